"""Data: the prepared format, the built-in datasets, users' manifests and the disk loader."""

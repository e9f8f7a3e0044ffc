"""Data: what the model trains and is judged on.

prepared  the prepared format (arrays on disk, a small index), its splits and the audit split
digits    decoy-digits: scikit-learn digits with a corner decoy that codes the label
lesions   decoy-lesions: procedural RGB lesions with an ISIC-style confounder
manifest  a user's images through a manifest CSV or a folder layout, checked row by row
build     the dataset params' `data` section names, built and written
prepare   the DVC stage `prepare`
images    rows read from disk on demand, batches and DataLoaders
"""

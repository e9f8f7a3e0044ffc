"""Errors a user acts on, importable without torch (the CLI catches them to print one line)."""


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key."""

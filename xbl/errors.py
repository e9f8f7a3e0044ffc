"""Errors a user acts on, importable without torch (the CLI catches them to print one line).

Each is permanent: running the same step again gives the same error, so no task retries it
(`tasks.is_transient`)."""


class XblError(Exception):
    """An error whose message tells the user what to fix; never retried."""


class ConfigError(XblError, ValueError):
    """A setting that cannot be used; the message names the key."""


class DataError(XblError, ValueError):
    """User data that cannot be read (an image, a manifest, a mask); the message names every
    bad row or file at once."""


class AnnotationError(XblError, ValueError):
    """A Label Studio annotation that cannot be read; the message names the task."""


class ProjectBusy(XblError, RuntimeError):
    """Another run holds this project's round lock; the message names the holder."""

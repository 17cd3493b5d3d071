"""Errors that reach the user as one line (the CLI prints ``str(err)`` and exits non-zero, no traceback)."""


class KDForgeError(Exception):
    """Base class: a problem with the user's input or environment, with a message that says how to fix it."""


class ConfigError(KDForgeError):
    """An unknown config key, a wrong type, a bad value or an incompatible combination."""


class DataError(KDForgeError):
    """A missing, corrupt or unreadable dataset."""


class CheckpointError(KDForgeError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class WriteError(KDForgeError, OSError):
    """A file could not be written (full disk, no permission); the previous version of the file is intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()  # the message alone, without OSError's "[Errno N]" prefix

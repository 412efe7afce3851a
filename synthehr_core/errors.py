"""Typed errors. Every message names the input, shows the value and says the fix."""


class SynthEHRError(ValueError):
    """Base class of all user-facing input errors."""


class ConfigError(SynthEHRError):
    """A dataset, KDE, model or pipeline configuration is invalid."""


class SchemaError(SynthEHRError):
    """A raw or canonical table lacks columns, has wrong types or breaks a key constraint."""


class DataError(SynthEHRError):
    """Raw data is present and well-formed but unusable (empty, inconsistent, undecodable)."""


def bullet_list(problems: list[str]) -> str:
    """Join collected problems into one message, one bullet per problem."""
    return "\n".join(f"  - {p}" for p in problems)


class StorageError(SynthEHRError):
    """A path or object-store location cannot be used: missing bucket, no credentials, permission denied, disk full."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A file, object, prefix or bucket does not exist."""


class OutputExistsError(StorageError, FileExistsError):
    """A stage output location already holds a finished output or files synthehr did not write."""


class OutputLockedError(StorageError):
    """Another synthehr run holds the advisory lock of this output location."""


class IncompleteOutputError(StorageError):
    """A stage input was written by a run that did not finish (no ``_SUCCESS`` marker, or files missing)."""

"""Typed errors. Every message names the input, shows the value and says the fix.

The error-exit contract of the ``synthehr`` command (``cli.py`` applies it, in one place):

* exit 2: a usage error: an option value or command line that is wrong (typer/click's own usage errors and
  :class:`UsageError`);
* exit 1: the input or the environment is wrong: a :class:`SynthEHRError` (config, schema, data), or a known
  library error that :func:`describe` recognises (``OSError`` such as ENOENT, EACCES, ENOSPC; ``EOFError`` of a
  truncated file; ``JSONDecodeError``; an object-store ``NotFound`` / missing credentials);
* each prints one line, ``error: <message>``, to stderr; ``--debug`` (or ``SYNTHEHR_DEBUG=1``) re-raises it with
  its traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import reprlib

SHOW_CHARS = 80     # longest value echoed in a message: a hostile 1 MB value must not become a 1 MB error
MESSAGE_CHARS = 2000  # longest message the CLI prints


class SynthEHRError(ValueError):
    """Base class of all user-facing input errors."""


class ConfigError(SynthEHRError):
    """A dataset, KDE, model or pipeline configuration is invalid."""


class SchemaError(SynthEHRError):
    """A raw or canonical table lacks columns, has wrong types or breaks a key constraint."""


class DataError(SynthEHRError):
    """Raw data is present and well-formed but unusable (empty, inconsistent, undecodable)."""


class UsageError(SynthEHRError):
    """An option or argument value is invalid (the CLI exits with status 2, like a usage error)."""


def bullet_list(problems: list[str]) -> str:
    """Join collected problems into one message, one bullet per problem."""
    return "\n".join(f"  - {p}" for p in problems)


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SHOW_CHARS
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def show(value: object, limit: int = SHOW_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, without building the whole repr of a huge value first."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(message: str) -> str:
    """A message as one line: a header and its bullets joined with '; ', cut to ``MESSAGE_CHARS``."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return ""
    head, rest = lines[0], [ln.removeprefix("- ").strip() for ln in lines[1:]]
    text = head if not rest else (head.rstrip(":") + ": " + "; ".join(r.rstrip(".") for r in rest) + ".")
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 3] + "..."


def _object_store(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("google.api_core", "google.auth", "google.cloud", "botocore", "boto3", "s3fs"))


def describe(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) of an expected error; None for anything else (a bug: keep its traceback)."""
    import json

    if isinstance(exc, UsageError):
        return 2, one_line(str(exc))
    if isinstance(exc, SynthEHRError):
        return 1, one_line(str(exc))
    if isinstance(exc, json.JSONDecodeError):
        return 1, one_line(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): a damaged file; "
                           "rerun the stage that wrote it (--debug shows which file was read).")
    if isinstance(exc, EOFError):
        return 1, one_line(f"input ended early ({exc or 'EOFError'}): a truncated or partly downloaded file; "
                           "copy it again.")
    if isinstance(exc, OSError):
        return 1, one_line(_os_message(exc))
    if _object_store(exc):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return 1, one_line(f"object store: {type(exc).__name__}: {first}. Check the bucket, the path and the "
                           "credentials (GOOGLE_APPLICATION_CREDENTIALS, AWS_* or the emulator host).")
    return None


def _os_message(exc: OSError) -> str:
    """An OSError as advice: the file it concerns, what went wrong, what to do."""
    name = exc.filename if exc.filename is not None else ""
    if exc.errno is None or not exc.strerror:       # raised with a message of our own (storage, adapters)
        return str(exc)
    fix = {errno.ENOSPC: "free some space or write the output elsewhere",
           errno.EDQUOT: "free some space or write the output elsewhere",
           errno.EACCES: "check the permissions, or choose another location",
           errno.EPERM: "check the permissions, or choose another location",
           errno.EROFS: "the file system is read-only: choose another location",
           errno.ENOENT: "check the path",
           errno.EISDIR: "pass a file, not a directory",
           errno.ENOTDIR: "a parent of this path is a file, not a directory"}.get(exc.errno, "")
    where = f"{name}: " if name else ""
    extra = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return f"{where}{exc.strerror}{extra}" + (f"; {fix}." if fix else ".")


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

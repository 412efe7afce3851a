"""Publishing stage outputs so that nothing is lost or mixed: locks, completion markers, atomic replacement.

The protocol (docs/storage.md):

1. ``check_output``: the location is writable, holds no finished output and no files synthehr did not write
   (unless ``overwrite``), and no live run holds its lock. Stages call it before reading inputs.
2. ``atomic_dir`` takes the advisory lock ``.<name>.lock`` beside the output (created exclusively: ``os.link``
   locally, ``if_generation_match=0`` on GCS, ``IfNoneMatch='*'`` on S3), removes temps left by dead runs, and
   hands the stage a staging directory (locally a hidden sibling ``.<name>.tmp-<pid>-<hex>``).
3. When the block succeeds it writes ``_SUCCESS`` (a manifest of file names, sizes and sha256) last into the
   staging directory, checks the target again, and publishes: locally one rename (an atomic exchange with the old
   output under ``overwrite``); on an object store an ``_IN_PROGRESS`` marker first, then the files, ``_SUCCESS``
   last, then the marker is removed.
4. ``require_complete``: readers refuse an output that carries ``_IN_PROGRESS`` without ``_SUCCESS`` or whose
   ``_SUCCESS`` lists files that are missing or truncated.

A retry on the same location replaces an incomplete synthehr output without ``overwrite``; files synthehr did not
write are never deleted without it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..errors import IncompleteOutputError, OutputExistsError, OutputLockedError, StorageError
from .backends import Backend, backend, scheme

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"          # written last: the output is complete (a manifest of its files)
IN_PROGRESS = "_IN_PROGRESS"  # object stores: written first, removed after _SUCCESS
HEARTBEAT_S = 10.0            # a lock holder refreshes its lock this often


def stale_after_s() -> float:
    """A lock whose holder has not refreshed it for this long is stale (a run on another host that died)."""
    return float(os.environ.get("SYNTHEHR_LOCK_STALE_S", "60"))


# ------------------------------------------------------------------------------------------------ paths
def _norm(out) -> str:
    return str(out).rstrip("/") if scheme(out) else str(Path(out))


def _parent_name(out: str) -> tuple[str, str]:
    if scheme(out):
        parent, _, name = out.rpartition("/")
        return parent, name
    p = Path(out)
    return str(p.parent), p.name


def _sibling(out: str, name: str) -> str:
    parent, _ = _parent_name(out)
    return f"{parent}/{name}" if scheme(out) else str(Path(parent, name))


def _child(out: str, name: str) -> str:
    return f"{out}/{name}" if scheme(out) else str(Path(out, name))


def lock_path(out) -> str:
    """Where the advisory lock of output ``out`` lives: ``.<name>.lock`` beside it."""
    out = _norm(out)
    return _sibling(out, f".{_parent_name(out)[1]}.lock")


# ------------------------------------------------------------------------------------------------ state
def _state(b: Backend, out: str) -> str:
    """``absent`` (nothing, or an empty directory), ``complete``, ``incomplete`` or ``foreign``."""
    if not b.is_dir(out):
        return "foreign" if b.exists(out) else "absent"
    if b.exists(_child(out, SUCCESS)):
        return "complete"
    if b.exists(_child(out, IN_PROGRESS)):
        return "incomplete"
    return "foreign"


def _exists_message(out: str, state: str, b: Backend, during: bool = False) -> str:
    what = {"complete": "a finished synthehr output", "foreign": "files synthehr did not write"}[state]
    names = b.list(out)[:3] if b.is_dir(out) else []
    shown = f" ({', '.join(names)}{', ...' if len(names) == 3 else ''})" if names else ""
    if during:
        return (f"{out}: {what}{shown} appeared there while this run was writing: they were kept and this run's "
                "output was discarded; choose a new output location or pass overwrite (--overwrite).")
    return (f"{out} already exists and is not empty: it holds {what}{shown}; choose a new output location or "
            "pass overwrite (--overwrite) to replace it.")


# ------------------------------------------------------------------------------------------------ locks
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Lock:
    """An advisory lock object/file beside an output, refreshed by a heartbeat thread while held."""

    def __init__(self, b: Backend, out: str):
        self.b, self.out, self.path = b, out, lock_path(out)
        self.token = uuid.uuid4().hex
        self.since = _now_iso()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _bytes(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": self.since, "heartbeat": time.time(),
                "token": self.token, "output": self.out}
        return (json.dumps(info, sort_keys=True) + "\n").encode()

    def read(self) -> dict | None:
        try:
            raw = self.b.read(self.path)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
            return info if isinstance(info, dict) else {}
        except ValueError:
            return {}

    @staticmethod
    def stale(info: dict) -> bool:
        if not {"pid", "host", "heartbeat"} <= set(info):
            return True                                   # not a synthehr lock (never written half: see acquire)
        if info["host"] == socket.gethostname():
            return not _pid_alive(int(info["pid"]))
        return time.time() - float(info["heartbeat"]) > stale_after_s()

    def message(self, info: dict) -> str:
        return (f"{self.out}: another synthehr run is writing here (lock {self.path} held by pid {info.get('pid')} "
                f"on {info.get('host')} since {info.get('since')}); wait for it, or delete the lock if that run "
                "is dead.")

    def holder(self) -> dict | None:
        """The live holder's lock info, or None when the lock is free or stale."""
        info = self.read()
        return None if info is None or self.stale(info) else info

    def acquire(self) -> None:
        for _ in range(3):
            if self.b.create_if_absent(self.path, self._bytes()):
                self._thread = threading.Thread(target=self._beat, name=f"synthehr-lock {self.out}", daemon=True)
                self._thread.start()
                return
            info = self.read()
            if info is None:
                continue                                  # released between our two calls: try again
            if not self.stale(info):
                raise OutputLockedError(self.message(info))
            if self.read() != info:
                continue                                  # someone refreshed or took it meanwhile: look again
            log.warning("%s: removing the stale lock %s (pid %s on %s since %s is gone)", self.out, self.path,
                        info.get("pid"), info.get("host"), info.get("since"))
            self.b.delete(self.path)
        raise OutputLockedError(self.message(self.read() or {}))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                info = self.read()
                if info is None or info.get("token") != self.token:
                    log.warning("%s: lost the lock %s (now %s)", self.out, self.path, info)
                    return                                # never overwrite another run's lock
                self.b.write(self.path, self._bytes())
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat must not kill the stage
                log.warning("%s: could not refresh the lock %s: %s", self.out, self.path, exc)

    def verify(self) -> None:
        """Raise unless this run still holds the lock (checked just before publishing)."""
        info = self.read()
        if info is None or info.get("token") != self.token:
            raise OutputLockedError(f"{self.out}: this run lost its lock {self.path} while it ran (stalled longer "
                                    f"than {stale_after_s():g} s?; now {self._who(info)}): nothing was published; "
                                    "rerun it.")

    @staticmethod
    def _who(info: dict | None) -> str:
        if not info:
            return "no lock"
        return f"held by pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info = self.read()
        if info is not None and info.get("token") == self.token:
            self.b.delete(self.path)
        elif info is not None:
            log.warning("%s: the lock %s was taken over by pid %s on %s; left it", self.out, self.path,
                        info.get("pid"), info.get("host"))


_HELD: dict[str, _Lock] = {}   # locks this process holds, by lock path: atomic_dir inside output_lock reuses them


@contextlib.contextmanager
def output_lock(out) -> Iterator[None]:
    """Hold the advisory lock of ``out`` for a block (for a stage that also writes beside its final publish, e.g.
    checkpoints while training); ``atomic_dir(out)`` and ``check_output(out)`` inside the block reuse it."""
    out = _norm(out)
    path = lock_path(out)
    if path in _HELD:
        yield
        return
    b = backend(out)
    b.check_writable(out)
    if not scheme(out):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    lock = _Lock(b, out)
    lock.acquire()
    _HELD[path] = lock
    try:
        yield
    finally:
        del _HELD[path]
        lock.release()


# ------------------------------------------------------------------------------------------------ markers
def write_manifest(local_dir: str | os.PathLike) -> None:
    """Write ``_SUCCESS`` into a finished local directory: every other file's size and sha256, no timestamps,
    so the same output has the same bytes."""
    root = Path(local_dir)
    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and rel not in (SUCCESS, IN_PROGRESS):
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            files[rel] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    text = json.dumps({"synthehr_output": 1, "files": files}, indent=1, sort_keys=True) + "\n"
    Path(root, SUCCESS).write_text(text, encoding="utf-8")


def require_complete(path, what: str) -> None:
    """Refuse a stage input written by a run that did not finish. ``path`` is an output folder or a file in one.

    Raises ``IncompleteOutputError`` when the folder carries ``_IN_PROGRESS`` but no ``_SUCCESS``, or when a file
    ``_SUCCESS`` lists is missing (object uploads and local renames are atomic, so a file is whole or absent). A folder with neither marker (written by hand, or before
    markers existed) and a missing path pass: the reader's own checks speak for them.
    """
    p = _norm(path)
    b = backend(p)
    if not b.is_dir(p):                 # a file of an output (present or not): check its folder
        p = _parent_name(p)[0]
        if not b.is_dir(p):
            return
    if not b.exists(_child(p, SUCCESS)):
        if b.exists(_child(p, IN_PROGRESS)):
            raise IncompleteOutputError(
                f"{p}: incomplete output, written by a run that did not finish (no {SUCCESS}): rerun the {what} "
                "stage (to the same location: no overwrite needed).")
        return
    try:
        listed = json.loads(b.read(_child(p, SUCCESS)))["files"]
        listed = {str(k): int(v["bytes"]) for k, v in listed.items()}   # checks the format
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IncompleteOutputError(f"{_child(p, SUCCESS)}: not a synthehr completion marker (a JSON manifest of "
                                    f"files): rerun the {what} stage with overwrite.") from None
    present = set(b.list(p))        # presence, not sizes: a file edited by hand afterwards is the user's call
    bad = sorted(f for f in listed if f not in present)
    if bad:
        raise IncompleteOutputError(
            f"{p}: incomplete output: {len(bad)} of the files its {SUCCESS} lists are missing "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): rerun the {what} stage with overwrite.")


# ------------------------------------------------------------------------------------------------ checks
def _check_state(b: Backend, out: str, overwrite: bool) -> None:
    state = _state(b, out)
    if state in ("complete", "foreign") and not overwrite:
        raise OutputExistsError(_exists_message(out, state, b))


def check_output(out, overwrite: bool = False) -> None:
    """The checks ``atomic_dir`` does on entry, for a stage to run before it reads its inputs: ``out`` is a
    writable location, holds no finished output or foreign files (unless ``overwrite``; an incomplete synthehr
    output is fine), and no live synthehr run holds its lock."""
    out = _norm(out)
    b = backend(out)
    b.check_writable(out)
    _check_state(b, out, overwrite)
    lock = _Lock(b, out)
    held = lock.holder()
    if held is not None and (lock.path not in _HELD or held.get("token") != _HELD[lock.path].token):
        raise OutputLockedError(lock.message(held))


def _temp_pid(name: str, prefix: str) -> int | None:
    first = name[len(prefix):].split("-", 1)
    return int(first[0]) if len(first) == 2 and first[0].isdigit() else None


def _clean_stale(out: Path) -> bool:
    """Remove staging folders of dead runs beside ``out`` (we hold its lock); put back an old output that a run
    killed between its two renames left aside (True if it did)."""
    restored = False
    for kind in ("old", "tmp", "lock.new", "lock.tmp"):    # old/tmp: folders; lock.*: a lock's own temp files
        prefix = f".{out.name}.{kind}-"
        for p in sorted(out.parent.glob(prefix + "*")):
            pid = _temp_pid(p.name, prefix)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                log.warning("%s: left %s alone (its run may still be alive)", out, p)
                continue
            if kind == "old" and not out.exists():
                os.rename(p, out)
                restored = True
                log.warning("%s: restored the previous output from %s (left aside by pid %s, now dead)", out, p, pid)
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                log.warning("%s: removed %s, left by pid %s that died before publishing", out, p, pid)
    return restored


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish_local(tmp: Path, out: Path, overwrite: bool) -> None:
    b = backend(str(out))
    state = _state(b, str(out))                  # again: files may have appeared while the stage ran
    if state in ("complete", "foreign") and not overwrite:
        raise OutputExistsError(_exists_message(str(out), state, b, during=True))
    if state == "absent":
        try:
            os.rename(tmp, out)                  # replaces an empty directory, fails on a non-empty one
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputExistsError(_exists_message(str(out), _state(b, str(out)), b, during=True)) from None
    if _exchange(tmp, out):                      # tmp now holds the old output
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)                          # a crash here leaves both versions; the next run restores old
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _publish_remote(b: Backend, tmp: Path, out: str, overwrite: bool) -> None:
    state = _state(b, out)
    if state in ("complete", "foreign") and not overwrite:
        raise OutputExistsError(_exists_message(out, state, b, during=True))
    files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
    files = [f for f in files if f != SUCCESS]
    files.sort(key=lambda f: f == "meta.json")
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso()}
    b.write(_child(out, IN_PROGRESS), (json.dumps(marker, sort_keys=True) + "\n").encode())
    if state != "absent":
        b.delete(_child(out, SUCCESS))           # from here on readers refuse the old output
        for rel in b.list(out):
            if rel not in (IN_PROGRESS, *files):
                b.delete(_child(out, rel))
    for rel in files:
        b.upload_file(tmp / rel, _child(out, rel))
    b.upload_file(tmp / SUCCESS, _child(out, SUCCESS))
    b.delete(_child(out, IN_PROGRESS))


def _disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__
    return False


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Assemble a directory output in a staging place; publish it only if the block succeeds (see the module doc).

    An existing output is replaced only with ``overwrite`` (checked on entry and again at publish time), or when
    it is an incomplete synthehr output (a retry). Raises ``OutputExistsError``, ``OutputLockedError`` or a
    ``StorageError`` naming ``out_dir``; on any failure nothing is published and the staging folder is removed.
    """
    out = _norm(out_dir)
    b = backend(out)
    check_output(out, overwrite)
    remote = bool(scheme(out))
    with output_lock(out):
        lock = _HELD[lock_path(out)]
        if remote:
            tmp = Path(tempfile.mkdtemp(prefix="synthehr-out-"))
        else:
            if _clean_stale(Path(out)):
                _check_state(b, out, overwrite)
            tmp = Path(out).with_name(f".{Path(out).name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
        try:
            yield tmp
            write_manifest(tmp)
            lock.verify()
            if remote:
                _publish_remote(b, tmp, out, overwrite)
            else:
                _publish_local(tmp, Path(out), overwrite)
        except (OSError, StorageError) as exc:
            if _disk_full(exc):
                raise StorageError(f"{out}: no space left on the device while writing the output: free space or "
                                   "choose another output location (nothing was published; the partial files "
                                   "were removed).") from exc
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

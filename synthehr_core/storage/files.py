"""Reading and writing single files and listing folders, local or in an object store, through one backend."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError, StorageNotFoundError
from .backends import backend, scheme, split_uri

GS = "gs://"


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GS)


def is_remote(path: str | os.PathLike) -> bool:
    """True for an object-store URI (gs:// or s3://), False for a local path."""
    return bool(scheme(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts; works for local paths and gs:// / s3:// URIs alike."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


# ---------------------------------------------------------------------------------------------- reading
def exists(path: str | os.PathLike) -> bool:
    """A file, a directory, an object, or a prefix holding at least one object."""
    if not is_remote(path):
        return Path(path).exists()
    b, uri = backend(path), str(path).rstrip("/")
    return b.exists(uri) or b.is_dir(uri)


def read_bytes(path: str | os.PathLike) -> bytes:
    return backend(path).read(str(path))


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    data = read_bytes(path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UnicodeDecodeError(exc.encoding, exc.object, exc.start, exc.end,
                                 f"{path}: byte {exc.start} is not valid {encoding}") from exc


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a damaged one is a DataError naming it (every stage's meta.json, rules.json, ...)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): a damaged, "
                        "half-copied or hand-edited file. Re-run the stage that wrote it.") from exc


def read_parquet(path: str | os.PathLike) -> pa.Table:
    if is_remote(path):
        return pq.read_table(io.BytesIO(read_bytes(path)))
    if not Path(path).exists():
        raise StorageNotFoundError(f"{path}: no such parquet file. Did the upstream stage finish?")
    return pq.read_table(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly inside a directory or prefix, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    return sorted({rel.split("/", 1)[0] for rel in backend(path).list(str(path))})


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a local path for ``path``: itself if local, else a temporary download of the file or prefix."""
    if not is_remote(path):
        yield Path(path)
        return
    b, uri = backend(path), str(path).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="synthehr-dl-") as tmp:
        _, key = split_uri(uri)
        name = Path(key).name or "root"
        if key and b.exists(uri):
            b.download(uri, Path(tmp, name))
            yield Path(tmp, name)
            return
        rels = b.list(uri)
        if not rels:
            raise StorageNotFoundError(f"{path}: no such object or prefix.")
        for rel in rels:
            dest = Path(tmp, name, rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            b.download(join(uri, rel), dest)
        yield Path(tmp, name)


# ---------------------------------------------------------------------------------------------- writing
def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically: locally a temp name in the same directory, then a rename; an object-store object
    appears only once fully uploaded."""
    backend(path).write(str(path), data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """Serialise deterministically: same table -> same bytes (no timestamps in the file metadata)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=True, write_statistics=True)
    return buf.getvalue()


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    write_bytes(path, table_to_parquet_bytes(table))

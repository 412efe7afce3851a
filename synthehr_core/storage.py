"""One door for reading and writing files, local or on Google Cloud Storage.

Every path in synthehr may be a local path or a ``gs://bucket/key`` URI. Writes never leave a half-written
output: a single file is written under a temporary name and renamed (GCS object uploads are atomic by
themselves), and a directory is assembled in a temporary sibling and renamed into place (or uploaded file by
file once it is complete). Tests run this module against a real GCS API emulator through
``STORAGE_EMULATOR_HOST``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

GS = "gs://"


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GS)


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts; works for local paths and gs:// URIs alike."""
    if is_gcs(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def _split_gcs(uri: str) -> tuple[str, str]:
    rest = uri[len(GS):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} is not a valid GCS URI: expected gs://BUCKET/PATH.")
    return bucket, key


def _client():
    from google.cloud import storage  # imported lazily: local-only users never touch GCS

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def _blob(uri: str):
    bucket, key = _split_gcs(uri)
    return _client().bucket(bucket).blob(key)


# ---------------------------------------------------------------------------------------------- reading
def exists(path: str | os.PathLike) -> bool:
    if is_gcs(path):
        uri = str(path).rstrip("/")
        if _blob(uri).exists():
            return True
        bucket, key = _split_gcs(uri)
        return any(True for _ in _client().list_blobs(bucket, prefix=key + "/", max_results=1))
    return Path(path).exists()


def read_bytes(path: str | os.PathLike) -> bytes:
    if is_gcs(path):
        blob = _blob(str(path))
        if not blob.exists():
            raise FileNotFoundError(f"{path}: no such object in Cloud Storage. Check the bucket and path in your config.")
        return blob.download_as_bytes()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file. Check the path in your config (paths are relative to the "
                                "current directory unless absolute).")
    return p.read_bytes()


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    data = read_bytes(path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UnicodeDecodeError(exc.encoding, exc.object, exc.start, exc.end,
                                 f"{path}: byte {exc.start} is not valid {encoding}") from exc


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_text(path))


def read_parquet(path: str | os.PathLike) -> pa.Table:
    if is_gcs(path):
        return pq.read_table(io.BytesIO(read_bytes(path)))
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such parquet file. Did the upstream stage finish?")
    return pq.read_table(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly inside a directory or GCS prefix, sorted."""
    if is_gcs(path):
        bucket, key = _split_gcs(str(path).rstrip("/"))
        prefix = key + "/" if key else ""
        names = {b.name[len(prefix):].split("/", 1)[0] for b in _client().list_blobs(bucket, prefix=prefix)}
        return sorted(n for n in names if n)
    return sorted(os.listdir(path))


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a local path for ``path``: itself if local, else a temporary download of the file or prefix."""
    if not is_gcs(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="synthehr-gcs-") as tmp:
        uri = str(path).rstrip("/")
        bucket, key = _split_gcs(uri)
        blob = _client().bucket(bucket).blob(key)
        if key and blob.exists():
            target = Path(tmp, Path(key).name)
            blob.download_to_filename(str(target))
            yield target
            return
        root = Path(tmp, Path(key).name or "root")
        found = False
        for b in _client().list_blobs(bucket, prefix=key + "/"):
            rel = b.name[len(key) + 1:]
            if not rel or rel.endswith("/"):
                continue
            found = True
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            b.download_to_filename(str(dest))
        if not found:
            raise FileNotFoundError(f"{path}: no such object or prefix in Cloud Storage.")
        yield root


# ---------------------------------------------------------------------------------------------- writing
def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically: a temp name in the same directory, then an atomic rename."""
    if is_gcs(path):
        _blob(str(path)).upload_from_string(data)  # a GCS object appears only once fully uploaded
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


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


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Assemble a directory output in a temporary place and publish it only if the block succeeds.

    Local: a hidden sibling directory renamed onto ``out_dir``. GCS: a local temp dir uploaded file by file
    after the block (so readers never see a partial set of files before ``meta.json``, which goes last).
    An existing non-empty ``out_dir`` is an error unless ``overwrite`` is true.
    """
    if is_gcs(out_dir):
        if not overwrite and exists(out_dir):
            raise FileExistsError(f"{out_dir} already exists: choose a new output path or pass overwrite=True.")
        with tempfile.TemporaryDirectory(prefix="synthehr-out-") as tmp:
            yield Path(tmp)
            files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name == "meta.json")  # the commit marker goes last
            for f in files:
                _blob(join(str(out_dir), str(f.relative_to(tmp)))).upload_from_filename(str(f))
        return
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: choose an empty output directory or pass overwrite=True.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

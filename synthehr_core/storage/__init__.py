"""One door for reading and writing files: local paths, ``gs://bucket/key`` and ``s3://bucket/key`` alike.

``files`` reads and writes single files (a write is atomic: readers see the old bytes or the new); ``publish``
publishes whole stage outputs (``atomic_dir``: a lock per output, a ``_SUCCESS`` marker written last, replacement
only with ``overwrite``) and lets readers refuse unfinished ones (``require_complete``); ``backends`` is the one
transport under both. The protocol, markers, locks and credentials: docs/storage.md.
"""
from .files import (GS, exists, is_gcs, is_remote, join, listdir, local_copy, read_bytes, read_json,
                    read_parquet, read_text, table_to_parquet_bytes, write_bytes, write_json, write_parquet,
                    write_text)
from .publish import (IN_PROGRESS, SUCCESS, atomic_dir, check_output, lock_path, output_lock, require_complete,
                      write_manifest)

__all__ = ["GS", "IN_PROGRESS", "SUCCESS", "atomic_dir", "check_output", "exists", "is_gcs", "is_remote", "join",
           "listdir", "local_copy", "lock_path", "output_lock", "read_bytes", "read_json", "read_parquet", "read_text",
           "require_complete", "table_to_parquet_bytes", "write_bytes", "write_json", "write_manifest",
           "write_parquet", "write_text"]

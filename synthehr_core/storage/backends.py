"""The transport: one small interface over local paths, ``gs://`` (Google Cloud Storage) and ``s3://`` (AWS S3,
MinIO or any S3 API at ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).

Every method takes a full path or URI; ``backend(path)`` picks the implementation by its scheme, so no caller
branches on the protocol. Clients authenticate the way each cloud's own tools do:

* gs://: Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default
  login``, or the pod's workload identity); ``STORAGE_EMULATOR_HOST`` points at an emulator (anonymous).
* s3://: boto3's chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, shared config
  files, IRSA's ``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``, instance roles); an endpoint URL (MinIO, an
  emulator) switches to path-style addressing.

Object-store failures come back as one-line ``StorageError``s naming the URI (missing bucket, missing object, no
credentials, permission denied, unreachable endpoint), never as a raw 404.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from ..errors import StorageError, StorageNotFoundError

SCHEMES = ("gs://", "s3://")


def scheme(path: str | os.PathLike) -> str:
    """``"gs://"``, ``"s3://"`` or ``""`` (a local path)."""
    s = str(path)
    return next((p for p in SCHEMES if s.startswith(p)), "")


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")`` (trailing slashes dropped)."""
    rest = uri[len(scheme(uri)):].rstrip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} is not a valid object-store URI: expected {scheme(uri)}BUCKET/PATH.")
    return bucket, key


class Backend:
    """What storage needs from a place that holds files. Paths are full paths or URIs."""

    def exists(self, path: str) -> bool: ...              # a file / object
    def is_dir(self, path: str) -> bool: ...              # a directory / a prefix with at least one object
    def read(self, path: str) -> bytes: ...
    def write(self, path: str, data: bytes) -> None: ...  # atomic: readers see the old bytes or the new
    def list(self, path: str) -> list[str]: ...           # every file below ``path``, relative, sorted
    def sizes(self, path: str) -> dict[str, int]: ...     # the same, with sizes in bytes
    def delete(self, path: str) -> None: ...              # a file; absent is fine
    def upload_file(self, local: Path, path: str) -> None: ...
    def download(self, path: str, local: Path) -> None: ...
    def create_if_absent(self, path: str, data: bytes) -> bool: ...  # False if it exists (the lock primitive)
    def check_writable(self, path: str) -> None: ...      # raise a StorageError if an output cannot go here


def _disk_error(path, exc: OSError, doing: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{path}: no space left on the device while {doing}: free space or choose another "
                            "output location (nothing was published).")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{path}: permission denied while {doing} ({exc.strerror}): choose a writable location.")
    return StorageError(f"{path}: {exc.strerror or exc} while {doing}.")


class Local(Backend):
    def exists(self, path):
        return Path(path).is_file()

    def is_dir(self, path):
        p = Path(path)
        return p.is_dir() and any(p.iterdir())

    def read(self, path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise StorageNotFoundError(f"{path}: no such file. Check the path (paths are relative to the current "
                                       "directory unless absolute).") from None
        except IsADirectoryError:
            raise StorageError(f"{path}: is a directory, expected a file.") from None

    def write(self, path, data):
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, p)
        except OSError as exc:
            raise _disk_error(p, exc, f"writing {len(data)} bytes") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def sizes(self, path):
        root = Path(path)
        return {str(f.relative_to(root)): f.stat().st_size for f in sorted(root.rglob("*")) if f.is_file()}

    def list(self, path):
        return sorted(self.sizes(path))

    def delete(self, path):
        Path(path).unlink(missing_ok=True)

    def upload_file(self, local, path):
        self.write(path, Path(local).read_bytes())

    def download(self, path, local):
        shutil.copyfile(path, local)

    def create_if_absent(self, path, data):
        p = Path(path)
        tmp = p.with_name(f".{p.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, p)          # atomic and exclusive, and the lock is never seen empty
            return True
        except FileExistsError:
            return False
        except OSError as exc:       # no hard links here (FUSE mounts of buckets): an O_EXCL create instead
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV):
                raise
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def check_writable(self, path):
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise StorageError(f"{p}: is a file, not a directory: choose a directory as the output location.")
        anc = p
        while not anc.exists():
            anc = anc.parent
        if not anc.is_dir():
            raise StorageError(f"{p}: {anc} is a file, so no directory can be made there: choose another location.")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise StorageError(f"{p}: {anc} is not writable by this user: choose a writable output location.")


class ObjectStore(Backend):
    """Shared logic of gs:// and s3://; subclasses implement the seven primitive calls on (bucket, key)."""

    name = ""

    # -- primitives, (bucket, key) based; raise the client's own exceptions, translated by _errors
    def _get(self, bucket, key) -> bytes: ...
    def _put(self, bucket, key, data: bytes, if_absent: bool = False) -> bool: ...
    def _head(self, bucket, key) -> bool: ...
    def _iter(self, bucket, prefix, limit: int | None = None) -> Iterator[tuple[str, int]]: ...
    def _delete(self, bucket, key) -> None: ...
    def _upload(self, bucket, key, local: Path) -> None: ...
    def _download(self, bucket, key, local: Path) -> None: ...
    def _bucket_exists(self, bucket) -> bool: ...
    def _translate(self, exc: Exception, uri: str, doing: str) -> StorageError | None: ...

    @contextlib.contextmanager
    def _errors(self, uri: str, doing: str):
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every client error becomes one line naming the URI
            err = self._translate(exc, uri, doing)
            if err is None:
                raise
            raise err from exc

    def _missing(self, uri: str, what: str = "object") -> StorageNotFoundError:
        bucket, _ = split_uri(uri)
        try:
            has_bucket = self._bucket_exists(bucket)
        except Exception:  # noqa: BLE001 - the original not-found is the error to report
            has_bucket = True
        if not has_bucket:
            return StorageNotFoundError(f"{uri}: bucket {bucket!r} does not exist in {self.name} (or these "
                                        "credentials cannot see it): create it or fix the URI.")
        return StorageNotFoundError(f"{uri}: no such {what} in {self.name}. Check the bucket and path in your "
                                    "config; did the upstream stage finish?")

    def exists(self, path):
        bucket, key = split_uri(path)
        with self._errors(path, "checking it"):
            return bool(key) and self._head(bucket, key)

    def is_dir(self, path):
        bucket, key = split_uri(path)
        with self._errors(path, "listing it"):
            return any(True for _ in self._iter(bucket, key + "/" if key else "", limit=1))

    def read(self, path):
        bucket, key = split_uri(path)
        with self._errors(path, "reading it"):
            if not key or not self._head(bucket, key):
                raise self._missing(path)
            return self._get(bucket, key)

    def write(self, path, data):
        bucket, key = split_uri(path)
        with self._errors(path, "writing it"):
            self._put(bucket, key, data)            # an object appears only once fully uploaded

    def sizes(self, path):
        bucket, key = split_uri(path)
        prefix = key + "/" if key else ""
        with self._errors(path, "listing it"):
            return {k[len(prefix):]: n for k, n in self._iter(bucket, prefix) if k[len(prefix):] and not k.endswith("/")}

    def list(self, path):
        return sorted(self.sizes(path))

    def delete(self, path):
        bucket, key = split_uri(path)
        with self._errors(path, "deleting it"):
            self._delete(bucket, key)

    def upload_file(self, local, path):
        bucket, key = split_uri(path)
        with self._errors(path, "uploading it"):
            self._upload(bucket, key, Path(local))

    def download(self, path, local):
        bucket, key = split_uri(path)
        with self._errors(path, "downloading it"):
            self._download(bucket, key, Path(local))

    def create_if_absent(self, path, data):
        bucket, key = split_uri(path)
        with self._errors(path, "creating it"):
            return self._put(bucket, key, data, if_absent=True)

    def check_writable(self, path):
        bucket, key = split_uri(path)
        if not key:
            raise StorageError(f"{path}: an output needs a prefix inside the bucket, e.g. {path.rstrip('/')}/out.")
        with self._errors(path, "checking its bucket"):
            if not self._bucket_exists(bucket):
                raise StorageNotFoundError(f"{path}: bucket {bucket!r} does not exist in {self.name} (or these "
                                           "credentials cannot see it): create it or fix the URI.")


# ------------------------------------------------------------------------------------------ Google Cloud Storage
class GCS(ObjectStore):
    name = "Cloud Storage"

    def __init__(self, uri: str):
        from google.cloud import storage  # imported lazily: local-only users never touch the clouds

        with self._errors(uri, "connecting"):
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                self.client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                                             credentials=AnonymousCredentials())
            else:
                self.client = storage.Client()

    def _blob(self, bucket, key):
        return self.client.bucket(bucket).blob(key)

    def _get(self, bucket, key):
        return self._blob(bucket, key).download_as_bytes()

    def _put(self, bucket, key, data, if_absent=False):
        from google.api_core.exceptions import PreconditionFailed

        blob = self._blob(bucket, key)
        if if_absent and blob.exists():   # the emulator ignores the precondition; real GCS enforces it below
            return False
        try:
            blob.upload_from_string(data, if_generation_match=0 if if_absent else None)
            return True
        except PreconditionFailed:
            return False

    def _head(self, bucket, key):
        return self._blob(bucket, key).exists()

    def _iter(self, bucket, prefix, limit=None):
        for b in self.client.list_blobs(bucket, prefix=prefix, max_results=limit):
            yield b.name, int(b.size or 0)

    def _delete(self, bucket, key):
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self._blob(bucket, key).delete()

    def _upload(self, bucket, key, local):
        self._blob(bucket, key).upload_from_filename(str(local))

    def _download(self, bucket, key, local):
        self._blob(bucket, key).download_to_filename(str(local))

    def _bucket_exists(self, bucket):
        return self.client.bucket(bucket).exists()

    def _translate(self, exc, uri, doing):
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc

        if isinstance(exc, aexc.DefaultCredentialsError):
            return StorageError(f"{uri}: no Google Cloud credentials: run `gcloud auth application-default login`, "
                                "set GOOGLE_APPLICATION_CREDENTIALS, or give the pod a workload identity.")
        if isinstance(exc, (gexc.Forbidden, gexc.Unauthorized)):
            return StorageError(f"{uri}: permission denied while {doing}: grant these credentials (the pod's "
                                "service account) storage access on the bucket.")
        if isinstance(exc, gexc.NotFound):
            return self._missing(uri)
        if isinstance(exc, gexc.GoogleAPIError):
            return StorageError(f"{uri}: Cloud Storage error while {doing}: {str(exc).splitlines()[0][:200]}")
        return None


# ------------------------------------------------------------------------------------------------ S3 and MinIO
def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3(ObjectStore):
    name = "S3"

    def __init__(self, uri: str):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StorageError(f"{uri}: s3:// needs boto3, which is not installed here: pip install "
                               "'boto3==1.44.8' (a main dependency of synthehr).") from None

        endpoint = s3_endpoint()
        self.endpoint = endpoint
        with self._errors(uri, "connecting"):
            self.client = boto3.session.Session().client(   # its own session: credentials of now, not cached
                "s3", endpoint_url=endpoint,
                config=Config(s3={"addressing_style": "path"} if endpoint else {}, retries={"max_attempts": 3}))

    def _get(self, bucket, key):
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def _put(self, bucket, key, data, if_absent=False):
        if not if_absent:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return True
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")  # conditional write
            return True
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def _head(self, bucket, key):
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _iter(self, bucket, prefix, limit=None):
        kw = {"PaginationConfig": {"MaxItems": limit}} if limit else {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **kw):
            for o in page.get("Contents", []):
                yield o["Key"], int(o["Size"])

    def _delete(self, bucket, key):
        self.client.delete_object(Bucket=bucket, Key=key)   # S3 deletes of absent keys succeed

    def _upload(self, bucket, key, local):
        self.client.upload_file(str(local), bucket, key)

    def _download(self, bucket, key, local):
        self.client.download_file(bucket, key, str(local))

    def _bucket_exists(self, bucket):
        try:
            self.client.head_bucket(Bucket=bucket)
            return True
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    def _translate(self, exc, uri, doing):
        from botocore import exceptions as bexc

        if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError)):
            return StorageError(f"{uri}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                                "AWS_PROFILE), or give the pod an IAM role (IRSA).")
        if isinstance(exc, bexc.EndpointConnectionError):
            return StorageError(f"{uri}: cannot reach the S3 endpoint {self.endpoint or '(AWS default)'} while "
                                f"{doing}: check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the network.")
        if isinstance(exc, bexc.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket",):
                return StorageNotFoundError(f"{uri}: bucket {split_uri(uri)[0]!r} does not exist in S3: create it "
                                            "or fix the URI.")
            if code in ("404", "NoSuchKey", "NotFound"):
                return self._missing(uri)
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                return StorageError(f"{uri}: permission denied while {doing} ({code}): check the AWS credentials "
                                    "and the bucket policy for these keys / this role.")
            return StorageError(f"{uri}: S3 error {code} while {doing}: {str(exc)[:200]}")
        if isinstance(exc, bexc.BotoCoreError):
            return StorageError(f"{uri}: S3 client error while {doing}: {str(exc)[:200]}")
        return None


_CLIENTS: dict[tuple, Backend] = {}
_LOCAL = Local()


def backend(path: str | os.PathLike) -> Backend:
    """The backend for ``path``; object-store clients are made once per scheme and per emulator/endpoint."""
    s = scheme(path)
    if not s:
        return _LOCAL
    if s == "gs://":
        key = (s, os.environ.get("STORAGE_EMULATOR_HOST"), os.environ.get("GOOGLE_CLOUD_PROJECT"))
        make = GCS
    else:
        key = (s, s3_endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
        make = S3
    if key not in _CLIENTS:
        _CLIENTS[key] = make(str(path))
    return _CLIENTS[key]

"""synthehr_core.storage on local paths and against real object-store emulators (gcp-storage-emulator for gs://,
moto's S3 server for s3:// / MinIO): the same reads, writes, publish protocol, markers and locks on all three."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from synthehr_core import storage
from synthehr_core.data.preprocess import preprocess
from synthehr_core.data.schema import read_tables
from synthehr_core.storage.backends import backend
from synthehr_core.errors import (IncompleteOutputError, OutputExistsError, OutputLockedError, StorageError,
                                  SynthEHRError)


@pytest.fixture(params=["local", "gs", "s3"])
def where(request, tmp_path):
    """A fresh folder (local) or prefix (in an emulated bucket) to write into."""
    if request.param == "local":
        return str(tmp_path / "w")
    base = request.getfixturevalue({"gs": "gcs", "s3": "s3"}[request.param])
    return f"{base}/{uuid.uuid4().hex[:8]}"


def _publish(out, files: dict[str, bytes], overwrite=False):
    with storage.atomic_dir(out, overwrite=overwrite) as tmp:
        for name, data in files.items():
            Path(tmp, name).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, name).write_bytes(data)


class TestReadWrite:
    def test_bytes_json_parquet_roundtrip(self, where):
        storage.write_bytes(storage.join(where, "a/b.bin"), b"\x00\x01abc")
        assert storage.read_bytes(storage.join(where, "a/b.bin")) == b"\x00\x01abc"
        storage.write_json(storage.join(where, "a/c.json"), {"x": 1, "codes": ["dx:03819"]})
        assert storage.read_json(storage.join(where, "a/c.json")) == {"x": 1, "codes": ["dx:03819"]}
        t = pa.table({"code": ["dx:03819", "px:3893"]})
        storage.write_parquet(storage.join(where, "a/t.parquet"), t)
        assert storage.read_parquet(storage.join(where, "a/t.parquet")).equals(t)
        assert storage.listdir(storage.join(where, "a")) == ["b.bin", "c.json", "t.parquet"]
        assert storage.exists(storage.join(where, "a")) and not storage.exists(storage.join(where, "nope"))

    def test_missing_file_error_names_path(self, where):
        path = storage.join(where, "missing.csv")
        with pytest.raises(FileNotFoundError, match=rf"{path}: no such") as e:
            storage.read_bytes(path)
        assert isinstance(e.value, SynthEHRError) and "\n" not in str(e.value)

    def test_local_copy_of_a_folder(self, where):
        _publish(where, {"a.txt": b"A", "sub/b.txt": b"B"})
        with storage.local_copy(where) as local:
            assert (local / "a.txt").read_bytes() == b"A" and (local / "sub" / "b.txt").read_bytes() == b"B"
            assert (local / storage.SUCCESS).exists()


class TestPublish:
    def test_publish_writes_files_and_success_manifest(self, where):
        _publish(where, {"patients.parquet": b"P" * 10, "meta.json": b"{}"})
        assert storage.listdir(where) == ["_SUCCESS", "meta.json", "patients.parquet"]
        manifest = storage.read_json(storage.join(where, storage.SUCCESS))
        assert manifest["files"]["patients.parquet"]["bytes"] == 10
        assert len(manifest["files"]["meta.json"]["sha256"]) == 64
        assert not storage.exists(storage.lock_path(where))                       # the lock is gone
        storage.require_complete(where, "test")

    def test_manifest_is_deterministic(self, where):
        _publish(storage.join(where, "one"), {"a": b"1", "b": b"22"})
        _publish(storage.join(where, "two"), {"b": b"22", "a": b"1"})
        assert (storage.read_bytes(storage.join(where, "one", "_SUCCESS"))
                == storage.read_bytes(storage.join(where, "two", "_SUCCESS")))

    def test_existing_output_is_not_overwritten(self, where):
        _publish(where, {"meta.json": b"{}"})
        with pytest.raises(OutputExistsError, match="already exists and is not empty: it holds a finished"):
            _publish(where, {"meta.json": b"new"})
        assert storage.read_bytes(storage.join(where, "meta.json")) == b"{}"

    def test_foreign_files_are_never_replaced_without_overwrite(self, where):
        storage.write_bytes(storage.join(where, "mine.txt"), b"user data")
        with pytest.raises(FileExistsError, match="files synthehr did not write"):
            _publish(where, {"meta.json": b"{}"})
        assert storage.read_bytes(storage.join(where, "mine.txt")) == b"user data"

    def test_overwrite_replaces_the_whole_output(self, where):
        _publish(where, {"old.parquet": b"old", "meta.json": b"1"})
        _publish(where, {"meta.json": b"2"}, overwrite=True)
        assert storage.listdir(where) == ["_SUCCESS", "meta.json"]
        assert storage.read_bytes(storage.join(where, "meta.json")) == b"2"
        storage.require_complete(where, "test")

    def test_failure_publishes_nothing(self, where):
        with pytest.raises(RuntimeError, match="boom"):
            with storage.atomic_dir(where) as tmp:
                (tmp / "patients.parquet").write_bytes(b"partial")
                raise RuntimeError("boom")
        assert not storage.exists(where) and not storage.exists(storage.lock_path(where))

    def test_incomplete_output_is_refused_by_readers_and_replaced_by_a_retry(self, where):
        storage.write_bytes(storage.join(where, "codes.parquet"), b"half")
        storage.write_bytes(storage.join(where, storage.IN_PROGRESS), b"{}")
        with pytest.raises(IncompleteOutputError, match=rf"{where}: incomplete output, written by a run that did "
                                                        r"not finish \(no _SUCCESS\): rerun the preprocess stage"):
            storage.require_complete(storage.join(where, "codes.parquet"), "preprocess")
        _publish(where, {"patients.parquet": b"P"})                        # no overwrite needed
        assert storage.listdir(where) == ["_SUCCESS", "patients.parquet"]

    def test_reader_refuses_missing_listed_file(self, where):
        _publish(where, {"a.parquet": b"A", "b.parquet": b"B"})
        backend(where).delete(storage.join(where, "b.parquet"))   # lost behind synthehr's back
        with pytest.raises(IncompleteOutputError, match=r"1 of the files its _SUCCESS lists are missing "
                                                        r"\(b.parquet\): rerun the merge stage"):
            storage.require_complete(where, "merge")

    def test_lock_held_by_a_live_run_refuses_a_second_writer(self, where):
        storage.write_json(storage.lock_path(where), {"pid": os.getpid(), "host": __import__("socket").gethostname(),
                                                      "since": "2026-01-01T00:00:00Z", "heartbeat": 0})
        msg = (rf"{where}: another synthehr run is writing here \(lock {storage.lock_path(where)} held by pid "
               rf"{os.getpid()} on .* since 2026-01-01T00:00:00Z\); wait for it, or delete the lock")
        with pytest.raises(OutputLockedError, match=msg):
            storage.check_output(where)
        with pytest.raises(OutputLockedError, match=msg):
            _publish(where, {"a": b"1"})
        assert not storage.exists(where)

    def test_stale_lock_is_taken_over(self, where):
        storage.write_json(storage.lock_path(where), {"pid": 1, "host": "gone-pod", "since": "x", "heartbeat": 0})
        _publish(where, {"a": b"1"})
        assert storage.listdir(where) == ["_SUCCESS", "a"] and not storage.exists(storage.lock_path(where))

    def test_check_output(self, where):
        storage.check_output(where)                                          # nothing there: fine
        _publish(where, {"a": b"1"})
        with pytest.raises(OutputExistsError, match="already exists"):
            storage.check_output(where)
        storage.check_output(where, overwrite=True)


class TestObjectStores:
    @pytest.mark.parametrize("base", ["gs", "s3"])
    def test_missing_bucket_is_one_line(self, request, base):
        request.getfixturevalue({"gs": "gcs", "s3": "s3"}[base])
        uri = f"{base}://no-such-bucket-15a/out"
        with pytest.raises(StorageError, match=rf"{uri}: bucket 'no-such-bucket-15a' does not exist"):
            storage.check_output(uri)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            storage.read_bytes(uri + "/x.json")

    def test_no_aws_credentials_is_one_line(self, s3, monkeypatch):
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(StorageError, match=rf"^{s3}/x.json: no AWS credentials: set AWS_ACCESS_KEY_ID .*IRSA"):
            storage.read_bytes(f"{s3}/x.json")

    def test_no_google_credentials_is_one_line(self, monkeypatch):
        monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
        with pytest.raises(StorageError, match=r"^gs://b/x.json: no Google Cloud credentials: run `gcloud auth "
                                               r"application-default login`.*workload identity"):
            storage.read_bytes("gs://b/x.json")

    def test_permission_denied_is_one_line(self, s3):
        from botocore.exceptions import ClientError

        denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
        err = backend(s3)._translate(denied, f"{s3}/x", "reading it")
        assert str(err) == (f"{s3}/x: permission denied while reading it (AccessDenied): check the AWS credentials "
                            "and the bucket policy for these keys / this role.")

    def test_bucket_root_is_not_an_output(self, gcs):
        with pytest.raises(StorageError, match="an output needs a prefix inside the bucket"):
            storage.check_output(gcs)

    @pytest.mark.parametrize("base", ["gs", "s3"])
    def test_preprocess_reads_and_writes_object_store(self, request, base, tmp_path):
        """Raw MIMIC demo uploaded to the emulator, preprocessed from the bucket to the bucket, equals the local run."""
        from synthehr_core.data.config import bundled_data_dir

        root = request.getfixturevalue({"gs": "gcs", "s3": "s3"}[base]) + f"/pp-{uuid.uuid4().hex[:6]}"
        src = bundled_data_dir("mimic3_demo")
        for f in src.iterdir():
            storage.write_bytes(f"{root}/raw/mimic3/{f.name}", f.read_bytes())
        meta = preprocess("mimic3", f"{root}/out/tables", raw=f"{root}/raw/mimic3")
        assert meta["n_patients"] == 100 and meta["n_visits"] == 129
        preprocess("mimic3", tmp_path / "local")
        remote = storage.read_json(f"{root}/out/tables/_SUCCESS")["files"]
        local = storage.read_json(tmp_path / "local" / "_SUCCESS")["files"]
        assert sorted(remote) == sorted(local)
        for name in ("patients.parquet", "visits.parquet", "codes.parquet", "vocab.json"):
            assert storage.read_bytes(f"{root}/out/tables/{name}") == (tmp_path / "local" / name).read_bytes(), name
            assert remote[name] == local[name]
        p, v, c = read_tables(f"{root}/out/tables")
        assert len(p) == 100 and len(v) == 129


class TestLocal:
    def test_write_bytes_replaces_atomically(self, tmp_path):
        p = tmp_path / "f.json"
        storage.write_json(p, {"a": 1})
        storage.write_json(p, {"a": 2})
        assert storage.read_json(p) == {"a": 2}
        assert [x.name for x in tmp_path.iterdir()] == ["f.json"]

    def test_read_parquet_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="Did the upstream stage finish"):
            storage.read_parquet(tmp_path / "nope.parquet")

    def test_empty_existing_directory_is_fine(self, tmp_path):
        (tmp_path / "out").mkdir()
        _publish(tmp_path / "out", {"a": b"1"})
        assert sorted(os.listdir(tmp_path / "out")) == ["_SUCCESS", "a"]
        assert sorted(os.listdir(tmp_path)) == ["out"]

    def test_output_below_a_file_is_refused(self, tmp_path):
        (tmp_path / "f").write_text("x")
        with pytest.raises(StorageError, match=r"f is a file, so no directory can be made there"):
            storage.check_output(tmp_path / "f" / "out")

    def test_manifest_format(self, tmp_path):
        _publish(tmp_path / "o", {"x.json": b"{}\n"})
        assert json.loads((tmp_path / "o" / "_SUCCESS").read_text()) == {"synthehr_output": 1, "files": {
            "x.json": {"bytes": 3, "sha256": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356"}}}

    def test_pandas_roundtrip_keeps_string_codes(self, tmp_path):
        from synthehr_core.data.schema import to_arrow

        df = pd.DataFrame({"patient_id": ["1"], "visit_index": [0], "code": ["dx:03819"]})
        storage.write_parquet(tmp_path / "c.parquet", to_arrow(df, "codes"))
        assert storage.read_parquet(tmp_path / "c.parquet").column("code").to_pylist() == ["dx:03819"]

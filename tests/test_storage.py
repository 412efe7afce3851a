"""synthehr_core.storage against a real GCS API emulator (gcp-storage-emulator), plus local atomicity."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from synthehr_core import storage
from synthehr_core.data.preprocess import preprocess
from synthehr_core.data.schema import read_tables

BUCKET = "synthehr-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Start gcp-storage-emulator on a free loopback port for this module; point the client at it."""
    port = _free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
                             "--default-bucket", BUCKET, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("gcp-storage-emulator did not start")
        yield f"gs://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


class TestGCS:
    def test_bytes_json_parquet_roundtrip(self, gcs):
        storage.write_bytes(f"{gcs}/a/b.bin", b"\x00\x01abc")
        assert storage.read_bytes(f"{gcs}/a/b.bin") == b"\x00\x01abc"
        storage.write_json(f"{gcs}/a/c.json", {"x": 1, "codes": ["dx:03819"]})
        assert storage.read_json(f"{gcs}/a/c.json") == {"x": 1, "codes": ["dx:03819"]}
        t = pa.table({"code": ["dx:03819", "px:3893"]})
        storage.write_parquet(f"{gcs}/a/t.parquet", t)
        assert storage.read_parquet(f"{gcs}/a/t.parquet").equals(t)
        assert storage.listdir(f"{gcs}/a") == ["b.bin", "c.json", "t.parquet"]
        assert storage.exists(f"{gcs}/a") and not storage.exists(f"{gcs}/nope")

    def test_missing_object_error_names_path(self, gcs):
        with pytest.raises(FileNotFoundError, match=r"gs://synthehr-test/missing.csv: no such object"):
            storage.read_bytes(f"{gcs}/missing.csv")

    def test_preprocess_reads_and_writes_gcs(self, gcs, tmp_path):
        """Raw MIMIC demo uploaded to the emulator, preprocessed from gs:// to gs://, equals the local run."""
        from synthehr_core.data.config import bundled_data_dir

        src = bundled_data_dir("mimic3_demo")
        for f in src.iterdir():
            storage.write_bytes(f"{gcs}/raw/mimic3/{f.name}", f.read_bytes())
        meta = preprocess("mimic3", f"{gcs}/out/tables", raw=f"{gcs}/raw/mimic3")
        assert meta["n_patients"] == 100 and meta["n_visits"] == 129
        preprocess("mimic3", tmp_path / "local")
        for name in ("patients.parquet", "visits.parquet", "codes.parquet", "vocab.json"):
            assert storage.read_bytes(f"{gcs}/out/tables/{name}") == (tmp_path / "local" / name).read_bytes(), name
        p, v, c = read_tables(f"{gcs}/out/tables")
        assert len(p) == 100 and len(v) == 129

    def test_existing_output_is_not_overwritten(self, gcs):
        storage.write_bytes(f"{gcs}/taken/meta.json", b"{}")
        with pytest.raises(FileExistsError, match="already exists"):
            with storage.atomic_dir(f"{gcs}/taken"):
                pass


class TestLocalAtomicity:
    def test_failure_leaves_no_output(self, tmp_path):
        out = tmp_path / "out"
        with pytest.raises(RuntimeError):
            with storage.atomic_dir(out) as tmp:
                (tmp / "patients.parquet").write_bytes(b"partial")
                raise RuntimeError("boom")
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []

    def test_non_empty_output_refused(self, tmp_path):
        (tmp_path / "x").write_text("old")
        with pytest.raises(FileExistsError, match="is not empty"):
            with storage.atomic_dir(tmp_path):
                pass

    def test_write_bytes_replaces_atomically(self, tmp_path):
        p = tmp_path / "f.json"
        storage.write_json(p, {"a": 1})
        storage.write_json(p, {"a": 2})
        assert storage.read_json(p) == {"a": 2}
        assert [x.name for x in tmp_path.iterdir()] == ["f.json"]

    def test_read_parquet_missing(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="Did the upstream stage finish"):
            storage.read_parquet(tmp_path / "nope.parquet")

    def test_pandas_roundtrip_keeps_string_codes(self, tmp_path):
        from synthehr_core.data.schema import to_arrow

        df = pd.DataFrame({"patient_id": ["1"], "visit_index": [0], "code": ["dx:03819"]})
        storage.write_parquet(tmp_path / "c.parquet", to_arrow(df, "codes"))
        assert storage.read_parquet(tmp_path / "c.parquet").column("code").to_pylist() == ["dx:03819"]

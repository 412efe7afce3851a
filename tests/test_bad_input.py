"""Every raw-data problem gets a clear error naming file and column (or a counted drop), and no output."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from synthehr_core.data.config import bundled_data_dir
from synthehr_core.data.preprocess import preprocess
from synthehr_core.errors import DataError, SchemaError

DEMO = bundled_data_dir("mimic3_demo")


@pytest.fixture
def raw(tmp_path) -> Path:
    """A writable plain-CSV copy of the demo extract."""
    d = tmp_path / "raw"
    d.mkdir()
    for f in DEMO.iterdir():
        if f.name.endswith(".csv.gz"):
            (d / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
        elif f.suffix == ".csv":
            shutil.copy(f, d / f.name)
    return d


def edit(path: Path, fn) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def run(raw: Path, tmp_path: Path):
    out = tmp_path / "out"
    try:
        return preprocess("mimic3", out, raw=str(raw))
    finally:
        if not (out / "meta.json").exists():
            assert not out.exists(), "a failed run left output behind"
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_missing_file(raw, tmp_path):
    (raw / "PROCEDURES_ICD.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"no PROCEDURES_ICD table found \(tried PROCEDURES_ICD.csv"):
        run(raw, tmp_path)


def test_missing_column(raw, tmp_path):
    edit(raw / "ADMISSIONS.csv", lambda ls: [ls[0].replace("hadm_id", "hadmid")] + ls[1:])
    with pytest.raises(SchemaError, match=r"ADMISSIONS.csv: ADMISSIONS table lacks column\(s\) \['hadm_id'\]"):
        run(raw, tmp_path)


def test_wrong_dtype(raw, tmp_path):
    edit(raw / "ADMISSIONS.csv", lambda ls: [ls[0], ls[1].replace("2164-10-23 21:09:00", "last tuesday", 1)] + ls[2:])
    with pytest.raises(SchemaError, match=r"column 'admittime' should be datetime but has 1 values that are not, e.g. \['last tuesday'\]"):
        run(raw, tmp_path)


def test_non_integer_id(raw, tmp_path):
    edit(raw / "PATIENTS.csv", lambda ls: [ls[0], ls[1].replace("10006", "10006.5", 1)] + ls[2:])
    with pytest.raises(SchemaError, match=r"(?s)PATIENTS.csv: wrong types .*'subject_id' should be int.*10006.5"):
        run(raw, tmp_path)


def test_empty_table(raw, tmp_path):
    (raw / "DIAGNOSES_ICD.csv").write_text("")
    with pytest.raises(DataError, match=r"DIAGNOSES_ICD.csv: the DIAGNOSES_ICD table is empty"):
        run(raw, tmp_path)


def test_header_only_table(raw, tmp_path):
    edit(raw / "PATIENTS.csv", lambda ls: ls[:1])
    with pytest.raises(DataError, match=r"PATIENTS.csv: the PATIENTS table has a header but no rows"):
        run(raw, tmp_path)


def test_admissions_without_patients_are_dropped_and_counted(raw, tmp_path):
    edit(raw / "PATIENTS.csv", lambda ls: [ls[0]] + [l for l in ls[1:] if ",10006," not in l])
    meta = run(raw, tmp_path)
    assert meta["n_patients"] == 99
    assert meta["dropped"]["visits: patient_id not in the patients table"] == 1
    assert meta["dropped"]["codes: visit not in the visits table (or dropped above)"] > 0


def test_codes_for_unknown_admissions_are_dropped_and_counted(raw, tmp_path):
    edit(raw / "DIAGNOSES_ICD.csv", lambda ls: ls + ["999999,10006,1,1,4019", "999998,10006,1,2,25000"])
    meta = run(raw, tmp_path)
    assert meta["dropped"]["codes: visit not in the visits table (or dropped above)"] == 2
    assert meta["n_visits"] == 129


def test_duplicate_ids(raw, tmp_path):
    edit(raw / "ADMISSIONS.csv", lambda ls: ls + [ls[1].replace("12258", "99999", 1)])
    with pytest.raises(DataError, match=r"ADMISSIONS.hadm_id must be unique but 1 ids repeat, e.g. \[142345\]"):
        run(raw, tmp_path)


def test_nan_in_required_field(raw, tmp_path):
    edit(raw / "ADMISSIONS.csv", lambda ls: [ls[0], ls[1].replace("2164-10-23 21:09:00", "", 1)] + ls[2:])
    with pytest.raises(DataError, match=r"required fields are empty in the ADMISSIONS table:\n  - column 'admittime' has 1 empty values"):
        run(raw, tmp_path)


def test_empty_code_is_dropped_and_counted(raw, tmp_path):
    edit(raw / "DIAGNOSES_ICD.csv", lambda ls: ls + ["999999,10006,142345,99,"])
    meta = run(raw, tmp_path)
    assert meta["dropped"]["DIAGNOSES_ICD: empty icd9_code"] == 1


def test_non_utf8_bytes(raw, tmp_path):
    p = raw / "ADMISSIONS.csv"
    p.write_bytes(p.read_bytes().replace(b"SEPSIS", b"SEPS\xe9S", 1))
    with pytest.raises(DataError, match=r"ADMISSIONS.csv: byte \d+ \(line 2\) is not valid UTF-8.*iconv"):
        run(raw, tmp_path)


def test_corrupt_gzip(raw, tmp_path):
    (raw / "ADMISSIONS.csv").unlink()
    (raw / "ADMISSIONS.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"ADMISSIONS.csv.gz: not a valid gzip file"):
        run(raw, tmp_path)

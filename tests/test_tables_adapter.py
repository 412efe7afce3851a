"""The declarative ``tables`` adapter: MIMIC-III by config gives the dedicated adapter's tables byte for byte;
subfolders, globs, parquet, renamed columns, a code-system version column; every problem named."""
from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from synthehr_core.data.adapters import tables
from synthehr_core.data.adapters.base import DropReport
from synthehr_core.data.preprocess import preprocess
from synthehr_core.errors import ConfigError, DataError, SchemaError

ROOT = Path(__file__).resolve().parents[1]
MIMIC_TABLES = ROOT / "examples" / "mimic3_tables.yml"
QH_TABLES = ROOT / "examples" / "qh_tables.yml"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mimic3_by_config_gives_the_dedicated_adapters_tables_byte_for_byte(tmp_path):
    preprocess("mimic3", tmp_path / "dedicated")
    preprocess(str(MIMIC_TABLES), tmp_path / "tables")
    for name in ("patients.parquet", "visits.parquet", "codes.parquet", "vocab.json"):
        assert _sha(tmp_path / "dedicated" / name) == _sha(tmp_path / "tables" / name), name


def test_qh_by_config_gives_the_dedicated_adapters_tables_byte_for_byte(tmp_path):
    """One table, patients from their first encounter, a clip on ED rows only, a weekday column, codes of ED rows."""
    preprocess("qh", tmp_path / "dedicated")
    preprocess(str(QH_TABLES), tmp_path / "tables")
    for name in ("patients.parquet", "visits.parquet", "codes.parquet", "vocab.json"):
        assert _sha(tmp_path / "dedicated" / name) == _sha(tmp_path / "tables" / name), name


def write_versioned_extract(root: Path) -> Path:
    """A layout no bundled adapter reads: subfolders, renamed columns, one code column + a version column
    (code '250' means different things in versions 9 and 10), a gzipped and a parquet table."""
    (root / "core").mkdir(parents=True)
    (root / "hosp").mkdir()
    people = pd.DataFrame({"PersonID": [f"P{i:03d}" for i in range(40)],
                           "Sex": ["F", "M"] * 20, "AgeAtAnchor": [30 + i for i in range(40)],
                           "AnchorYear": [2010] * 40})
    people.to_parquet(root / "core" / "people.parquet", index=False)
    stays = []
    for i in range(40):
        for k in range(3):
            month, day = 3 + 2 * k, 1 + i % 7
            stays.append({"StayID": f"S{i:03d}{k}", "PersonID": f"P{i:03d}", "Begin": f"2012-{month:02d}-{day:02d} 08:30",
                          "Finish": f"2012-{month:02d}-{day + 1:02d} 10:00", "Kind": "ward" if k else "ed"})
    pd.DataFrame(stays).to_csv(root / "core" / "stays.csv", index=False)
    rows = []
    for n, s in enumerate(stays):
        version = "9" if int(s["StayID"][1:4]) < 20 else "10"
        for code in (["250", "401"] if version == "9" else ["250", "E11"])[: 1 + n % 2]:
            rows.append(f"{s['StayID']},{code},{version}")
    (root / "hosp" / "dx.csv.gz").write_bytes(gzip.compress(("stay,dx_code,dx_version\n" + "\n".join(rows) + "\n").encode()))
    return root


VERSIONED = {
    "patients": {"file": "core/people.parquet", "id": "PersonID", "static": {"sex": "Sex"},
                 "age": {"anchor_age": "AgeAtAnchor", "anchor_year": "AnchorYear"}},
    "visits": {"file": "core/stays.csv", "id": "StayID", "patient": "PersonID", "start": "Begin", "end": "Finish",
               "duration": {"name": "los_hours", "unit": "hours"}, "event_type": {"column": "Kind"},
               "formats": {"Begin": "%Y-%m-%d %H:%M", "Finish": "%Y-%m-%d %H:%M"}},
    "codes": [{"file": "hosp/*.csv.gz", "visit": "stay", "key": "dx:{dx_version}:{dx_code}", "version": "dx_version",
               "category": "dx_version"}],
}


class TestLayouts:
    def test_subfolders_renamed_columns_parquet_and_gzip(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        c = tables.load(str(raw), VERSIONED, DropReport())
        assert len(c.patients) == 40 and len(c.visits) == 120
        assert list(c.patients.columns) == ["patient_id", "sex", "age"]
        assert c.patients.loc[c.patients["patient_id"] == "P005", "age"].item() == 35 + 2
        assert c.visits["los_hours"].iloc[0] == pytest.approx(25.5)
        assert set(c.visits["event_type"]) == {"ed", "ward"}
        assert set(c.visits["dx_version"]) == {"9", "10"}
        assert {"dx:9:250", "dx:10:250", "dx:9:401", "dx:10:E11"} == set(c.codes["code"])

    def test_a_code_under_two_versions_is_counted_and_kept_apart(self, tmp_path, caplog):
        raw = write_versioned_extract(tmp_path / "raw")
        with caplog.at_level(logging.WARNING):
            c = tables.load(str(raw), VERSIONED, DropReport())
        note = next(iter(c.notes.values()))
        assert note["codes_under_several_versions"] == 1 and note["version_in_key"] is True
        assert "1 code strings occur under two or more dx_version values" in caplog.text

    def test_without_the_version_in_the_key_the_warning_says_how_to_fix_it(self, tmp_path, caplog):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "codes": [{**VERSIONED["codes"][0], "key": "dx:{dx_code}"}]}
        with caplog.at_level(logging.WARNING):
            tables.load(str(raw), opts, DropReport())
        assert "MERGED" in caplog.text and "add {dx_version} to the key" in caplog.text

    def test_patients_from_the_first_visit_when_there_is_no_patients_table(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "patients": None, "visits": {**VERSIONED["visits"], "static": {"first_kind": "Kind"}}}
        c = tables.load(str(raw), opts, DropReport())
        assert len(c.patients) == 40 and set(c.patients["first_kind"]) == {"ed"}

    def test_max_rows_reads_a_sample(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        c = tables.load(str(raw), VERSIONED, DropReport(), max_rows=10)
        assert len(c.visits) == 10


class TestRowRules:
    """`where`, `clip` and `calendar`: what QH needs, said generically."""

    def test_clip_applies_only_to_the_rows_where_says(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "visits": {**VERSIONED["visits"], "clip": {"los_hours": {"max": 10, "where": {"Kind": ["ed"]}}}}}
        c = tables.load(str(raw), opts, DropReport())
        los = c.visits.set_index("event_type")["los_hours"]
        assert set(los["ed"]) == {10.0} and set(los["ward"]) == {25.5}

    def test_codes_of_the_rows_where_says_and_nothing_counted_as_dropped(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "codes": [{**VERSIONED["codes"][0], "where": {"dx_version": [10]}},
                                       {"from_visits": True, "key": "kind:{Kind}", "where": {"Kind": ["ward"]}}]}
        report = DropReport()
        c = tables.load(str(raw), opts, report)
        assert set(c.codes["code"]) == {"dx:10:250", "dx:10:E11", "kind:ward"}
        assert (c.codes["code"] == "kind:ward").sum() == 80 and report.as_dict() == {}

    def test_calendar_weekday_of_the_start(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "visits": {**VERSIONED["visits"], "calendar": {"day": "weekday", "m": "month"}}}
        c = tables.load(str(raw), opts, DropReport())
        assert c.visits["day"].iloc[0] == "Thu" and c.visits["m"].iloc[0] == "3"     # 2012-03-01 was a Thursday
        assert {"day", "m"} <= set(tables.declared_columns(opts)["visits"])

    def test_clip_of_a_column_that_is_not_declared(self):
        with pytest.raises(ConfigError, match=r"`clip` names \['los'\], which are not continuous or duration"):
            tables.check_options({**VERSIONED, "visits": {**VERSIONED["visits"], "clip": {"los": {"max": 1}}}})


class TestErrors:
    def test_no_file_matches_lists_the_files_there(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "visits": {**VERSIONED["visits"], "file": "core/visits.csv"}}
        with pytest.raises(DataError, match=r"no file matches 'core/visits.csv'; files there: \[.*core/stays.csv"):
            tables.load(str(raw), opts, DropReport())

    def test_a_missing_column_names_file_and_columns_found(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "visits": {**VERSIONED["visits"], "patient": "PatientID"}}
        with pytest.raises(SchemaError, match=r"stays.csv: visits table lacks column\(s\) \['patientid'\]; found"):
            tables.load(str(raw), opts, DropReport())

    def test_a_date_not_in_its_format(self, tmp_path):
        raw = write_versioned_extract(tmp_path / "raw")
        opts = {**VERSIONED, "visits": {**VERSIONED["visits"], "formats": {"Begin": "%d/%m/%Y"}}}
        with pytest.raises(DataError, match=r"column 'begin' does not match format '%d/%m/%Y' in 120 rows"):
            tables.load(str(raw), opts, DropReport())

    def test_bad_options_are_listed_together(self):
        with pytest.raises(ConfigError) as err:
            tables.check_options({"visits": {"file": "v.csv", "id": "v", "patient": "p", "start": "s",
                                              "duration": "los"}, "codes": [{"key": "dx"}], "extra": 1})
        msg = str(err.value)
        assert "`duration` and `end` go together" in msg and "exactly one of `file`" in msg and "extra" in msg


def test_the_example_configs_are_valid_yaml_with_the_tables_adapter():
    for path in (MIMIC_TABLES, QH_TABLES):
        data = yaml.safe_load(path.read_text())
        assert data["adapter"] == "tables"
        tables.check_options(data["adapter_options"])

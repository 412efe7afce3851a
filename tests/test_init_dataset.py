"""``synthehr init-dataset``: a draft dataset config + KDE config from the raw files alone, which `synthehr check`
accepts after the TODO edits README "Adding a dataset" lists; never overwrites a file without --overwrite."""
from __future__ import annotations

import pandas as pd
import yaml
from typer.testing import CliRunner

from synthehr_core.check import check_dataset
from synthehr_core.cli import app
from synthehr_core.data.config import bundled_data_dir
from synthehr_core.data.draft import nice_edges
from test_tables_adapter import write_versioned_extract


def init(tmp_path, raw, *extra):
    out = tmp_path / "user" / "mydata.yml"
    result = CliRunner().invoke(app, ["init-dataset", "mydata", "--raw", str(raw), "--out", str(out), *extra])
    return result, out


def test_the_draft_of_the_versioned_extract_passes_check_after_the_todo_edits(tmp_path):
    result, out = init(tmp_path, write_versioned_extract(tmp_path / "raw"))
    assert result.exit_code == 0, result.output
    assert "visits: core/stays.csv; patients: core/people.parquet; codes: hosp/dx.csv.gz" in result.output
    text = out.read_text()
    assert "TODO" in text and "core/stays.csv (120 rows read)" in text        # columns found, as comments
    cfg = yaml.safe_load(text)
    opts = cfg["adapter_options"]
    assert opts["patients"]["id"] == "PersonID" and opts["visits"]["patient"] == "PersonID"
    assert opts["patients"]["age"] == {"anchor_age": "AgeAtAnchor", "anchor_year": "AnchorYear"}
    assert (opts["visits"]["start"], opts["visits"]["end"]) == ("Begin", "Finish")
    assert opts["visits"]["duration"] == {"name": "los_hours", "unit": "hours"}      # median stay 25.5 h
    assert opts["visits"]["event_type"] == {"column": "Kind"}
    assert opts["codes"] == [{"file": "hosp/dx.csv.gz", "visit": "stay", "key": "dx:{dx_version}:{dx_code}",
                              "version": "dx_version", "category": "dx_version"}]
    assert cfg["visit_categories"] == ["dx_version"] and cfg["labels"] == ["sex"]
    assert yaml.safe_load((out.parent / "kde_mydata.yml").read_text())["time"]["los_unit"] == "hours"
    # the TODO edits README lists: where the pods read the extract, one line of description
    edited = text.replace("gs://CHANGE-ME/mydata", "gs://bucket/mydata").replace("mydata (TODO: one line)", "stays")
    out.write_text(edited)
    res = check_dataset(str(out))
    assert res.ok, res.problems
    assert res.summary["sample"] == {"patients": 40, "visits": 120, "codes": 180}


def test_never_overwrites_without_overwrite(tmp_path):
    raw = write_versioned_extract(tmp_path / "raw")
    init(tmp_path, raw)
    (tmp_path / "user" / "kde_mydata.yml").write_text("# mine\n")
    again, out = init(tmp_path, raw)
    assert again.exit_code == 1 and "never overwrites" in again.output and "kde_mydata.yml" in again.output
    assert (tmp_path / "user" / "kde_mydata.yml").read_text() == "# mine\n"
    forced, _ = init(tmp_path, raw, "--overwrite")
    assert forced.exit_code == 0 and (tmp_path / "user" / "kde_mydata.yml").read_text() != "# mine\n"


def test_bundled_extracts_draft_into_configs_that_pass_check(tmp_path):
    """MIMIC-III (four tables, joins by value) and QH (one table: patients from their first visit)."""
    for sample, n_patients in (("mimic3_demo", 100), ("qh_sample", None)):
        result, out = init(tmp_path / sample, bundled_data_dir(sample))
        assert result.exit_code == 0, result.output
        res = check_dataset(str(out))
        assert res.ok, (sample, res.problems)
        if n_patients:
            assert res.summary["sample"]["patients"] == n_patients
    qh = yaml.safe_load((tmp_path / "qh_sample" / "user" / "mydata.yml").read_text())["adapter_options"]
    assert "patients" not in qh and qh["visits"]["static"]["gender"] == "gender"


def test_a_folder_without_tables_is_one_message(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("x")
    result, out = init(tmp_path, tmp_path / "raw")
    assert result.exit_code == 1 and "no .csv, .csv.gz or .parquet file under it" in result.output
    assert not out.exists()


def test_suggested_edges_are_rounded_quintiles_from_0_to_above_the_max():
    assert nice_edges(pd.Series(range(1, 101))) == [0.0, 21.0, 41.0, 60.0, 80.0, 101.0]
    assert nice_edges(pd.Series([25.5] * 10)) == [0.0, 26.0]           # equal values: one bin

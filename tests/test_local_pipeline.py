"""End to end: the whole MIMIC-III pipeline under kfp.local, started through `synthehr run --local`.

Tiny settings keep it to about a minute on a shared CPU: 2 epochs of the tiny model at lr 0.01 (an undertrained
model samples hundreds of codes per visit, and sampling time grows with them), 2 seeds x 10 patients.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthehr_core.cli import app
from synthehr_core.data.schema import read_tables


@pytest.mark.slow
def test_mimic3_pipeline_runs_locally_end_to_end(tmp_path):
    from kfp.local import config as local_config

    args = ["run", "--local", "--dataset", "mimic3", "--pipeline-root", str(tmp_path / "runs"),
            "-p", "epochs=2", "-p", "lr=0.01", "-p", "n_patients_per_seed=10", "-p", "n_shards=2", "-p", "first_seed=2"]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        local_config.LocalExecutionConfig.instance = None
    assert result.exit_code == 0, result.output + repr(result.exception)
    paths = dict(re.findall(r"^(merged cohort|report \(HTML\)|summary \(MD\)|run folder):\s+(\S+)$", result.output, re.MULTILINE))
    wall = float(re.search(r"wall time:\s+([0-9.]+) s", result.output).group(1))
    assert 0 < wall < 600
    assert re.search(r"real data \(mimic3\): 100 patients, 129 visits, \d+ codes; vocabulary \d+ tokens .*"
                     r"split train/val/test = 72/8/20", result.output)
    assert re.search(r"synthetic cohort: \d+ patients, \d+ visits from 2 seed shards", result.output)

    cohort = Path(paths["merged cohort"])
    patients, visits, codes = read_tables(cohort)
    meta = json.loads((cohort / "meta.json").read_text())
    assert meta["seeds"] == [2, 3]                                   # first_seed 2, n_shards 2
    assert 0 < len(patients) <= 20 and patients["patient_id"].is_unique
    assert set(patients["patient_id"].str.split("-").str[1]) <= {"2", "3"}
    assert visits["start_offset_days"].notna().all()                 # KDE restored the times
    assert codes["code"].str.contains(":").all()

    run_dir = Path(paths["run folder"])
    metrics = json.loads(next(run_dir.glob("**/evaluate/details/metrics.json")).read_text())
    assert 0 <= metrics["privacy.exact_copies"] <= len(patients)
    assert -1 <= metrics["fidelity.code_record.pearson"] <= 1
    assert all(isinstance(v, (int, float)) or v is None for v in metrics.values())
    assert "<html" in Path(paths["report (HTML)"]).read_text().lower()
    assert Path(paths["summary (MD)"]).read_text().startswith("#")
    train_meta = json.loads(next(run_dir.glob("**/train/model/meta.json")).read_text())
    assert train_meta["model_type"] == "halo" and train_meta["preset"] == "tiny" and train_meta["epochs_run"] == 2


def test_failed_stage_exits_nonzero_and_names_the_task(tmp_path):
    """A bad dataset config fails the first task, check, at once (a few seconds, so not marked slow); the exit
    handler still runs and the CLI says which task failed."""
    from kfp.local import config as local_config

    args = ["run", "--local", "--dataset", "mimic3", "--pipeline-root", str(tmp_path / "runs"),
            "-p", "dataset_config=no_such_dataset"]
    try:
        result = CliRunner().invoke(app, args)
    finally:
        local_config.LocalExecutionConfig.instance = None
    assert result.exit_code == 1, result.output
    assert "Inner task failed: 'check'" in result.output
    notify_out = next((tmp_path / "runs").glob("*/notify/executor_output.json"))
    assert "FAILED" in notify_out.read_text()

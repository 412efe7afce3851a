"""The `synthehr` CLI: parameter parsing, help, compile, and stage commands on the toy cohort (fast)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from synthehr_core.cli import app, parse_params, pipeline_args
from synthehr_core.data.schema import read_tables

COMPILED = Path(__file__).resolve().parents[1] / "pipelines" / "compiled"
runner = CliRunner()


def test_parse_params_types_values_from_json_and_keeps_strings():
    got = parse_params(["epochs=3", "lr=0.01", "sample_seeds=[0, 1]", "model_type=halo", 'condition={"gender": "F"}',
                        "raw_uri=gs://b/x=y"], {"epochs": 5, "preset": "tiny"})
    assert got == {"epochs": 3, "lr": 0.01, "sample_seeds": [0, 1], "model_type": "halo",
                   "condition": {"gender": "F"}, "raw_uri": "gs://b/x=y", "preset": "tiny"}


def test_parse_params_rejects_a_pair_without_equals():
    with pytest.raises(typer.BadParameter, match="expected key=value"):
        parse_params(["epochs"])


def test_pipeline_args_follow_the_pipeline_parameter_types():
    from pipelines.builder import build_pipeline

    fn = build_pipeline("mimic3", conditional=True)
    got = pipeline_args(fn, ['condition={"gender": "F"}', "epochs=3", "lr=1", "sample_seeds=[4, 5]",
                             "model_type=consequence"], {"epochs": 10})
    assert got == {"condition": '{"gender": "F"}', "epochs": 3, "lr": 1, "sample_seeds": [4, 5],
                   "model_type": "consequence"}
    with pytest.raises(typer.BadParameter) as err:
        pipeline_args(fn, ["epochs=ten", "sample_seeds=3", "epoch=3", "lr"])
    msg = str(err.value)
    assert "epochs is Integer; got 'ten'" in msg and "sample_seeds is List[Integer]" in msg
    assert "-p epoch: unknown pipeline parameter" in msg and "expected key=value" in msg


def test_help_lists_every_command_and_the_slurm_example():
    out = runner.invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    for cmd in ("compile", "run", "submit", "preprocess", "rules", "train", "kde-grids", "sample", "kde-sample",
                "merge", "evaluate"):
        assert cmd in out
    assert "SLURM_ARRAY_TASK_ID" in out


def test_compile_writes_the_committed_yaml(tmp_path):
    result = runner.invoke(app, ["compile", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for f in COMPILED.glob("*.yaml"):
        assert (tmp_path / f.name).read_text() == f.read_text(), f"{f.name}: run `make compile` and commit"


def test_run_refuses_unknown_parameters_before_running(tmp_path):
    result = runner.invoke(app, ["run", "--local", "-d", "mimic3", "--pipeline-root", str(tmp_path),
                                 "-p", "n_epochs=3"])
    assert result.exit_code != 0
    assert "n_epochs" in result.output and "epochs" in result.output
    assert not any(tmp_path.iterdir())


def test_submit_without_compiled_package_says_to_compile(tmp_path):
    result = runner.invoke(app, ["submit", "-d", "mimic3", "--package", str(tmp_path / "none.yaml"),
                                 "--host", "http://localhost:1"])
    assert result.exit_code != 0 and "synthehr compile" in result.output


def test_rules_and_merge_commands_on_toy_tables(toy_tables, tmp_path):
    result = runner.invoke(app, ["rules", "--tables", str(toy_tables), "--out", str(tmp_path / "rules"),
                                 "-t", "label_min_prevalence=3", "-t", "pair_min_prevalence=3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_rules"] > 0 and (tmp_path / "rules" / "rules.json").exists()

    for seed, name in ((4, "a"), (1, "b")):
        shutil.copytree(toy_tables, tmp_path / name)
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        (tmp_path / name / "meta.json").write_text(json.dumps({**meta, "seed": seed, "stage": "kde-sample"}))
    result = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["seeds"] == [1, 4]
    patients, _, _ = read_tables(tmp_path / "c")
    assert patients["patient_id"].str.startswith(("syn-1-", "syn-4-")).all()

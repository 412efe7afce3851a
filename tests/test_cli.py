"""The `synthehr` CLI: parameter parsing, help, compile, and stage commands on the toy cohort (fast)."""
from __future__ import annotations

import json
import re
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
    got = parse_params(["epochs=3", "lr=0.01", "gpu_tolerations=[0, 1]", "model_type=halo", 'condition={"gender": "F"}',
                        "raw_uri=gs://b/x=y"], {"epochs": 5, "preset": "tiny"})
    assert got == {"epochs": 3, "lr": 0.01, "gpu_tolerations": [0, 1], "model_type": "halo",
                   "condition": {"gender": "F"}, "raw_uri": "gs://b/x=y", "preset": "tiny"}


def test_parse_params_rejects_a_pair_without_equals():
    with pytest.raises(typer.BadParameter, match="expected key=value"):
        parse_params(["epochs"])


def test_pipeline_args_follow_the_pipeline_parameter_types():
    from pipelines.builder import build_pipeline

    fn = build_pipeline("mimic3", conditional=True)
    got = pipeline_args(fn, ['condition={"gender": "F"}', "epochs=3", "lr=1", 'gpu_node_selector={"a": "b"}',
                             "model_type=consequence", "n_shards=16"], {"epochs": 10})
    assert got == {"condition": '{"gender": "F"}', "epochs": 3, "lr": 1, "gpu_node_selector": {"a": "b"},
                   "model_type": "consequence", "n_shards": 16}
    with pytest.raises(typer.BadParameter) as err:
        pipeline_args(fn, ["epochs=ten", "gpu_tolerations=3", "epoch=3", "lr"])
    msg = str(err.value)
    assert "epochs is Integer; got 'ten'" in msg and "gpu_tolerations is List" in msg
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


class FakeKFP:
    """Stands in for kfp.Client: no KFP API server can run on this machine (no Kubernetes, no backend images;
    shared/docs/kfp.md section 8), so submit is tested at the client boundary. It keeps a copy of each uploaded
    package as it was at upload time, and ends runs in `final_state`."""
    final_state = "SUCCEEDED"

    def __init__(self, **kwargs):
        self.kwargs, self.uploaded, self.runs = kwargs, [], []
        FakeKFP.last = self

    def get_pipeline_id(self, name):
        return None

    def upload_pipeline(self, path, pipeline_name, namespace=None):
        from types import SimpleNamespace
        self.uploaded.append((pipeline_name, Path(path).read_text()))
        return SimpleNamespace(pipeline_id="p-1")

    def list_pipeline_versions(self, pipeline_id):
        from types import SimpleNamespace
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id="v-1")])

    def create_experiment(self, name, namespace=None):
        from types import SimpleNamespace
        return SimpleNamespace(experiment_id="e-1")

    def run_pipeline(self, **kwargs):
        from types import SimpleNamespace
        self.runs.append(kwargs)
        return SimpleNamespace(run_id="r-1")

    def _get_url_prefix(self):
        return "http://kfp.example"

    def wait_for_run_completion(self, run_id, timeout):
        from types import SimpleNamespace
        return SimpleNamespace(state=self.final_state)


def _record(tmp_path, digest=True):
    from components import _images
    images = {s: {"ref": f"reg.example/synthehr-{s}:0.1.0-gabc", "id": "sha256:" + "1" * 64, "variant": "-",
                  "digest": f"reg.example/synthehr-{s}@sha256:{i:064x}" if digest else None}
              for i, s in enumerate(_images.STAGES)}
    path = tmp_path / "images.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_submit_uploads_a_fresh_compile_pinned_by_digest_and_prints_the_run_url(tmp_path, monkeypatch):
    import kfp
    monkeypatch.setattr(kfp, "Client", FakeKFP)
    record = _record(tmp_path)
    result = runner.invoke(app, ["submit", "-d", "mimic3", "--host", "http://kfp.example", "--images", str(record),
                                 "-p", "raw_uri=gs://bucket/mimic3", "-p", "n_shards=8"])
    assert result.exit_code == 0, result.output
    assert "run: http://kfp.example/#/runs/details/r-1" in result.output
    (name, text), = FakeKFP.last.uploaded
    assert name == "synthehr-mimic3"
    assert "reg.example/synthehr-train@sha256:" + f"{2:064x}" in text        # the record's digest, not a tag
    assert ":0.1.0\n" not in text and text != (COMPILED / "mimic3.yaml").read_text()
    assert FakeKFP.last.runs[0]["params"] == {"raw_uri": "gs://bucket/mimic3", "n_shards": 8}


@pytest.mark.parametrize("state, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_wait_exits_with_the_run_state(tmp_path, monkeypatch, state, code):
    import kfp
    monkeypatch.setattr(kfp, "Client", FakeKFP)
    monkeypatch.setattr(FakeKFP, "final_state", state)
    result = runner.invoke(app, ["submit", "-d", "mimic3", "--images", str(_record(tmp_path)), "--wait",
                                 "-p", "raw_uri=s3://bucket/raw"])
    assert result.exit_code == code, result.output
    assert f"finished: {state}" in result.output


def test_submit_refuses_unpushed_images_and_a_missing_raw_uri(tmp_path, monkeypatch):
    import kfp
    monkeypatch.setattr(kfp, "Client", FakeKFP)
    result = runner.invoke(app, ["submit", "-d", "mimic3", "--images", str(_record(tmp_path, digest=False)),
                                 "-p", "raw_uri=s3://b/raw"])
    assert result.exit_code != 0 and "never pushed" in result.output and "make images-push" in result.output
    result = runner.invoke(app, ["submit", "-d", "mimic3", "--images", "none"])
    assert result.exit_code != 0 and "raw_uri is required" in result.output


def test_submit_task_timeouts_reach_the_uploaded_pods(tmp_path, monkeypatch):
    import kfp
    import yaml
    monkeypatch.setattr(kfp, "Client", FakeKFP)
    result = runner.invoke(app, ["submit", "-d", "qh", "--images", str(_record(tmp_path)), "-p", "raw_uri=gs://b/qh",
                                 "--task-timeout", "train=3600", "--task-timeout", "sample=1800"])
    assert result.exit_code == 0, result.output
    platform = list(yaml.safe_load_all(FakeKFP.last.uploaded[0][1]))[1]
    ex = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert (ex["exec-train"]["activeDeadlineSeconds"], ex["exec-sample"]["activeDeadlineSeconds"]) == ("3600", "1800")
    result = runner.invoke(app, ["submit", "-d", "qh", "--images", str(_record(tmp_path)), "-p", "raw_uri=gs://b/qh",
                                 "--task-timeout", "trian=3600"])
    assert result.exit_code != 0 and "trian=3600" in result.output and "'train'" in result.output


def test_compile_pins_digests_from_a_build_record(tmp_path):
    result = runner.invoke(app, ["compile", "--out", str(tmp_path / "out"), "--images", str(_record(tmp_path))])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "qh.yaml").read_text()
    images = set(re.findall(r"image: (\S+)", text))
    assert images and all("@sha256:" in i for i in images), images


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


def test_run_summary_ends_with_the_release_decision_and_its_first_reason(tmp_path):
    from synthehr_core.cli import _run_summary

    details = tmp_path / "run" / "evaluate" / "details"
    details.mkdir(parents=True)
    (tmp_path / "run" / "evaluate" / "report").write_text("<html></html>")
    (details / "verdicts.json").write_text(json.dumps({
        "decision": "do not release",
        "reasons": ["BLOCKING: exact copies (privacy, fail): 0.2 is above 0.01. Measures: share of copies.", "x"]}))
    last = _run_summary(tmp_path / "run").splitlines()[-1]
    assert last == "release decision: DO NOT RELEASE (BLOCKING: exact copies (privacy, fail): 0.2 is above 0.01)"

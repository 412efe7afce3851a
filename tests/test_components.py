"""Component tests: each stage's ``.python_func`` on real artifacts in a temp dir (toy cohort, tiny model).

The stages run in DAG order once per module (fixtures below); each test then checks one stage's outputs and the
metadata it records. merge_shards and the image names are tested directly.
"""
from __future__ import annotations

import ast
import importlib
import json
import shutil
from pathlib import Path

import pytest
from kfp import dsl

from components import _images
from components.evaluate import evaluate
from components.kde_grids import kde_grids
from components.kde_sample import kde_sample
from components.merge import merge
from components.notify import notify
from components.preprocess import preprocess
from components.rules import rules
from components.sample import sample
from components.train import train
from synthehr_core.data.config import bundled_data_dir
from synthehr_core.data.merge import merge_shards
from synthehr_core.data.schema import parse_bin, read_tables
from synthehr_core.errors import ConfigError, DataError

COMPONENTS = Path(__file__).resolve().parents[1] / "components"


def art(cls, root: Path, name: str):
    """A stand-in artifact like the KFP executor builds: local URI == path, empty metadata."""
    return cls(name=name, uri=str(root / name), metadata={})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("components")


@pytest.fixture(scope="module")
def tables(toy_tables):
    return dsl.Dataset(name="tables", uri=str(toy_tables), metadata={})


@pytest.fixture(scope="module")
def ruleset(work, tables):
    out = art(dsl.Artifact, work, "ruleset")
    rules.python_func(tables=tables, ruleset=out, label_min_prevalence=3, pair_min_prevalence=3,
                      persistence_min_prevalence=3, prerequisite_min_prevalence=3)
    return out


@pytest.fixture(scope="module")
def trained(work, tables, ruleset):
    model, metrics, curve = art(dsl.Model, work, "model"), art(dsl.Metrics, work, "metrics"), art(dsl.HTML, work, "curve")
    train.python_func(tables=tables, ruleset=ruleset, model_type="halo", preset="tiny", epochs=2, batch_size=16,
                      lr=1e-3, seed=0, dp_target_epsilon=0.0, model=model, metrics=metrics, loss_curve=curve)
    return model, metrics, curve


@pytest.fixture(scope="module")
def grids(work, tables, toy_kde_config):
    out = art(dsl.Artifact, work, "grids")
    kde_grids.python_func(tables=tables, kde_config=str(toy_kde_config), grids=out)
    return out


@pytest.fixture(scope="module")
def shards(work, trained, grids):
    """Two shards (seeds 7 and 3), sampled and KDE-restored; returned in sampling order (7 first)."""
    out = []
    for seed in (7, 3):
        shard = art(dsl.Dataset, work, f"shard-{seed}")
        n = sample.python_func(model=trained[0], seed=seed, n_patients_per_seed=12, batch_size=8, temperature=1.0,
                               condition="", device="cpu", shard=shard)
        restored = art(dsl.Dataset, work, f"restored-{seed}")
        kde_sample.python_func(shard=shard, grids=grids, seed=seed, restored=restored)
        out.append((n, shard, restored))
    return out


@pytest.fixture(scope="module")
def cohort(work, shards, tables):
    out = art(dsl.Dataset, work, "cohort")
    n = merge.python_func(shards=[s[2] for s in shards], tables=tables, small_cell_k=0, cohort=out)
    return n, out


class TestStages:
    def test_merge_task_drops_small_cells_when_asked(self, work, shards, tables, cohort):
        out = art(dsl.Dataset, work, "cohort-k")
        n = merge.python_func(shards=[s[2] for s in shards], tables=tables, small_cell_k=10_000, cohort=out)
        assert n < cohort[0]     # k above the training split's size: every label combination is a small cell
        _, _, codes = read_tables(out.path)
        _, _, all_codes = read_tables(cohort[1].path)
        assert len(codes) < len(all_codes)

    def test_preprocess_writes_canonical_tables_from_the_bundled_mimic_demo(self, tmp_path):
        raw = dsl.Dataset(name="raw", uri=str(bundled_data_dir("mimic3_demo")), metadata={})
        tables = art(dsl.Dataset, tmp_path, "tables")
        preprocess.python_func(raw=raw, dataset_config="mimic3", split_seed=4, tables=tables)
        patients, _, _ = read_tables(tables.path)
        assert len(patients) == tables.metadata["n_patients"] == 100
        assert tables.metadata["seed"] == 4 and tables.metadata["dataset"] == "mimic3"
        assert sum(tables.metadata["split_sizes"].values()) == 100
        assert len(tables.metadata["config_hash"]) == 16
        assert (Path(tables.path) / "vocab.json").exists()

    def test_rules_writes_rules_json_and_counts(self, ruleset):
        saved = json.loads((Path(ruleset.path) / "rules.json").read_text())
        assert ruleset.metadata["n_rules"] > 0
        assert ruleset.metadata["thresholds"]["label_min_prevalence"] == 3
        assert "rules" in saved

    def test_train_writes_checkpoint_metrics_and_loss_curve(self, trained):
        model, metrics, curve = trained
        for f in ("model.pt", "config.json", "vocab.json", "history.parquet", "label_probs.parquet", "meta.json"):
            assert (Path(model.path) / f).exists(), f
        assert model.metadata["model_type"] == "halo" and model.metadata["preset"] == "tiny"
        assert model.metadata["dp_target_epsilon"] == 0.0
        assert metrics.metadata["steps"] >= 2 and metrics.metadata["final_train_loss"] > 0
        html = Path(curve.path).read_text()
        assert "data:image/png;base64," in html and "HALO, preset tiny" in html and str(work) not in html

    def test_train_consequence_reads_the_ruleset(self, tmp_path, tables, ruleset):
        model = art(dsl.Model, tmp_path, "model")
        train.python_func(tables=tables, ruleset=ruleset, model_type="consequence", preset="tiny", epochs=1,
                          batch_size=16, lr=1e-3, seed=0, dp_target_epsilon=0.0, model=model,
                          metrics=art(dsl.Metrics, tmp_path, "x"), loss_curve=art(dsl.HTML, tmp_path, "c"))
        assert model.metadata["model_type"] == "consequence"
        assert model.metadata["n_rules"] == ruleset.metadata["n_rules"] > 0
        assert (Path(model.path) / "rules.json").exists()

    def test_train_passes_dp_target_epsilon_through(self, tmp_path, tables, ruleset):
        model, metrics = art(dsl.Model, tmp_path, "model"), art(dsl.Metrics, tmp_path, "x")
        train.python_func(tables=tables, ruleset=ruleset, model_type="halo", preset="tiny", epochs=1, batch_size=16,
                          lr=1e-3, seed=0, dp_target_epsilon=8.0, model=model, metrics=metrics,
                          loss_curve=art(dsl.HTML, tmp_path, "c"))
        assert model.metadata["dp_target_epsilon"] == 8.0
        assert 0 < metrics.metadata["dp_epsilon"] <= 8.0 * 1.05      # the budget spent, within the target

    def test_train_rejects_unknown_model_type(self, tmp_path, tables, ruleset):
        with pytest.raises(ConfigError, match="gpt"):
            train.python_func(tables=tables, ruleset=ruleset, model_type="gpt", preset="tiny", epochs=1, batch_size=8,
                              lr=1e-3, seed=0, dp_target_epsilon=0.0, model=art(dsl.Model, tmp_path, "m"),
                              metrics=art(dsl.Metrics, tmp_path, "x"), loss_curve=art(dsl.HTML, tmp_path, "c"))

    def test_kde_grids_writes_one_grid_per_variable(self, grids):
        assert grids.metadata["variables"] == ["age", "gap_days", "los_days"]
        assert sorted(p.name for p in Path(grids.path).glob("grid_*_kde.parquet")) == [
            "grid_age_kde.parquet", "grid_gap_days_kde.parquet", "grid_los_days_kde.parquet"]

    def test_sample_and_kde_sample_fill_values_per_seed(self, shards):
        for n, shard, restored in shards:
            assert n == shard.metadata["n_patients"] > 0
            assert restored.metadata["seed"] == shard.metadata["seed"]
            patients, visits, _ = read_tables(restored.path)
            assert len(patients) == n
            assert visits["start_offset_days"].notna().all()
            binned = patients[patients["age_binned"].notna()]
            assert len(binned) and binned["age"].notna().all()   # every sampled age bin got a value inside it
            lohi = binned["age_binned"].map(parse_bin)
            assert all(lo <= a <= hi for a, (lo, hi) in zip(binned["age"], lohi))

    def test_sample_condition_json_restricts_labels(self, tmp_path, trained):
        shard = art(dsl.Dataset, tmp_path, "shard")
        sample.python_func(model=trained[0], seed=1, n_patients_per_seed=10, batch_size=10, temperature=1.0,
                           condition='{"sex": "F"}', device="cpu", shard=shard)
        patients, _, _ = read_tables(shard.path)
        assert len(patients) > 0 and set(patients["sex"]) == {"F"}

    def test_merge_orders_by_seed_and_rekeys(self, shards, cohort):
        n, out = cohort
        assert n == sum(s[0] for s in shards) == out.metadata["n_patients"]
        assert out.metadata["seeds"] == [3, 7]      # sampled 7 first; merged in seed order
        patients, _, _ = read_tables(out.path)
        assert patients["patient_id"].is_unique
        assert set(patients["patient_id"].str.extract(r"^syn-(\d+)-\d+$")[0]) == {"3", "7"}
        assert (Path(out.path) / "vocab.json").read_bytes() == (Path(shards[0][2].path) / "vocab.json").read_bytes()

    def test_evaluate_logs_metrics_and_writes_report(self, tmp_path, tables, ruleset, cohort, trained):
        outs = {k: art(c, tmp_path, k) for k, c in (("metrics", dsl.Metrics), ("report", dsl.HTML),
                                                  ("summary", dsl.Markdown), ("details", dsl.Artifact),
                                                  ("roc", dsl.ClassificationMetrics))}
        kw = dict(real=tables, cohort=cohort[1], ruleset=ruleset, model=trained[0], seed=0, dataset_config="",
                  policy="", run_id="run-1", **outs)
        evaluate.python_func(release_gate=False, **kw)
        m = outs["metrics"].metadata
        assert len(m) > 10 and all(isinstance(v, float) for v in m.values())
        report = Path(outs["report"].path).read_text()
        assert "<html" in report.lower() and "Decision:" in report and "run-1" in report and "tiny" in report
        assert Path(outs["summary"].path).read_text().startswith("#")
        assert (Path(outs["details"].path) / "verdicts.json").exists()
        assert outs["roc"].metadata["confidenceMetrics"]          # KFP draws the ROC curve from these
        decision = outs["details"].metadata["decision"]
        # the gate: fails exactly when the decision is "do not release" (forced here by gating on a fidelity check
        # no R² can pass: thresholds above 1 and no held-out ceiling to pass at instead)
        strict = tmp_path / "strict.yml"
        policy = (Path(__file__).parents[1] / "synthehr_core/evaluation/release_policy.yml").read_text()
        assert "    ceiling: fidelity.baseline.code_record.r2\n" in policy
        strict.write_text(policy.replace("fail_on: [exact_copies, membership_inference, small_cells]",
                                         "fail_on: [code_prevalence]").replace("warn: 0.8\n    fail: 0.5", "warn: 2\n    fail: 1.5")
                          .replace("    ceiling: fidelity.baseline.code_record.r2\n", ""))
        outs2 = {k: art(type(a), tmp_path / "g", k) for k, a in outs.items()}
        with pytest.raises(RuntimeError, match="release gate: do not release"):
            evaluate.python_func(release_gate=True, **{**kw, **outs2, "policy": str(strict)})
        assert decision in ("do not release", "release with warnings", "release")

    def test_notify_returns_the_final_state(self, capsys):
        status = dsl.PipelineTaskFinalStatus(state="FAILED", pipeline_job_resource_name="runs/1",
                                             pipeline_task_name="exit-handler-1", error_code=1, error_message="boom")
        assert notify.python_func(status=status) == "FAILED"
        assert json.loads(capsys.readouterr().out)["error_message"] == "boom"


class TestMergeShards:
    def _shard(self, src: Path, dst: Path, seed: int) -> Path:
        shutil.copytree(src, dst)
        meta = json.loads((dst / "meta.json").read_text())
        (dst / "meta.json").write_text(json.dumps({**meta, "seed": seed, "stage": "kde-sample"}))
        return dst

    def test_row_counts_and_ids_from_real_tables(self, toy_tables, tmp_path):
        a, b = self._shard(toy_tables, tmp_path / "a", 5), self._shard(toy_tables, tmp_path / "b", 2)
        meta = merge_shards([a, b], tmp_path / "out")
        p, v, c = read_tables(tmp_path / "out")
        p0, v0, c0 = read_tables(toy_tables)
        assert (len(p), len(v), len(c)) == (2 * len(p0), 2 * len(v0), 2 * len(c0))
        assert meta["seeds"] == [2, 5] and p["patient_id"].is_unique
        # every visit and code follows its patient to the new id
        assert set(v["patient_id"]) == set(p["patient_id"]) >= set(c["patient_id"])
        first = p0.sort_values("patient_id").iloc[0]
        assert p.loc[p["patient_id"] == "syn-2-0", "age"].item() == first["age"]

    def test_duplicate_seeds_are_refused(self, toy_tables, tmp_path):
        a, b = self._shard(toy_tables, tmp_path / "a", 1), self._shard(toy_tables, tmp_path / "b", 1)
        with pytest.raises(DataError, match=r"share seeds \[1\]"):
            merge_shards([a, b], tmp_path / "out")

    def test_shards_from_different_vocabularies_are_refused(self, toy_tables, tmp_path):
        a, b = self._shard(toy_tables, tmp_path / "a", 1), self._shard(toy_tables, tmp_path / "b", 2)
        vocab = json.loads((b / "vocab.json").read_text())
        vocab["tokens"] = vocab["tokens"][::-1]
        (b / "vocab.json").write_text(json.dumps(vocab))
        with pytest.raises(DataError, match="different models"):
            merge_shards([a, b], tmp_path / "out")

    def test_missing_meta_and_empty_input(self, toy_tables, tmp_path):
        a = tmp_path / "a"
        shutil.copytree(toy_tables, a)
        (a / "meta.json").unlink()
        (a / "_SUCCESS").unlink(missing_ok=True)   # with its marker, a missing meta.json is an incomplete output
        with pytest.raises(DataError, match="no meta.json"):
            merge_shards([a], tmp_path / "out")
        with pytest.raises(ConfigError, match="no shard directories"):
            merge_shards([], tmp_path / "out")


class TestImagesAndImports:
    def test_every_stage_image_is_pinned_and_named_after_its_stage(self):
        for stage in _images.STAGES:
            ref = _images.image(stage)
            assert ref == f"{_images.REGISTRY}/synthehr-{stage}:{_images.TAG}" and not ref.endswith(":latest")
        assert _images.KDE_GRIDS_IMAGE.split("/")[-1].startswith("synthehr-kde-grids:")

    def test_env_overrides_registry_and_tag_and_latest_is_refused(self, monkeypatch):
        try:
            monkeypatch.setenv("SYNTHEHR_IMAGE_REGISTRY", "europe-docker.pkg.dev/p/r/")
            monkeypatch.setenv("SYNTHEHR_IMAGE_TAG", "1.2.3")
            assert importlib.reload(_images).SAMPLE_IMAGE == "europe-docker.pkg.dev/p/r/synthehr-sample:1.2.3"
            monkeypatch.setenv("SYNTHEHR_IMAGE_TAG", "latest")
            with pytest.raises(ValueError, match="pinned"):
                importlib.reload(_images)
        finally:
            monkeypatch.delenv("SYNTHEHR_IMAGE_REGISTRY")
            monkeypatch.delenv("SYNTHEHR_IMAGE_TAG")
            importlib.reload(_images)

    @pytest.mark.parametrize("path", sorted(COMPONENTS.glob("*.py")), ids=lambda p: p.name)
    def test_component_modules_import_only_stdlib_kfp_and_images_at_top(self, path):
        import sys

        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    top = n.split(".")[0]
                    assert top in sys.stdlib_module_names or top == "kfp" or n == "components._images", \
                        f"{path.name} imports {n} at module level"


class TestCheckOptions:
    """The first task: every run-form option checked at once, without torch, before anything is read."""
    GOOD = dict(model_type="halo", preset="small", epochs=50, train_batch_size=48, lr=1e-4, lr_schedule="cosine",
                lr_warmup=0.05, lr_final=0.1, train_seed=0,
                precision="fp32", dp_target_epsilon=0.0, dp_delta=0.0, min_code_count=0, rules_min_confidence=1.0,
                n_shards=3, first_seed=7, n_patients_per_seed=1000, sample_batch_size=256, temperature=1.0,
                sample_device="auto", condition="", eval_seed=0, gpu_node_selector={},
                gpu_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                image_pull_secret="synthehr-registry", object_store_secret="synthehr-object-store",
                train_eval_every=500, train_patience=5, train_ckpt_minutes=10.0, train_gpus=1,
                train_checkpoint_root="", small_cell_k=10)

    def test_good_options_give_the_shard_seeds(self):
        from components.check import check_options

        assert check_options.python_func(**self.GOOD) == [7, 8, 9]

    def test_every_bad_option_is_named_at_once_with_its_value(self):
        from components.check import check_options

        bad = {**self.GOOD, "model_type": "hallo", "preset": "huge", "sample_device": "tpu", "precision": "fp61",
               "n_shards": 0, "lr": 0.0, "condition": "{gender: F}", "gpu_tolerations": [{"keys": "x"}],
               "image_pull_secret": "Bad_Name", "dp_delta": 1.5, "train_gpus": 0, "train_patience": -1,
               "train_checkpoint_root": "hdfs://nn/ckpt"}
        with pytest.raises(ConfigError) as err:
            check_options.python_func(**bad)
        msg = str(err.value)
        for piece in ("model_type must be one of ['halo', 'consequence']; got 'hallo'", "preset must be one of",
                      "sample_device must be one of ['auto', 'cpu', 'cuda']; got 'tpu'", "got 'fp61'",
                      "n_shards must be >= 1 and <= 1000; got 0", "lr must be > 0; got 0.0", "condition is not valid JSON",
                      "gpu_tolerations[0] has unknown keys ['keys']", "image_pull_secret must be a Kubernetes secret name",
                      "dp_delta must be >= 0 and < 1; got 1.5", "dp_delta=1.5 is set but dp_target_epsilon is 0",
                      "train_gpus must be >= 1 and <= 16; got 0", "train_patience must be >= 0; got -1",
                      "train_checkpoint_root 'hdfs://nn/ckpt' has a scheme"):
            assert piece in msg, piece

    def test_the_allowed_strings_are_the_models_own(self):
        from synthehr_core.model.checkpoint import MODEL_TYPES
        from synthehr_core.model.halo import PRESETS
        from synthehr_core.model.precision import PRECISIONS
        from synthehr_core.run_options import CHOICES

        assert set(CHOICES["model_type"]) == set(MODEL_TYPES)
        assert set(CHOICES["preset"]) == set(PRESETS)
        assert set(CHOICES["precision"]) == set(PRECISIONS)

    def test_the_check_imports_no_torch(self):
        import subprocess
        import sys

        code = ("import sys; from synthehr_core.run_options import check_run_options; "
                "check_run_options({'model_type': 'halo'}); assert 'torch' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True)


class TestDeviceAuto:
    """pick_device("auto") never falls back to the CPU on a machine that was given a GPU."""

    def test_cpu_only_torch_on_a_gpu_pod_is_refused_naming_image_and_build(self, monkeypatch):
        import torch

        from synthehr_core.model.train import pick_device

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-0b1c2d3e")
        monkeypatch.setenv("SYNTHEHR_IMAGE", "reg.example/synthehr-train@sha256:abc")
        with pytest.raises(ConfigError, match=r"given a GPU \(NVIDIA_VISIBLE_DEVICES=GPU-0b1c2d3e\).*a CPU-only build"
                                              r".*reg\.example/synthehr-train@sha256:abc"):
            pick_device("auto")
        with pytest.raises(ConfigError):
            pick_device(None)
        assert pick_device("cpu").type == "cpu"                      # asking for the CPU is still allowed

    def test_no_gpu_anywhere_means_cpu(self, monkeypatch):
        import os

        import torch

        from synthehr_core.model.train import pick_device

        if os.path.exists("/dev/nvidia0"):
            pytest.skip("this machine has an NVIDIA device node")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        for visible in ("", "void", "none", "all"):   # "all" alone is a CUDA base image's default, not a GPU
            monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", visible)
            assert pick_device("auto").type == "cpu", visible

"""Training that survives the cluster: step checkpoints outside the model (complete or absent, markers last), a
train task killed mid-run and retried under kfp.local resuming from its object-store checkpoint (a real GCS API
emulator) bit-identical to an uninterrupted run, 2 gloo processes through the component, progress in the task
log, finished runs and extend, two trains into one folder, a full disk, and the pipeline IR."""

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emulators
from synthehr_core import storage
from synthehr_core.errors import ConfigError, DataError, OutputExistsError
from synthehr_core.model.checkpoint import StepCheckpoints
from synthehr_core.model.train import FAULT_ENV, train_to_dir

RUN = dict(preset="tiny", epochs=2, batch_size=16, lr=3e-3, lr_schedule="cosine", lr_warmup=0.25, seed=1,
           eval_every=3, ckpt_minutes=None)   # a resumed step must also resume the lr: warm-up and decay cross it
CONSTANT = {**RUN, "lr_schedule": "constant"}


def _state(path) -> dict:
    return torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full(toy_tables, tmp_path_factory):
    """The uninterrupted run of RUN, its model in ``<dir>/m``."""
    d = tmp_path_factory.mktemp("full")
    return {"dir": d, **train_to_dir(toy_tables, d / "m", progress=False, **RUN)}


# ---------------------------------------------------------------------------------------------- the library
class TestCheckpoints:
    def test_layout_markers_pruning_and_the_model_holds_only_what_sampling_needs(self, full):
        ck, last = Path(full["checkpoints"]), full["steps"]
        assert ck.parent == full["dir"] / "m.checkpoints" and len(ck.name) == 16  # <out>.checkpoints/<key>/
        kept = sorted({s for s in range(3, last + 1, 3)} | {last})[-2:]  # eval (and checkpoint) every 3, the end
        assert sorted(p.name for p in ck.iterdir()) == [f"step_{s:08d}.{e}" for s in kept for e in ("json", "pt")]
        mark = json.loads((ck / f"step_{last:08d}.json").read_text())
        assert mark["done"] and mark["bytes"] == (ck / f"step_{last:08d}.pt").stat().st_size
        assert {p.name for p in (full["dir"] / "m").iterdir()} == {
            "model.pt", "config.json", "vocab.json", "history.parquet", "label_probs.parquet", "token_groups.json",
            "meta.json", "_SUCCESS"}
        assert all(v.dtype.is_floating_point for v in _state(full["dir"] / "m" / "model.pt").values())  # weights

    def test_a_checkpoint_without_its_marker_is_absent_and_a_changed_one_is_named(self, toy_tables, tmp_path):
        ck = StepCheckpoints(tmp_path / "ck")
        ck.save(3, {"x": torch.ones(2)}, done=False)
        (tmp_path / "ck" / "step_00000009.pt").write_bytes(b"half an upload")  # a write that never got its marker
        assert ck.steps() == [3] and ck.latest() == 3
        assert torch.equal(ck.load(3)["x"], torch.ones(2))
        ck.save(6, {"x": torch.zeros(2)}, done=False)
        ck.prune(1)
        assert ck.steps() == [6] and not (tmp_path / "ck" / "step_00000003.pt").exists()
        (tmp_path / "ck" / "step_00000006.pt").write_bytes(b"tampered")
        with pytest.raises(DataError, match="step_00000006.pt: 8 bytes that do not match its marker"):
            ck.load(6)

    def test_time_based_checkpoints_and_progress_lines(self, toy_tables, tmp_path, caplog):
        caplog.set_level(logging.INFO, logger="synthehr_core.model.train")
        info = train_to_dir(toy_tables, tmp_path / "m", progress=False, keep_checkpoints=None, log_every=2,
                            **{**RUN, "eval_every": None, "ckpt_minutes": 1e-9})  # every step is due by the clock
        assert StepCheckpoints(info["checkpoints"]).steps() == list(range(1, info["steps"] + 1))
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
        n = info["steps"]
        assert [ln.split()[1] for ln in lines] == [f"{s}/{n}" for s in sorted({1, n, *range(2, n + 1, 2)})]
        assert all(" lr " in ln and " loss " in ln and " val " in ln and "steps/s ETA " in ln for ln in lines), lines

    def test_a_rerun_resumes_a_finished_run_is_refused_and_extend_says_what_it_does(self, toy_tables, full,
                                                                                  tmp_path, caplog):
        caplog.set_level(logging.INFO, logger="synthehr_core.model.train")
        a = full["dir"] / "m"
        again = train_to_dir(toy_tables, tmp_path / "b", progress=False, checkpoint_uri=full["dir"] / "m.checkpoints",
                             **RUN)
        assert again["resumed_from"].endswith(f"step_{full['steps']:08d}.pt") and "no training" in caplog.text
        assert _equal(_state(a / "model.pt"), _state(tmp_path / "b" / "model.pt"))
        with pytest.raises(ConfigError, match="is a finished run .*pass extend=True"):
            train_to_dir(toy_tables, tmp_path / "c", progress=False, resume_from=a, **RUN)
        with pytest.raises(ConfigError, match="leave nothing to add"):
            train_to_dir(toy_tables, tmp_path / "c", progress=False, resume_from=a, extend=True, **RUN)
        # a constant lr: 2 epochs extended by 1 are 3 epochs (cosine re-plans its decay over the new total)
        two = train_to_dir(toy_tables, tmp_path / "two", progress=False, **CONSTANT)
        more = train_to_dir(toy_tables, tmp_path / "c", progress=False, resume_from=tmp_path / "two", extend=True,
                            **{**CONSTANT, "epochs": 3})
        assert more["steps"] == full["steps"] * 3 // 2 and more["checkpoints"] != two["checkpoints"]
        assert "extending the finished run" in caplog.text and "patience counter restarts" in caplog.text
        assert "the constant lr re-planned over" in caplog.text
        whole = train_to_dir(toy_tables, tmp_path / "d", progress=False, **{**CONSTANT, "epochs": 3})
        last = [StepCheckpoints(r["checkpoints"]).load(more["steps"]) for r in (more, whole)]
        assert _equal(last[0]["model"], last[1]["model"])  # 2 epochs + 1 more = 3 epochs at once, bit for bit
        assert _equal(last[0]["optimizer"]["state"][0], last[1]["optimizer"]["state"][0])

    def test_two_trains_into_one_folder_or_one_checkpoint_folder_cannot_mix(self, toy_tables, tmp_path):
        """While a train runs, another process training into its output folder fails at once (the output's lock),
        and so does one of the same config and data into its checkpoint folder; the first run ends whole."""
        out, seen = tmp_path / "m", []
        code = ("import json, sys\n"
                "from synthehr_core.model.train import train_to_dir\n"
                "for kw in json.loads(sys.argv[1]):\n"
                "    try:\n"
                "        train_to_dir(**kw)\n"
                "        print('trained')\n"
                "    except Exception as exc:\n"
                "        print(type(exc).__name__, exc)\n")
        runs = [{"tables_dir": str(toy_tables), "out_dir": str(out), "progress": False, **RUN, "seed": 9},
                {"tables_dir": str(toy_tables), "out_dir": str(tmp_path / "other"), "progress": False,
                 "checkpoint_uri": str(tmp_path / "m.checkpoints"), **RUN}]

        def meanwhile(step):
            if step == 2:
                seen.append(subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True,
                                           text=True, timeout=120, check=False).stdout.splitlines())
        info = train_to_dir(toy_tables, out, progress=False, on_step=meanwhile, **RUN)
        (lines,) = seen
        assert len(lines) == 2 and all(ln.startswith("OutputLockedError ") for ln in lines), lines
        assert f"{out}: another synthehr run is writing here" in lines[0] and f"pid {os.getpid()}" in lines[0]
        assert f"{info['checkpoints']}: another synthehr run is writing here" in lines[1]
        assert not (tmp_path / "other").exists() and not (tmp_path / "other.checkpoints").exists()
        meta, cfg = (json.loads((out / f).read_text()) for f in ("meta.json", "config.json"))
        assert meta["seed"] == cfg["seed"] == 1 and info["steps"] > 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.checkpoints"]  # no temp or lock left
        with pytest.raises(OutputExistsError, match="finished synthehr output"):  # and afterwards, before work
            train_to_dir(toy_tables, out, progress=False, **{**RUN, "seed": 9})

    @pytest.mark.parametrize("store", ["gs", "s3"])
    def test_checkpoints_on_object_stores_markers_pruning_and_lock(self, store):
        emulator = emulators.gcs_emulator if store == "gs" else emulators.s3_emulator
        with emulator() as env, emulators.patched_env(env):
            root = f"{store}://{emulators.BUCKET}/run/checkpoints"
            ck = StepCheckpoints(f"{root}/abc")
            for step in (2, 4):
                ck.save(step, {"w": torch.full((3,), float(step))}, done=step == 4)
            storage.write_bytes(f"{root}/abc/step_00000006.pt", b"an upload without its marker")
            assert ck.steps() == [2, 4] and ck.marker(4)["done"]
            ck.prune(1)
            assert ck.steps() == [4] and torch.equal(ck.load(4)["w"], torch.full((3,), 4.0))
            with ck.lock():  # (another process is refused: the test above, locally)
                assert sorted(storage.listdir(root)) == [".abc.lock", "abc"]
            assert sorted(storage.listdir(root)) == ["abc"]  # the lock is gone once released

    def test_a_minio_checkpoint_uri_is_s3_and_other_schemes_are_refused(self, toy_tables, tmp_path):
        from synthehr_core.model.train import _checkpoint_uri

        assert _checkpoint_uri("minio://mlpipeline/v2/artifacts/checkpoints") == "s3://mlpipeline/v2/artifacts/checkpoints"
        assert _checkpoint_uri("gs://b/root/checkpoints") == "gs://b/root/checkpoints"
        with pytest.raises(ConfigError, match=r"checkpoint_uri='oci://x/y': not a location storage writes"):
            train_to_dir(toy_tables, tmp_path / "m", checkpoint_uri="oci://x/y", **RUN)
        assert not (tmp_path / "m").exists()

    @pytest.mark.slow
    def test_a_full_disk_is_a_clear_error_and_the_rerun_resumes(self, toy_tables, full, tmp_path):
        """RLIMIT_FSIZE stands in for a full disk (a write past it fails with EFBIG, as ENOSPC would): the first
        checkpoints fit, a later, larger one does not."""
        kw = {"tables_dir": str(toy_tables), "out_dir": str(tmp_path / "m"), "progress": False,
              "keep_checkpoints": None, **RUN}
        code = ("import json, resource, signal, sys\n"
                "from synthehr_core.model.train import train_to_dir\n"
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))\n"
                "train_to_dir(**json.loads(sys.argv[1]))\n")
        ck = tmp_path / "m.checkpoints"
        probe = train_to_dir(toy_tables, tmp_path / "probe", progress=False, max_steps=3, **RUN)
        size = (Path(probe["checkpoints"]) / "step_00000003.pt").stat().st_size
        r = subprocess.run([sys.executable, "-c", code, json.dumps(kw), str(size + 1)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
        assert r.returncode == 1, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()[-1]
        assert "checkpoint" in err and "File too large" in err and "resumes from the last complete " \
            "checkpoint, step 3" in err, err
        (key,) = ck.iterdir()
        assert StepCheckpoints(key).steps() == [3] and not (tmp_path / "m").exists()
        assert sorted(p.name for p in key.iterdir()) == ["step_00000003.json", "step_00000003.pt"]  # nothing half
        info = train_to_dir(toy_tables, tmp_path / "m", progress=False, keep_checkpoints=None, **RUN)
        assert info["resumed_from"] == str(key / "step_00000003.pt") and info["steps"] == full["steps"]
        assert _equal(_state(tmp_path / "m" / "model.pt"), _state(full["dir"] / "m" / "model.pt"))


# ---------------------------------------------------------------------------------------------- kfp.local
def _train_pipeline(ckpt_root: str, gpus: int, batch_size: int = 16):
    from kfp import dsl

    from components.train import train

    @dsl.pipeline(name="train-only")
    def train_only(tables_uri: str):
        tables = dsl.importer(artifact_uri=tables_uri, artifact_class=dsl.Dataset, reimport=False)
        fit = train(tables=tables.output, ruleset=tables.output, model_type="halo", preset="tiny", epochs=2,
                    batch_size=batch_size, lr=3e-3, seed=1, dp_target_epsilon=0.0, eval_every=3, patience=0,
                    ckpt_minutes=0.0, gpus=gpus, checkpoint_root=ckpt_root,
                    pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, lr_schedule=RUN["lr_schedule"],
                    lr_warmup=RUN["lr_warmup"])
        fit.set_retry(1)
    return train_only


def _model_pt(root: Path) -> Path:
    (path,) = root.glob("train-only-*/train/model/model.pt")
    return path


@pytest.mark.slow
def test_kfp_local_train_killed_mid_run_is_retried_and_resumes_bit_identical(toy_tables, full, gcs, kfp_local_runner,
                                                                           monkeypatch, capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the task's matmuls as this process's (one thread): same bits
    monkeypatch.setenv(FAULT_ENV, "5")          # the first attempt SIGKILLs itself after step 5
    ckpt_root = f"{gcs}/ckpt/runs/checkpoints"   # conftest.gcs: the kfp.local tasks inherit its env
    _train_pipeline(ckpt_root, gpus=1)(tables_uri=str(toy_tables))
    log = capfd.readouterr().out
    # the task's log showed progress while it ran: the killed attempt's lines came before its death
    died = log.index(f"{FAULT_ENV}=5: killing this process after step 5")
    assert f"step 3/{full['steps']}" in log[:died] and f"resumed from {ckpt_root}/" in log[died:]
    (key,) = storage.listdir(ckpt_root)
    assert StepCheckpoints(storage.join(ckpt_root, key)).latest() == full["steps"]
    assert Path(full["checkpoints"]).name == key  # the same run, by its checkpoint key
    got = _model_pt(kfp_local_runner)
    assert got.read_bytes() == (full["dir"] / "m" / "model.pt").read_bytes()
    assert not (got.parent / "checkpoints").exists()


@pytest.mark.slow
def test_kfp_local_two_gloo_processes_through_the_component_equal_one(toy_tables, kfp_local_runner, monkeypatch,
                                                                     capfd):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(FAULT_ENV, raising=False)
    _train_pipeline("", gpus=2, batch_size=7)(tables_uri=str(toy_tables))  # 7 over 2 ranks: uneven shares
    log = capfd.readouterr().out
    assert "launching 2 training processes" in log
    got = _model_pt(kfp_local_runner)
    meta = json.loads((got.parent / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["checkpoints"].startswith(str(kfp_local_runner / "checkpoints"))
    one = train_to_dir(toy_tables, Path(kfp_local_runner).parent / "one", progress=False,
                       **{**RUN, "batch_size": 7})
    assert one["steps"] == meta["steps"]
    a, b = _state(got), _state(Path(kfp_local_runner).parent / "one" / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------- the IR
def test_ir_train_is_retried_requests_train_gpus_and_checkpoints_under_the_pipeline_root():
    import yaml

    from pipelines import builder

    path = Path(__file__).resolve().parents[1] / "pipelines" / "compiled" / "synthehr.yaml"
    spec = next(yaml.safe_load_all(path.read_text()))
    (dag,) = [c["dag"]["tasks"] for c in spec["components"].values() if "train" in c.get("dag", {}).get("tasks", {})]
    task = dag["train"]
    assert task["retryPolicy"]["maxRetryCount"] == builder.TRAIN_RETRIES >= 1
    args = task["inputs"]["parameters"]
    assert args["pipeline_root"] == {"runtimeValue": {"constant": "{{$.pipeline_root}}"}}
    assert args["checkpoint_root"]["componentInputParameter"] == "pipelinechannel--train_checkpoint_root"
    assert args["gpus"]["componentInputParameter"] == "pipelinechannel--train_gpus"
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert res["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--train_gpus']}}"
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, default in (("train_gpus", 1), ("train_patience", 5), ("train_eval_every", 0),
                          ("train_ckpt_minutes", 10.0), ("train_checkpoint_root", "")):
        assert params[name]["defaultValue"] == default, name
        assert params[name]["description"], name
    assert "Early stopping" in params["train_patience"]["description"]

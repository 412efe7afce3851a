"""DDP under a real ``torchrun`` (2 CPU processes, gloo): the same result as one process on the same global batch,
rank-0-only outputs, resume across world sizes, and DP-SGD over DDP (Opacus DPDDP)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from synthehr_core.data.toy import write_toy_tables
from synthehr_core.model.distributed import DistContext
from synthehr_core.model.train import train_to_dir

# batch 7 over 2 ranks: shares of 4 and 3, so the uneven-share loss weighting is exercised on every step
COMMON = dict(preset="tiny", batch_size=7, max_steps=4, ckpt_every=2, keep_checkpoints=None, eval_every=None,
              seed=3)
OVERRIDES = {"n_embd": 16}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "t"
    write_toy_tables(d, 60, seed=0)
    return d


def _state(path) -> dict:
    return torch.load(io.BytesIO(open(path, "rb").read()), map_location="cpu", weights_only=True)


def _argv(out, extra: list[str] = ()) -> list[str]:
    return ["--tables", "", "--out", str(out), "--preset", COMMON["preset"],
            "--batch-size", str(COMMON["batch_size"]), "--max-steps", str(COMMON["max_steps"]),
            "--ckpt-every", str(COMMON["ckpt_every"]), "--keep-checkpoints", "100", "--eval-every", "1000",
            "--seed", str(COMMON["seed"]), "--model-override", "n_embd=16", *extra]


def _torchrun(toy_dir, runs: list[list[str]]) -> list[dict]:
    """One real ``torchrun --nproc_per_node 2`` launch (gloo on the CPU) running each command line in turn."""
    runs = [[str(toy_dir) if a == "" else a for a in argv] for argv in runs]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("ddp_runs.py")), json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(out) == len(runs), r.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(toy_dir, tmp_path_factory):
    """Single-process runs in this process, then the 2-process runs in one torchrun launch."""
    d = tmp_path_factory.mktemp("runs")
    dp = {"dp_noise_multiplier": 0.8, "dp_max_grad_norm": 0.5, "dp_delta": 1e-3}
    single = train_to_dir(toy_dir, d / "single", progress=False, **COMMON, **OVERRIDES)
    single_dp = train_to_dir(toy_dir, d / "single_dp", progress=False, **COMMON, **OVERRIDES, **dp)
    ddp, resumed, ddp_dp = _torchrun(toy_dir, [
        _argv(d / "ddp"),
        _argv(d / "resumed", ["--resume-from", str(Path(single["checkpoints"]) / "step_00000002.pt")]),
        _argv(d / "ddp_dp", ["--dp-noise-multiplier", "0.8", "--dp-max-grad-norm", "0.5", "--dp-delta", "1e-3"]),
    ])
    return {"dir": d, "single": single, "single_dp": single_dp, "ddp": ddp, "resumed": resumed, "ddp_dp": ddp_dp}


def _assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_shard_and_loss_weight_reconstruct_the_global_mean():
    idx = torch.arange(7)
    parts = [DistContext(r, 2).shard(idx) for r in range(2)]
    assert sorted(torch.cat(parts).tolist()) == list(range(7)) and [len(p) for p in parts] == [4, 3]
    w = [DistContext(r, 2).loss_weight(len(p), 7) for r, p in enumerate(parts)]
    local_means = [p.float().mean() for p in parts]
    ddp_avg = sum(wi * m for wi, m in zip(w, local_means)) / 2  # DDP averages the ranks' (weighted) gradients
    assert torch.isclose(ddp_avg, idx.float().mean())


def test_ddp_two_processes_equal_one_process_and_resume_across_world_sizes(runs):
    d = runs["dir"]
    assert runs["ddp"]["world_size"] == 2 and runs["ddp"]["steps"] == runs["single"]["steps"] == 4
    _assert_close_states(_state(d / "single" / "model.pt"), _state(d / "ddp" / "model.pt"))
    h1 = pd.read_parquet(d / "single" / "history.parquet")
    h2 = pd.read_parquet(d / "ddp" / "history.parquet")
    assert (h1["split"] == h2["split"]).all()
    assert ((h1["loss"] - h2["loss"]).abs() < 1e-6).all()  # logged loss is the global-batch mean on both
    # rank 0 alone wrote: one set of outputs, one checkpoint per period
    assert sorted(os.listdir(runs["ddp"]["checkpoints"])) == ["step_00000002.json", "step_00000002.pt",
                                                             "step_00000004.json", "step_00000004.pt"]
    assert json.loads((d / "ddp" / "meta.json").read_text())["world_size"] == 2
    # a checkpoint does not depend on the number of processes: the 1-process run resumed with 2 processes
    assert runs["resumed"]["steps"] == 4 and runs["resumed"]["resumed_from"]
    _assert_close_states(_state(d / "single" / "model.pt"), _state(d / "resumed" / "model.pt"))


def test_dp_sgd_over_ddp_equals_one_process(runs):
    """Poisson batch drawn from (seed, step) and split over ranks; each rank clips its patients; rank 0 adds the
    same seeded noise a single process would: the two runs agree, and so does the accounting."""
    d = runs["dir"]
    assert runs["ddp_dp"]["dp_epsilon"] == pytest.approx(runs["single_dp"]["dp_epsilon"])
    assert runs["ddp_dp"]["dp_steps"] == 4 and runs["ddp_dp"]["world_size"] == 2
    _assert_close_states(_state(d / "single_dp" / "model.pt"), _state(d / "ddp_dp" / "model.pt"))

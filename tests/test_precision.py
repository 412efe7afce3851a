"""Mixed precision: option checks, fp32 loss on low-precision logits, bf16 training on CPU (also under DP-SGD)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from synthehr_core.data.toy import write_toy_tables
from synthehr_core.errors import ConfigError
from synthehr_core.model.halo import HALO, HaloConfig
from synthehr_core.model.precision import autocast, grad_scaler, validate_precision
from synthehr_core.model.train import train_to_dir

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 autocast is CUDA-only)")


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "t"
    write_toy_tables(d, 60, seed=0)
    return d


def test_options_are_checked_against_the_device():
    assert validate_precision("BF16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        validate_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="precision='bf16'"):  # the fix is named
        validate_precision("fp16", "cpu")
    assert not grad_scaler("bf16", "cpu").is_enabled() and not grad_scaler("fp32", "cpu").is_enabled()


def test_fp16_on_cpu_is_refused_by_the_train_stage(toy_dir, tmp_path):
    with pytest.raises(ConfigError, match="fp16"):
        train_to_dir(toy_dir, tmp_path / "o", max_steps=1, precision="fp16", device="cpu", progress=False)


def test_bf16_logits_but_fp32_loss():
    """The head runs in bf16 under autocast; the loss is the fp32 BCE of those logits, so log(1 - p) of rare codes
    (p ~ 1e-5, where bf16's 1 - p is exactly 1) is kept."""
    cfg = HaloConfig.tiny(9, 3, n_ctx=5, n_embd=16, n_head=2)
    torch.manual_seed(0)
    model = HALO(cfg)
    X = (torch.rand(3, cfg.n_ctx, cfg.vocab_size) < 0.2).float()
    mask = torch.ones(3, cfg.n_ctx, 1)
    with autocast("bf16", "cpu"):
        logits, loss = model(X, mask)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref = F.binary_cross_entropy_with_logits(logits.float(), X[:, 1:], weight=mask[:, 1:].expand_as(X[:, 1:]))
    assert torch.equal(loss, ref)
    rare = torch.tensor([-11.5])  # p = 1.0e-5
    kept = F.binary_cross_entropy_with_logits(rare, torch.zeros(1))  # what the fp32 path computes
    lost = -torch.log(torch.ones(1, dtype=torch.bfloat16) - torch.sigmoid(rare).bfloat16())  # a bf16 BCE on p
    # PyTorch's fp32 BCEWithLogits itself is only ~5% accurate here (log of 1 + 1e-5); bf16 loses the term entirely
    assert kept.item() == pytest.approx(1.0e-5, rel=0.05) and lost.item() == 0.0


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_bf16_training_on_cpu_has_no_nan(toy_dir, tmp_path, dp):
    extra = {"dp_noise_multiplier": 0.5, "dp_delta": 1e-3, "dp_max_grad_norm": 1.0} if dp else {}
    info = train_to_dir(toy_dir, tmp_path / "o", preset="tiny", batch_size=8, max_steps=8, lr=1e-3, eval_every=4,
                        precision="bf16", progress=False, **extra)
    hist = pd.read_parquet(tmp_path / "o" / "history.parquet")
    assert hist["loss"].notna().all() and (hist["loss"] < 1e3).all()
    if not dp:  # the same run in fp32 (same batches, same order): bf16 autocast tracks it step by step
        train_to_dir(toy_dir, tmp_path / "f", preset="tiny", batch_size=8, max_steps=8, lr=1e-3, eval_every=4,
                     progress=False)
        ref = pd.read_parquet(tmp_path / "f" / "history.parquet")
        rel = (hist["loss"] - ref["loss"]).abs() / ref["loss"]
        assert list(hist["split"]) == list(ref["split"]) and rel.max() < 0.01, rel.round(4).tolist()   # seen: 1e-4
    state = torch.load(io.BytesIO((tmp_path / "o" / "model.pt").read_bytes()), weights_only=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())  # fp32 master weights
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["precision"] == "bf16" and info["steps"] == 8
    assert ("dp_epsilon" in meta) == dp


@CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_mixed_precision_trains_and_checkpoints_its_scaler(toy_dir, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    info = train_to_dir(toy_dir, tmp_path / "o", preset="tiny", batch_size=8, max_steps=6, lr=1e-3, eval_every=3,
                 precision=precision, device="cuda", progress=False)
    hist = pd.read_parquet(tmp_path / "o" / "history.parquet")
    assert hist["loss"].notna().all()
    ck = torch.load(io.BytesIO(max(Path(info["checkpoints"]).glob("step_*.pt")).read_bytes()), weights_only=True)
    assert ("scaler" in ck) == (precision == "fp16")


def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    """bench/gpu_check.py --tiny is how CI keeps the lead's one-command GPU check working."""
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(script), "--tiny", "--dp", "--json", str(out)], capture_output=True,
                       text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["precision"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"fp32", "bf16", "fp16", "fp32+dp", "bf16+dp"}
    assert "CUDA" in rows["fp16"]["error"]  # --tiny runs on the CPU, where fp16 is refused
    for name in ("fp32", "bf16", "fp32+dp", "bf16+dp"):
        row = rows[name]
        assert row["train_steps_per_s"] > 0 and row["sample_patients_per_s"] > 0, name
        assert math.isfinite(row["final_loss"]) and row["rows_per_patient"] >= 1, name
    assert "| config" in r.stdout and "train steps/s" in r.stdout

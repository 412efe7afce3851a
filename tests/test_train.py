"""The train stage: overfitting, keep-best and patience, and resume after a real SIGKILL (bit-identical)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from synthehr_core.data.schema import write_tables
from synthehr_core.data.toy import make_toy_tables, toy_vocab, write_toy_tables
from synthehr_core.errors import ConfigError
from synthehr_core.model.checkpoint import load_model
from synthehr_core.model.sampling import sample
from synthehr_core.model.tensors import EHRParquetDataset, decode_rows
from synthehr_core.model.train import CKPT_DIR, KILL_ENV, epoch_order, evaluate, train_to_dir

N_CTX = 8


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy") / "t"
    write_toy_tables(d, 120, seed=0)
    return d


def _state(path) -> dict:
    return torch.load(io.BytesIO(open(path, "rb").read()), map_location="cpu", weights_only=True)


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 7), epoch_order(50, 3, 7))
    assert not torch.equal(epoch_order(50, 3, 7), epoch_order(50, 3, 8))
    assert not torch.equal(epoch_order(50, 3, 7), epoch_order(50, 4, 7))


def test_tiny_model_overfits_one_patient_and_greedy_sampling_reproduces_it(tmp_path):
    p, v, c = make_toy_tables(40, seed=2)
    nvis = v.groupby("patient_id").size()
    keep = nvis[nvis >= 3].index[0]  # a patient with a few visits to memorise
    p["split"] = ["train" if pid == keep else "test" for pid in p["patient_id"]]
    vocab = toy_vocab(c, p)
    write_tables(tmp_path / "t", p, v, c)
    vocab.save(tmp_path / "t" / "vocab.json")
    info = train_to_dir(tmp_path / "t", tmp_path / "m", epochs=150, batch_size=1, lr=1e-2, n_ctx=N_CTX,
                        progress=False)
    assert info["n_val"] == 0 and info["steps"] == 150
    assert info["final_train_loss"] < info["first_train_loss"] / 20, info
    model, vocab, _ = load_model(tmp_path / "m")
    rows = sample(model, vocab, 3, seed=0, temperature=1e-3, progress=False)  # ~greedy
    sp, sv, sc, _ = decode_rows(rows, vocab, seed=0)
    want = c[c["patient_id"] == keep].groupby("visit_index")["code"].apply(sorted).tolist()
    for pid in sp["patient_id"]:
        got = sc[sc["patient_id"] == pid].groupby("visit_index")["code"].apply(sorted).tolist()
        assert got == want
    assert (sp["sex"] == p.loc[p["patient_id"] == keep, "sex"].iloc[0]).all()
    assert len(sp) == 3 and len(sv) == 3 * int(nvis[keep])


def test_keep_best_and_early_stopping(toy_dir, tmp_path):
    info = train_to_dir(toy_dir, tmp_path / "m", epochs=30, batch_size=16, lr=0.3, eval_every=1, patience=2,
                        n_ctx=N_CTX, progress=False)
    hist = pd.read_parquet(tmp_path / "m" / "history.parquet")
    val = hist[hist["split"] == "val"].reset_index(drop=True)
    assert info["stopped_early"] and info["steps"] < 30 * 6
    best = int(val["loss"].idxmin())
    assert info["best_step"] == int(val.loc[best, "step"]) and info["best_val_loss"] == val.loc[best, "loss"]
    assert info["steps"] == info["best_step"] + 2 == int(val["step"].iloc[-1])  # patience 2, eval every step
    model, vocab, _ = load_model(tmp_path / "m")  # model.pt holds the best weights, not the last
    ds = EHRParquetDataset(toy_dir, "val", N_CTX, vocab)
    assert evaluate(model, ds, vocab, N_CTX, 16, torch.device("cpu")) == pytest.approx(info["best_val_loss"], rel=1e-6)
    last = _state(tmp_path / "m" / CKPT_DIR / f"step_{info['steps']:08d}.pt")["model"]
    assert not _equal_states(last, model.state_dict())
    written = {f.name for f in (tmp_path / "m").iterdir()}
    assert {"model.pt", "config.json", "vocab.json", "history.parquet", "label_probs.parquet", "meta.json"} <= written
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "halo" and cfg["training"]["lr"] == 0.3 and cfg["seed"] == 0 and cfg["config_hash"]
    lp = pd.read_parquet(tmp_path / "m" / "label_probs.parquet")
    assert lp["probability"].sum() == pytest.approx(1.0) and lp["labels"].str.contains("label:sex=").all()


def test_non_empty_out_dir_needs_resume_from(toy_dir, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="resume_from="):
        train_to_dir(toy_dir, tmp_path / "m", max_steps=1, n_ctx=N_CTX, progress=False)
    train_to_dir(toy_dir, tmp_path / "r", max_steps=2, batch_size=16, n_ctx=N_CTX, progress=False)
    with pytest.raises(ConfigError, match="different run"):
        train_to_dir(toy_dir, tmp_path / "r", max_steps=4, batch_size=16, lr=1e-3, n_ctx=N_CTX, progress=False,
                     resume_from=tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no checkpoints/step_"):
        train_to_dir(toy_dir, tmp_path / "m", max_steps=1, n_ctx=N_CTX, progress=False, resume_from=tmp_path / "m")


RUN = "import json, sys; from synthehr_core.model.train import train_to_dir; print(json.dumps(train_to_dir(**json.loads(sys.argv[1]))))"


def _run(kw: dict, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill_after:
        env[KILL_ENV] = str(kill_after)
    return subprocess.run([sys.executable, "-c", RUN, json.dumps(kw)], check=False, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(toy_dir, tmp_path):
    kw = {"tables_dir": str(toy_dir), "epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 4, "ckpt_every": 5,
          "keep_checkpoints": None, "n_ctx": N_CTX, "progress": False, "seed": 5, "device": "cpu"}  # bit-exact on CPU
    steps = 3 * -(-len(EHRParquetDataset(toy_dir, "train", N_CTX)) // 16)
    assert steps > 12  # the kill lands after the step-10 checkpoint and before the end
    full = _run({**kw, "out_dir": str(tmp_path / "full")})
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run({**kw, "out_dir": str(tmp_path / "cut")}, kill_after=12)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])  # really SIGKILLed mid-training
    ckpts = sorted(f.name for f in (tmp_path / "cut" / CKPT_DIR).iterdir())
    assert ckpts == ["step_00000005.pt", "step_00000010.pt"] and not (tmp_path / "cut" / "meta.json").exists()
    # resume from the *older* checkpoint: it crosses an epoch boundary and re-runs evaluations and keep-best
    resumed = _run({**kw, "out_dir": str(tmp_path / "cut"),
                    "resume_from": str(tmp_path / "cut" / CKPT_DIR / "step_00000005.pt")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = json.loads(full.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert a["steps"] == b["steps"] == steps and a["best_step"] == b["best_step"] and a["best_val_loss"] == b["best_val_loss"]
    assert _equal_states(_state(tmp_path / "full" / "model.pt"), _state(tmp_path / "cut" / "model.pt"))
    last_a = _state(tmp_path / "full" / CKPT_DIR / f"step_{steps:08d}.pt")
    last_b = _state(tmp_path / "cut" / CKPT_DIR / f"step_{steps:08d}.pt")
    assert _equal_states(last_a["model"], last_b["model"])
    assert _equal_states(last_a["optimizer"]["state"][0], last_b["optimizer"]["state"][0])
    ha, hb = (pd.read_parquet(tmp_path / d / "history.parquet") for d in ("full", "cut"))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    assert not _equal_states(_state(tmp_path / "full" / "model.pt"),
                             _state(tmp_path / "cut" / CKPT_DIR / "step_00000005.pt")["model"])  # it did train on


def test_group_heads_and_token_groups_reach_the_checkpoint(toy_dir, tmp_path):
    """train writes HaloConfig.groups (one categorical head per single-valued variable) and token_groups.json;
    group_heads=False trains HI's head only; the sampler draws required groups exactly once per visit."""
    from synthehr_core import storage
    from synthehr_core.data.schema import read_tables
    from synthehr_core.model.sampling import sample_to_dir

    train_to_dir(toy_dir, tmp_path / "m", epochs=1, batch_size=16, n_ctx=N_CTX, eval_every=None, progress=False)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    groups = storage.read_json(tmp_path / "m" / "token_groups.json")["groups"]
    assert [list(g) for g in cfg["groups"]] == [[g["start"], g["stop"]] for g in groups]
    by_col = {g["column"]: g["required"] for g in groups}
    assert by_col["event_type"] is True and by_col["sex"] is True and by_col["gap_days_binned"] is False
    meta = sample_to_dir(tmp_path / "m", tmp_path / "s", seed=0, n_patients=64, batch_size=32)
    assert meta["token_groups"]["n"] == len(groups) and "event_type" in meta["token_groups"]["required"]
    sp, sv, _ = read_tables(tmp_path / "s")
    assert meta["n_visit_value_conflicts"] == meta["n_label_conflicts"] == 0      # never two values of one variable
    assert sv["event_type"].notna().all() and sp["sex"].notna().all()            # required: always one
    train_to_dir(toy_dir, tmp_path / "m2", epochs=1, batch_size=16, n_ctx=N_CTX, eval_every=None, progress=False,
                 group_heads=False)
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["groups"] is None

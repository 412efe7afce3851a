"""The train stage: overfitting, keep-best and patience, resume after a real SIGKILL (bit-identical), and the
TrainConfig that every entry point (CLI, torchrun, component) builds."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from synthehr_core.data.schema import write_tables
from synthehr_core.data.toy import make_toy_tables, toy_vocab, write_toy_tables
from synthehr_core.errors import ConfigError
from synthehr_core.model.checkpoint import load_model
from synthehr_core.model.halo import HaloConfig
from synthehr_core.model.sampling import sample
from synthehr_core.model.tensors import EHRParquetDataset, decode_rows
from synthehr_core.model.train import TrainConfig, epoch_order, train_to_dir, validation_loss

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


@pytest.mark.parametrize("keep", ["auto", "last"])
def test_keep_last_publishes_the_final_weights(toy_dir, tmp_path, keep):
    """keep="last", and "auto" on a val split under KEEP_BEST_MIN_VAL patients (the toy's): the final weights."""
    from synthehr_core.model.schedule import KEEP_BEST_MIN_VAL

    info = train_to_dir(toy_dir, tmp_path / "m", epochs=4, batch_size=16, lr=0.3, eval_every=1, keep=keep,
                        n_ctx=N_CTX, progress=False, calibration="off")
    assert 0 < info["n_val"] < KEEP_BEST_MIN_VAL
    assert info["kept"] == "last" and info["kept_step"] == info["steps"] != info["best_step"]
    model, _, _ = load_model(tmp_path / "m")
    last = _state(Path(info["checkpoints"]) / f"step_{info['steps']:08d}.pt")["model"]
    assert _equal_states(last, model.state_dict())


def test_keep_best_and_early_stopping(toy_dir, tmp_path):
    info = train_to_dir(toy_dir, tmp_path / "m", epochs=30, batch_size=16, lr=0.3, eval_every=1, patience=2,
                        keep="best", n_ctx=N_CTX, progress=False, calibration="off")
    assert info["kept"] == "best" and info["kept_step"] == info["best_step"]
    hist = pd.read_parquet(tmp_path / "m" / "history.parquet")
    val = hist[hist["split"] == "val"].reset_index(drop=True)
    assert info["stopped_early"] and info["steps"] < 30 * 6
    best = int(val["loss"].idxmin())
    assert info["best_step"] == int(val.loc[best, "step"]) and info["best_val_loss"] == val.loc[best, "loss"]
    assert info["steps"] == info["best_step"] + 2 == int(val["step"].iloc[-1])  # patience 2, eval every step
    model, vocab, _ = load_model(tmp_path / "m")  # model.pt holds the best weights, not the last
    ds = EHRParquetDataset(toy_dir, "val", N_CTX, vocab)
    assert validation_loss(model, ds, vocab, N_CTX, 16, torch.device("cpu")) == pytest.approx(info["best_val_loss"], rel=1e-6)
    last = _state(Path(info["checkpoints"]) / f"step_{info['steps']:08d}.pt")["model"]
    assert not _equal_states(last, model.state_dict())
    written = {f.name for f in (tmp_path / "m").iterdir()}  # what sampling needs, no step checkpoints
    assert written == {"model.pt", "config.json", "vocab.json", "history.parquet", "label_probs.parquet", "meta.json",
                       "token_groups.json", "_SUCCESS"}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "halo" and cfg["training"]["lr"] == 0.3 and cfg["seed"] == 0 and cfg["config_hash"]
    lp = pd.read_parquet(tmp_path / "m" / "label_probs.parquet")
    assert lp["probability"].sum() == pytest.approx(1.0) and lp["labels"].str.contains("label:sex=").all()


def test_non_empty_out_dir_is_refused_before_work_and_resume_checks_the_run(toy_dir, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty: it holds files synthehr did not write.*overwrite"):
        train_to_dir(toy_dir, tmp_path / "m", max_steps=1, n_ctx=N_CTX, progress=False)
    assert not (tmp_path / "m.checkpoints").exists()  # refused before any work
    train_to_dir(toy_dir, tmp_path / "r", max_steps=2, batch_size=16, n_ctx=N_CTX, progress=False)
    with pytest.raises(FileExistsError, match="finished synthehr output.*resume_from=.*extend=True"):
        train_to_dir(toy_dir, tmp_path / "r", max_steps=2, batch_size=16, n_ctx=N_CTX, progress=False)
    with pytest.raises(ConfigError, match="different run"):
        train_to_dir(toy_dir, tmp_path / "r2", max_steps=4, batch_size=16, lr=1e-3, n_ctx=N_CTX, progress=False,
                     resume_from=tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no complete step checkpoint"):
        train_to_dir(toy_dir, tmp_path / "m2", max_steps=1, n_ctx=N_CTX, progress=False, resume_from=tmp_path / "m")
    assert (tmp_path / "m" / "stray.txt").read_text() == "x"  # nothing of the user's touched


# the run in a subprocess: kill_after > 0 makes the on_step hook SIGKILL the process right after that step
RUN = """
import json, os, signal, sys
from synthehr_core.model.train import TrainConfig, train_to_dir
kw, kill_after = json.loads(sys.argv[1]), int(sys.argv[2])
def kill(step):
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
config = TrainConfig.from_dict(kw.pop("config"))
print(json.dumps(train_to_dir(config=config, on_step=kill if kill_after else None, **kw)))
"""


def _run(kw: dict, kill_after: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", RUN, json.dumps(kw), str(kill_after)], check=False, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(toy_dir, tmp_path):
    config = {"epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 4, "ckpt_every": 5, "keep_checkpoints": None,
              "n_ctx": N_CTX, "seed": 5, "lr_schedule": "cosine", "lr_warmup": 0.3}  # the kill is in the decay
    kw = {"tables_dir": str(toy_dir), "config": config, "progress": False, "device": "cpu"}  # bit-exact on CPU
    steps = 3 * -(-len(EHRParquetDataset(toy_dir, "train", N_CTX)) // 16)
    assert steps > 12  # the kill lands after the step-10 checkpoint and before the end
    full = _run({**kw, "out_dir": str(tmp_path / "full")})
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run({**kw, "out_dir": str(tmp_path / "cut")}, kill_after=12)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])  # really SIGKILLed mid-training
    (cut,) = (tmp_path / "cut.checkpoints").glob("[!.]*")  # <out>.checkpoints/<checkpoint key>/ (+ its lock)
    assert (tmp_path / "cut.checkpoints" / f".{cut.name}.lock").exists()  # the killed run's, stale: taken over
    assert sorted(f.name for f in cut.iterdir()) == ["step_00000005.json", "step_00000005.pt", "step_00000010.json",
                                                     "step_00000010.pt"]
    assert not (tmp_path / "cut").exists()  # the model directory is published only at the end
    # resume from the *older* checkpoint: it crosses an epoch boundary and re-runs evaluations and keep-best
    resumed = _run({**kw, "out_dir": str(tmp_path / "cut"), "resume_from": str(cut / "step_00000005.pt")})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = json.loads(full.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert a["steps"] == b["steps"] == steps and a["best_step"] == b["best_step"] and a["best_val_loss"] == b["best_val_loss"]
    assert _equal_states(_state(tmp_path / "full" / "model.pt"), _state(tmp_path / "cut" / "model.pt"))
    assert a["checkpoints"] != b["checkpoints"] == str(cut)
    assert sorted(p.name for p in (tmp_path / "cut.checkpoints").iterdir()) == [cut.name]  # lock released
    last_a = _state(Path(a["checkpoints"]) / f"step_{steps:08d}.pt")
    last_b = _state(cut / f"step_{steps:08d}.pt")
    assert _equal_states(last_a["model"], last_b["model"])
    assert _equal_states(last_a["optimizer"]["state"][0], last_b["optimizer"]["state"][0])
    ha, hb = (pd.read_parquet(tmp_path / d / "history.parquet") for d in ("full", "cut"))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    assert not _equal_states(_state(tmp_path / "full" / "model.pt"),
                             _state(cut / "step_00000005.pt")["model"])  # it did train on


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


class TestTrainConfig:
    """One frozen, validated config; the CLI, torchrun and the component each build it from their parameters."""

    def test_bad_values_are_collected_and_name_the_option_value_and_fix(self):
        with pytest.raises(ConfigError) as err:
            TrainConfig.from_dict({"epochs": 0, "lr": -1.0, "dp_accountant": "gdp", "precision": "fp8",
                                   "model_type": "gpt", "min_code_count": -1, "model_overrides": {"n_embdd": 3}})
        msg = str(err.value)
        for want in ("epochs must be an int >= 1 or 'auto' (sized from the training set); got 0.", "lr must be > 0; got -1.0.",
                     "dp_accountant must be one of ('rdp', 'prv'); got 'gdp'.", "precision must be one of",
                     "got 'fp8'. Use 'fp32'", "model_type must be one of ['consequence', 'halo']; got 'gpt'.",
                     "min_code_count must be an int >= 0 (0 = keep all codes); got -1.", "['n_embdd']"):
            assert want in msg, (want, msg)
        assert msg.count("\n  - ") == 7  # one bullet per problem, one error
        with pytest.raises(ConfigError, match=r"dp_target_epsilon \(3.0\) or dp_noise_multiplier"):
            TrainConfig.from_dict({"dp_target_epsilon": 3.0, "dp_noise_multiplier": 1.0})
        with pytest.raises(ConfigError, match="n_ctx=8 cannot be overridden: use the n_ctx option"):
            TrainConfig(model_overrides={"n_ctx": 8})

    def test_unknown_option_is_named_with_the_known_ones(self):
        with pytest.raises(ConfigError, match=r"unknown training options \['epoch'\].*'epochs'"):
            TrainConfig.from_dict({"epoch": 3})

    def test_round_trip_and_frozen(self):
        c = TrainConfig.from_dict({"model_type": "consequence", "preset": "small", "epochs": 3, "max_steps": 7,
                                   "precision": "bf16", "dp_noise_multiplier": 0.8, "dp_delta": 1e-4,
                                   "min_code_count": 5, "n_ctx": 16, "group_heads": False,
                                   "model_overrides": {"n_embd": 64}})
        assert c.loop.max_steps == 7 and c.dp.noise_multiplier == 0.8 and c.seed == 0
        assert TrainConfig.from_dict(c.to_dict()) == c
        assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        assert tuple(c.to_dict()) == TrainConfig.option_names()
        assert TrainConfig.from_dict({}) == TrainConfig()
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.preset = "paper"
        assert TrainConfig.from_options(epochs=3, n_embd=16) == TrainConfig.from_dict(
            {"epochs": 3, "model_overrides": {"n_embd": 16}})  # train_to_dir(..., epochs=3, n_embd=16)

    def test_train_to_dir_takes_a_config_or_its_options_not_both(self, toy_dir, tmp_path):
        with pytest.raises(TypeError, match="not both"):
            train_to_dir(toy_dir, tmp_path / "m", TrainConfig(), epochs=2)
        with pytest.raises(TypeError, match="must be a TrainConfig"):
            train_to_dir(toy_dir, tmp_path / "m", {"epochs": 2})

    def test_torchrun_has_a_flag_per_option_with_the_config_default(self):
        from synthehr_core.model.torchrun import RUN_FLAGS, _parser, config_from_args

        p = _parser()
        defaults = TrainConfig().to_dict()
        options = {a.dest: a.default for a in p._actions if a.dest not in {"help", *RUN_FLAGS}}
        assert set(options) == set(TrainConfig.option_names())
        assert {k: v for k, v in options.items() if k != "model_overrides"} == \
            {k: v for k, v in defaults.items() if k != "model_overrides"}
        assert config_from_args(p.parse_args(["--tables", "t", "--out", "o"])) == TrainConfig()
        a = p.parse_args(["--tables", "t", "--out", "o", "--epochs", "3", "--dp-noise-multiplier", "0.5",
                          "--no-group-heads", "--model-override", "n_embd=16", "--eval-every", "7"])
        assert config_from_args(a) == TrainConfig.from_dict({"epochs": 3, "dp_noise_multiplier": 0.5, "eval_every": 7,
                                                             "group_heads": False, "model_overrides": {"n_embd": 16}})

    def test_cli_and_component_train_the_run_the_library_trains(self, toy_dir, tmp_path):
        """Same parameters through `synthehr train`, the train component and TrainConfig: same config.json,
        config_hash and weights."""
        kfp_dsl = pytest.importorskip("kfp.dsl")
        from typer.testing import CliRunner

        from components.train import train as train_component
        from synthehr_core.cli import app

        opts = {"model_type": "halo", "preset": "tiny", "epochs": 1, "batch_size": 16, "lr": 3e-3, "seed": 2,
                "dp_target_epsilon": 0.0}
        lib = train_to_dir(toy_dir, tmp_path / "lib", TrainConfig.from_dict(opts), progress=False, device="cpu")
        r = CliRunner().invoke(app, ["train", "--tables", str(toy_dir), "--out", str(tmp_path / "cli"),
                                     "--model-type", "halo", "--preset", "tiny", "--epochs", "1", "--batch-size",
                                     "16", "--lr", "3e-3", "--seed", "2", "--dp-target-epsilon", "0", "--device",
                                     "cpu"])
        assert r.exit_code == 0, r.output
        art = lambda cls, name: cls(name=name, uri=str(tmp_path / name), metadata={})  # noqa: E731
        train_component.python_func(tables=kfp_dsl.Dataset(name="t", uri=str(toy_dir), metadata={}),
                                     ruleset=art(kfp_dsl.Artifact, "r"), model=art(kfp_dsl.Model, "comp"),
                                     metrics=art(kfp_dsl.Metrics, "x"), loss_curve=art(kfp_dsl.HTML, "c"), **opts)

        def config_json(d):
            cfg = json.loads((tmp_path / d / "config.json").read_text())
            return {k: v for k, v in cfg.items() if k not in ("tables_dir", "versions")}

        for d in ("cli", "comp"):
            assert config_json(d) == config_json("lib"), d
            assert json.loads((tmp_path / d / "meta.json").read_text())["config_hash"] == lib["config_hash"]
            assert _equal_states(_state(tmp_path / d / "model.pt"), _state(tmp_path / "lib" / "model.pt"))


# ---------------------------------------------------------------------------------------------- trimmed batches
def _toy_batch(toy_dir, n_ctx: int, n: int = 24, trim: bool = False):
    from synthehr_core.model.tensors import collate_halo

    ds = EHRParquetDataset(toy_dir, "train", n_ctx)
    return collate_halo([ds[i] for i in range(n)], ds.vocab, n_ctx, trim=trim), ds.vocab


def _loss_and_grads(model, X, mask, **kw):
    model.zero_grad()
    _, loss = model(X, mask, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _toy_model(toy_dir, kind: str, vocab, n_ctx: int):
    from synthehr_core.data.vocab import token_groups
    from synthehr_core.model.train import make_model

    cfg = dict(n_ctx=n_ctx, n_embd=16, n_head=2)
    if kind == "groups":  # categorical heads and a positive-target weight: the loss's other branch
        cfg.update(groups=[(g.start, g.stop) for g in token_groups(vocab)], pos_loss_weight=2.0)
    rules = None
    if kind == "consequence":
        from synthehr_core.data.schema import read_tables
        from synthehr_core.model.consequence import compile_rules
        from synthehr_core.rules.mining import Thresholds, mine_rules

        p, v, c = read_tables(toy_dir)
        rules = compile_rules(mine_rules(p, v, c, vocab, Thresholds.make(label_min_prevalence=20)), vocab)
        assert len(rules)
    model_type = "consequence" if kind == "consequence" else "halo"
    return make_model(model_type, HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, **cfg), seed=1, rules=rules)


class TestTrimmedBatches:
    """A batch cut after its longest patient, with the nominal n_ctx as the loss normaliser, is the padded batch:
    same loss, same gradient of every parameter (float tolerance), and the training loop follows the same path."""
    N_CTX = 16  # toy patients have at most 6 visits: the padded batch is mostly padding

    @pytest.mark.parametrize("kind", ["halo", "groups", "consequence"])
    def test_loss_and_every_gradient_equal_the_padded_batch(self, toy_dir, kind):
        (X, mask), vocab = _toy_batch(toy_dir, self.N_CTX)
        (Xt, mt), _ = _toy_batch(toy_dir, self.N_CTX, trim=True)
        assert Xt.size(1) < X.size(1) // 2 and torch.equal(X[:, :Xt.size(1)], Xt) and mask[:, Xt.size(1):].sum() == 0
        model = _toy_model(toy_dir, kind, vocab, self.N_CTX)
        if kind == "consequence":
            assert model.rules.fired(Xt)[0].any()  # rules take entries out of the loss in this batch
        loss, grads = _loss_and_grads(model, X, mask)
        loss_t, grads_t = _loss_and_grads(model, Xt, mt, n_ctx=self.N_CTX)
        torch.testing.assert_close(loss_t, loss, rtol=1e-6, atol=0)
        assert grads.keys() == grads_t.keys() and len(grads) == len(list(model.parameters()))
        for n in grads:
            torch.testing.assert_close(grads_t[n], grads[n], rtol=1e-5, atol=1e-8, msg=lambda m, n=n: f"{n}: {m}")
        _, loss_short = model(Xt, mt)  # without the nominal n_ctx the scale would change: the test has power
        assert float(loss_short.detach()) > float(loss) * 1.5

    def test_training_follows_the_padded_run(self, toy_dir, tmp_path):
        """Same data order, same objective: the loss curves and weights agree to float rounding (the trimmed
        run sums in another order, so its last bits may differ; docs/speed.md)."""
        run = dict(max_steps=12, batch_size=16, lr=3e-3, eval_every=4, n_ctx=self.N_CTX, progress=False, seed=3)
        train_to_dir(toy_dir, tmp_path / "pad", legacy_step=True, **run)
        train_to_dir(toy_dir, tmp_path / "trim", **run)
        a, b = (pd.read_parquet(tmp_path / d / "history.parquet") for d in ("pad", "trim"))
        assert a[["step", "split"]].equals(b[["step", "split"]]) and (a["split"] == "val").sum() == 3
        assert (a["loss"] - b["loss"]).abs().max() < 1e-5 * a["loss"].abs().max()
        sa, sb = _state(tmp_path / "pad" / "model.pt"), _state(tmp_path / "trim" / "model.pt")
        assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6) for k in sa)
        ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("pad", "trim"))
        assert ca["config_hash"] == cb["config_hash"] and "length_buckets" not in cb["training"]


class TestLengthBuckets:
    """Optional length-bucketed batches: same patients each epoch, similar lengths per batch, off by default."""

    def test_bucket_order_is_a_seeded_permutation_of_sorted_runs(self):
        from synthehr_core.model.train import bucket_order

        n, bs, window = 103, 8, 4
        rows = torch.randint(3, 20, (n,), generator=torch.Generator().manual_seed(0))
        order = epoch_order(n, 5, 2)
        out = bucket_order(order, rows, bs, seed=5, epoch=2, window=window)
        assert torch.equal(out, bucket_order(order, rows, bs, seed=5, epoch=2, window=window))
        assert not torch.equal(out, bucket_order(order, rows, bs, seed=5, epoch=3, window=window))
        assert sorted(out.tolist()) == list(range(n))
        assert torch.equal(out[n // bs * bs:], order[n // bs * bs:])  # the partial batch stays last
        # every full batch comes from one run of `window` batches, as a contiguous slice of that run sorted by length
        runs = [order[a:min(a + window * bs, n // bs * bs)] for a in range(0, n // bs * bs, window * bs)]
        sorted_runs = [r[torch.argsort(rows[r], stable=True)] for r in runs]
        slices = {tuple(r[i:i + bs].tolist()) for r in sorted_runs for i in range(0, len(r), bs)}
        assert {tuple(b) for b in out[:n // bs * bs].view(-1, bs).tolist()} == slices

    def test_train_with_buckets_records_them_and_refuses_dp(self, toy_dir, tmp_path):
        run = dict(epochs=1, batch_size=16, n_ctx=16, eval_every=None, progress=False, seed=0)
        off = train_to_dir(toy_dir, tmp_path / "off", **run)
        on = train_to_dir(toy_dir, tmp_path / "on", length_buckets=3, **run)
        assert on["length_buckets"] == 3 and "length_buckets" not in off
        assert on["config_hash"] != off["config_hash"] and on["steps"] == off["steps"]
        assert json.loads((tmp_path / "on" / "config.json").read_text())["training"]["length_buckets"] == 3
        with pytest.raises(ConfigError, match="different run"):  # a bucketed run resumes only as one
            train_to_dir(toy_dir, tmp_path / "on2", resume_from=tmp_path / "on", **run)
        with pytest.raises(ConfigError, match="length_buckets=3 cannot be combined with DP-SGD"):
            train_to_dir(toy_dir, tmp_path / "dp", length_buckets=3, dp_noise_multiplier=1.0, dp_delta=1e-3, **run)
        with pytest.raises(ConfigError, match="length_buckets must be an int >= 0"):
            train_to_dir(toy_dir, tmp_path / "bad", length_buckets=-1, **run)


def test_calibration_reaches_the_maximum_of_its_convex_problems_and_is_skipped_with_dp(toy_dir, tmp_path):
    """After training, calibration="full" moves every BCE bias and every group head's bias and direct terms (on the
    earlier single-valued columns) to the maximum of their penalised teacher-forced likelihood: the gradient there,
    recomputed from the published model, is zero. Without it ("off", the same weights before calibration) it is not;
    "end" moves only the <end> bias; "full" then moves <end> on its own samples; a DP run skips it and says so."""
    import torch.nn.functional as F

    from synthehr_core.data.vocab import TOKEN_GROUPS_FILE, load_token_groups
    from synthehr_core.model.calibrate import (END_SAMPLED_ROUNDS, RIDGE, _bce_columns, bce_moments,
                                               end_counts, group_data, sampled_visits)
    from synthehr_core.randomness import torch_seed

    run = dict(epochs=2, batch_size=16, lr=3e-3, n_ctx=N_CTX, progress=False)
    infos = {c: train_to_dir(toy_dir, tmp_path / c, calibration=c, **run) for c in ("full", "end", "off")}
    assert infos["off"]["calibration"] is None and infos["full"]["calibration"]["what"] == "full"
    assert infos["full"]["calibration"]["bce"]["converged"] and infos["end"]["calibration"]["bce"]["converged"]
    models = {c: load_model(tmp_path / c)[0] for c in infos}
    vocab = load_model(tmp_path / "off")[1]
    ds = EHRParquetDataset(toy_dir, "train", N_CTX)
    E, full, off = models["full"].config.n_embd, models["full"], models["off"]
    cols = _bce_columns(full, vocab, "full")
    assert vocab.end_index in cols.tolist() and len(cols) < vocab.size  # the group columns are the heads'
    cols = cols[cols != vocab.end_index]  # full moves <end> once more, on its own samples (below)
    for name, model in (("full", full), ("off", off)):
        shift = (model.output_bias() - off.output_bias()).detach().double()[cols]
        ep, ob, _ = bce_moments(model, ds, vocab, cols, 64, "cpu")
        grad = (ep - ob + RIDGE * shift).abs().max()
        assert (grad < 1e-3) == (name == "full"), (name, grad)
    sp, sy = end_counts(models["end"], ds, vocab, 64, "cpu")
    end_bias = {c: float(m.output_bias()[vocab.end_index].detach()) for c, m in models.items()}
    end_shift = end_bias["end"] - end_bias["off"]
    assert abs(sp - sy + RIDGE * end_shift) < 1e-3 and end_shift != 0
    # full: the teacher-forced <end> fit (the same as "end"'s), then steps until its own samples have the training
    # visits per patient within two standard errors (or the rounds run out); the last sample is reproducible
    es = infos["full"]["calibration"]["end_sampled"]
    assert es["target"] == pytest.approx(sum(ds.n_visits(i) for i in range(len(ds))) / len(ds), abs=1e-5)
    assert end_bias["full"] - end_bias["end"] == pytest.approx(es["shift"], abs=1e-5)
    # the toy's 2-epoch model starts off by more than two s.e. (so a step is taken) and ends within them
    assert abs(es["sampled"][0] / es["target"] - 1) > 2 * es["se"] and es["shift"] != 0
    assert 1 < len(es["sampled"]) <= END_SAMPLED_ROUNDS + 1
    assert abs(es["sampled"][-1] / es["target"] - 1) < 2 * es["se"]
    assert sampled_visits(full, vocab, es["n"], torch_seed(0, "calibrate"), load_token_groups(
        tmp_path / "full" / TOKEN_GROUPS_FILE, vocab), "cpu") == pytest.approx(es["sampled"][-1], abs=1e-5)
    moved = (models["end"].fine_2.bias != off.fine_2.bias).nonzero().flatten().tolist()
    assert moved == [E - 1 + vocab.end_index]
    assert _equal_states({k: v for k, v in models["end"].state_dict().items() if k != "fine_2.bias"},
                         {k: v for k, v in off.state_dict().items() if k != "fine_2.bias"})
    direct, before = 0, group_data(off, ds, vocab, 64, "cpu")
    for k, (z, x, y, w, fcols) in enumerate(group_data(full, ds, vocab, 64, "cpu")):
        d = (full.group_heads[k].bias - off.group_heads[k].bias).detach().double()
        D = ((full.group_direct[str(k)].weight - off.group_direct[str(k)].weight).detach().double()[:, fcols]
             if fcols else torch.zeros(len(d), 0, dtype=torch.float64))
        direct += len(fcols)
        r = w[:, None] * (torch.softmax(z, -1) - F.one_hot(y, z.size(1)).double())  # d NLL / d logits
        assert float((r.sum(0) + RIDGE * d).abs().max()) < 1e-4, k
        assert not fcols or float((r.T @ x + RIDGE * D).abs().max()) < 1e-4, k
        r0 = w[:, None] * (torch.softmax(before[k][0], -1) - F.one_hot(y, z.size(1)).double())
        assert float(r0.sum(0).abs().max()) > 1e-2, k  # the trained head was not at it already
    assert direct > 0  # the toy's later groups read earlier ones
    dp = train_to_dir(toy_dir, tmp_path / "dp", epochs=1, batch_size=16, lr=3e-3, n_ctx=N_CTX, progress=False,
                      dp_noise_multiplier=0.5)
    assert dp["calibration"] == {"skipped": "dp"}
    with pytest.raises(ConfigError, match="calibration must be one of .*got 'ends'"):
        TrainConfig.from_dict({"calibration": "ends"})

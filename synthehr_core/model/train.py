"""The train stage: HALO / ConSequence on a tables directory, with explicit, bit-exact resume.

Loop as HI:train_model.py and KI:train_consequence.py (Adam, constant lr 1e-4, validation every N steps, keep the
best) plus early stopping with patience (KI), and what the references lack:

* **resume is explicit** (``resume_from=``); a non-empty ``out_dir`` without it is an error, never a silent resume;
* a step checkpoint holds model, optimizer, step, epoch and batch position, best validation loss and weights,
  the patience counter, the history, and RNG state; the data order of epoch e is a pure function of
  ``(seed, e)``, so resuming from any step checkpoint reaches bit-identical weights on CPU;
* the model is built under a forked, seeded RNG (no global seeding).

``make_optimizer`` / ``train_step`` are the seams for AMP, DP-SGD (Opacus) and DDP: the loss is a per-sample
constant-normalised mean (HALO's scale) and the model has no buffers.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .. import storage, versions
from ..data.schema import read_tables
from ..data.vocab import TOKEN_GROUPS_FILE, Vocab, save_token_groups, token_groups
from ..errors import ConfigError
from .checkpoint import model_class, write_checkpoint
from .distributed import SINGLE, DistContext
from .distributed import setup as setup_distributed
from .dp import DPConfig, PrivateTraining
from .halo import HaloConfig
from .precision import autocast, grad_scaler, validate_precision
from .tensors import EHRParquetDataset, HaloCollate, collate_halo

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
KILL_ENV = "SYNTHEHR_TRAIN_KILL_AFTER_STEP"  # fault injection for the resume test: SIGKILL after this step


@dataclass(frozen=True)
class TrainArgs:
    epochs: int = 50                  # HI:train_model.py
    batch_size: int = 48              # HI:train_model.py (KI: 32)
    lr: float = 1e-4                  # HI and KI, constant
    max_steps: int | None = None      # stop after this many optimiser steps (None = epochs decide)
    eval_every: int | None = 500      # HI: full validation every 500 iterations; None = at each epoch end
    patience: int | None = None       # KI:train_consequence.py uses 5 (evaluations); None = no early stopping
    ckpt_every: int | None = None     # step checkpoint period; None = at every evaluation
    keep_checkpoints: int | None = 2  # newest step checkpoints kept (None = all); arbitrary
    seed: int = 0                     # model init and data order

    def validate(self) -> "TrainArgs":
        problems = []
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be an int >= 1; got {getattr(self, name)!r}.")
        for name in ("max_steps", "eval_every", "patience", "ckpt_every", "keep_checkpoints"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                problems.append(f"{name} must be None or an int >= 1; got {v!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            problems.append(f"lr must be > 0; got {self.lr!r}.")
        if problems:
            raise ConfigError("invalid training arguments:\n" + "\n".join(f"  - {p}" for p in problems))
        return self


# ---------------------------------------------------------------------------------------------- pieces
def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_model(model_type: str, config: HaloConfig, seed: int, rules=None) -> torch.nn.Module:
    """Build the model with its weights drawn from ``seed`` only (forked RNG: the caller's state is untouched)."""
    cls = model_class(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    if rules is not None:
        model.attach_rules(rules)
    return model


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)  # HI/KI: Adam, no weight decay, no schedule


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, mask: torch.Tensor,
               amp=None, scaler: torch.amp.GradScaler | None = None, loss_weight: float = 1.0) -> torch.Tensor:
    """One optimiser step on a batch; returns the detached loss.

    ``amp`` makes the autocast context (precision.py), ``scaler`` is the fp16 GradScaler, ``loss_weight`` scales
    the loss for the backward only (a rank's share of an uneven global batch under DDP, distributed.py).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with amp() if amp is not None else contextlib.nullcontext():
        _, loss = model(X, mask)
    scaled = loss * loss_weight if loss_weight != 1.0 else loss
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        scaled.backward()
        optimizer.step()
    return loss.detach()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Patient order of one epoch: a pure function of (seed, epoch), so any step can be resumed."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g)


def _batch(ds: EHRParquetDataset, idx, vocab: Vocab, n_ctx: int, device: torch.device):
    X, mask = collate_halo([ds[int(i)] for i in idx], vocab, n_ctx)
    return X.to(device), mask.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: EHRParquetDataset, vocab: Vocab, n_ctx: int, batch_size: int,
             device: torch.device) -> float:
    """Mean loss over a dataset (batch losses weighted by batch size), in a fixed order."""
    model.eval()
    total, n = 0.0, 0
    for b0 in range(0, len(ds), batch_size):
        idx = range(b0, min(b0 + batch_size, len(ds)))
        X, mask = _batch(ds, idx, vocab, n_ctx, device)
        _, loss = model(X, mask)
        total += float(loss) * len(idx)
        n += len(idx)
    return total / max(n, 1)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- checkpoints
def _ckpt_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _list_ckpts(work_dir) -> list[str]:
    d = storage.join(work_dir, CKPT_DIR)
    if not storage.exists(d):
        return []
    return [n for n in storage.listdir(d) if n.startswith("step_") and n.endswith(".pt")]


def _save(path: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(path, buf.getvalue())


def _load(path: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def resolve_resume(resume_from: str | Path) -> str:
    """A step checkpoint file, or a run/checkpoint directory (its newest step checkpoint)."""
    p = str(resume_from)
    if p.endswith(".pt"):
        if not storage.exists(p):
            raise FileNotFoundError(f"resume_from={p}: no such checkpoint. List {CKPT_DIR}/ of the run for "
                                    "the step_*.pt files, or pass the run directory to take the newest.")
        return p
    base = p.rstrip("/")
    if base.endswith("/" + CKPT_DIR) or base == CKPT_DIR:
        base = base[:-len(CKPT_DIR)].rstrip("/") or "."
    names = _list_ckpts(base)
    if not names:
        raise FileNotFoundError(f"resume_from={p}: holds no {CKPT_DIR}/step_*.pt checkpoint. Start without "
                                "resume_from in an empty out_dir.")
    return storage.join(base, CKPT_DIR, names[-1])


# ---------------------------------------------------------------------------------------------- the loop
def train(model: torch.nn.Module, train_ds: EHRParquetDataset, val_ds: EHRParquetDataset | None, vocab: Vocab,
          work_dir: str | Path, args: TrainArgs, run_hash: str = "", resume_from: str | Path | None = None,
          device: str | torch.device | None = None, progress: bool = True, precision: str = "fp32",
          dp: DPConfig | None = None, dist: DistContext | None = None) -> dict:
    """Train ``model`` in place; step checkpoints go to ``work_dir/checkpoints``.

    Returns ``{"best_state", "history", "step", "epoch", "best_val", "best_step", "stopped_early", "privacy"}``;
    the model ends holding its *last* weights, ``best_state`` the best by validation loss (the last when there is
    no val set). ``precision``: "fp32" | "bf16" | "fp16" (precision.py); ``dp``: DP-SGD options (privacy.py);
    ``dist``: this process's rank under torchrun (distributed.py; rank 0 alone writes checkpoints).
    """
    args = args.validate()
    device = pick_device(device)
    model.to(device)
    n_ctx = model.config.n_ctx
    precision = validate_precision(precision, device)
    dist = dist or SINGLE
    amp = lambda: autocast(precision, device)
    scaler = grad_scaler(precision, device)
    optimizer = make_optimizer(model, args.lr)
    ck: dict = {}
    step, epoch, batch_pos = 0, 0, 0
    best_val, best_step, bad_evals, best_state = float("inf"), -1, 0, None
    history: list[dict] = []
    done = stopped_early = False
    if resume_from is not None:
        path = resolve_resume(resume_from)
        ck = _load(path)
        if run_hash and ck.get("run_hash") != run_hash:
            raise ConfigError(f"resume_from={path} was written by a different run (hash {ck.get('run_hash')} != "
                              f"{run_hash}): model, data, lr, batch size, seed, precision or dp_* options "
                              "differ. Resume with the same arguments, or start fresh in an empty out_dir.")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step, epoch, batch_pos = int(ck["step"]), int(ck["epoch"]), int(ck["batch_pos"])
        best_val, best_step, bad_evals = float(ck["best_val"]), int(ck["best_step"]), int(ck["bad_evals"])
        best_state = ck.get("best_model")
        history = list(ck["history"])
        done, stopped_early = bool(ck["done"]), bool(ck["stopped_early"])
        torch.set_rng_state(ck["torch_rng"])  # nothing in HALO draws from it today; dropout would
        if device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, step, epoch, batch_pos)

    n = len(train_ds)
    per_epoch = -(-n // args.batch_size)
    total = per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, per_epoch * args.epochs)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    private = None
    if dp is not None and dp.enabled:  # DP-SGD: the noise is calibrated for the `total` planned steps
        private = PrivateTraining(model, optimizer, n_train=n, batch_size=args.batch_size, steps=total, config=dp,
                                  seed=args.seed, device=device, precision=precision, rank=dist.rank,
                                  world_size=dist.world_size)
        if resume_from is not None:
            private.load_state_dict(ck.get("privacy"), where=str(resume_from))
    elif ck.get("privacy"):
        raise ConfigError(f"resume_from={resume_from} is a DP-SGD run: resume it with the same dp_* options, "
                          "or its privacy accounting would be lost.")
    if "scaler" in ck:
        scaler.load_state_dict(ck["scaler"])
    step_model = dist.wrap(model) if private is None else model  # DDP; Opacus wraps the model itself under DP
    collate = HaloCollate(vocab, n_ctx)
    last_eval_step = max((h["step"] for h in history if h["split"] == "val"), default=-1)

    def do_eval() -> None:
        nonlocal best_val, best_step, bad_evals, best_state, last_eval_step
        val = evaluate(model, val_ds, vocab, n_ctx, args.batch_size, device)
        history.append({"step": step, "epoch": epoch, "split": "val", "loss": val,
                        **({"epsilon": private.epsilon()} if private is not None else {})})  # DP: spent so far
        last_eval_step = step
        if val < best_val:
            best_val, best_step, bad_evals, best_state = val, step, 0, _cpu_state(model)
        else:
            bad_evals += 1

    def checkpoint() -> None:
        state = {"model": _cpu_state(model), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                 "batch_pos": batch_pos, "best_val": best_val, "best_step": best_step, "bad_evals": bad_evals,
                 "best_model": best_state, "history": history, "done": done, "stopped_early": stopped_early,
                 "run_hash": run_hash, "data_order": {"seed": args.seed, "epoch": epoch, "batch_pos": batch_pos},
                 "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        if private is not None:
            state["privacy"] = private.state_dict()  # accountant history: a resumed run keeps counting
        _save(storage.join(work_dir, CKPT_DIR, _ckpt_name(step)), state)
        if args.keep_checkpoints and not storage.is_gcs(work_dir):
            for old in _list_ckpts(work_dir)[:-args.keep_checkpoints]:
                Path(work_dir, CKPT_DIR, old).unlink(missing_ok=True)

    bar = tqdm(total=total, initial=min(step, total), desc="train", unit="step", disable=not progress or not dist.is_main)
    while not done and epoch < args.epochs:
        order = epoch_order(n, args.seed, epoch)
        while batch_pos < per_epoch:
            if private is not None:  # a Poisson batch of expected size batch_size, this rank's share
                total_loss, n_loss = dist.sum(*private.step(step, private.batch_indices(step), train_ds, collate, amp))
                loss = total_loss / n_loss if n_loss else float("nan")  # nan: an empty Poisson batch
            else:
                idx = order[batch_pos * args.batch_size:(batch_pos + 1) * args.batch_size]
                local = dist.shard(idx)  # the whole batch unless under torchrun
                X, mask = _batch(train_ds, local, vocab, n_ctx, device)
                loss = float(train_step(step_model, optimizer, X, mask, amp, scaler,
                                        dist.loss_weight(len(local), len(idx))))
                if dist.enabled:  # the global-batch mean, as one process would log it
                    total_loss, n_loss = dist.sum(loss * len(local) if len(local) else 0.0, len(local))
                    loss = total_loss / n_loss
            step += 1
            batch_pos += 1
            history.append({"step": step, "epoch": epoch, "split": "train", "loss": loss})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", best_val=f"{best_val:.4g}",
                            **({"eps": f"{private.epsilon():.3g}"} if private is not None and step % 50 == 0 else {}))
            epoch_end = batch_pos == per_epoch
            due = (step % args.eval_every == 0) if args.eval_every else epoch_end
            if val_ds is not None and len(val_ds) and due:
                do_eval()
                if args.patience is not None and bad_evals >= args.patience:
                    stopped_early = done = True
                    log.info("early stop at step %d: no val improvement in %d evaluations (best %.5g at %d)",
                             step, bad_evals, best_val, best_step)
            if args.max_steps is not None and step >= args.max_steps:
                done = True
            if epoch_end:
                epoch, batch_pos = epoch + 1, 0
                done = done or epoch >= args.epochs
            if done and val_ds is not None and len(val_ds) and last_eval_step != step:
                do_eval()  # the final weights always get a validation score
            if dist.is_main and (done or (step % args.ckpt_every == 0 if args.ckpt_every else due)):
                checkpoint()
            if kill_at and step == kill_at:
                log.warning("%s=%d: killing this process (fault injection)", KILL_ENV, kill_at)
                os.kill(os.getpid(), signal.SIGKILL)
            if done or epoch_end:
                break
    bar.close()
    privacy = None
    if private is not None:
        private.close()
        privacy = private.metrics()
        log.info("DP-SGD: epsilon %.4g at delta %g after %d steps", privacy["dp_epsilon"], privacy["dp_delta"], step)
    if best_state is None:  # no validation set: the last weights are the result
        best_state, best_step = _cpu_state(model), step
    return {"best_state": best_state, "history": history, "step": step, "epoch": epoch, "best_val": best_val,
            "best_step": best_step, "stopped_early": stopped_early, "privacy": privacy}


# ---------------------------------------------------------------------------------------------- the stage
def label_probs(ds: EHRParquetDataset, vocab: Vocab) -> pd.DataFrame:
    """Empirical joint distribution of whole label vectors: ``labels`` ('|'-joined tokens), ``probability``."""
    keys = ["|".join(vocab.tokens[t].token for t in ds[i][0]) for i in range(len(ds))]
    counts = pd.Series(keys, dtype="object").value_counts()
    df = pd.DataFrame({"labels": counts.index.astype(str), "probability": counts.to_numpy() / max(len(keys), 1)})
    return df.sort_values(["probability", "labels"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dir_is_empty(path) -> bool:
    if storage.is_gcs(path):
        return not storage.exists(path)
    p = Path(path)
    return not p.exists() or not any(p.iterdir())


def train_to_dir(tables_dir: str | Path, out_dir: str | Path, model_type: str = "halo", preset: str = "tiny",
                 epochs: int = 50, batch_size: int = 48, lr: float = 1e-4, rules_dir: str | Path | None = None,
                 seed: int = 0, resume_from: str | Path | None = None, max_steps: int | None = None,
                 eval_every: int | None = 500, patience: int | None = None, ckpt_every: int | None = None,
                 keep_checkpoints: int | None = 2, n_ctx: int | None = None,
                 device: str | torch.device | None = None, progress: bool = True, precision: str = "fp32",
                 dp_target_epsilon: float = 0.0, dp_delta: float | None = None, dp_noise_multiplier: float | None = None,
                 dp_max_grad_norm: float = 1.0, dp_physical_batch_size: int | None = None,
                 dp_accountant: str = "rdp", min_code_count: int = 0, distributed: bool = False,
                 group_heads: bool = True, **model_overrides: Any) -> dict:
    """The train stage: fit HALO or ConSequence on the train split, validate on val, write a checkpoint dir.

    Args:
        tables_dir: preprocess output (tables + vocab.json); ``train`` patients train, ``val`` patients validate.
        out_dir: checkpoint directory; must be empty unless ``resume_from`` is given. Holds ``model.pt`` (best
            weights), ``config.json``, ``vocab.json``, ``rules.json`` (ConSequence), ``history.parquet``,
            ``label_probs.parquet``, ``token_groups.json`` (``vocab.token_groups``: the sampler's one-value-per-
            variable constraints), ``meta.json`` (written last) and ``checkpoints/step_*.pt``.
        model_type: ``"halo"`` or ``"consequence"`` (needs ``rules_dir``).
        preset: model size from ``HaloConfig.preset`` (``"tiny"`` runs on a laptop CPU in seconds).
        rules_dir: rules-stage output holding ``rules.json``.
        seed: model init and data order.
        resume_from: a ``step_*.pt`` checkpoint, or a run directory (its newest checkpoint).
        n_ctx: rows per patient; default from the tables' ``meta.json`` (``n_ctx``), else 48.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA, with loss scaling); see precision.py.
        dp_target_epsilon: DP-SGD privacy budget; 0 = no differential privacy (privacy.py, docs/privacy.md).
        dp_delta: DP delta, < 1 / n_train; None = min(1e-5, 1 / (10 n_train)).
        dp_noise_multiplier: fixed noise multiplier instead of a target epsilon (epsilon is then reported).
        dp_max_grad_norm: per-patient gradient clipping norm.
        dp_physical_batch_size: largest batch put through the model at once (BatchMemoryManager).
        dp_accountant: ``"rdp"`` or ``"prv"``.
        min_code_count: leave out of the vocabulary (and so of the model and the synthetic data) every clinical
            code held by fewer than this many training patients; 0 = keep all (privacy.py, docs/privacy.md).
        distributed: join the torchrun process group (distributed.py); rank 0 alone writes ``out_dir``.
        group_heads: give each single-valued variable (event type, visit bins, calendar kinds, labels:
            ``vocab.token_groups``) a categorical head instead of a chain of per-token Bernoullis (HALO's), so a
            visit gets one month drawn from one softmax. False = HI's head only. Ignored for HALO-Coarse.
        model_overrides: extra ``HaloConfig`` fields (e.g. ``n_embd=64``, ``coarse=True``).
    """
    from ..rules.ruleset import RULES_FILE, load_rules, validate_rules

    args = TrainArgs(epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, eval_every=eval_every,
                     patience=patience, ckpt_every=ckpt_every, keep_checkpoints=keep_checkpoints, seed=seed).validate()
    dp = DPConfig(dp_target_epsilon, dp_delta, dp_noise_multiplier, dp_max_grad_norm, dp_physical_batch_size,
                  dp_accountant).validate()
    if resume_from is None and not _dir_is_empty(out_dir):
        raise FileExistsError(f"{out_dir} is not empty: pass resume_from={storage.join(out_dir, CKPT_DIR)} to "
                              "continue that run, or choose an empty out_dir.")
    model_class(model_type)
    vocab = Vocab.load(storage.join(tables_dir, "vocab.json"))
    tables = read_tables(tables_dir)   # once, for the rare-code filter and both datasets
    rare_codes: list[str] = []
    if min_code_count:
        from .dp import code_patient_counts, min_code_count_vocab
        vocab, rare_codes = min_code_count_vocab(vocab, code_patient_counts(tables, "train"), min_code_count)
    meta_path = storage.join(tables_dir, "meta.json")
    tables_meta = storage.read_json(meta_path) if storage.exists(meta_path) else {}
    n_ctx = int(n_ctx or tables_meta.get("n_ctx") or 48)  # HI:config.py n_ctx
    tp = tables[0][tables[0]["split"] == "train"]
    groups = token_groups(vocab, tp, tables[1][tables[1]["patient_id"].isin(tp["patient_id"])])
    if group_heads and not model_overrides.get("coarse") and "groups" not in model_overrides:
        model_overrides["groups"] = [(g.start, g.stop) for g in groups]
    config = HaloConfig.preset(preset, vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx, **model_overrides)
    rules, compiled = None, None
    if model_type == "consequence":
        if rules_dir is None:
            raise ConfigError("model_type='consequence' needs rules_dir: run the rules stage "
                              "(synthehr_core.rules.mining.mine_rules_to_dir) and pass its output directory.")
        rules_path = storage.join(rules_dir, RULES_FILE)
        rules = validate_rules(load_rules(rules_path), vocab, rules_path)
        from .consequence import compile_rules
        compiled = compile_rules(rules, vocab)
    train_ds = EHRParquetDataset(tables_dir, "train", n_ctx, vocab, tables)
    try:
        val_ds = EHRParquetDataset(tables_dir, "val", n_ctx, vocab, tables)
    except ConfigError:
        val_ds = None
        log.warning("%s has no val split: keeping the last weights, no early stopping.", tables_dir)
    train_args = {k: v for k, v in asdict(args).items()}
    hashed = {"config": config.to_dict(), "model_type": model_type, "lr": lr, "batch_size": batch_size,
              "seed": seed, "n_train": len(train_ds), "rules": [r.to_json() for r in rules] if rules else None}
    if dp.enabled:
        hashed["dp"] = dp.to_dict()
    if precision != "fp32":
        hashed["precision"] = precision
    if min_code_count:
        hashed["min_code_count"] = min_code_count
    run_hash = _hash(hashed)
    model = make_model(model_type, config, seed, compiled)
    dist = setup_distributed() if distributed else SINGLE
    dev = pick_device(device)
    if dist.enabled and (device is None or (dev.type == "cuda" and dev.index is None)):
        dev = dist.device()  # one GPU per rank: cuda:<LOCAL_RANK>
    t0 = time.perf_counter()
    res = train(model, train_ds, val_ds, vocab, out_dir, args, run_hash=run_hash, resume_from=resume_from,
                device=dev, progress=progress, precision=precision, dp=dp, dist=dist)
    seconds = time.perf_counter() - t0
    if not dist.is_main:  # rank 0 writes the checkpoint directory; the others wait for it
        dist.barrier()
        return {"rank": dist.rank, "steps": res["step"], "seconds": round(seconds, 3)}

    model.load_state_dict(res["best_state"])
    extra = {"training": train_args, "seed": seed, "preset": preset, "config_hash": run_hash,
             "tables_dir": str(tables_dir),
             "versions": versions("torch")}
    write_checkpoint(out_dir, model, vocab, model_type, extra_config=extra)
    if rules is not None:
        from ..rules.ruleset import save_rules
        save_rules(storage.join(out_dir, RULES_FILE), rules, source=str(rules_dir))
    eps_col = ["epsilon"] if dp.enabled else []  # DP runs: epsilon spent at each validation
    hist = pd.DataFrame(res["history"], columns=["step", "epoch", "split", "loss", *eps_col])
    storage.write_parquet(storage.join(out_dir, "history.parquet"), pa.Table.from_pandas(
        hist.astype({"step": "int64", "epoch": "int64", "split": "object", "loss": "float64",
                     **dict.fromkeys(eps_col, "float64")}), preserve_index=False))
    storage.write_parquet(storage.join(out_dir, "label_probs.parquet"),
                          pa.Table.from_pandas(label_probs(train_ds, vocab), preserve_index=False))
    save_token_groups(storage.join(out_dir, TOKEN_GROUPS_FILE), groups)
    train_losses = hist.loc[hist["split"] == "train", "loss"]
    info = {"model_type": model_type, "preset": preset, "seed": seed, "config_hash": run_hash,
            "steps": res["step"], "epochs_run": res["epoch"], "best_step": res["best_step"],
            "best_val_loss": None if not np.isfinite(res["best_val"]) else res["best_val"],
            "first_train_loss": float(train_losses.iloc[0]) if len(train_losses) else None,
            "final_train_loss": float(train_losses.iloc[-1]) if len(train_losses) else None,
            "stopped_early": res["stopped_early"], "n_train": len(train_ds),
            "n_val": len(val_ds) if val_ds is not None else 0, "n_rules": len(rules) if rules else 0,
            "device": str(dev), "seconds": round(seconds, 3), "resumed_from": str(resume_from) if resume_from else None,
            "precision": precision, "world_size": dist.world_size, **(res["privacy"] or {}),
            **({"min_code_count": min_code_count, "n_rare_codes_dropped": len(rare_codes)} if min_code_count else {})}
    storage.write_json(storage.join(out_dir, "meta.json"), info)  # written last: the directory is complete
    dist.barrier()
    return info

"""The train stage: HALO / ConSequence on a tables directory, with explicit, bit-exact resume.

Loop as HI:train_model.py and KI:train_consequence.py (Adam, constant lr 1e-4, validation every N steps, keep the
best) plus early stopping with patience (KI), and what the references lack:

* **resume is explicit** (``resume_from=``); a non-empty ``out_dir`` without it is an error, never a silent resume;
* a step checkpoint holds model, optimizer, step, epoch and batch position, best validation loss and weights,
  the patience counter, the history, and RNG state; the data order of epoch e is a pure function of
  ``(seed, e)``, so resuming from any step checkpoint reaches bit-identical weights on CPU;
* the model is built under a forked, seeded RNG (no global seeding).

What defines a run is one ``TrainConfig`` (config.py); ``train_to_dir`` adds where it reads and writes. The loop
state lives in ``LoopState``, which is also what a step checkpoint restores. ``on_step(step)`` is called after
every step's checkpoint (the resume test kills its own process there). ``make_optimizer`` / ``train_step`` are
the seams for AMP, DP-SGD (Opacus) and DDP: the loss is a per-sample constant-normalised mean (HALO's scale)
and the model has no buffers.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from .. import storage, versions
from ..data.schema import read_tables
from ..data.vocab import TOKEN_GROUPS_FILE, TokenGroup, Vocab, save_token_groups, token_groups
from ..errors import ConfigError
from ..randomness import torch_seed
from .checkpoint import model_class, write_checkpoint
from .config import TrainArgs, TrainConfig, config_or_options
from .distributed import SINGLE, DistContext
from .distributed import setup as setup_distributed
from .dp import DPConfig, PrivateTraining
from .halo import HaloConfig
from .precision import autocast, grad_scaler, validate_precision
from .tensors import EHRParquetDataset, HaloCollate, collate_halo

__all__ = ["CKPT_DIR", "LoopState", "TrainArgs", "TrainConfig", "bucket_order", "epoch_order", "make_model",
           "make_optimizer", "pick_device", "resolve_resume", "run_identity", "train", "train_step", "train_to_dir",
           "validation_loss"]

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------- pieces
def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or for None / "auto" the GPU when torch sees one, else the CPU. A silent CPU fallback on a
    machine that was given a GPU (a pod with ``nvidia.com/gpu``: NVIDIA_VISIBLE_DEVICES names devices, or
    /dev/nvidia0 exists) is refused: it is a CPU-only torch build or a broken driver, and would run for days."""
    if device is not None and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    gpu = _assigned_gpu()
    if gpu:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"device='auto': this machine was given a GPU ({gpu}) but torch {torch.__version__} "
                          f"({build}) cannot use it, in image {os.environ.get('SYNTHEHR_IMAGE', '(unknown: SYNTHEHR_IMAGE unset)')}. "
                          "Build the GPU stages with CUDA torch (`make images-push`, docs/deploy.md), check the "
                          "node's NVIDIA driver, or pass device='cpu' to run on the CPU on purpose.")
    return torch.device("cpu")


def _assigned_gpu() -> str:
    """What says this machine has a GPU for us ("" = nothing): the device plugin's NVIDIA_VISIBLE_DEVICES (GPU
    ids; "all" alone is only a CUDA base image's default), or a device node."""
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("void", "none", "all"):
        return f"NVIDIA_VISIBLE_DEVICES={visible}"
    return "/dev/nvidia0" if os.path.exists("/dev/nvidia0") else ""


def make_model(model_type: str, config: HaloConfig, seed: int, rules=None) -> torch.nn.Module:
    """Build the model with its weights drawn from ``seed`` only (forked RNG: the caller's state is untouched)."""
    cls = model_class(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed))             # the root stream of the train seed
        model = cls(config)
    if rules is not None:
        model.attach_rules(rules)
    return model


def make_optimizer(model: torch.nn.Module, lr: float, fused: bool | None = None) -> torch.optim.Optimizer:
    """HI/KI's Adam: no weight decay, no schedule. ``fused`` (default: on CPU and CUDA) updates each parameter in
    one kernel instead of a pass over memory per operation: the same update up to float rounding in the last
    bits, and most of a trimmed tiny-model step (docs/speed.md). ``fused=False`` is the for-loop Adam, bit for bit."""
    params = list(model.parameters())
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, mask: torch.Tensor,
               amp=None, scaler: torch.amp.GradScaler | None = None, loss_weight: float = 1.0,
               n_ctx: int | None = None) -> torch.Tensor:
    """One optimiser step on a batch; returns the detached loss.

    ``amp`` makes the autocast context (precision.py), ``scaler`` is the fp16 GradScaler, ``loss_weight`` scales
    the loss for the backward only (a rank's share of an uneven global batch under DDP, distributed.py), ``n_ctx``
    is the nominal row count of a trimmed batch (``collate_halo(..., trim=True)``; the loss keeps HI's normaliser).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with amp() if amp is not None else contextlib.nullcontext():
        _, loss = model(X, mask) if n_ctx is None else model(X, mask, n_ctx=n_ctx)
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
    g = torch.Generator().manual_seed(torch_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=g)


def bucket_order(order: torch.Tensor, rows: torch.Tensor, batch_size: int, seed: int, epoch: int, window: int
                 ) -> torch.Tensor:
    """Length-bucketed epoch order: ``order`` cut into runs of ``window`` full batches, each run sorted by the
    patients' row counts ``rows`` (stable) and cut into batches, then the full batches shuffled (stream
    ``("buckets", epoch)``); the last, partial batch stays last. Every patient is still seen once per epoch, but a
    batch now holds patients of similar length, so trimmed batches are shorter (docs/speed.md)."""
    n_full = len(order) // batch_size * batch_size
    run = window * batch_size
    parts = [order[a:min(a + run, n_full)] for a in range(0, n_full, run)]
    parts = [p[torch.argsort(rows[p], stable=True)] for p in parts]
    batches = torch.cat(parts).view(-1, batch_size) if parts else order[:0].view(0, batch_size)
    g = torch.Generator().manual_seed(torch_seed(seed, "buckets", epoch))
    return torch.cat([batches[torch.randperm(len(batches), generator=g)].flatten(), order[n_full:]])


def _batch(ds: EHRParquetDataset, idx, vocab: Vocab, n_ctx: int, device: torch.device, trim: bool = True):
    X, mask = collate_halo([ds[int(i)] for i in idx], vocab, n_ctx, trim=trim)
    return X.to(device), mask.to(device)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, ds: EHRParquetDataset, vocab: Vocab, n_ctx: int, batch_size: int,
                    device: torch.device, trim: bool = True) -> float:
    """Mean loss over a dataset (batch losses weighted by batch size), in a fixed order; ``trim``: each batch
    trimmed to its longest patient (the same loss, HI's normaliser kept)."""
    model.eval()
    total, n = 0.0, 0
    for b0 in range(0, len(ds), batch_size):
        idx = range(b0, min(b0 + batch_size, len(ds)))
        X, mask = _batch(ds, idx, vocab, n_ctx, device, trim)
        _, loss = model(X, mask, n_ctx=n_ctx) if trim else model(X, mask)
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
@dataclass
class LoopState:
    """Where a run is and what it has kept; with the model, optimiser and RNG states it is a step checkpoint."""
    step: int = 0
    epoch: int = 0
    batch_pos: int = 0                # batches of `epoch` done
    best_val: float = float("inf")
    best_step: int = -1
    bad_evals: int = 0                # evaluations since the best one (patience)
    best_state: dict | None = None    # the best weights so far, on the CPU
    history: list[dict] = field(default_factory=list)
    done: bool = False
    stopped_early: bool = False
    last_eval_step: int = -1

    @classmethod
    def from_checkpoint(cls, ck: dict) -> LoopState:
        history = list(ck["history"])
        return cls(step=int(ck["step"]), epoch=int(ck["epoch"]), batch_pos=int(ck["batch_pos"]),
                   best_val=float(ck["best_val"]), best_step=int(ck["best_step"]), bad_evals=int(ck["bad_evals"]),
                   best_state=ck.get("best_model"), history=history, done=bool(ck["done"]),
                   stopped_early=bool(ck["stopped_early"]),
                   last_eval_step=max((h["step"] for h in history if h["split"] == "val"), default=-1))

    def checkpoint_fields(self) -> dict:
        """The checkpoint keys of the loop state, in checkpoint order."""
        return {"step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos, "best_val": self.best_val,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "best_model": self.best_state,
                "history": self.history, "done": self.done, "stopped_early": self.stopped_early}


class _Loop:
    """One run's moving parts (model, optimiser, loss scaler, DP-SGD, DDP) around its ``LoopState``."""

    def __init__(self, model: torch.nn.Module, train_ds: EHRParquetDataset, val_ds: EHRParquetDataset | None,
                 vocab: Vocab, work_dir, args: TrainArgs, run_hash: str, device: torch.device, precision: str,
                 dist: DistContext, legacy_step: bool = False, length_buckets: int = 0):
        self.model, self.train_ds, self.val_ds, self.vocab = model, train_ds, val_ds, vocab
        self.work_dir, self.args, self.run_hash = work_dir, args, run_hash
        self.device, self.precision, self.dist = device, precision, dist
        self.n_ctx = model.config.n_ctx
        self.trim, self.length_buckets = not legacy_step, length_buckets
        self.scaler = grad_scaler(precision, device)
        self.optimizer = make_optimizer(model, args.lr, fused=False if legacy_step else None)
        self.state = LoopState()
        self.per_epoch = -(-len(train_ds) // args.batch_size)
        planned = self.per_epoch * args.epochs
        self.total = planned if args.max_steps is None else min(args.max_steps, planned)
        self.private: PrivateTraining | None = None
        self.step_model = model
        self.collate = HaloCollate(vocab, self.n_ctx, self.trim)

    def amp(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def resume(self, resume_from: str | Path) -> dict:
        """Restore model, optimiser, loop state and RNG from a step checkpoint; returns the checkpoint."""
        path = resolve_resume(resume_from)
        ck = _load(path)
        if self.run_hash and ck.get("run_hash") != self.run_hash:
            raise ConfigError(f"resume_from={path} was written by a different run (hash {ck.get('run_hash')} != "
                              f"{self.run_hash}): model, data, lr, batch size, seed, precision or dp_* options "
                              "differ. Resume with the same arguments, or start fresh in an empty out_dir.")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = LoopState.from_checkpoint(ck)
        torch.set_rng_state(ck["torch_rng"])  # nothing in HALO draws from it today; dropout would
        if self.device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], self.device)
        s = self.state
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, s.step, s.epoch, s.batch_pos)
        return ck

    def prepare_step(self, dp: DPConfig | None, ck: dict, resume_from) -> None:
        """DP-SGD or DDP around the model, and the resumed privacy accounting and loss scale."""
        if dp is not None and dp.enabled and self.length_buckets:
            raise ConfigError(f"length_buckets={self.length_buckets} cannot be combined with DP-SGD: its batches are "
                              "Poisson samples, which the privacy accounting assumes. Use length_buckets=0.")
        if dp is not None and dp.enabled:  # DP-SGD: the noise is calibrated for the `total` planned steps
            self.private = PrivateTraining(self.model, self.optimizer, n_train=len(self.train_ds),
                                           batch_size=self.args.batch_size, steps=self.total, config=dp,
                                           seed=self.args.seed, device=self.device, precision=self.precision,
                                           rank=self.dist.rank, world_size=self.dist.world_size)
            if resume_from is not None:
                self.private.load_state_dict(ck.get("privacy"), where=str(resume_from))
        elif ck.get("privacy"):
            raise ConfigError(f"resume_from={resume_from} is a DP-SGD run: resume it with the same dp_* options, "
                              "or its privacy accounting would be lost.")
        if "scaler" in ck:
            self.scaler.load_state_dict(ck["scaler"])
        # DDP; Opacus wraps the model itself under DP
        self.step_model = self.dist.wrap(self.model) if self.private is None else self.model

    def run(self, progress: bool, on_step: Callable[[int], None] | None) -> None:
        s, args = self.state, self.args
        bar = tqdm(total=self.total, initial=min(s.step, self.total), desc="train", unit="step",
                   disable=not progress or not self.dist.is_main)
        while not s.done and s.epoch < args.epochs:
            order = epoch_order(len(self.train_ds), args.seed, s.epoch)
            if self.length_buckets:
                order = bucket_order(order, self.rows(), args.batch_size, args.seed, s.epoch, self.length_buckets)
            while s.batch_pos < self.per_epoch:
                loss = self.train_batch(order)
                s.step += 1
                s.batch_pos += 1
                s.history.append({"step": s.step, "epoch": s.epoch, "split": "train", "loss": loss})
                bar.update(1)
                eps = self.private is not None and s.step % 50 == 0
                bar.set_postfix(loss=f"{loss:.4g}", best_val=f"{s.best_val:.4g}",
                                **({"eps": f"{self.private.epsilon():.3g}"} if eps else {}))
                epoch_end = self.after_step()
                if on_step is not None:
                    on_step(s.step)
                if s.done or epoch_end:
                    break
        bar.close()

    def rows(self) -> torch.Tensor:
        """Rows of each training patient up to its last visit (what a trimmed batch of it needs)."""
        if not hasattr(self, "_rows"):
            fvr, ds = self.vocab.first_visit_row, self.train_ds
            self._rows = torch.tensor([fvr + min(ds.n_visits(i), self.n_ctx - fvr) for i in range(len(ds))])
        return self._rows

    def train_batch(self, order: torch.Tensor) -> float:
        """One optimiser step; returns the loss of the whole (global) batch."""
        s, bs, dist = self.state, self.args.batch_size, self.dist
        if self.private is not None:  # a Poisson batch of expected size batch_size, this rank's share
            idx = self.private.batch_indices(s.step)
            total_loss, n_loss = dist.sum(*self.private.step(s.step, idx, self.train_ds, self.collate, self.amp,
                                                             n_ctx=self.n_ctx if self.trim else None))
            return total_loss / n_loss if n_loss else float("nan")  # nan: an empty Poisson batch
        idx = order[s.batch_pos * bs:(s.batch_pos + 1) * bs]
        local = dist.shard(idx)  # the whole batch unless under torchrun
        X, mask = _batch(self.train_ds, local, self.vocab, self.n_ctx, self.device, self.trim)
        loss = float(train_step(self.step_model, self.optimizer, X, mask, self.amp, self.scaler,
                                dist.loss_weight(len(local), len(idx)), n_ctx=self.n_ctx if self.trim else None))
        if dist.enabled:  # the global-batch mean, as one process would log it
            total_loss, n_loss = dist.sum(loss * len(local) if len(local) else 0.0, len(local))
            loss = total_loss / n_loss
        return loss

    def after_step(self) -> bool:
        """Validate, stop, advance the epoch and checkpoint as due; returns whether the epoch ended."""
        s, args = self.state, self.args
        epoch_end = s.batch_pos == self.per_epoch
        due = (s.step % args.eval_every == 0) if args.eval_every else epoch_end
        has_val = self.val_ds is not None and len(self.val_ds) > 0
        if has_val and due:
            self.validate()
            if args.patience is not None and s.bad_evals >= args.patience:
                s.stopped_early = s.done = True
                log.info("early stop at step %d: no val improvement in %d evaluations (best %.5g at %d)",
                         s.step, s.bad_evals, s.best_val, s.best_step)
        if args.max_steps is not None and s.step >= args.max_steps:
            s.done = True
        if epoch_end:
            s.epoch, s.batch_pos = s.epoch + 1, 0
            s.done = s.done or s.epoch >= args.epochs
        if s.done and has_val and s.last_eval_step != s.step:
            self.validate()  # the final weights always get a validation score
        if self.dist.is_main and (s.done or (s.step % args.ckpt_every == 0 if args.ckpt_every else due)):
            self.checkpoint()
        return epoch_end

    def validate(self) -> None:
        s = self.state
        val = validation_loss(self.model, self.val_ds, self.vocab, self.n_ctx, self.args.batch_size, self.device,
                              self.trim)
        s.history.append({"step": s.step, "epoch": s.epoch, "split": "val", "loss": val,
                          **({"epsilon": self.private.epsilon()} if self.private is not None else {})})  # DP: so far
        s.last_eval_step = s.step
        if val < s.best_val:
            s.best_val, s.best_step, s.bad_evals, s.best_state = val, s.step, 0, _cpu_state(self.model)
        else:
            s.bad_evals += 1

    def checkpoint(self) -> None:
        s = self.state
        state = {"model": _cpu_state(self.model), "optimizer": self.optimizer.state_dict(), **s.checkpoint_fields(),
                 "run_hash": self.run_hash,
                 "data_order": {"seed": self.args.seed, "epoch": s.epoch, "batch_pos": s.batch_pos},
                 "torch_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.private is not None:
            state["privacy"] = self.private.state_dict()  # accountant history: a resumed run keeps counting
        _save(storage.join(self.work_dir, CKPT_DIR, _ckpt_name(s.step)), state)
        keep = self.args.keep_checkpoints
        if keep and not storage.is_gcs(self.work_dir):
            for old in _list_ckpts(self.work_dir)[:-keep]:
                Path(self.work_dir, CKPT_DIR, old).unlink(missing_ok=True)

    def finish(self) -> dict:
        s, privacy = self.state, None
        if self.private is not None:
            self.private.close()
            privacy = self.private.metrics()
            log.info("DP-SGD: epsilon %.4g at delta %g after %d steps", privacy["dp_epsilon"], privacy["dp_delta"],
                     s.step)
        if s.best_state is None:  # no validation set: the last weights are the result
            s.best_state, s.best_step = _cpu_state(self.model), s.step
        return {"best_state": s.best_state, "history": s.history, "step": s.step, "epoch": s.epoch,
                "best_val": s.best_val, "best_step": s.best_step, "stopped_early": s.stopped_early,
                "privacy": privacy}


def train(model: torch.nn.Module, train_ds: EHRParquetDataset, val_ds: EHRParquetDataset | None, vocab: Vocab,
          work_dir: str | Path, args: TrainArgs, run_hash: str = "", resume_from: str | Path | None = None,
          device: str | torch.device | None = None, progress: bool = True, precision: str = "fp32",
          dp: DPConfig | None = None, dist: DistContext | None = None,
          on_step: Callable[[int], None] | None = None, legacy_step: bool = False, length_buckets: int = 0) -> dict:
    """Train ``model`` in place; step checkpoints go to ``work_dir/checkpoints``.

    Returns ``{"best_state", "history", "step", "epoch", "best_val", "best_step", "stopped_early", "privacy"}``;
    the model ends holding its *last* weights, ``best_state`` the best by validation loss (the last when there is
    no val set). ``precision``: "fp32" | "bf16" | "fp16" (precision.py); ``dp``: DP-SGD options (dp.py);
    ``dist``: this process's rank under torchrun (distributed.py; rank 0 alone writes checkpoints);
    ``on_step(step)``: called after each step, once that step's checkpoint (if due) is written.
    ``legacy_step``: False (default) cuts each batch after its longest patient, HI's loss normaliser kept, and
    uses the fused Adam (the same objective, gradients and update up to float rounding, for a fraction of the
    work: docs/speed.md); True is the step before that, bit for bit: every padding row computed, as HI does, and
    the for-loop Adam.
    ``length_buckets``: 0 = off; W > 0 sorts each run of W batches of the epoch by patient length
    (``bucket_order``), which changes which patients share a batch (not DP-SGD: its batches are Poisson).
    """
    args = args.validate()
    if not (isinstance(length_buckets, int) and not isinstance(length_buckets, bool) and length_buckets >= 0):
        raise ConfigError(f"length_buckets must be an int >= 0 (0 = off; W = sort each run of W batches by "
                          f"patient length); got {length_buckets!r}.")
    device = pick_device(device)
    model.to(device)
    loop = _Loop(model, train_ds, val_ds, vocab, work_dir, args, run_hash, device,
                 validate_precision(precision, device), dist or SINGLE, legacy_step, length_buckets)
    ck = loop.resume(resume_from) if resume_from is not None else {}
    loop.prepare_step(dp, ck, resume_from)
    loop.run(progress, on_step)
    return loop.finish()


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


def run_identity(config: TrainConfig, model_config: HaloConfig, n_train: int, rules, length_buckets: int = 0
                 ) -> dict:
    """What decides the weights, hashed into ``config_hash``: a checkpoint resumes only a run of the same hash."""
    loop = config.loop
    out = {"config": model_config.to_dict(), "model_type": config.model_type, "lr": loop.lr,
           "batch_size": loop.batch_size, "seed": loop.seed, "n_train": n_train,
           "rules": [r.to_json() for r in rules] if rules else None}
    if length_buckets:  # the batches' make-up; off (0) stays out, so other runs keep their hash
        out["length_buckets"] = length_buckets
    if config.dp.enabled:  # options at their defaults stay out, so older runs keep their hash
        out["dp"] = config.dp.to_dict()
    if config.precision != "fp32":
        out["precision"] = config.precision
    if config.min_code_count:
        out["min_code_count"] = config.min_code_count
    return out


@dataclass
class _TrainData:
    """What the train stage reads before training: vocabulary, datasets, model config, rules and the run hash."""
    vocab: Vocab
    groups: list[TokenGroup]
    rare_codes: list[str]
    model_config: HaloConfig
    rules: list | None
    compiled_rules: Any
    train_ds: EHRParquetDataset
    val_ds: EHRParquetDataset | None
    run_hash: str
    length_buckets: int = 0


def _model_config(config: TrainConfig, vocab: Vocab, n_ctx: int, groups: list[TokenGroup]) -> HaloConfig:
    overrides = dict(config.model_overrides)
    if config.group_heads and not overrides.get("coarse") and "groups" not in overrides:
        overrides["groups"] = [(g.start, g.stop) for g in groups]
    return HaloConfig.preset(config.preset, vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx, **overrides)


def _read_rules(model_type: str, rules_dir, vocab: Vocab):
    """``(rules, compiled rules)`` for ConSequence, ``(None, None)`` for HALO."""
    if model_type != "consequence":
        return None, None
    from ..rules.ruleset import RULES_FILE, load_rules, validate_rules
    from .consequence import compile_rules

    if rules_dir is None:
        raise ConfigError("model_type='consequence' needs rules_dir: run the rules stage "
                          "(synthehr_core.rules.mining.mine_rules_to_dir) and pass its output directory.")
    rules_path = storage.join(rules_dir, RULES_FILE)
    rules = validate_rules(load_rules(rules_path), vocab, rules_path)
    return rules, compile_rules(rules, vocab)


def _read_data(tables_dir, config: TrainConfig, rules_dir, length_buckets: int = 0) -> _TrainData:
    vocab = Vocab.load(storage.join(tables_dir, "vocab.json"))
    tables = read_tables(tables_dir)   # once, for the rare-code filter and both datasets
    rare_codes: list[str] = []
    if config.min_code_count:
        from .dp import code_patient_counts, min_code_count_vocab
        vocab, rare_codes = min_code_count_vocab(vocab, code_patient_counts(tables, "train"), config.min_code_count)
    meta_path = storage.join(tables_dir, "meta.json")
    tables_meta = storage.read_json(meta_path) if storage.exists(meta_path) else {}
    n_ctx = int(config.n_ctx or tables_meta.get("n_ctx") or 48)  # HI:config.py n_ctx
    tp = tables[0][tables[0]["split"] == "train"]
    groups = token_groups(vocab, tp, tables[1][tables[1]["patient_id"].isin(tp["patient_id"])])
    model_config = _model_config(config, vocab, n_ctx, groups)
    rules, compiled = _read_rules(config.model_type, rules_dir, vocab)
    train_ds = EHRParquetDataset(tables_dir, "train", n_ctx, vocab, tables)
    try:
        val_ds = EHRParquetDataset(tables_dir, "val", n_ctx, vocab, tables)
    except ConfigError:
        val_ds = None
        log.warning("%s has no val split: keeping the last weights, no early stopping.", tables_dir)
    run_hash = _hash(run_identity(config, model_config, len(train_ds), rules, length_buckets))
    return _TrainData(vocab, groups, rare_codes, model_config, rules, compiled, train_ds, val_ds, run_hash,
                      length_buckets)


def _write_outputs(out_dir, model: torch.nn.Module, data: _TrainData, config: TrainConfig, res: dict,
                   tables_dir, rules_dir) -> pd.DataFrame:
    """Everything but meta.json: checkpoint, rules, history, label priors, token groups; returns the history."""
    extra = {"training": asdict(config.loop), "seed": config.seed, "preset": config.preset,
             "config_hash": data.run_hash, "tables_dir": str(tables_dir), "versions": versions("torch")}
    if data.length_buckets:  # off (0) stays out of config.json
        extra["training"]["length_buckets"] = data.length_buckets
    write_checkpoint(out_dir, model, data.vocab, config.model_type, extra_config=extra)
    if data.rules is not None:
        from ..rules.ruleset import RULES_FILE, save_rules
        save_rules(storage.join(out_dir, RULES_FILE), data.rules, source=str(rules_dir))
    eps_col = ["epsilon"] if config.dp.enabled else []  # DP runs: epsilon spent at each validation
    hist = pd.DataFrame(res["history"], columns=["step", "epoch", "split", "loss", *eps_col])
    storage.write_parquet(storage.join(out_dir, "history.parquet"), pa.Table.from_pandas(
        hist.astype({"step": "int64", "epoch": "int64", "split": "object", "loss": "float64",
                     **dict.fromkeys(eps_col, "float64")}), preserve_index=False))
    storage.write_parquet(storage.join(out_dir, "label_probs.parquet"),
                          pa.Table.from_pandas(label_probs(data.train_ds, data.vocab), preserve_index=False))
    save_token_groups(storage.join(out_dir, TOKEN_GROUPS_FILE), data.groups)
    return hist


def _run_info(config: TrainConfig, data: _TrainData, res: dict, hist: pd.DataFrame, device: torch.device,
              seconds: float, resume_from, dist: DistContext) -> dict:
    """meta.json of the checkpoint directory."""
    train_losses = hist.loc[hist["split"] == "train", "loss"]
    mcc = config.min_code_count
    return {"model_type": config.model_type, "preset": config.preset, "seed": config.seed,
            "config_hash": data.run_hash, "steps": res["step"], "epochs_run": res["epoch"],
            "best_step": res["best_step"],
            "best_val_loss": None if not np.isfinite(res["best_val"]) else res["best_val"],
            "first_train_loss": float(train_losses.iloc[0]) if len(train_losses) else None,
            "final_train_loss": float(train_losses.iloc[-1]) if len(train_losses) else None,
            "stopped_early": res["stopped_early"], "n_train": len(data.train_ds),
            "n_val": len(data.val_ds) if data.val_ds is not None else 0,
            "n_rules": len(data.rules) if data.rules else 0, "device": str(device), "seconds": round(seconds, 3),
            "resumed_from": str(resume_from) if resume_from else None, "precision": config.precision,
            "world_size": dist.world_size, **(res["privacy"] or {}),
            **({"min_code_count": mcc, "n_rare_codes_dropped": len(data.rare_codes)} if mcc else {}),
            **({"length_buckets": data.length_buckets} if data.length_buckets else {})}


def _config_of(config: TrainConfig | None, options: dict) -> TrainConfig:
    return config_or_options(TrainConfig, config, options, lambda o: TrainConfig.from_options(**o))


def train_to_dir(tables_dir: str | Path, out_dir: str | Path, config: TrainConfig | None = None, *,
                 rules_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 device: str | torch.device | None = None, progress: bool = True, distributed: bool = False,
                 on_step: Callable[[int], None] | None = None, legacy_step: bool = False, length_buckets: int = 0,
                 **options: Any) -> dict:
    """The train stage: fit HALO or ConSequence on the train split, validate on val, write a checkpoint dir.

    Args:
        tables_dir: preprocess output (tables + vocab.json); ``train`` patients train, ``val`` patients validate.
        out_dir: checkpoint directory; must be empty unless ``resume_from`` is given. Holds ``model.pt`` (best
            weights), ``config.json``, ``vocab.json``, ``rules.json`` (ConSequence), ``history.parquet``,
            ``label_probs.parquet``, ``token_groups.json`` (``vocab.token_groups``: the sampler's one-value-per-
            variable constraints), ``meta.json`` (written last) and ``checkpoints/step_*.pt``.
        config: what defines the run (config.py: model, loop, precision, DP-SGD, vocabulary filter).
        rules_dir: rules-stage output holding ``rules.json`` (``model_type="consequence"``).
        resume_from: a ``step_*.pt`` checkpoint, or a run directory (its newest checkpoint).
        device: torch device; default cuda when available (under torchrun: this rank's GPU).
        progress: show a tqdm bar (rank 0).
        distributed: join the torchrun process group (distributed.py); rank 0 alone writes ``out_dir``.
        on_step: called with the step number after every step (and its checkpoint, when one is due).
        legacy_step: True = the training step before trimmed batches and the fused Adam, bit for bit (``train``).
        length_buckets: 0 = off; W > 0 = batches of similar-length patients (``bucket_order``; part of the run's
            hash, recorded in config.json and meta.json; not with DP-SGD).
        options: instead of ``config``, its option names as keywords (``epochs=3, dp_target_epsilon=1.0``); other
            names are extra ``HaloConfig`` fields (``n_embd=64``): ``TrainConfig.from_options``.
    Returns:
        the run summary, also written to ``meta.json``.
    """
    config = _config_of(config, options)
    if resume_from is None and not _dir_is_empty(out_dir):
        raise FileExistsError(f"{out_dir} is not empty: pass resume_from={storage.join(out_dir, CKPT_DIR)} to "
                              "continue that run, or choose an empty out_dir.")
    data = _read_data(tables_dir, config, rules_dir, length_buckets)
    model = make_model(config.model_type, data.model_config, config.seed, data.compiled_rules)
    dist = setup_distributed() if distributed else SINGLE
    dev = pick_device(device)
    if dist.enabled and (device is None or (dev.type == "cuda" and dev.index is None)):
        dev = dist.device()  # one GPU per rank: cuda:<LOCAL_RANK>
    t0 = time.perf_counter()
    res = train(model, data.train_ds, data.val_ds, data.vocab, out_dir, config.loop, run_hash=data.run_hash,
                resume_from=resume_from, device=dev, progress=progress, precision=config.precision, dp=config.dp,
                dist=dist, on_step=on_step, legacy_step=legacy_step, length_buckets=length_buckets)
    seconds = time.perf_counter() - t0
    if not dist.is_main:  # rank 0 writes the checkpoint directory; the others wait for it
        dist.barrier()
        return {"rank": dist.rank, "steps": res["step"], "seconds": round(seconds, 3)}
    model.load_state_dict(res["best_state"])
    hist = _write_outputs(out_dir, model, data, config, res, tables_dir, rules_dir)
    info = _run_info(config, data, res, hist, dev, seconds, resume_from, dist)
    storage.write_json(storage.join(out_dir, "meta.json"), info)  # written last: the directory is complete
    dist.barrier()
    return info

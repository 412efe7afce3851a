"""The train stage: HALO / ConSequence on a tables directory, preemption-safe, with bit-exact resume.

Loop as HI:train_model.py and KI:train_consequence.py (Adam, constant lr 1e-4, validation every N steps, keep the
best) plus early stopping with patience (KI), and what the references lack:

* **a run sized from the data** (schedule.py): ``epochs="auto"`` and ``eval_every="auto"`` resolved from the number
  of training patients, and a warm-up + cosine lr (``lr_schedule="cosine"``) set on the optimiser before each step
  as a pure function of the step, so resume needs no scheduler state; the sizing is logged once;

* **checkpoints outside the model** (``checkpoint_uri``: local, gs:// or s3://, keyed by ``checkpoint_key``): at a step
  period, every ``ckpt_minutes`` and at the end, each complete-or-absent (``checkpoint.StepCheckpoints``: the
  ``.pt``, then a marker with its digest; older ones pruned only after a newer one is complete). A rerun of the
  same config and data (a retried pod, a resubmitted pipeline) resumes from the newest complete one;
* a step checkpoint holds model, optimizer, step, epoch and batch position, best validation loss and weights,
  the patience counter, the history, and RNG state; the data order of epoch e is a pure function of
  ``(seed, e)``, so resuming from any step checkpoint reaches bit-identical weights on CPU;
* **the model directory is published whole** at the end (``storage.atomic_dir``): complete or absent, never a mix
  of two runs; it holds only what sampling needs (best weights, no optimiser state);
* **resume is explicit** beyond the run's own folder (``resume_from=``); a finished run is trained further only
  with ``extend=True``, which says what it keeps;
* progress reaches the log (``logging``, one line every N steps or seconds) for pods, where no bar shows;
* the model is built under a forked, seeded RNG (no global seeding).

What defines a run is one ``TrainConfig`` (config.py); ``train_to_dir`` adds where it reads and writes. The loop
state lives in ``LoopState``, which is also what a step checkpoint restores. ``on_step(step)`` is called after
every step's checkpoint (the resume tests kill their own process there; ``SYNTHEHR_FAULT_KILL_AT_STEP`` does the
same in a pipeline task). ``make_optimizer`` / ``train_step`` are the seams for AMP, DP-SGD (Opacus) and DDP: the
loss is a per-sample constant-normalised mean (HALO's scale) and the model has no buffers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
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
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import storage, versions
from ..data.schema import read_tables
from ..data.vocab import TOKEN_GROUPS_FILE, TokenGroup, Vocab, save_token_groups, token_groups
from ..errors import ConfigError, OutputExistsError
from ..randomness import torch_seed
from .checkpoint import StepCheckpoints, load_step_file, model_class, write_checkpoint
from .config import TrainArgs, TrainConfig, config_or_options
from .distributed import SINGLE, DistContext, launch
from .distributed import setup as setup_distributed
from .dp import DPConfig, PrivateTraining
from .halo import RECURRENCE_GAIN, HaloConfig
from .precision import autocast, grad_scaler, validate_precision
from .schedule import KEEP_BEST_MIN_VAL, Plan, keep_weights, lr_at, plan_run
from .tensors import EHRParquetDataset, HaloCollate, collate_halo

__all__ = ["CKPT_DIR", "LoopState", "TrainArgs", "TrainConfig", "bucket_order", "checkpoint_key",
           "default_checkpoint_uri", "epoch_order", "make_model", "make_optimizer", "pick_device",
           "resolve_resume", "run_identity", "train", "train_step", "train_to_dir",
           "validation_loss"]

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"  # resolve_resume also looks in <dir>/checkpoints


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
def resolve_resume(resume_from: str | Path) -> tuple[str, dict | None]:
    """``(step checkpoint path, its marker or None)`` for ``resume_from``: a ``step_*.pt`` file, a checkpoint
    folder (its newest complete checkpoint), or a model directory (the folder its meta.json names)."""
    p = str(resume_from)
    if p.endswith(".pt"):
        if not storage.exists(p):
            raise FileNotFoundError(f"resume_from={p}: no such checkpoint. List the run's checkpoint folder (meta.json "
                                    "'checkpoints') for the step_*.pt files, or pass the folder to take the newest.")
        marker = p[:-3] + ".json"
        return p, storage.read_json(marker) if storage.exists(marker) else None
    base = p.rstrip("/")
    meta = storage.join(base, "meta.json")
    if storage.exists(meta):
        base = storage.read_json(meta).get("checkpoints") or base
    for folder in (base, storage.join(base, CKPT_DIR)):
        ckpts = StepCheckpoints(folder)
        step = ckpts.latest()
        if step is not None:
            return ckpts.path(step), ckpts.marker(step)
    raise FileNotFoundError(f"resume_from={p}: holds no complete step checkpoint (step_*.pt with its .json marker)"
                            f"{f' in {base}' if base != p.rstrip('/') else ''}. Start without resume_from, or pass "
                            "a step_*.pt file itself (checkpoints written before markers have none).")


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


class _Progress:
    """The training log: one INFO line (step, loss, last validation loss, best, steps/s, ETA) every ``every`` steps
    or ``seconds`` seconds, whichever comes first, and at the first step, each validation and the last step: for
    pod logs, where no bar shows."""

    def __init__(self, every: int | None = None, seconds: float | None = 30.0):
        self.every, self.seconds = every, seconds

    def start(self, step: int, total: int) -> None:
        self.step0, self.total = step, total
        self.t0 = self.last = time.monotonic()

    def step(self, s: LoopState, loss: float, lr: float) -> None:
        now = time.monotonic()
        if not (s.done or s.step == self.step0 + 1 or s.last_eval_step == s.step  # first step, a new val loss
                or (self.every and s.step % self.every == 0)
                or (self.seconds is not None and now - self.last >= self.seconds)):
            return
        self.last = now
        rate = (s.step - self.step0) / max(now - self.t0, 1e-9)
        left = max(self.total - s.step, 0) / rate if rate > 0 else float("nan")
        val = next((h["loss"] for h in reversed(s.history) if h["split"] == "val"), None)
        best = f"{s.best_val:.5g}@{s.best_step}" if s.best_step >= 0 else "-"
        log.info("step %d/%d epoch %d lr %.3g loss %.5g val %s best %s %.3g steps/s ETA %s", s.step, self.total,
                 s.epoch, lr, loss, "-" if val is None else f"{val:.5g}", best, rate, _hms(left))


def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


class _Loop:
    """One run's moving parts (model, optimiser, loss scaler, DP-SGD, DDP) around its ``LoopState``."""

    def __init__(self, model: torch.nn.Module, train_ds: EHRParquetDataset, val_ds: EHRParquetDataset | None,
                 vocab: Vocab, ckpts: StepCheckpoints | None, args: TrainArgs, run_hash: str, device: torch.device,
                 precision: str, dist: DistContext, legacy_step: bool = False, length_buckets: int = 0):
        self.model, self.train_ds, self.val_ds, self.vocab = model, train_ds, val_ds, vocab
        self.ckpts, self.args, self.run_hash = ckpts, args, run_hash
        self.last_ckpt = time.monotonic()
        self.device, self.precision, self.dist = device, precision, dist
        self.n_ctx = model.config.n_ctx
        self.trim, self.length_buckets = not legacy_step, length_buckets
        self.scaler = grad_scaler(precision, device)
        self.optimizer = make_optimizer(model, args.lr, fused=False if legacy_step else None)
        self.state = LoopState()
        self.plan: Plan = plan_run(args, len(train_ds))
        self.per_epoch, self.total = self.plan.per_epoch, self.plan.total
        self.lr = lr_at(0, self.plan, args)   # of the next step; train_batch sets it on the optimiser
        self.private: PrivateTraining | None = None
        self.step_model = model
        self.collate = HaloCollate(vocab, self.n_ctx, self.trim)

    def amp(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def resume(self, path: str, marker: dict | None, explicit: bool, extend: bool) -> dict:
        """Restore model, optimiser, loop state and RNG from a step checkpoint; returns the checkpoint.

        A finished checkpoint (``done``) found in the run's own folder (``explicit=False``: a retried or
        resubmitted run) stays finished: the run publishes its model without training. ``resume_from`` a finished
        run (``explicit``) is an error unless ``extend``, which trains it on to the new ``epochs``/``max_steps``."""
        ck = load_step_file(path, marker)
        if self.run_hash and ck.get("run_hash") != self.run_hash:
            raise ConfigError(f"resume_from={path} was written by a different run (hash {ck.get('run_hash')} != "
                              f"{self.run_hash}): model, data, lr, lr schedule, batch size, seed, precision or dp_* options "
                              "differ. Resume with the same arguments, or start fresh in an empty out_dir.")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.state = LoopState.from_checkpoint(ck)
        if self.state.done:
            self._reopen(path, ck, explicit, extend)
        torch.set_rng_state(ck["torch_rng"])  # nothing in HALO draws from it today; dropout would
        if self.device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], self.device)
        s = self.state
        if s.done:
            log.info("%s is this run finished (step %d, epoch %d): publishing its model, no training", path, s.step,
                     s.epoch)
        else:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, s.step, s.epoch, s.batch_pos)
        return ck

    def _reopen(self, path: str, ck: dict, explicit: bool, extend: bool) -> None:
        """A finished checkpoint: train it on (``extend``), refuse (``resume_from`` without ``extend``) or keep it
        finished (the run's own folder)."""
        s, a = self.state, self.args
        how = "stopped early" if s.stopped_early else "reached its budget"
        room = s.epoch < self.plan.epochs and (a.max_steps is None or s.step < a.max_steps)
        if extend and room:
            if ck.get("privacy"):
                raise ConfigError(f"extend: {path} is a DP-SGD run, whose noise was calibrated for its planned steps; "
                                  "training it further would spend an unaccounted privacy budget. Train a new run "
                                  "with the larger epochs instead.")
            s.done = s.stopped_early = False
            s.bad_evals = 0
            log.info("extending the finished run %s (step %d, epoch %d, %s) to epochs=%d max_steps=%s: weights, "
                     "optimiser state, best weights and history kept, the patience counter restarts, the %s lr "
                     "re-planned over %d steps", path, s.step, s.epoch, how, self.plan.epochs, a.max_steps,
                     a.lr_schedule, self.total)
        elif extend:
            raise ConfigError(f"extend: {path} finished at step {s.step} (epoch {s.epoch}, {how}) and epochs="
                              f"{a.epochs} ({self.plan.epochs}), max_steps={a.max_steps} leave nothing to add. Pass a larger epochs (or "
                              "max_steps) to train it further.")
        elif explicit:
            raise ConfigError(f"resume_from={path} is a finished run (step {s.step}, epoch {s.epoch}, {how}): there "
                              "is nothing to resume. To train it further pass extend=True (--extend) with a larger "
                              "epochs or max_steps; its own model directory already holds the result.")

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

    def run(self, progress: bool, on_step: Callable[[int], None] | None, report: _Progress) -> None:
        s = self.state
        bar = tqdm(total=self.total, initial=min(s.step, self.total), desc="train", unit="step",
                   disable=not progress or not self.dist.is_main)
        report.start(s.step, self.total)
        if self.dist.is_main:
            log.info("%s", self.plan.describe(self.args.lr_schedule))
        with logging_redirect_tqdm([logging.getLogger("synthehr_core")]) if not bar.disable else \
                contextlib.nullcontext():  # log lines above the bar, not through it
            self._epochs(bar, on_step, report)
        bar.close()

    def _epochs(self, bar, on_step: Callable[[int], None] | None, report: _Progress) -> None:
        s, args = self.state, self.args
        while not s.done and s.epoch < self.plan.epochs:
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
                if self.dist.is_main:
                    report.step(s, loss, self.lr)
                if on_step is not None:
                    on_step(s.step)
                if s.done or epoch_end:
                    break

    def rows(self) -> torch.Tensor:
        """Rows of each training patient up to its last visit (what a trimmed batch of it needs)."""
        if not hasattr(self, "_rows"):
            fvr, ds = self.vocab.first_visit_row, self.train_ds
            self._rows = torch.tensor([fvr + min(ds.n_visits(i), self.n_ctx - fvr) for i in range(len(ds))])
        return self._rows

    def train_batch(self, order: torch.Tensor) -> float:
        """One optimiser step at the schedule's lr; returns the loss of the whole (global) batch."""
        s, bs, dist = self.state, self.args.batch_size, self.dist
        self.lr = lr_at(s.step, self.plan, self.args)
        for group in self.optimizer.param_groups:  # the wrapped Adam's groups under DP-SGD (Opacus steps it)
            group["lr"] = self.lr
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
        every = self.plan.eval_every
        due = (s.step % every == 0) if every else epoch_end
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
            s.done = s.done or s.epoch >= self.plan.epochs
        if s.done and has_val and s.last_eval_step != s.step:
            self.validate()  # the final weights always get a validation score
        stepped = s.step % args.ckpt_every == 0 if args.ckpt_every else due
        timed = args.ckpt_minutes is not None and time.monotonic() - self.last_ckpt >= 60 * args.ckpt_minutes
        if self.dist.is_main and self.ckpts is not None and (s.done or stepped or timed):
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
        self.ckpts.save(s.step, state, done=s.done)
        self.ckpts.prune(self.args.keep_checkpoints)  # only once the new one is complete
        self.last_ckpt = time.monotonic()

    def finish(self) -> dict:
        s, privacy = self.state, None
        if self.private is not None:
            self.private.close()
            privacy = self.private.metrics()
            log.info("DP-SGD: epsilon %.4g at delta %g after %d steps", privacy["dp_epsilon"], privacy["dp_delta"],
                     s.step)
        n_val = len(self.val_ds) if self.val_ds is not None else 0
        kept = keep_weights(self.args.keep, n_val)
        state, kept_step = s.best_state, s.best_step
        if state is None or kept == "last":  # no validation set, or asked: the last weights are the result
            state, kept_step, kept = _cpu_state(self.model), s.step, "last"
        if self.args.keep == "auto" and s.best_state is not None:
            log.info("publishing the %s weights (step %d; best val %.5g at step %d; %d val patients, keep=auto: "
                     "best from %d)", kept, kept_step, s.best_val, s.best_step, n_val, KEEP_BEST_MIN_VAL)
        return {"best_state": state, "history": s.history, "step": s.step, "epoch": s.epoch,
                "best_val": s.best_val, "best_step": s.best_step, "stopped_early": s.stopped_early,
                "privacy": privacy, "plan": self.plan, "kept": kept, "kept_step": kept_step}


FAULT_ENV = "SYNTHEHR_FAULT_KILL_AT_STEP"


def _fault_hook(on_step: Callable[[int], None] | None, resumed: bool) -> Callable[[int], None] | None:
    """Fault injection for the preemption tests: with ``SYNTHEHR_FAULT_KILL_AT_STEP=K`` set, a run that did not
    resume SIGKILLs its own process right after step K (so a retried task, which resumes, runs through)."""
    at = os.environ.get(FAULT_ENV, "")
    if not at or resumed:
        return on_step

    def hook(step: int) -> None:
        if on_step is not None:
            on_step(step)
        if step == int(at):
            log.warning("%s=%s: killing this process after step %d", FAULT_ENV, at, step)
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def train(model: torch.nn.Module, train_ds: EHRParquetDataset, val_ds: EHRParquetDataset | None, vocab: Vocab,
          checkpoints: str | Path | None, args: TrainArgs, run_hash: str = "",
          resume_from: str | Path | None = None, device: str | torch.device | None = None, progress: bool = True,
          precision: str = "fp32", dp: DPConfig | None = None, dist: DistContext | None = None,
          on_step: Callable[[int], None] | None = None, legacy_step: bool = False, length_buckets: int = 0,
          extend: bool = False, log_every: int | None = None, log_seconds: float | None = 30.0) -> dict:
    """Train ``model`` in place; step checkpoints go to the folder ``checkpoints`` (None: none are written).

    The run starts from ``resume_from`` (a step checkpoint, a checkpoint folder or a model directory: 
    ``resolve_resume``) when given, else from the newest complete checkpoint in ``checkpoints`` (a retried or
    resubmitted run; none: from scratch). A finished checkpoint is published as it is, or with ``extend`` trained
    on to the new ``epochs``/``max_steps``; ``resume_from`` a finished run without ``extend`` is an error.
    Checkpoints are due at the step period (``args.ckpt_every``; default at each validation), every
    ``args.ckpt_minutes`` and at the end. Progress goes to the log every ``log_every`` steps or ``log_seconds``.

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
    dist = dist or SINGLE
    ckpts = StepCheckpoints(checkpoints) if checkpoints is not None else None
    loop = _Loop(model, train_ds, val_ds, vocab, ckpts, args, run_hash, device,
                 validate_precision(precision, device), dist, legacy_step, length_buckets)
    source = None
    if dist.is_main:  # rank 0 picks the checkpoint, so every rank resumes from the same one
        if resume_from is not None:
            source = resolve_resume(resume_from)
        elif ckpts is not None and ckpts.latest() is not None:
            source = ckpts.path(ckpts.latest()), ckpts.marker(ckpts.latest())
    source = dist.broadcast_object(source)
    ck = loop.resume(*source, explicit=resume_from is not None, extend=extend) if source else {}
    loop.prepare_step(dp, ck, source[0] if source else None)
    loop.run(progress, _fault_hook(on_step, resumed=source is not None), _Progress(log_every, log_seconds))
    return {**loop.finish(), "resumed_from": source[0] if source else None}


# ---------------------------------------------------------------------------------------------- the stage
def label_probs(ds: EHRParquetDataset, vocab: Vocab) -> pd.DataFrame:
    """Empirical joint distribution of whole label vectors: ``labels`` ('|'-joined tokens), ``probability``."""
    keys = ["|".join(vocab.tokens[t].token for t in ds[i][0]) for i in range(len(ds))]
    counts = pd.Series(keys, dtype="object").value_counts()
    df = pd.DataFrame({"labels": counts.index.astype(str), "probability": counts.to_numpy() / max(len(keys), 1)})
    return df.sort_values(["probability", "labels"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(config: TrainConfig, model_config: HaloConfig, n_train: int, rules, length_buckets: int = 0
                 ) -> dict:
    """What decides the weights, hashed into ``config_hash``: a checkpoint resumes only a run of the same hash."""
    loop = config.loop
    out = {"config": model_config.to_dict(), "model_type": config.model_type, "lr": loop.lr,
           "batch_size": loop.batch_size, "seed": loop.seed, "n_train": n_train,
           "rules": [r.to_json() for r in rules] if rules else None}
    if length_buckets:  # the batches' make-up; off (0) stays out, so other runs keep their hash
        out["length_buckets"] = length_buckets
    if loop.lr_schedule != "constant":  # the lr of every step; constant (HI's) stays out, so older runs keep theirs
        out["lr_schedule"] = {"name": loop.lr_schedule, "warmup": loop.lr_warmup, "final": loop.lr_final}
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
    data_hash: str
    length_buckets: int = 0


def _model_config(config: TrainConfig, vocab: Vocab, n_ctx: int, groups: list[TokenGroup]) -> HaloConfig:
    overrides = dict(config.model_overrides)
    if config.group_heads and not overrides.get("coarse") and "groups" not in overrides:
        overrides["groups"] = [(g.start, g.stop) for g in groups]
        overrides.setdefault("group_direct", True)
    if config.recurrence and "recurrence" not in overrides:
        overrides["recurrence"] = RECURRENCE_GAIN
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
                      _data_hash(tables, vocab), length_buckets)


def _data_hash(tables, vocab: Vocab) -> str:
    """A digest of the tables' content and the vocabulary (part of the checkpoint key, not of config_hash)."""
    h = hashlib.sha256(json.dumps([t.token for t in vocab.tokens]).encode())
    for df in tables:
        h.update(json.dumps(list(df.columns)).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


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


def _calibrate(model: torch.nn.Module, data: _TrainData, config: TrainConfig, device: torch.device) -> dict | None:
    """``calibrate.calibrate`` on the published weights where the config asks for it and it is allowed."""
    if config.calibration == "off" or model.config.coarse:
        return None
    if config.dp.enabled:  # it reads the training data outside DP-SGD's accounting
        log.info("calibration skipped: a DP-SGD run may not read the training data outside its accounting")
        return {"skipped": "dp"}
    from .calibrate import calibrate

    return calibrate(model, data.train_ds, data.vocab, config.calibration, config.loop.batch_size, device,
                     groups=data.groups, seed=config.seed)


def _run_info(config: TrainConfig, data: _TrainData, res: dict, hist: pd.DataFrame, device: torch.device,
              seconds: float, dist: DistContext) -> dict:
    """meta.json of the checkpoint directory."""
    train_losses = hist.loc[hist["split"] == "train", "loss"]
    mcc = config.min_code_count
    return {"model_type": config.model_type, "preset": config.preset, "seed": config.seed,
            "config_hash": data.run_hash, "steps": res["step"], "epochs_run": res["epoch"],
            "best_step": res["best_step"],
            "best_val_loss": None if not np.isfinite(res["best_val"]) else res["best_val"],
            "kept": res["kept"], "kept_step": res["kept_step"],
            "first_train_loss": float(train_losses.iloc[0]) if len(train_losses) else None,
            "final_train_loss": float(train_losses.iloc[-1]) if len(train_losses) else None,
            "stopped_early": res["stopped_early"], "n_train": len(data.train_ds),
            "planned_epochs": res["plan"].epochs, "planned_steps": res["plan"].total,
            "eval_every": res["plan"].eval_every, "lr_schedule": config.loop.lr_schedule,
            "n_val": len(data.val_ds) if data.val_ds is not None else 0,
            "n_rules": len(data.rules) if data.rules else 0, "device": str(device), "seconds": round(seconds, 3),
            "resumed_from": res["resumed_from"], "precision": config.precision,
            "world_size": dist.world_size, **(res["privacy"] or {}),
            **({"min_code_count": mcc, "n_rare_codes_dropped": len(data.rare_codes)} if mcc else {}),
            **({"length_buckets": data.length_buckets} if data.length_buckets else {})}


def _config_of(config: TrainConfig | None, options: dict) -> TrainConfig:
    return config_or_options(TrainConfig, config, options, lambda o: TrainConfig.from_options(**o))


def default_checkpoint_uri(out_dir: str | Path) -> str:
    """Where step checkpoints go when no ``checkpoint_uri`` is given: beside the model directory, never in it."""
    return str(out_dir).rstrip("/") + ".checkpoints"


def _checkpoint_uri(uri) -> str:
    """``checkpoint_uri`` as storage writes it: ``minio://bucket/...`` (KFP's default pipeline root) is MinIO's S3
    API, so ``s3://bucket/...`` (endpoint and keys from the AWS_* environment); other schemes are refused."""
    u = str(uri)
    if u.startswith("minio://"):
        u = "s3://" + u[len("minio://"):]
    if "://" in u and not storage.is_remote(u):
        raise ConfigError(f"checkpoint_uri={u[:80]!r}: not a location storage writes (gs://, s3://, minio:// or a "
                          "local path). For a mounted volume pass its path.")
    return u


def checkpoint_key(config: TrainConfig, data: _TrainData, legacy_step: bool = False) -> str:
    """The folder name of a run's checkpoints under ``checkpoint_uri``: what decides its trajectory (the
    ``config_hash``, the tables' content, the loop's budget, validation and patience), so a retried or
    resubmitted run of the same config and data finds its own checkpoints and nothing else."""
    a = config.loop
    key = {"config_hash": data.run_hash, "data": data.data_hash, "epochs": a.epochs, "max_steps": a.max_steps,
           "eval_every": a.eval_every, "patience": a.patience, **({"legacy_step": True} if legacy_step else {})}
    return _hash(key)


def _check_out(out_dir, overwrite: bool) -> None:
    """storage.check_output, with the way to train a finished model further."""
    try:
        storage.check_output(out_dir, overwrite)
    except OutputExistsError as exc:
        if not storage.exists(storage.join(out_dir, "meta.json")):
            raise
        raise OutputExistsError(f"{exc} To train that model further, pass resume_from={out_dir} with extend=True "
                                "(--extend), a larger epochs and a new out_dir.") from None


def _launch(processes: int, tables_dir, out_dir, config: TrainConfig, unsupported: dict, **run: Any) -> dict:
    """``train_to_dir`` on ``processes`` torchrun ranks; returns the published meta.json."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ConfigError(f"processes (train_gpus) must be an int >= 1; got {processes!r}.")
    given = sorted(k for k, v in unsupported.items() if v is not None)
    if given:
        raise ConfigError(f"processes={processes}: {given} cannot be passed to the torchrun ranks; leave them at "
                          "their defaults (each rank takes its own GPU).")
    _check_out(out_dir, run["overwrite"])  # before the launch: a clear error at once, not one per rank
    argv = ["--tables", str(tables_dir), "--out", str(out_dir), "--config-json", json.dumps(config.to_dict())]
    for k, v in run.items():
        if isinstance(v, bool):
            argv += [f"--{k.replace('_', '-')}"] if v else []
        elif v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    launch(processes, "synthehr_core.model.torchrun", argv)
    return storage.read_json(storage.join(str(out_dir), "meta.json"))


def train_to_dir(tables_dir: str | Path, out_dir: str | Path, config: TrainConfig | None = None, *,
                 rules_dir: str | Path | None = None, checkpoint_uri: str | Path | None = None,
                 resume_from: str | Path | None = None, extend: bool = False, overwrite: bool = False,
                 device: str | torch.device | None = None, progress: bool = True, distributed: bool = False,
                 on_step: Callable[[int], None] | None = None, legacy_step: bool = False, length_buckets: int = 0,
                 log_every: int | None = None, log_seconds: float | None = 30.0, processes: int = 1,
                 **options: Any) -> dict:
    """The train stage: fit HALO or ConSequence on the train split, validate on val, publish a model directory.

    Args:
        tables_dir: preprocess output (tables + vocab.json); ``train`` patients train, ``val`` patients validate.
        out_dir: the model directory, published whole at the end (assembled aside, then renamed or uploaded;
            ``meta.json`` last), so it is complete or absent; must be empty unless ``overwrite``. Holds what
            sampling needs: ``model.pt`` (best weights only), ``config.json``, ``vocab.json``, ``rules.json``
            (ConSequence), ``history.parquet``, ``label_probs.parquet``, ``token_groups.json`` and ``meta.json``.
        config: what defines the run (config.py: model, loop, precision, DP-SGD, vocabulary filter).
        rules_dir: rules-stage output holding ``rules.json`` (``model_type="consequence"``).
        checkpoint_uri: root of the step checkpoints (local or gs://); they go to
            ``<checkpoint_uri>/<checkpoint_key>/step_*.pt`` + ``.json`` markers, and a rerun of the same config
            and data resumes from the newest complete one (a finished one is published without training).
            Default: ``<out_dir>.checkpoints``.
        resume_from: a ``step_*.pt``, a checkpoint folder or a model directory (its meta.json names its
            checkpoints) to continue from, instead of the run's own folder; a finished run needs ``extend``.
        extend: train a finished run on to this config's larger ``epochs``/``max_steps`` (its weights, optimiser,
            best weights and history kept, the patience counter restarted); says so in the log.
        overwrite: replace a non-empty ``out_dir`` at publish time (a retried pipeline task owns its output).
        device: torch device; default cuda when available (under torchrun: this rank's GPU).
        progress: show a tqdm bar (rank 0).
        distributed: join the torchrun process group (distributed.py); rank 0 alone writes.
        on_step: called with the step number after every step (and its checkpoint, when one is due).
        legacy_step: True = the training step before trimmed batches and the fused Adam, bit for bit (``train``).
        length_buckets: 0 = off; W > 0 = batches of similar-length patients (``bucket_order``; part of the run's
            hash, recorded in config.json and meta.json; not with DP-SGD).
        log_every, log_seconds: a progress line in the log every so many steps or seconds (rank 0).
        processes: > 1 = run as that many DDP ranks (one per GPU; gloo CPU processes without GPUs) under
            ``torchrun --standalone`` (model/torchrun.py), their log in this process's output.
        options: instead of ``config``, its option names as keywords (``epochs=3, dp_target_epsilon=1.0``); other
            names are extra ``HaloConfig`` fields (``n_embd=64``): ``TrainConfig.from_options``.
    Returns:
        the run summary, also written to ``meta.json``; ``checkpoints`` is the run's checkpoint folder.
    """
    config = _config_of(config, options)
    if checkpoint_uri is not None:
        checkpoint_uri = _checkpoint_uri(checkpoint_uri)
    if processes != 1:
        return _launch(processes, tables_dir, out_dir, config, rules_dir=rules_dir, checkpoint_uri=checkpoint_uri,
                       resume_from=resume_from, extend=extend, overwrite=overwrite, log_every=log_every,
                       log_seconds=log_seconds, unsupported={"device": device, "on_step": on_step, "distributed":
                                                             distributed or None, "legacy_step": legacy_step or None,
                                                             "length_buckets": length_buckets or None})
    dist = setup_distributed() if distributed else SINGLE
    if dist.is_main:
        _check_out(out_dir, overwrite)  # before any work
    # rank 0 holds out_dir's lock from here to the publish (a second train into it fails at once) and assembles
    # the directory aside; the other ranks only train
    with storage.atomic_dir(out_dir, overwrite=overwrite) if dist.is_main else contextlib.nullcontext() as tmp:
        data = _read_data(tables_dir, config, rules_dir, length_buckets)
        ckpts = StepCheckpoints(storage.join(str(checkpoint_uri or default_checkpoint_uri(out_dir)),
                                             checkpoint_key(config, data, legacy_step)))
        model = make_model(config.model_type, data.model_config, config.seed, data.compiled_rules)
        dev = pick_device(device)
        if dist.enabled and (device is None or (dev.type == "cuda" and dev.index is None)):
            dev = dist.device()  # one GPU per rank: cuda:<LOCAL_RANK>
        t0 = time.perf_counter()
        with ckpts.lock() if dist.is_main else contextlib.nullcontext():  # one writer per checkpoint folder
            res = train(model, data.train_ds, data.val_ds, data.vocab, ckpts.folder, config.loop,
                        run_hash=data.run_hash, resume_from=resume_from, device=dev, progress=progress,
                        precision=config.precision, dp=config.dp, dist=dist, on_step=on_step,
                        legacy_step=legacy_step, length_buckets=length_buckets, extend=extend, log_every=log_every,
                        log_seconds=log_seconds)
        seconds = time.perf_counter() - t0
        if not dist.is_main:  # rank 0 publishes the model directory; the others wait for it
            dist.barrier()
            return {"rank": dist.rank, "steps": res["step"], "seconds": round(seconds, 3)}
        model.load_state_dict(res["best_state"])
        calibration = _calibrate(model, data, config, dev)
        hist = _write_outputs(str(tmp), model, data, config, res, tables_dir, rules_dir)
        info = {**_run_info(config, data, res, hist, dev, seconds, dist), "checkpoints": ckpts.folder,
                "calibration": calibration}
        storage.write_json(storage.join(str(tmp), "meta.json"), info)
    log.info("published %s (best val %s at step %s); checkpoints in %s", out_dir, info["best_val_loss"],
             info["best_step"], ckpts.folder)
    dist.barrier()
    return info

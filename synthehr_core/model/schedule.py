"""How long a run is and what its learning rate does, as pure functions of the training-set size and ``TrainArgs``.

``plan_run(args, n_train)`` sizes the run: steps per epoch, the epochs (``epochs="auto"``: enough passes for about
``AUTO_TARGET_STEPS`` steps, bounded), the planned total, the warm-up steps and the validation period
(``eval_every="auto"``: about ``AUTO_EVALS`` validations per run, bounded). ``lr_at(step, plan, args)`` is the
learning rate of the step about to be taken: ``"constant"`` is HI/KI's ``lr`` throughout; ``"cosine"`` ramps
linearly from ``lr / warmup_steps`` to ``lr`` over the first ``lr_warmup`` of the planned steps, then follows a
half cosine down to ``lr_final * lr`` at the last planned step (SGDR, Loshchilov & Hutter 2017, without restarts).
The loop sets it on the optimiser's param groups before every step, so it needs no scheduler state: a resumed run
recomputes it from the step number.

The constants come from the measurements in docs/training.md ("Training recipe") and docs/fidelity.md (the lr
and epochs ablations on the 3,000-patient simulator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AUTO_EVALS", "AUTO_EVAL_MAX", "AUTO_EVAL_MIN", "AUTO_MAX_EPOCHS", "AUTO_MIN_EPOCHS",
           "AUTO_TARGET_STEPS", "KEEP", "KEEP_BEST_MIN_VAL", "SCHEDULES", "Plan", "keep_weights", "lr_at", "plan_run"]

SCHEDULES = ("constant", "cosine")
KEEP = ("auto", "best", "last")
# keep="auto": the best-validation weights only where the val split has at least this many patients. Below, the
# val loss ranks checkpoints by noise: the MIMIC-III demo's 8 val patients all have one visit, so the "best" of a
# 300-step run was step 51, under-trained (p(<end>) 0.95 vs 0.85 real; visits/patient -9 to -12 % in 3 seeds, -3 %
# with the last weights; docs/fidelity.md). On the simulator's 240 the best is within the last few validations.
KEEP_BEST_MIN_VAL = 100


def keep_weights(keep: str, n_val: int) -> str:
    """Which weights a run publishes, ``"best"`` or ``"last"``, for ``TrainArgs.keep`` and the val patients."""
    if keep != "auto":
        return keep
    return "best" if n_val >= KEEP_BEST_MIN_VAL else "last"
# epochs="auto": enough passes for ~AUTO_TARGET_STEPS steps. docs/fidelity.md: on 2,160 simulated train patients
# the tiny model's pair R² rose up to ~700 steps (10 epochs at batch 32 = 680 steps was the best of 3/10 epochs);
# docs/training.md "Training recipe": with the cosine schedule 810 steps match or beat the old 1,350 constant-lr
# steps on code/pair R² and visits per patient in two seeds; 1,350 cosine steps lower the loss, not the marginals.
AUTO_TARGET_STEPS = 800
# ... at least 3 passes (a large data set still sees each patient a few times: docs/fidelity.md's 3-epoch budget),
# at most 10 (the 100-patient MIMIC-III demo: 5 steps per epoch, so it keeps today's 10 epochs / 50 steps)
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 3, 10
# eval_every="auto": about AUTO_EVALS validations per run (enough points for patience 5 to act on), at least
# every AUTO_EVAL_MIN steps (a validation costs about as much as a few steps on a small val split) and at most
# every AUTO_EVAL_MAX (HI:train_model.py's period, what a large run gets)
AUTO_EVALS, AUTO_EVAL_MIN, AUTO_EVAL_MAX = 20, 10, 500


@dataclass(frozen=True)
class Plan:
    """A run's size, resolved from ``TrainArgs`` and the number of training patients."""
    n_train: int
    batch_size: int
    per_epoch: int               # optimiser steps per pass over the train split (the last batch may be partial)
    epochs: int                  # passes planned (``epochs="auto"`` resolved)
    total: int                   # steps planned: per_epoch * epochs, capped by max_steps
    warmup_steps: int            # cosine only; 0 for constant
    eval_every: int | None       # validation period in steps; None = at each epoch end
    auto: tuple[str, ...] = ()   # which of epochs / eval_every were sized from the data

    def describe(self, schedule: str) -> str:
        """The sizing decision as one log line."""
        epochs = f"auto epochs {self.epochs}" if "epochs" in self.auto else f"epochs {self.epochs}"
        evals = "at each epoch end" if self.eval_every is None else f"every {self.eval_every}"
        evals += " (auto)" if "eval_every" in self.auto else ""
        warm = f", warmup {self.warmup_steps}" if schedule == "cosine" else ""
        return (f"{self.n_train} train patients, batch {self.batch_size}: {self.per_epoch} steps/epoch, {epochs} -> "
                f"{self.total} steps, {schedule} lr{warm}, validate {evals}")


def plan_run(args, n_train: int) -> Plan:
    """The run's size for ``args`` (a validated ``TrainArgs``) on ``n_train`` training patients."""
    per_epoch = max(-(-n_train // args.batch_size), 1)
    auto = []
    if args.epochs == "auto":
        epochs = min(max(-(-AUTO_TARGET_STEPS // per_epoch), AUTO_MIN_EPOCHS), AUTO_MAX_EPOCHS)
        auto.append("epochs")
    else:
        epochs = args.epochs
    planned = per_epoch * epochs
    total = planned if args.max_steps is None else min(args.max_steps, planned)
    if args.eval_every == "auto":
        eval_every = min(max(total // AUTO_EVALS, AUTO_EVAL_MIN), AUTO_EVAL_MAX)
        auto.append("eval_every")
    else:
        eval_every = args.eval_every
    warmup = round(args.lr_warmup * total) if args.lr_schedule == "cosine" else 0
    return Plan(n_train, args.batch_size, per_epoch, epochs, total, warmup, eval_every, tuple(auto))


def lr_at(step: int, plan: Plan, args) -> float:
    """Learning rate of the step after ``step`` steps were taken (0 = the first step)."""
    peak = args.lr
    if args.lr_schedule == "constant":
        return peak
    w = plan.warmup_steps
    if step < w:
        return peak * (step + 1) / w                                  # linear ramp; never 0
    progress = min((step - w) / max(plan.total - w, 1), 1.0)          # 0 after warm-up, 1 at the planned end
    return peak * (args.lr_final + (1 - args.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))

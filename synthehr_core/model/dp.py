"""Differentially private training of HALO / ConSequence with Opacus DP-SGD (Abadi et al. 2016).

What DP-SGD needs from the model, and where it is provided:

* **per-sample gradients** of every trainable parameter. Opacus computes them from hooks for ``nn.Linear``,
  ``nn.LayerNorm`` and ``nn.Embedding``; HALO's code-level head is ``MaskedLinear`` (``F.linear`` on the weight's
  lower triangle), for which :func:`masked_linear_grad_sample` is registered here. Opacus looks samplers up by the
  exact module type, and the stock ``nn.Linear`` rule would give the *unmasked* outer product: upper-triangle
  entries that never reach the loss would inflate the per-sample norm and receive noise for nothing. The
  recurrence offsets (``halo.Recurrence``) get :func:`recurrence_grad_sample`.
* **a per-sample loss normalised by a constant**: HALO's loss is the weighted BCE averaged over all
  ``B * (T-1) * V`` entries, i.e. the batch mean of per-patient losses each divided by the constant
  ``(T-1) * V`` (models/halo.py), which is Opacus' ``loss_reduction="mean"``. Nothing divides by a batch statistic.
* **no buffers, batch-first inputs, no tied weights**: HALO-Coarse ties its decoder to the visit embedding (the
  weight is used outside its module, so its per-sample gradient would be incomplete) and is refused.

Sampling is Poisson (each training patient joins a logical batch independently with rate q = batch_size / n), which
is what the accountant's subsampling amplification assumes. Batch membership and noise are drawn from generators
seeded by ``(seed, step)``, so a resumed run draws exactly what an uninterrupted one would. A logical batch is
split into physical batches with Opacus' ``BatchMemoryManager``; per-sample gradients are clipped to
``max_grad_norm``, summed over the logical batch, noised with N(0, (sigma * max_grad_norm)^2) and divided by the
expected batch size q * n. The accountant (RDP by default) turns (sigma, q, steps) into the epsilon spent; its
history is saved in every step checkpoint and restored on resume.

Scope of the guarantee: see docs/privacy.md. It covers the *model weights* only; the vocabulary, label priors,
mined rules and KDE grids are computed from the raw data without noise.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn

from ..data.vocab import Token, Vocab
from ..errors import ConfigError
from ..randomness import torch_seed
from .halo import MaskedLinear, Recurrence

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv")
# RDP orders searched when converting to (epsilon, delta): Opacus' defaults (1.1 .. 63) plus larger orders, which
# are the optimal ones for few steps or a large epsilon (Opacus warns "optimal order is the largest alpha").
RDP_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 384, 512]


def _epsilon_kwargs(accountant: str) -> dict:
    return {"alphas": RDP_ALPHAS} if accountant == "rdp" else {}


# ---------------------------------------------------------------------------------------------- grad sampler
def masked_linear_grad_sample(layer: MaskedLinear, activations: list[torch.Tensor], backprops: torch.Tensor
                              ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``y = x @ tril(W).T + b`` for a batch: ``{weight: (n, D, D), bias: (n, D)}``.

    ``activations[0]`` is the layer input ``x (n, ..., D)``, ``backprops`` is dL/dy ``(n, ..., D)`` already scaled
    by Opacus for the loss reduction. The gradient of the masked weight is the linear layer's outer product summed
    over the non-batch dimensions, then restricted to the triangle the forward reads (entries above the diagonal do
    not influence the output, so their gradient is exactly 0).
    """
    x = activations[0].to(backprops.dtype)
    ret = {}
    if layer.weight.requires_grad:
        gw = torch.einsum("n...o,n...i->noi", backprops, x)  # (n, D_out, D_in)
        ret[layer.weight] = layer.mask(gw)  # tril (and narrow) act on the last two dims, i.e. per sample
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = torch.einsum("n...o->no", backprops)  # (n, D_out)
    return ret


def recurrence_grad_sample(layer: Recurrence, activations: list[torch.Tensor], backprops: torch.Tensor
                           ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of ``y = gain * (prev * last + seen * ever)``: ``{last: (n, V), ever: (n, V)}``, the
    elementwise products summed over the non-batch dimensions (``activations`` = [prev, seen])."""
    prev, seen = (a.to(backprops.dtype) for a in activations[:2])
    ret = {}
    if layer.last.requires_grad:
        ret[layer.last] = layer.gain * torch.einsum("n...v,n...v->nv", backprops, prev)
    if layer.ever.requires_grad:
        ret[layer.ever] = layer.gain * torch.einsum("n...v,n...v->nv", backprops, seen)
    return ret


def register_grad_samplers() -> None:
    """Register the ``MaskedLinear`` and ``Recurrence`` per-sample gradient rules with Opacus (idempotent)."""
    from opacus.grad_sample import GradSampleModule, register_grad_sampler

    if GradSampleModule.GRAD_SAMPLERS.get(MaskedLinear) is not masked_linear_grad_sample:
        register_grad_sampler(MaskedLinear)(masked_linear_grad_sample)
    if GradSampleModule.GRAD_SAMPLERS.get(Recurrence) is not recurrence_grad_sample:
        register_grad_sampler(Recurrence)(recurrence_grad_sample)


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class DPConfig:
    """DP-SGD options. Give ``target_epsilon`` (the noise is calibrated to reach it after the planned steps) or
    ``noise_multiplier`` (epsilon is then whatever the accountant says), not both."""
    target_epsilon: float = 0.0               # 0 = not set
    delta: float | None = None                # None = min(1e-5, 1 / (10 n_train)); 1e-5: Abadi et al. 2016
    noise_multiplier: float | None = None     # sigma; None = calibrate from target_epsilon
    max_grad_norm: float = 1.0                # per-sample clipping norm C; Opacus examples; arbitrary, tune
    physical_batch_size: int | None = None    # BatchMemoryManager chunk; None = the expected batch size
    accountant: str = "rdp"                   # Opacus "rdp" (Mironov 2017) or "prv" (Gopi et al. 2021)

    @property
    def enabled(self) -> bool:
        return self.target_epsilon > 0 or self.noise_multiplier is not None

    def validate(self, n_train: int | None = None) -> DPConfig:
        problems = []
        num = (int, float)
        if not isinstance(self.target_epsilon, num) or not math.isfinite(self.target_epsilon) or self.target_epsilon < 0:
            problems.append(f"dp_target_epsilon must be a finite number >= 0 (0 = off); got {self.target_epsilon!r}.")
        if self.noise_multiplier is not None and not (isinstance(self.noise_multiplier, num)
                                                      and self.noise_multiplier > 0):
            problems.append(f"dp_noise_multiplier must be None or > 0; got {self.noise_multiplier!r}.")
        if isinstance(self.target_epsilon, num) and self.target_epsilon > 0 and self.noise_multiplier is not None:
            problems.append(f"give dp_target_epsilon ({self.target_epsilon}) or dp_noise_multiplier "
                            f"({self.noise_multiplier}), not both: the noise is calibrated from the target epsilon.")
        if self.delta is None:
            pass
        elif not (isinstance(self.delta, num) and 0 < self.delta < 1):
            problems.append(f"dp_delta must be None (automatic) or in (0, 1); got {self.delta!r}.")
        elif n_train and self.delta >= 1.0 / n_train:
            problems.append(f"dp_delta={self.delta:g} is not below 1/n_train = 1/{n_train}: such a delta permits "
                            f"releasing a whole patient's record. Use dp_delta <= {0.1 / n_train:.2g}.")
        if not (isinstance(self.max_grad_norm, num) and self.max_grad_norm > 0):
            problems.append(f"dp_max_grad_norm must be > 0; got {self.max_grad_norm!r}.")
        if self.physical_batch_size is not None and not (isinstance(self.physical_batch_size, int)
                                                         and self.physical_batch_size >= 1):
            problems.append(f"dp_physical_batch_size must be None or an int >= 1; got {self.physical_batch_size!r}.")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"dp_accountant must be one of {ACCOUNTANTS}; got {self.accountant!r}.")
        if problems:
            raise ConfigError("invalid differential-privacy options:\n" + "\n".join(f"  - {p}" for p in problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_supported(model: nn.Module, precision: str = "fp32") -> None:
    """Refuse what per-sample clipping cannot handle correctly (called before wrapping)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "coarse", False):
        raise ConfigError("coarse=True (HALO-Coarse) cannot be trained with DP-SGD: its decoder reuses the visit "
                          "embedding weight outside nn.Linear, so Opacus would miss that part of each per-sample "
                          "gradient. Train the full HALO (coarse=False) for a DP model.")
    if precision == "fp16":
        raise ConfigError("precision='fp16' cannot be combined with DP-SGD: the GradScaler's loss scale multiplies "
                          "every per-sample gradient before clipping, so the clip norm would be wrong. "
                          "Use precision='bf16' (no loss scaling) or 'fp32'.")
    from opacus.grad_sample import GradSampleModule

    register_grad_samplers()
    errors = GradSampleModule.validate(model, strict=False)
    if errors:
        raise ConfigError("the model cannot be made private by Opacus:\n"
                          + "\n".join(f"  - {e}" for e in errors)
                          + "\nRemove buffers from trainable modules (build masks in forward instead).")


# ---------------------------------------------------------------------------------------------- seeded draws
def poisson_batch(n: int, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """Indices of the logical batch of ``step``: each of the n patients independently with probability q.

    A pure function of ``(seed, step)``: every DDP rank draws the same batch and keeps its share, and a resumed
    run draws the batches an uninterrupted run would. The batch may be empty; its size is Binomial(n, q).
    """
    g = torch.Generator().manual_seed(torch_seed(seed, "poisson", step))
    return (torch.rand(n, generator=g) < sample_rate).nonzero().flatten()


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Noise multiplier sigma that spends at most ``target_epsilon`` in ``steps`` Poisson-subsampled steps."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01,
                                          **_epsilon_kwargs(accountant)))
    except ValueError as exc:
        raise ConfigError(f"dp_target_epsilon={target_epsilon} cannot be reached with delta={delta:g}, sample rate "
                          f"{sample_rate:.4g} and {steps} steps ({exc}). Raise the epsilon, or train fewer steps / "
                          "with a smaller batch.") from exc


# ---------------------------------------------------------------------------------------------- training
class PrivateTraining:
    """DP-SGD around a model and its optimizer: Poisson batches, per-sample clipping, noise, accounting.

    ``model`` stays the plain module (state dicts, evaluation and sampling use it); ``self.module`` is the Opacus
    ``GradSampleModule`` that the training forward goes through. Under DDP (``world_size > 1``, an initialised
    process group) the model is wrapped in Opacus' ``DifferentiallyPrivateDistributedDataParallel`` and the
    optimizer is ``DistributedDPOptimizer``: each rank clips its share of the logical batch, rank 0 alone adds
    the noise, and the gradients are summed over ranks, which is the single-process computation.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, n_train: int, batch_size: int,
                 steps: int, config: DPConfig, seed: int, device: str | torch.device = "cpu",
                 precision: str = "fp32", rank: int = 0, world_size: int = 1):
        import warnings

        from opacus.accountants import create_accountant
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

        self.config = config.validate(n_train)
        check_model_supported(model, precision)
        if batch_size > n_train:
            raise ConfigError(f"batch_size={batch_size} exceeds the {n_train} training patients: the Poisson sample "
                              f"rate would be > 1. Use batch_size <= {n_train}.")
        self.n_train, self.seed, self.device = n_train, int(seed), torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.sample_rate = batch_size / n_train  # q: the expected logical batch is the configured batch size
        self.planned_steps = int(steps)
        self.delta = config.delta if config.delta is not None else min(1e-5, 0.1 / n_train)
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        else:
            self.noise_multiplier = calibrate_noise(config.target_epsilon, self.delta, self.sample_rate, steps,
                                                    config.accountant)
        self.physical_batch_size = config.physical_batch_size or batch_size
        model.train()  # Opacus: the model must be in training mode when it is wrapped
        wrapped = model
        if world_size > 1:
            from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
            wrapped = DPDDP(model)  # broadcasts rank 0's weights; gradients are reduced by the optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = GradSampleModule(wrapped, batch_first=True, loss_reduction="mean", strict=True)
        opt_cls = DistributedDPOptimizer if world_size > 1 else DPOptimizer
        # expected_batch_size is per rank: DistributedDPOptimizer divides the summed gradient by it and by world_size
        self.optimizer = opt_cls(optimizer, noise_multiplier=self.noise_multiplier,
                                 max_grad_norm=config.max_grad_norm,
                                 expected_batch_size=self.sample_rate * n_train / world_size, loss_reduction="mean")
        self.accountant = create_accountant(mechanism=config.accountant)
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        log.info("DP-SGD: sigma=%.4g, C=%g, q=%.4g (expected batch %d of %d), %d planned steps, delta=%g, %s",
                 self.noise_multiplier, config.max_grad_norm, self.sample_rate, batch_size, n_train, steps,
                 self.delta, config.accountant)

    def batch_indices(self, step: int) -> torch.Tensor:
        """This rank's share of the Poisson logical batch of ``step`` (training-set indices)."""
        idx = poisson_batch(self.n_train, self.sample_rate, self.seed, step)
        return idx[self.rank::self.world_size]

    def step(self, step: int, idx: torch.Tensor, dataset, collate: Callable, autocast_ctx: Callable,
             n_ctx: int | None = None) -> tuple[float, int]:
        """One DP-SGD step on this rank's indices ``idx``; returns ``(sum of per-patient losses, patients)``.

        The logical batch goes through ``BatchMemoryManager`` in physical batches of at most
        ``physical_batch_size``; the optimizer clips each, accumulates, and steps (noise + update) after the last.
        ``n_ctx``: the nominal rows of batches that ``collate`` trims to their longest patient (each per-patient
        loss keeps the constant normaliser ``(n_ctx-1)*V``, so clipping and noise see the padded gradients).
        """
        import warnings

        from opacus.utils.batch_memory_manager import BatchMemoryManager
        from torch.utils.data import DataLoader

        self.module.train()
        self.optimizer.generator = torch.Generator(device=self.device).manual_seed(
            torch_seed(self.seed, "noise", step))
        loader = DataLoader(dataset, batch_sampler=[idx.tolist()], collate_fn=collate)
        total, n = 0.0, 0
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=self.physical_batch_size,
                                optimizer=self.optimizer) as physical:
            for X, mask in physical:
                X, mask = X.to(self.device), mask.to(self.device)
                with autocast_ctx(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "full backward hook ... no inputs require gradients"
                    _, loss = self.module(X, mask) if n_ctx is None else self.module(X, mask, n_ctx=n_ctx)
                    if len(X) == 0:  # an empty Poisson batch still takes a (pure noise) step
                        loss = torch.nan_to_num(loss, nan=0.0)
                    loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if len(X):
                    total += float(loss.detach()) * len(X)
                    n += len(X)
        return total, n

    # ------------------------------------------------------------------ accounting
    def epsilon(self) -> float:
        """Epsilon spent so far at ``self.delta`` (0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta, **_epsilon_kwargs(self.config.accountant)))

    @property
    def steps_accounted(self) -> int:
        return int(sum(h[2] for h in self.accountant.history))

    def metrics(self) -> dict:
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.delta,
                "dp_target_epsilon": self.config.target_epsilon or None,
                "dp_noise_multiplier": self.noise_multiplier, "dp_max_grad_norm": self.config.max_grad_norm,
                "dp_sample_rate": self.sample_rate, "dp_steps": self.steps_accounted,
                "dp_planned_steps": self.planned_steps, "dp_accountant": self.config.accountant,
                "dp_physical_batch_size": self.physical_batch_size}

    def state_dict(self) -> dict:
        return {"accountant": dict(self.accountant.state_dict()), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "max_grad_norm": self.config.max_grad_norm,
                "delta": self.delta, "mechanism": self.config.accountant}

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> None:
        """Continue the accounting of a checkpointed run; refuse one made with different DP parameters."""
        if not state:
            raise ConfigError(f"{where} holds no privacy accounting (it was written by a non-DP run): resume it "
                              "without DP options, or start the DP run fresh in an empty out_dir.")
        mine = {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "max_grad_norm": self.config.max_grad_norm, "delta": self.delta,
                "mechanism": self.config.accountant}
        diff = [f"{k}: checkpoint {state.get(k)!r} vs now {v!r}" for k, v in mine.items()
                if not (state.get(k) == v or (isinstance(v, float) and isinstance(state.get(k), float)
                                              and math.isclose(state[k], v, rel_tol=1e-9)))]
        if diff:
            raise ConfigError(f"{where}: DP parameters differ from this run, so the privacy accounting cannot "
                              "continue:\n" + "\n".join(f"  - {d}" for d in diff)
                              + "\nResume with the DP options of the original run.")
        self.accountant.history = [tuple(h) for h in state["accountant"]["history"]]

    def close(self) -> None:
        """Remove Opacus' hooks from the model (it goes on to evaluation, checkpoints and sampling)."""
        self.module._close()


# ---------------------------------------------------------------------------------------------- mitigations
def code_patient_counts(tables, split: str | None = "train") -> pd.Series:
    """Number of distinct patients (of ``split``; None = all) having each clinical code: ``code -> count``.

    ``tables`` is a tables directory or the ``(patients, visits, codes)`` already read from one.
    """
    from ..data.schema import read_tables

    patients, _, codes = tables if isinstance(tables, tuple) else read_tables(tables)
    if split is not None:
        keep = set(patients.loc[patients["split"] == split, "patient_id"])
        codes = codes[codes["patient_id"].isin(keep)]
    return codes.drop_duplicates(["patient_id", "code"]).groupby("code").size().sort_index()


def min_code_count_vocab(vocab: Vocab, counts: pd.Series, min_count: int) -> tuple[Vocab, list[str]]:
    """Drop clinical-code tokens held by fewer than ``min_count`` patients; returns ``(vocab, dropped tokens)``.

    A vocabulary entry reveals that *some* patient had the code, so a code seen in one patient is itself a
    disclosure that DP-SGD does not cover. Training on the returned vocabulary (``EHRParquetDataset(...,
    vocab=...)`` drops tokens it lacks) keeps such codes out of the model and out of the checkpoint's
    ``vocab.json``. Event types, bins, calendar tokens, labels and specials are kept: they come from the
    dataset config, not from individual records. ``counts`` comes from :func:`code_patient_counts`.
    """
    if not isinstance(min_count, int) or min_count < 0:
        raise ConfigError(f"min_code_count must be an int >= 0 (0 = keep all codes); got {min_count!r}.")
    def is_clinical(t: Token) -> bool:  # clinical codes are kind "code" with no source variable (docs/canonical-tables.md)
        return t.kind == "code" and t.variable is None

    dropped = [t.token for t in vocab.tokens[:vocab.n_visit_tokens]
               if is_clinical(t) and int(counts.get(t.token, 0)) < min_count]
    if not dropped:
        return vocab, []
    gone = set(dropped)
    visit = [t for t in vocab.tokens[:vocab.n_visit_tokens] if t.token not in gone]
    rest = vocab.tokens[vocab.n_visit_tokens:]
    return Vocab(visit + rest, len(visit), vocab.n_labels, vocab.label_row), dropped

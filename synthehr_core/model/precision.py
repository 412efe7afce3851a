"""Mixed precision for training: autocast on the big matmuls, everything probabilistic in fp32.

HALO's cost is the two ``D x D`` masked head matmuls (D = E + V, 7637 for the paper config) and the transformer;
those run in bf16/fp16 under ``torch.autocast``. What decides rare-code quality stays fp32: the model returns
logits, ``BCEWithLogits`` reads ``logits.float()`` and its mean is taken in fp32 (models/halo.py), and the sampler
takes ``sigmoid`` and draws the Bernoulli on ``logits.float()`` (sampling.py). Why: almost every BCE term is a
negative, ``log(1 - p)`` with small p; in bf16 ``1 - p`` rounds to 1 for p < 2e-3 and in fp16 for p < 5e-4, and
fp16 holds p ~ 1e-5 only as a subnormal (spacing 6e-8). The logits themselves keep bf16 rounding (spacing 0.0625 at -11.5,
so up to ~3% relative error on such a p); the functions of them that decide the loss and the draws add none. PyTorch also refuses
``BCELoss`` on probabilities under autocast.

* ``fp32``: no autocast (default everywhere, including GPUs, so a run is exact unless asked otherwise).
* ``bf16``: autocast to bfloat16; same exponent range as fp32, so no loss scaling. Allowed on CPU (slow on most
  CPUs: opt-in only).
* ``fp16``: autocast to float16 with a ``GradScaler`` (dynamic loss scaling). CUDA only: CPU fp16 autocast covers
  few ops and is slower than fp32, so it is refused with a ConfigError.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def validate_precision(precision: str, device: str | torch.device) -> str:
    """Check ``precision`` against the device; returns it (lower-cased)."""
    p = precision.lower() if isinstance(precision, str) else precision
    if p not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}. "
                          "Use 'fp32' (exact), 'bf16' (GPUs from Ampere on) or 'fp16' (older GPUs, with loss scaling).")
    dev = torch.device(device)
    if p == "fp16" and dev.type != "cuda":
        raise ConfigError(f"precision='fp16' needs a CUDA device; got device={str(dev)!r}. On CPU use "
                          "precision='bf16' (autocast) or 'fp32'.")
    if p == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision='bf16' is not supported by {torch.cuda.get_device_name(dev)}; "
                          "use precision='fp16' (with loss scaling) or 'fp32'.")
    return p


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16, a no-op context for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaler: enabled for fp16 only (bf16 and fp32 need none; a disabled scaler is a pass-through).

    Its ``state_dict`` belongs in the step checkpoint so a resumed fp16 run keeps its scale.
    """
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")

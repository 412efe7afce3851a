"""The torchrun entry point: one process per GPU, each running the same ``train_to_dir`` (distributed.py).

    torchrun --nproc_per_node 4 -m synthehr_core.model.torchrun --tables TABLES --out OUT [--preset paper ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch.distributed as dist

from ..errors import ConfigError
from .distributed import teardown
from .train import train_to_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m synthehr_core.model.torchrun",
                                description="Train HALO / ConSequence with DDP (one process per GPU).")
    p.add_argument("--tables", required=True, help="preprocess output (tables directory)")
    p.add_argument("--out", required=True, help="checkpoint directory (empty unless --resume-from)")
    p.add_argument("--model-type", default="halo", choices=["halo", "consequence"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rules-dir", default=None)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=48, help="global batch (split over the processes)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume-from", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--dp-target-epsilon", type=float, default=0.0, help="0 = no differential privacy")
    p.add_argument("--dp-delta", type=float, default=None, help="default: min(1e-5, 1 / (10 n_train))")
    p.add_argument("--dp-noise-multiplier", type=float, default=None)
    p.add_argument("--dp-max-grad-norm", type=float, default=1.0)
    p.add_argument("--dp-physical-batch-size", type=int, default=None)
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=JSON",
                   help="HaloConfig field, e.g. n_embd=64 (repeatable)")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {}
    for kv in a.model_override:
        if "=" not in kv:
            raise ConfigError(f"--model-override {kv!r} must be KEY=JSON, e.g. n_embd=64.")
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v)
    owns_group = not dist.is_initialized()  # a caller that set up the group keeps it (several runs per launch)
    try:
        info = train_to_dir(a.tables, a.out, model_type=a.model_type, preset=a.preset, epochs=a.epochs,
                            batch_size=a.batch_size, lr=a.lr, rules_dir=a.rules_dir, seed=a.seed,
                            resume_from=a.resume_from, max_steps=a.max_steps, eval_every=a.eval_every,
                            patience=a.patience, ckpt_every=a.ckpt_every, keep_checkpoints=a.keep_checkpoints,
                            precision=a.precision, dp_target_epsilon=a.dp_target_epsilon, dp_delta=a.dp_delta,
                            dp_noise_multiplier=a.dp_noise_multiplier, dp_max_grad_norm=a.dp_max_grad_norm,
                            dp_physical_batch_size=a.dp_physical_batch_size, distributed=True, progress=False,
                            **overrides)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(info, default=str))
        return info
    finally:
        if owns_group:
            teardown()


if __name__ == "__main__":
    main()

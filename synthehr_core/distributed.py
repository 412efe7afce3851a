"""Multi-GPU (or multi-process CPU) training under ``torchrun`` with DistributedDataParallel.

    torchrun --nproc_per_node 4 -m synthehr_core.distributed --tables TABLES --out OUT [--preset paper ...]

Every rank runs the same ``train_to_dir`` call; ``train.py`` asks :class:`DistContext` for its share of each
batch and whether it is rank 0. The split is chosen so that N processes compute *the single-process step on the
same global batch*:

* the global batch of a step is the same slice of the same seeded epoch permutation as in a single process, and
  rank r takes ``batch[r::N]``. This is what ``DistributedSampler(shuffle=True)`` yields when the global batch is
  N * local batch (its rank-strided split of the permutation), minus its padding: DistributedSampler repeats
  patients to even out the ranks, which would weight them twice (and, under DP, break the per-patient bound);
* each rank's loss is its local mean times ``n_local * N / n_global``; DDP averages gradients over the N ranks,
  so the update is the gradient of the global-batch mean even when the last batch does not divide evenly;
* rank 0 alone writes checkpoints, the output directory and the progress bar; every rank reads the checkpoint to
  resume (a shared filesystem or gs://), so a run can be resumed with another number of processes.

With DP-SGD the model is wrapped by Opacus instead (privacy.py): DPDDP + DistributedDPOptimizer, each rank
clipping its own patients, rank 0 adding the noise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """This rank's device: ``cuda:<local_rank>`` when CUDA is available, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of indices."""
        return idx[self.rank::self.world_size]

    def loss_weight(self, n_local: int, n_global: int) -> float:
        """Factor on the local mean loss that makes DDP's gradient average the global-batch mean gradient."""
        return n_local * self.world_size / n_global if n_global else 0.0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``model`` (already on this rank's device); the model itself when not distributed."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def sum(self, *values: float) -> list[float]:
        """Sum floats over ranks (float64 on the CPU for gloo, on the device for NCCL)."""
        if not self.enabled:
            return list(values)
        dev = self.device() if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


def setup(backend: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a single process without that environment gets the trivial context.

    The backend is NCCL when CUDA is available, else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {missing} are not set: launch with "
                          "`torchrun --nproc_per_node N -m synthehr_core.distributed ...`, which sets them.")
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    if dist.get_world_size() != world:
        raise ConfigError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}.")
    return ctx


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m synthehr_core.distributed",
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
    from .train import train_to_dir

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

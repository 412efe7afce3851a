"""Multi-GPU (or multi-process CPU) training under ``torchrun`` with DistributedDataParallel.

    torchrun --nproc_per_node 4 -m synthehr_core.model.torchrun --tables TABLES --out OUT [--preset paper ...]

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

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

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

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable value of our own making: paths, markers)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
                          "`torchrun --nproc_per_node N -m synthehr_core.model.torchrun ...`, which sets them.")
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    if dist.get_world_size() != world:
        raise ConfigError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}.")
    return ctx


def launch(processes: int, module: str, argv: list[str]) -> None:
    """Run ``python -m module *argv`` as ``processes`` ranks under ``torchrun --standalone`` (one machine, a free
    port), its output straight to this process's stdout and stderr (a pod's log); raises when a rank failed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", module, *argv]
    log.info("launching %d training processes: torchrun --standalone --nproc_per_node %d -m %s", processes,
             processes, module)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"torchrun with {processes} processes exited with status {rc}; the lines above are its "
                           "log (the first error is the cause).")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""The torchrun entry point: one process per GPU, each running the same ``train_to_dir`` (distributed.py).

    torchrun --nproc_per_node 4 -m synthehr_core.model.torchrun --tables TABLES --out OUT [--preset paper ...]

One flag per ``TrainConfig`` option (``--dp-target-epsilon`` is ``dp_target_epsilon``), its default the config's;
``--config-json`` gives them all at once (what ``train_to_dir(processes=N)`` passes, so None values survive).
``train_to_dir(..., processes=N)`` launches this entry under ``torchrun --standalone --nproc_per_node N``
(``distributed.launch``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import torch.distributed as dist

from ..errors import ConfigError
from .checkpoint import MODEL_TYPES
from .config import CALIBRATIONS, TrainConfig
from .distributed import teardown
from .dp import ACCOUNTANTS
from .precision import PRECISIONS
from .schedule import KEEP, SCHEDULES
from .train import train_to_dir

log = logging.getLogger(__name__)

# where the run reads and writes, and how it reports; the rest is config
RUN_FLAGS = ("tables", "out", "rules_dir", "checkpoint_uri", "resume_from", "extend", "overwrite", "log_every",
             "log_seconds", "config_json")


def _int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig().to_dict()
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m synthehr_core.model.torchrun",
                                description="Train HALO / ConSequence with DDP (one process per GPU).")
    p.add_argument("--tables", required=True, help="preprocess output (tables directory)")
    p.add_argument("--out", required=True, help="checkpoint directory (empty unless --resume-from)")
    p.add_argument("--rules-dir", default=None)
    p.add_argument("--checkpoint-uri", default=None, help="root of the step checkpoints (default: beside --out)")
    p.add_argument("--resume-from", default=None)
    p.add_argument("--extend", action="store_true", help="train a finished --resume-from run on to --epochs")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out at publish time")
    p.add_argument("--log-every", type=int, default=None, help="a progress log line every N steps")
    p.add_argument("--log-seconds", type=float, default=30.0, help="a progress log line every S seconds")
    p.add_argument("--config-json", default=None, help="all TrainConfig options as JSON (overrides the flags)")
    p.add_argument("--model-type", default=d["model_type"], choices=sorted(MODEL_TYPES))
    p.add_argument("--preset", default=d["preset"])
    p.add_argument("--epochs", type=_int_or_auto, default=d["epochs"], help="an int or 'auto' (sized from the data)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch (split over the processes)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--lr-schedule", default=d["lr_schedule"], choices=list(SCHEDULES))
    p.add_argument("--lr-warmup", type=float, default=d["lr_warmup"], help="cosine: warm-up share of the steps")
    p.add_argument("--lr-final", type=float, default=d["lr_final"], help="cosine: last step's lr / lr")
    p.add_argument("--max-steps", type=int, default=d["max_steps"])
    p.add_argument("--eval-every", type=_int_or_auto, default=d["eval_every"], help="an int or 'auto'")
    p.add_argument("--patience", type=int, default=d["patience"])
    p.add_argument("--keep", default=d["keep"], choices=list(KEEP),
                   help="weights published: best val, last, or auto (best where the val split has >= 100 patients)")
    p.add_argument("--ckpt-every", type=int, default=d["ckpt_every"])
    p.add_argument("--ckpt-minutes", type=float, default=d["ckpt_minutes"])
    p.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--precision", default=d["precision"], choices=sorted(PRECISIONS))
    p.add_argument("--dp-target-epsilon", type=float, default=d["dp_target_epsilon"],
                   help="0 = no differential privacy")
    p.add_argument("--dp-delta", type=float, default=d["dp_delta"], help="default: min(1e-5, 1 / (10 n_train))")
    p.add_argument("--dp-noise-multiplier", type=float, default=d["dp_noise_multiplier"])
    p.add_argument("--dp-max-grad-norm", type=float, default=d["dp_max_grad_norm"])
    p.add_argument("--dp-physical-batch-size", type=int, default=d["dp_physical_batch_size"])
    p.add_argument("--dp-accountant", default=d["dp_accountant"], choices=list(ACCOUNTANTS))
    p.add_argument("--min-code-count", type=int, default=d["min_code_count"], help="0 = keep every code")
    p.add_argument("--n-ctx", type=int, default=d["n_ctx"], help="default: the tables' meta.json n_ctx")
    p.add_argument("--group-heads", action=argparse.BooleanOptionalAction, default=d["group_heads"])
    p.add_argument("--recurrence", action=argparse.BooleanOptionalAction, default=d["recurrence"],
                   help="offsets for the tokens the patient already has (halo.Recurrence)")
    p.add_argument("--calibration", choices=CALIBRATIONS, default=d["calibration"],
                   help="after training fit every output bias and the group direct terms (full), the <end> bias "
                        "(end) or nothing (off); calibrate.py, skipped with DP")
    p.add_argument("--model-override", dest="model_overrides", action="append", default=[], metavar="KEY=JSON",
                   help="HaloConfig field, e.g. n_embd=64 (repeatable)")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed flags (every flag but the ``RUN_FLAGS`` is an option)."""
    overrides = {}
    for kv in a.model_overrides:
        if "=" not in kv:
            raise ConfigError(f"--model-override {kv!r} must be KEY=JSON, e.g. n_embd=64.")
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v)
    options = {k: v for k, v in vars(a).items() if k not in RUN_FLAGS}
    if a.config_json:
        return TrainConfig.from_dict(json.loads(a.config_json))
    return TrainConfig.from_dict({**options, "model_overrides": overrides})


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(a)
    owns_group = not dist.is_initialized()  # a caller that set up the group keeps it (several runs per launch)
    try:
        info = train_to_dir(a.tables, a.out, config, rules_dir=a.rules_dir, checkpoint_uri=a.checkpoint_uri,
                            resume_from=a.resume_from, extend=a.extend, overwrite=a.overwrite, distributed=True,
                            progress=False, log_every=a.log_every, log_seconds=a.log_seconds)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(info, default=str))
        return info
    finally:
        if owns_group:
            teardown()


if __name__ == "__main__":
    main()

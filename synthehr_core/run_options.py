"""The pipeline's run options, checked before any work: the first task of every run calls ``check_run_options``.

A run form is free text: ``model_type=hallo`` or ``precision=fp61`` would otherwise fail only in the train
stage, after preprocessing, rule mining and KDE grids. This module checks every option the form carries in
milliseconds, without torch (the first task runs on the light image), and returns the shard seeds.

The allowed strings are data here and must equal the model's own tables (``model.checkpoint.MODEL_TYPES``,
``model.halo.PRESETS``, ``model.precision.PRECISIONS``); a test holds them equal.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import ConfigError, bullet_list

CHOICES: dict[str, tuple[str, ...]] = {
    "model_type": ("halo", "consequence"),
    "preset": ("tiny", "small", "paper"),
    "precision": ("fp32", "bf16", "fp16"),
    "sample_device": ("auto", "cpu", "cuda"),
    "lr_schedule": ("constant", "cosine"),
}

# name -> (lowest, highest, kind); None = unbounded. "open" floats exclude the lower bound, _OPEN_ABOVE the upper.
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "epochs": (0, None, "int"),              # 0 = auto (sized from the training set)
    "train_batch_size": (1, None, "int"),
    "lr": (0, None, "open"),
    "lr_warmup": (0, 1, "float"),            # [0, 1): a share of the planned steps
    "lr_final": (0, 1, "float"),
    "train_seed": (None, None, "int"),
    "dp_target_epsilon": (0, None, "float"),
    "dp_delta": (0, 1, "float"),
    "min_code_count": (0, None, "int"),
    "n_shards": (1, 1000, "int"),          # arbitrary cap; a very wide ParallelFor strains the backend (kfp #12131)
    "first_seed": (0, 2**31 - 1 - 1000, "int"),
    "n_patients_per_seed": (1, None, "int"),
    "sample_batch_size": (1, None, "int"),
    "temperature": (0, None, "open"),
    "rules_min_confidence": (0, 1, "open"),
    "eval_seed": (None, None, "int"),
    "train_eval_every": (0, None, "int"),
    "train_patience": (0, None, "int"),
    "train_ckpt_minutes": (0, None, "float"),
    "train_gpus": (1, 16, "int"),
    "small_cell_k": (0, None, "int"),          # one pod's GPUs (torchrun --nproc_per_node); more = Kubeflow Trainer
}
_OPEN_ABOVE = ("dp_delta", "lr_warmup")
CHECKPOINT_SCHEMES = ("gs://", "s3://", "minio://")   # what storage writes (minio:// is read as s3://)

# Kubernetes object names (RFC 1123 subdomain): what a secret name must look like.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _range_problem(name: str, value: Any) -> str | None:
    low, high, kind = RANGES[name]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or (isinstance(value, float) and math.isfinite(value))
    if kind == "int" and not is_int:
        return f"{name} must be an integer; got {_show(value)}."
    if not is_num:
        return f"{name} must be a number; got {_show(value)}."
    too_low = low is not None and (value <= low if kind == "open" else value < low)
    too_high = high is not None and (value >= high if name in _OPEN_ABOVE else value > high)
    if too_low or too_high:
        lo = "" if low is None else (f"> {low}" if kind == "open" else f">= {low}")
        hi = "" if high is None else (f"< {high}" if name in _OPEN_ABOVE else f"<= {high}")
        return f"{name} must be {' and '.join(x for x in (lo, hi) if x)}; got {_show(value)}."
    return None


def _checkpoint_root_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"train_checkpoint_root must be a string; got {_show(value)}."
    if "://" in value and not value.startswith(CHECKPOINT_SCHEMES):
        return (f"train_checkpoint_root {_show(value)} has a scheme synthehr cannot write; use one of "
                f"{list(CHECKPOINT_SCHEMES)}, a path the pods see, or \"\" for <pipeline root>/checkpoints.")
    return None


def _condition_problem(text: str) -> str | None:
    text = text.strip()
    if text in ("", "label_probs"):
        return None
    if not text.startswith("{"):
        return (f'condition must be "" (the model samples labels), "label_probs" or a JSON object such as '
                f'{{"gender": "F"}}; got {_show(text)}.')
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"condition is not valid JSON ({exc.msg} at character {exc.pos}); got {_show(text)}."
    if not isinstance(obj, dict) or not obj:
        return f'condition must be a non-empty JSON object of label values, e.g. {{"gender": "F"}}; got {_show(text)}.'
    return None


def _placement_problems(node_selector: Any, tolerations: Any) -> list[str]:
    out = []
    if not isinstance(node_selector, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in node_selector.items()):
        out.append('gpu_node_selector must be a JSON object of node label -> value, e.g. '
                   f'{{"cloud.google.com/gke-accelerator": "nvidia-l4"}}, or {{}}; got {_show(node_selector)}.')
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        out.append('gpu_tolerations must be a JSON list of tolerations, e.g. [{"key": "nvidia.com/gpu", '
                   f'"operator": "Exists", "effect": "NoSchedule"}}], or []; got {_show(tolerations)}.')
    else:
        for i, t in enumerate(tolerations):
            unknown = sorted(set(t) - _TOLERATION_KEYS)
            if unknown:
                out.append(f"gpu_tolerations[{i}] has unknown keys {unknown}; a toleration has "
                           f"{sorted(_TOLERATION_KEYS)}.")
            if t.get("operator", "Equal") not in ("Equal", "Exists"):
                out.append(f'gpu_tolerations[{i}].operator must be "Equal" or "Exists"; got {_show(t["operator"])}.')
    return out


def secret_name_problem(option: str, name: Any) -> str | None:
    """A Kubernetes secret name, or the problem with it (empty names make the API server reject the pod)."""
    if isinstance(name, str) and len(name) <= 253 and _K8S_NAME.fullmatch(name):
        return None
    return (f"{option} must be a Kubernetes secret name (lower-case letters, digits, '-' and '.'); got "
            f"{_show(name)}. Keep the default if you have no such secret: a secret that does not exist is "
            "skipped, and the pods use their own identity.")


def check_run_options(options: dict[str, Any]) -> list[int]:
    """Check a run's options (any subset of CHOICES, RANGES, ``condition``, the placement and secret options);
    raise one ``ConfigError`` listing every problem, else return the shard seeds
    ``first_seed .. first_seed + n_shards - 1`` (empty when those two are not given)."""
    problems = []
    for name, value in options.items():
        if name in CHOICES:
            if value not in CHOICES[name]:
                problems.append(f"{name} must be one of {list(CHOICES[name])}; got {_show(value)}.")
        elif name in RANGES:
            problems.append(_range_problem(name, value))
        elif name == "condition":
            problems.append(_condition_problem(value) if isinstance(value, str)
                            else f"condition must be a string; got {_show(value)}.")
        elif name == "train_checkpoint_root":
            problems.append(_checkpoint_root_problem(value))
        elif name in ("image_pull_secret", "object_store_secret"):
            problems.append(secret_name_problem(name, value))
        elif name not in ("gpu_node_selector", "gpu_tolerations"):
            problems.append(f"{name} is not a run option this check knows; the options are "
                            f"{sorted([*CHOICES, *RANGES, 'condition', 'gpu_node_selector', 'gpu_tolerations'])}.")
    if "gpu_node_selector" in options or "gpu_tolerations" in options:
        problems += _placement_problems(options.get("gpu_node_selector", {}), options.get("gpu_tolerations", []))
    if options.get("dp_delta") and not options.get("dp_target_epsilon"):
        problems.append(f"dp_delta={_show(options['dp_delta'])} is set but dp_target_epsilon is 0 (no DP-SGD); "
                        "set dp_target_epsilon too, or leave dp_delta at 0.")
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("invalid run options (fix them in the run form or with -p):\n" + bullet_list(problems))
    if "n_shards" in options and "first_seed" in options:
        return list(range(options["first_seed"], options["first_seed"] + options["n_shards"]))
    return []

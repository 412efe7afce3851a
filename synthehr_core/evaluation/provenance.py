"""Provenance of an evaluated cohort, read from the ``meta.json`` files the stages already write: the real tables
(preprocess: dataset, config hash, split seed, versions), the cohort (merge: seeds, shards, versions; each shard's
kde-sample / sample meta), the model (train: model type, preset, epochs and steps, DP-SGD (ε, δ), run hash).
The model directory is given, or found through the shards' ``upstream.model_dir`` when readable from here.
"""
from __future__ import annotations

import datetime as dt
import os

from .. import __version__, storage


def _meta(d) -> dict:
    if not d:
        return {}
    path = storage.join(str(d), "meta.json")
    try:
        return storage.read_json(path) if storage.exists(path) else {}
    except (OSError, ValueError):
        return {}


def _model_dir_from_cohort(cohort: dict) -> str | None:
    for sh in cohort.get("shards", []):
        up = _meta(sh.get("dir"))
        up = up.get("upstream", up)
        d = up.get("model_dir")
        if d and _meta(d):
            return d
    return None


def evaluation_date() -> str:
    """UTC date of the evaluation; ``SOURCE_DATE_EPOCH`` (reproducible builds) fixes it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch and epoch.isdigit() else \
        dt.datetime.now(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def dp_statement(model: dict) -> str:
    eps = model.get("dp_epsilon")
    if eps:
        delta = model.get("dp_delta")
        return (f"DP-SGD (ε = {float(eps):.3g}, δ = {float(delta):.2g}) on the model weights only; the vocabulary, "
                "label priors, rules and KDE grids are outside the guarantee")
    if model:
        return "no formal guarantee (trained without differential privacy)"
    return "unknown (no model meta.json found): treat as no formal guarantee"


def provenance(real_dir=None, synthetic_dir=None, model_dir=None, run_id: str = "", licences: dict | None = None,
               policy: dict | None = None) -> dict:
    """A flat, JSON-able provenance block (missing facts say so rather than disappearing)."""
    real, cohort = _meta(real_dir), _meta(synthetic_dir)
    model_dir = model_dir or _model_dir_from_cohort(cohort)
    model = _meta(model_dir)
    shard = _meta((cohort.get("shards") or [{}])[0].get("dir"))
    dataset = real.get("dataset", "unknown")
    licences = licences or {}
    versions = {"synthehr": __version__, **(real.get("versions") or {}), **(cohort.get("versions") or {})}
    out = {
        "dataset": dataset,
        "model": f"{model.get('model_type', 'unknown')} / preset {model.get('preset', 'unknown')}" if model
        else "unknown (pass the model directory)",
        "training": (f"{model.get('epochs_run', '?')} epochs, {model.get('steps', '?')} steps, best val loss "
                     f"{model['best_val_loss']:.4g}" if model.get("best_val_loss") is not None else
                     f"{model.get('epochs_run', '?')} epochs, {model.get('steps', '?')} steps") if model else "unknown",
        "differential_privacy": dp_statement(model),
        "run_id": run_id or "not given",
        "evaluated": evaluation_date(),
        "sampling": (f"{cohort.get('n_shards', '?')} shards, seeds {cohort.get('seeds', '?')}, "
                     f"{cohort.get('n_patients', '?')} patients") if cohort else "unknown",
        "split": f"seed {real.get('seed', '?')}, sizes {real.get('split_sizes', '?')}",
        "config_hashes": ", ".join(f"{k} {v}" for k, v in (("dataset config", real.get("config_hash")),
                                                           ("training run", model.get("config_hash")),
                                                           ("KDE config", shard.get("config_hash")),
                                                           ("release policy", (policy or {}).get("sha256_16")))
                                   if v),
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        "licence": licences.get(dataset, f"no licence notice recorded for dataset {dataset!r}: check its data use "
                                         "agreement before release (add it under licences: in the policy)."),
    }
    if model.get("min_code_count"):
        out["vocabulary_filter"] = f"codes held by fewer than {model['min_code_count']} training patients dropped"
    return out

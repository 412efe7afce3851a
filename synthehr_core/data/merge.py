"""The merge stage: concatenate synthetic cohort shards (one per seed) into one canonical tables directory.

Shards are ordered by the ``seed`` in their ``meta.json`` (never by the order they arrive in: a Kubeflow
fan-in does not promise one), patients are re-keyed ``syn-<seed>-<n>`` so ids stay unique across shards, and
the shards' common ``vocab.json`` is copied. No torch here: the merge image is the light one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .. import storage, versions
from ..errors import ConfigError, DataError, bullet_list
from .schema import read_tables, write_tables

SYNTHETIC_ID = "syn-{seed}-{n}"
MERGED_STAGE = "kde-sample"   # the stage whose outputs merge takes (its meta.json "stage")


def _shard_meta(shard_dir: str) -> dict:
    path = storage.join(shard_dir, "meta.json")
    if not storage.exists(path):
        raise DataError(f"{shard_dir}: no meta.json, so the shard's seed is unknown. Point merge at the outputs of "
                        "the kde-sample stage.")
    storage.require_complete(shard_dir, "kde-sample")
    meta = storage.read_json(path)   # a damaged file is a DataError naming it
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a stage's meta.json (a JSON object). Point merge at kde-sample outputs.")
    stage = meta.get("stage", "kde-sample" if "grids_dir" in meta else None)   # kde-sample wrote no stage before
    if stage != MERGED_STAGE:
        what = ("a sample-stage shard: its continuous values and visit times are still empty" if stage == "sample"
                else f"written by the {stage!r} stage" if stage else "not written by the kde-sample stage")
        raise DataError(f"{shard_dir}: {what}. Merge only kde-sample outputs: run synthehr kde-sample --shard "
                        f"{shard_dir} --grids GRIDS --seed SEED --out DIR first.")
    if "seed" not in meta:
        raise DataError(f"{path}: has no 'seed' (keys: {sorted(meta)}). Re-run the sample / kde-sample stage.")
    return meta


def rekey(patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame, seed: int):
    """Give one shard's patients the ids ``syn-<seed>-0``, ``syn-<seed>-1``, ... in their current order."""
    mapping = {old: SYNTHETIC_ID.format(seed=seed, n=i) for i, old in enumerate(patients["patient_id"])}
    patients = patients.assign(patient_id=patients["patient_id"].map(mapping))
    visits = visits.assign(patient_id=visits["patient_id"].map(mapping))
    codes = codes.assign(patient_id=codes["patient_id"].map(mapping))
    return patients, visits, codes


def merge_shards(shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 overwrite: bool = False, small_cell_k: int = 0, real_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Merge synthetic shard tables directories into ``out_dir``.

    Args:
        shard_dirs: tables directories written by ``sample_to_dir`` or ``sample_kde_to_dir``, each with a
            ``meta.json`` holding its ``seed``; any order.
        out_dir: the merged cohort's tables directory; must be empty unless ``overwrite``.
        small_cell_k: 0 = off; k > 0 = drop codes held by fewer than k real training patients and patients whose
            label combination is that rare (``data/smallcells.py``), counted in ``real_dir``'s train split.
        real_dir: the real tables directory (preprocess output); needed with ``small_cell_k``.
    Returns:
        A summary dict (also written to ``meta.json``): seeds in merge order, row counts per shard and in total.
    """
    dirs = [str(d) for d in shard_dirs]
    if small_cell_k and real_dir is None:
        raise ConfigError(f"merge_shards: small_cell_k={small_cell_k} needs real_dir (the preprocess output whose "
                          "training patients define the small cells); pass real_dir or small_cell_k=0.")
    if not dirs:
        raise ConfigError("merge_shards got no shard directories: pass at least one kde-sample output.")
    storage.check_output(out_dir, overwrite=overwrite)     # before any shard is read
    metas = [_shard_meta(d) for d in dirs]
    seeds = [int(m["seed"]) for m in metas]
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise DataError(f"shards share seeds {dup}: {[d for d, s in zip(dirs, seeds) if s in dup]}. Shards from the "
                        "same seed are identical copies; sample each shard with its own seed.")
    order = sorted(range(len(dirs)), key=lambda i: seeds[i])

    vocab_bytes, vocab_parsed, vocab_from, problems = None, None, None, []
    parts: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = []
    shards = []
    for i in order:
        d, seed = dirs[i], seeds[i]
        vpath = storage.join(d, "vocab.json")
        if storage.exists(vpath):
            raw = storage.read_bytes(vpath)
            if vocab_bytes is None:
                vocab_bytes, vocab_parsed, vocab_from = raw, json.loads(raw), vpath
            elif json.loads(raw) != vocab_parsed:
                problems.append(f"{vpath} differs from {vocab_from}: shards come from different models.")
        patients, visits, codes = rekey(*read_tables(d), seed=seed)
        parts.append((patients, visits, codes))
        shards.append({"seed": seed, "dir": d, "n_patients": len(patients), "n_visits": len(visits),
                       "n_codes": len(codes)})
    if problems:
        raise DataError("cannot merge the shards:\n" + bullet_list(problems) + "\nMerge only shards sampled from "
                        "one trained model.")

    patients = pd.concat([p[0] for p in parts], ignore_index=True)
    visits = pd.concat([p[1] for p in parts], ignore_index=True)
    codes = pd.concat([p[2] for p in parts], ignore_index=True)
    visits["visit_index"] = visits["visit_index"].astype("int32")
    codes["visit_index"] = codes["visit_index"].astype("int32")
    suppressed = None
    if small_cell_k:
        from .smallcells import suppress
        from .vocab import Vocab

        vocab = Vocab.from_json(vocab_parsed, vocab_from) if vocab_parsed is not None else None
        (patients, visits, codes), suppressed = suppress(patients, visits, codes, read_tables(real_dir), vocab,
                                                         small_cell_k)
    meta = {"stage": "merge", "seeds": [s["seed"] for s in shards], "n_shards": len(shards),
            "n_patients": len(patients), "n_visits": len(visits), "n_codes": len(codes), "shards": shards,
            "versions": versions(), **({"small_cells": suppressed} if suppressed else {})}
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(tmp, patients, visits, codes)
        if vocab_bytes is not None:
            storage.write_bytes(storage.join(tmp, "vocab.json"), vocab_bytes)  # copied byte for byte
        storage.write_json(storage.join(tmp, "meta.json"), meta)
    return meta

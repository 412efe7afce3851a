"""The two post-processing stages: kde-grids (fit on the real training split) and kde-sample (fill one shard).

``generate_kde_grids_to_dir`` writes ``grid_<name>_kde.parquet`` per variable, ``kde_config.json`` (the normalised
config), the calendar tables when the real visits carry ``start_day``, and ``meta.json``.
``sample_kde_to_dir`` fills every configured variable of a sampled shard (``draw.sample_from_kde_grid``), rebuilds
the visit times (``draw.reconstruct_times``) and, with calendar tables, dates the visits to agree with their
sampled calendar tokens (``dating.reconstruct_calendar_times``). This module must not import torch or kfp: the
KDE images have neither.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .. import storage
from ..data.schema import read_tables, write_tables
from ..errors import DataError
from ..randomness import numpy_rng
from .calendar_tables import build_calendar_tables, read_calendar_tables, write_calendar_tables
from .dating import reconstruct_calendar_times
from .draw import reconstruct_times, sample_from_kde_grid
from .grids import add_code_columns, generate_kde_grids, read_kde_grid
from .kde_config import CONFIG_FILE, GRID_FILE, UNIT_DAYS, KDEConfig, TimeSpec, load_kde_config

log = logging.getLogger(__name__)


# ============================================================================================ kde-grids
def _real_overlap_rate(visits: pd.DataFrame, tcfg: TimeSpec | None) -> float | None:
    """Share of real visits that start before the previous one ends (guides ``time.allow_overlap``)."""
    if tcfg is None or not tcfg.gap or not tcfg.los or not {tcfg.gap, tcfg.los} <= set(visits.columns):
        return None
    v = visits.sort_values(["patient_id", "visit_index"], kind="stable")
    prev_los = v.groupby("patient_id", sort=False)[tcfg.los].shift(1).to_numpy(dtype=float)
    gap = v[tcfg.gap].to_numpy(dtype=float) * UNIT_DAYS[tcfg.gap_unit]
    ok = ~np.isnan(prev_los) & ~np.isnan(gap)
    return float(np.mean(gap[ok] < prev_los[ok] * UNIT_DAYS[tcfg.los_unit])) if ok.any() else None


def _write_calendar_tables(train: pd.DataFrame, tv: pd.DataFrame, min_count: int, out_dir: str) -> bool:
    """Calendar anchor and time-of-day tables for the dating (docs/temporal.md), when the real visits carry
    ``start_day``; False (logged) when they do not or the data are too few."""
    if "start_day" not in tv.columns or not tv["start_day"].notna().any():
        return False
    try:
        write_calendar_tables(*build_calendar_tables(train, tv, min_count), out_dir)
    except DataError as exc:
        log.warning("no calendar tables: %s", exc)
        return False
    return True


def generate_kde_grids_to_dir(tables_dir: str, kde_config: KDEConfig | Mapping | str, out_dir: str,
                              overwrite: bool = False) -> dict:
    """Stage entry point: fit grids on the *train* split of a canonical tables dir; write grids, config and meta."""
    storage.check_output(out_dir, overwrite=overwrite)     # before any input is read
    cfg = load_kde_config(kde_config)
    patients, visits, codes = read_tables(tables_dir)
    visits = add_code_columns(visits, codes, cfg.code_columns)
    train = patients.loc[patients["split"] == "train"]
    if train.empty:
        raise DataError(f"{tables_dir}: no patients with split == 'train' (splits: {sorted(patients['split'].unique())}). "
                        "Grids must come from real training data: point at the preprocess output.")
    tv = visits.loc[visits["patient_id"].isin(set(train["patient_id"]))]
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        summary = generate_kde_grids(cfg, train, tv, tmp)
        storage.write_json(storage.join(str(tmp), CONFIG_FILE), cfg.to_dict())
        calendar = _write_calendar_tables(train, tv, cfg.min_count, str(tmp))
        meta = {"tables_dir": str(tables_dir), "config_hash": cfg.config_hash(), "n_patients": len(train),
                "n_visits": len(tv), "grids": summary, "real_overlap_rate": _real_overlap_rate(tv, cfg.time),
                "privacy": "grids are derived from real training data and are outside any DP guarantee",
                "calendar_tables": calendar}
        storage.write_json(storage.join(str(tmp), "meta.json"), meta)
    return meta


# ============================================================================================ kde-sample
def _top_edges(vocab_json: dict | None) -> dict[str, float]:
    """The last bin edge per variable (closed there) from the shard's vocabulary."""
    if not vocab_json:
        return {}
    tops: dict[str, float] = {}
    for t in vocab_json.get("tokens", []):
        if t.get("variable") and t.get("hi") is not None:
            tops[t["variable"]] = max(tops.get(t["variable"], -np.inf), float(t["hi"]))
    return tops


def _calendar_times_from_grids(patients: pd.DataFrame, visits: pd.DataFrame, grids_dir: str, cfg: KDEConfig,
                               rng: np.random.Generator) -> tuple[pd.DataFrame, dict | None]:
    """``reconstruct_calendar_times`` with the calendar tables, time section and gap grid of a grids dir;
    ``(visits, None)`` unchanged when the grids dir has no calendar tables."""
    tables = read_calendar_tables(grids_dir)
    if tables is None:
        return visits, None
    tcfg = cfg.time or TimeSpec()
    grid = None
    for name, vcfg in cfg.variable_config.items():
        if tcfg.gap and getattr(vcfg, "column", name) == tcfg.gap and vcfg.method == "kde_range":
            grid = read_kde_grid(storage.join(grids_dir, GRID_FILE.format(name)))
    anchors, tod, weekdays = tables
    return reconstruct_calendar_times(patients, visits, anchors, tod, grid, tcfg, rng, weekdays=weekdays)


def sample_kde_to_dir(shard_dir: str, grids_dir: str, out_dir: str, seed: int, overwrite: bool = False) -> dict:
    """Stage entry point: fill every configured variable and the visit times of a sampled shard; write a tables dir.

    Each variable draws from its own stream ``numpy_rng(seed, i)`` (i = config order), the visit times from stream
    ``n`` and the calendar dating from ``n + 1`` (randomness.py), so adding a variable does not change the others.
    """
    storage.check_output(out_dir, overwrite=overwrite)     # before any input is read
    storage.require_complete(grids_dir, "kde-grids")
    cfg = load_kde_config(storage.read_json(storage.join(grids_dir, CONFIG_FILE)),
                          where=storage.join(grids_dir, CONFIG_FILE))
    patients, visits, codes = read_tables(shard_dir)
    derived = [c for c in cfg.code_columns if c not in visits.columns]
    visits = add_code_columns(visits, codes, cfg.code_columns)
    vocab_path = storage.join(shard_dir, "vocab.json")
    vocab = storage.read_json(vocab_path) if storage.exists(vocab_path) else None
    tops = _top_edges(vocab)
    names = list(cfg.variable_config)
    reports = {}
    for i, name in enumerate(names):
        grid = read_kde_grid(storage.join(grids_dir, GRID_FILE.format(name)))
        rng = numpy_rng(seed, i)
        if grid.spec["data_source"] == "patients":
            patients, reports[name] = sample_from_kde_grid(grid, patients, None, rng, tops)
        else:
            visits, reports[name] = sample_from_kde_grid(grid, visits, None, rng, tops, patients=patients)
        log.info("kde %s: %s", name, reports[name])
    time_report = None
    if cfg.time is not None:
        visits, time_report = reconstruct_times(patients, visits, cfg.time, numpy_rng(seed, len(names)))
    # dates that agree with the sampled cal_* tokens, when the grids dir holds calendar tables (docs/temporal.md)
    visits, calendar_report = _calendar_times_from_grids(patients, visits, grids_dir, cfg,
                                                         numpy_rng(seed, len(names) + 1))
    visits = visits.drop(columns=derived)   # code-derived strata stay codes in the output
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(tmp, patients, visits, codes)
        if vocab is not None:
            storage.write_json(storage.join(str(tmp), "vocab.json"), vocab)
        meta = {"stage": "kde-sample", "seed": seed, "shard_dir": str(shard_dir), "grids_dir": str(grids_dir), "config_hash": cfg.config_hash(),
                "n_patients": len(patients), "n_visits": len(visits), "variables": reports,
                "backoff_counts": {k: r["n_backoff"] for k, r in reports.items()},
                "disagreement_counts": {k: r["n_uniform_fallback"] for k, r in reports.items()},
                "time": time_report, "calendar": calendar_report}
        shard_meta = storage.join(shard_dir, "meta.json")
        if storage.exists(shard_meta):
            meta["upstream"] = storage.read_json(shard_meta)     # the sample stage's provenance, kept verbatim
        storage.write_json(storage.join(str(tmp), "meta.json"), meta)
    return meta

"""Raw extract -> canonical tables, the same way for every dataset.

The adapter (``synthehr_core/data/adapters/<adapter>.py``) reads and validates the raw files and returns a
:class:`~synthehr_core.data.adapters.base.RawCohort`. This module then, for every dataset alike: drops orphans with
a counted reason, orders visits in time (``visit_index``), derives ``start_offset_days`` and ``gap_days``,
draws the seeded patient split, bins continuous variables, builds the deterministic vocabulary and writes the
tables directory atomically. Same raw data + config + seed -> byte-identical parquet.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import storage, versions
from ..errors import ConfigError, DataError, SchemaError, bullet_list
from ..randomness import numpy_rng
from .adapters.base import DropReport, RawCohort
from .adapters.registry import resolve_adapter
from .config import BinSpec, DatasetConfig, load_config
from .schema import HOUR_BANDS, MONTHS, SPLITS, WEEKDAYS, bin_values, calendar_parts, fast_isin, write_tables
from .vocab import build_vocab

log = logging.getLogger(__name__)

RAW_VISIT_COLUMNS = ("patient_id", "visit_id", "start", "event_type")


def _check_raw_cohort(c: RawCohort, adapter: str) -> None:
    problems = []
    for table, cols in (("patients", ("patient_id",)), ("visits", RAW_VISIT_COLUMNS), ("codes", ("visit_id", "code"))):
        df = getattr(c, table)
        missing = [col for col in cols if col not in df.columns]
        if missing:
            problems.append(f"adapter {adapter!r} returned a {table} frame without {missing}")
    if problems:
        raise SchemaError("dataset adapter output does not follow data/adapters/base.py RawCohort:\n" + bullet_list(problems))


def assign_split(patient_ids: pd.Series, fractions: tuple[float, float, float], seed: int) -> pd.Series:
    """Seeded split by patient: sort ids, permute with ``seed``, cut by the fractions."""
    ids = np.sort(patient_ids.to_numpy(dtype=object))
    order = numpy_rng(seed).permutation(len(ids))
    n = len(ids)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    labels = np.empty(n, dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train:n_train + n_val]] = "val"
    labels[order[n_train + n_val:]] = "test"
    return pd.Series(labels, index=ids).reindex(patient_ids.to_numpy()).set_axis(patient_ids.index)


def _edges(spec: BinSpec, values: pd.Series, name: str, where: str) -> list[float]:
    if spec.edges is not None:
        return [float(e) for e in spec.edges]
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if v.size == 0:
        raise ConfigError(f"{where}: cannot fit quantile bins for {name!r}: no non-null values in the train split. "
                          "Give explicit `edges` instead.")
    q = np.quantile(v, np.linspace(0.0, 1.0, spec.quantiles + 1))
    q = np.unique(np.array([float(f"{x:.6g}") for x in q]))
    if q.size < 2:
        q = np.array([q[0], q[0] + 1.0])
    q[0], q[-1] = min(q[0], float(v.min())), max(q[-1], float(v.max()))
    return q.tolist()


def add_calendar_columns(visits: pd.DataFrame, kinds: list[str]) -> list[str]:
    """Add ``cal_<kind>`` visit columns from ``start`` (days since 1970-01-01); return the calendar tokens.

    Tokens are ``cal:month=01..12``, ``cal:weekday=Mon..Sun``, ``cal:hour=00-05|06-11|12-17|18-23`` and
    ``cal:year=<yyyy>`` (the years seen), so the model learns calendar position jointly with the codes.
    """
    parts = calendar_parts(visits["start"].to_numpy(dtype=float))
    parts["month"] = parts["month"] - 1     # 0-based, to index MONTHS
    names = {"month": MONTHS, "weekday": WEEKDAYS, "hour": HOUR_BANDS}
    tokens: list[str] = []
    for kind in kinds:
        if kind == "year":
            visits["cal_year"] = parts["year"].astype(str).astype(object)
            tokens += [f"cal:year={y}" for y in sorted(set(visits["cal_year"]))]
        else:
            visits[f"cal_{kind}"] = np.asarray(names[kind], dtype=object)[parts[kind]]
            tokens += [f"cal:{kind}={v}" for v in names[kind]]
    return tokens


def _clean(cohort: RawCohort, report: DropReport) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """String keys; orphans, undated visits and repeated codes dropped, counted and logged."""
    patients, visits, codes = cohort.patients.copy(), cohort.visits.copy(), cohort.codes.copy()
    patients["patient_id"] = patients["patient_id"].astype(str)
    visits["patient_id"] = visits["patient_id"].astype(str)
    visits["visit_id"] = visits["visit_id"].astype(str)
    codes["visit_id"] = codes["visit_id"].astype(str)
    codes["code"] = codes["code"].astype(str)
    orphan = ~fast_isin(visits["patient_id"], patients["patient_id"])
    report.drop("visits", "patient_id not in the patients table", int(orphan.sum()))
    visits = visits[~orphan]
    bad_start = visits["start"].isna()
    report.drop("visits", "no start time", int(bad_start.sum()))
    visits = visits[~bad_start]
    unknown = ~fast_isin(codes["visit_id"], visits["visit_id"])
    report.drop("codes", "visit not in the visits table (or dropped above)", int(unknown.sum()))
    codes = codes[~unknown]
    dup = codes.duplicated(["visit_id", "code"])
    report.drop("codes", "same code repeated within one visit", int(dup.sum()))
    codes = codes[~dup]
    no_visits = ~fast_isin(patients["patient_id"], visits["patient_id"])
    report.drop("patients", "no visits", int(no_visits.sum()))
    return patients[~no_visits], visits, codes


def _check_plausible(cohort: RawCohort, cfg: DatasetConfig, report: DropReport, where: str) -> dict[str, int]:
    """Ages and visit years that no real record has: an error, or clipped/dropped and counted (``plausible``)."""
    spec, counts, problems = cfg.plausible, {}, []
    clip = spec.action == "clip"
    fix = ("fix the extract, or set plausible.action: clip in the config to clip/drop them (counted in "
           "meta.json)")
    patients, visits = cohort.patients, cohort.visits
    if spec.age_column in patients.columns:
        age = pd.to_numeric(patients[spec.age_column], errors="coerce")
        for bound, name, bad in ((spec.min_age, "min_age", age < spec.min_age),
                                 (spec.max_age, "max_age", age > spec.max_age if spec.max_age is not None else None)):
            if bad is None or not bad.any():
                continue
            counts[f"patients.{spec.age_column} outside plausible.{name}"] = int(bad.sum())
            if clip:
                age = age.where(~bad, bound)
            else:
                problems.append(f"{int(bad.sum())} patients have {spec.age_column} {'<' if name == 'min_age' else '>'} "
                                f"{bound:g} (plausible.{name}), e.g. patient_id {patients.loc[bad, 'patient_id'].head(3).tolist()} "
                                f"with {age[bad].head(3).tolist()}")
        if clip and counts:
            cohort.patients = patients.assign(**{spec.age_column: age})
    start = visits["start"].to_numpy(dtype=float)
    known = np.isfinite(start)
    year = np.zeros(len(start), dtype=np.int64)
    year[known] = calendar_parts(start[known])["year"]
    lo, hi = spec.visit_years
    out = known & ((year < lo) | (year > hi))
    if out.any():
        counts[f"visits: start year outside plausible.visit_years {list(spec.visit_years)}"] = int(out.sum())
        if clip:
            report.drop("visits", f"start year outside plausible.visit_years {list(spec.visit_years)}", int(out.sum()))
            cohort.visits = visits[~out]
        else:
            problems.append(f"{int(out.sum())} visits start outside the years {lo}-{hi} (plausible.visit_years), "
                            f"e.g. visit_id {visits.loc[out, 'visit_id'].head(3).tolist()} in the years "
                            f"{sorted(set(year[out].tolist()))[:3]}")
    if problems:
        raise DataError(f"{where}: implausible values ({fix}):\n" + bullet_list(problems))
    return counts


def _require_patients(patients: pd.DataFrame, cohort: RawCohort, report: DropReport, where: str) -> None:
    """An empty cohort after the drops is an error naming what dropped the rows, not an empty output."""
    if len(patients):
        return
    drops = report.as_dict()
    why = "; ".join(f"{k} ({n})" for k, n in drops.items()) or "nothing was dropped: the adapter returned no rows"
    raise DataError(f"{where}: no patient is left after cleaning ({len(cohort.patients)} patients, "
                    f"{len(cohort.visits)} visits read). Dropped: {why}. Check that the adapter's id columns "
                    "(adapter_options: visits.patient, patients.id) join, and plausible.visit_years.")


def _order_visits(visits: pd.DataFrame) -> pd.DataFrame:
    """Visits in time order per patient, with ``visit_index``, ``start_offset_days`` and ``gap_days``."""
    visits = visits.sort_values(["patient_id", "start", "visit_id"], kind="stable").reset_index(drop=True)
    g = visits.groupby("patient_id", sort=False)
    visits["visit_index"] = g.cumcount().astype("int32")
    first = g["start"].transform("min")
    visits["start_offset_days"] = (visits["start"] - first).astype(float)
    visits["gap_days"] = g["start"].diff().astype(float)
    return visits


def _check_columns(cfg: DatasetConfig, patients: pd.DataFrame, visits: pd.DataFrame, where: str) -> None:
    problems = []
    for key, names, table, kind in (("labels", cfg.labels, patients, "patient"),
                                    ("patient_bins", cfg.patient_bins, patients, "patient"),
                                    ("visit_bins", cfg.visit_bins, visits, "visit"),
                                    ("visit_categories", cfg.visit_categories, visits, "visit")):
        problems += [f"{key}: {col!r} is not a {kind} column; {kind} columns: {sorted(table.columns)}"
                     for col in names if col not in table.columns]
    if problems:
        raise ConfigError(f"{where}: config does not match the data of adapter {cfg.adapter!r}:\n" + bullet_list(problems))


def _labels(patients: pd.DataFrame, columns) -> dict[str, list[str]]:
    """Label columns as strings ('unknown' where missing), in place; returns each column's sorted values."""
    label_values: dict[str, list[str]] = {}
    for col in columns:
        missing = patients[col].isna()
        if missing.any():
            log.warning("%d patients have no %s; labelled 'unknown'", int(missing.sum()), col)
        patients[col] = patients[col].astype("object").where(~missing, "unknown").astype(str)
        label_values[col] = sorted(patients[col].unique())
    return label_values


def _bin_columns(cfg: DatasetConfig, patients: pd.DataFrame, visits: pd.DataFrame, where: str, stats: dict
                 ) -> tuple[dict, dict]:
    """``<col>_binned`` for every configured bin, edges from the train split only; returns (patient, visit) edges."""
    train_ids = patients.loc[patients["split"] == "train", "patient_id"]
    patient_edges, visit_edges = {}, {}
    for table, df, specs, edges_out in (("patients", patients, cfg.patient_bins, patient_edges),
                                        ("visits", visits, cfg.visit_bins, visit_edges)):
        in_train = fast_isin(df["patient_id"], train_ids)   # edges (quantiles) come from the train split only
        for col, spec in specs.items():
            edges_out[col] = _edges(spec, df.loc[in_train, col], col, where)
            res = bin_values(df[col], edges_out[col])
            df[f"{col}_binned"] = res.labels
            stats["clipped"][f"{table}.{col}"] = res.n_clipped
    return patient_edges, visit_edges


def _categories(visits: pd.DataFrame, columns) -> dict[str, list[str]]:
    """Visit category columns as strings (null stays null: no token), in place; returns each column's values."""
    out = {}
    for col in columns:
        s = visits[col]
        visits[col] = s.astype("object").where(s.notna(), None).map(lambda v: None if v is None else str(v).strip())
        out[col] = sorted(set(visits[col].dropna()))
    return out


def _key_codes(codes: pd.DataFrame, visits: pd.DataFrame) -> pd.DataFrame:
    """Codes keyed by (patient, visit_index) instead of the raw visit id."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # position of each code's visit (pyarrow hash lookup; a pandas merge on string keys peaks at ~1 GB per 10M rows)
    pos = np.asarray(pc.index_in(pa.array(codes["visit_id"].astype(str), type=pa.string()),
                                 value_set=pa.array(visits["visit_id"].astype(str), type=pa.string())).fill_null(-1))
    found = pos >= 0
    return pd.DataFrame({"patient_id": visits["patient_id"].take(pos[found]).reset_index(drop=True),
                         "visit_index": visits["visit_index"].to_numpy()[pos[found]],
                         "code": codes["code"][found].reset_index(drop=True)})


def canonicalize(cohort: RawCohort, cfg: DatasetConfig, seed: int, report: DropReport):
    """Turn an adapter's RawCohort into canonical (patients, visits, codes, vocab, stats)."""
    where = cfg.source or cfg.name
    _check_raw_cohort(cohort, cfg.adapter)
    implausible = _check_plausible(cohort, cfg, report, where)
    patients, visits, codes = _clean(cohort, report)
    _require_patients(patients, cohort, report, where)
    visits = _order_visits(visits)
    patients = patients.sort_values("patient_id", kind="stable").reset_index(drop=True)
    patients.insert(1, "split", assign_split(patients["patient_id"], (cfg.split.train, cfg.split.val, cfg.split.test), seed).to_numpy())
    if not (patients["split"] == "train").any():
        raise DataError(f"{where}: split.train = {cfg.split.train} of {len(patients)} patients is no patient, so there "
                        "is nothing to train on. Use a larger extract or a larger split.train.")
    _check_columns(cfg, patients, visits, where)
    label_values = _labels(patients, cfg.labels)
    stats: dict[str, Any] = {"clipped": {}, **({"implausible": implausible} if implausible else {})}
    patient_edges, visit_edges = _bin_columns(cfg, patients, visits, where, stats)
    calendar_tokens = add_calendar_columns(visits, cfg.calendar.tokens) if cfg.calendar.enabled else []
    categories = _categories(visits, cfg.visit_categories)
    codes = _key_codes(codes, visits)
    vocab = build_vocab(visits["event_type"].astype(str).unique(), visit_edges, calendar_tokens, codes["code"].unique(),
                        label_values, patient_edges, cfg.code_namespaces, categories)
    visits["start_day"] = visits["start"].astype(float)  # absolute calendar position, for temporal metrics
    visits = visits.drop(columns=["visit_id", "start"])
    core = ["patient_id", "visit_index", "start_offset_days", "event_type"]
    visits = visits[core + [c for c in visits.columns if c not in core]]
    visits["event_type"] = visits["event_type"].astype(str)
    n_long = int((visits.groupby("patient_id").size() > cfg.n_ctx - vocab.first_visit_row).sum())
    stats["patients_longer_than_n_ctx"] = n_long
    if n_long:
        log.warning("%d patients have more visits than n_ctx=%d allows; training keeps their first visits",
                    n_long, cfg.n_ctx)
    return patients, visits, codes, vocab, stats


def preprocess(config: str | Path | dict | DatasetConfig, out_dir: str | Path, profile: str = "local",
               seed: int | None = None, raw: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run a dataset's adapter and write the canonical tables directory.

    Args:
        config: bundled config name (``mimic3``, ``adni``, ``qh``), YAML path, dict or DatasetConfig.
        out_dir: output tables directory (local or gs://); must be empty unless ``overwrite``.
        profile: which ``profiles.<name>.raw`` to read when ``raw`` is not given.
        seed: split seed; defaults to the config's ``split.seed``.
        raw: raw-data directory overriding the profile.
    Returns:
        A summary dict (also written to ``meta.json``).
    """
    t0 = time.perf_counter()
    storage.check_output(out_dir, overwrite=overwrite)     # before the config and the raw data are read
    cfg = load_config(config)
    raw_dir = raw if raw is not None else cfg.raw_path(profile)
    if raw is not None and not storage.exists(raw):
        raise ConfigError(f"raw data directory {raw!r} does not exist. Check --raw / the importer URI.")
    seed = cfg.split.seed if seed is None else int(seed)
    adapter = resolve_adapter(cfg.adapter)
    report = DropReport()
    log.info("reading %s with adapter %s (%s)", raw_dir, cfg.adapter, adapter.origin)
    cohort = adapter.load(raw_dir, dict(cfg.adapter_options), report)
    patients, visits, codes, vocab, stats = canonicalize(cohort, cfg, seed, report)
    split_sizes = {s: int((patients["split"] == s).sum()) for s in SPLITS}
    meta = {
        "dataset": cfg.name, "adapter": cfg.adapter, "profile": profile if raw is None else "explicit",
        "seed": seed, "config_hash": cfg.config_hash(), "versions": versions(),
        "n_patients": int(len(patients)), "n_visits": int(len(visits)), "n_codes": int(len(codes)),
        "vocab_size": vocab.size, "n_visit_tokens": vocab.n_visit_tokens, "n_labels": vocab.n_labels,
        "split_sizes": split_sizes, "source_rows": dict(cohort.source_rows), "dropped": report.as_dict(),
        "labels": list(cfg.labels), "patient_binned": list(cfg.patient_bins), "visit_binned": list(cfg.visit_bins),
        "kde": cfg.kde, "n_ctx": cfg.n_ctx, "calendar": cfg.calendar.model_dump(), **stats,
    }
    if cohort.notes:   # only adapters that report something (bundled datasets' meta.json stays as it was)
        meta["adapter_notes"] = cohort.notes
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(tmp, patients, visits, codes)
        vocab.save(storage.join(tmp, "vocab.json"))
        storage.write_json(storage.join(tmp, "meta.json"), meta)
    log.info("wrote %s: %d patients, %d visits, %d codes, vocab %d (%.1fs)", out_dir, len(patients), len(visits),
             len(codes), vocab.size, time.perf_counter() - t0)
    return meta

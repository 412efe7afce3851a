"""Calendar tables of the real training data, and the ``cal_<kind>`` tokens of synthetic visits.

The kde-grids stage writes three tables beside the grids when the real visits carry ``start_day``
(``build_calendar_tables`` -> ``write_calendar_tables``): first-visit counts per (year, month, weekday) cell, a
time-of-day histogram in 10-minute slots per event type, and later-visit counts per (month, weekday) cell. The
kde-sample stage reads them back (``read_calendar_tables``) to date visits so that they agree with the sampled
calendar tokens (``dating.py``); ``calendar_agreement`` counts the visits whose date disagrees with a token.

Privacy: cells and strata below ``min_count`` are dropped; the tables come from real training data and are outside
any DP guarantee, like the KDE grids (docs/temporal.md).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import storage
from ..data.schema import HOUR_BANDS, MONTHS, WEEKDAYS, calendar_parts
from ..errors import ConfigError, DataError
from .kde_config import DEFAULT_MIN_COUNT

CAL_KINDS = ("year", "month", "weekday", "hour")
SLOTS_PER_DAY = 144                       # 10-minute time-of-day slots; arbitrary, fine enough for hour bands
ANCHOR_FILE = "calendar_anchors.parquet"
TOD_FILE = "calendar_time_of_day.parquet"
WEEKDAY_FILE = "calendar_weekdays.parquet"
ALL = "*"                                 # time-of-day stratum of all event types


# ============================================================================================ synthetic tokens
def token_codes(visits: pd.DataFrame) -> dict[str, np.ndarray]:
    """The ``cal_<kind>`` columns as integers (year, month 1-12, weekday 0-6, hour band 0-3); -1 = absent."""
    maps = {"month": {m: i + 1 for i, m in enumerate(MONTHS)}, "weekday": {d: i for i, d in enumerate(WEEKDAYS)},
            "hour": {h: i for i, h in enumerate(HOUR_BANDS)}}
    out = {}
    for kind in CAL_KINDS:
        col = f"cal_{kind}"
        if col not in visits.columns:
            out[kind] = np.full(len(visits), -1, dtype=np.int64)
            continue
        s = visits[col].astype("string")
        if kind == "year":
            out[kind] = pd.to_numeric(s, errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
        else:
            out[kind] = s.map(maps[kind]).astype("Float64").fillna(-1).to_numpy(dtype=np.int64)
    return out


def calendar_agreement(visits: pd.DataFrame) -> dict[str, int]:
    """Visits whose ``start_day`` disagrees with their own ``cal_<kind>`` token, per kind (absent tokens skipped)."""
    if "start_day" not in visits.columns:
        raise DataError(f"calendar_agreement: visits has no start_day column; columns: {sorted(visits.columns)}. "
                        "Run reconstruct_calendar_times (or the kde-sample stage) first.")
    parts = calendar_parts(visits["start_day"].to_numpy(dtype=float))
    tok = token_codes(visits)
    known = ~np.isnan(visits["start_day"].to_numpy(dtype=float))
    out = {f"n_disagree_{k}": int(np.count_nonzero(known & (tok[k] >= 0) & (tok[k] != parts[k])))
           for k in CAL_KINDS if f"cal_{k}" in visits.columns}
    out["n_visits_with_tokens"] = int(np.count_nonzero(known & np.any([tok[k] >= 0 for k in CAL_KINDS], axis=0)))
    out["n_disagree_any"] = int(np.count_nonzero(known & np.any(
        [(tok[k] >= 0) & (tok[k] != parts[k]) for k in CAL_KINDS], axis=0)))
    return out


# ============================================================================================ real-data tables
def build_calendar_tables(patients: pd.DataFrame, visits: pd.DataFrame, min_count: int = DEFAULT_MIN_COUNT
                          ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Anchor cells and time-of-day histogram from real (training) tables.

    Returns ``(anchors, time_of_day, weekdays)``: ``anchors`` = first visits per (year, month, weekday) cell with columns
    ``year, month, weekday, count`` (cells below ``min_count`` dropped; when none is left, year-free cells
    with year = -1) and ``year_lo``/``year_hi`` (the real first-visit years); ``time_of_day`` = visits per 10-minute
    slot, per ``event_type`` and for all (``event_type == "*"``), strata below ``min_count`` visits dropped;
    ``weekdays`` = later visits (index > 0) per (month, weekday) cell, by ``event_type`` and for all, same guard:
    the source of a weekday for a later visit whose row holds no weekday token, and of the seasonal weight of a
    later visit's candidate days (``_month_weights``).
    """
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ConfigError(f"build_calendar_tables: min_count must be a positive int, got {min_count!r}.")
    missing = [c for c in ("patient_id", "visit_index", "start_day", "event_type") if c not in visits.columns]
    if missing:
        raise DataError(f"build_calendar_tables: real visits lack {missing}; columns: {sorted(visits.columns)}. "
                        "Pass the preprocess output (it writes start_day).")
    v = visits.loc[visits["patient_id"].isin(set(patients["patient_id"])) & visits["start_day"].notna()]
    if v.empty:
        raise DataError("build_calendar_tables: no real visit with a start_day among the given patients. "
                        "Pass the training split of the preprocess output.")
    first = v.sort_values(["patient_id", "visit_index"], kind="stable").drop_duplicates("patient_id")
    p = calendar_parts(first["start_day"].to_numpy(dtype=float))
    anchors = (pd.DataFrame({"year": p["year"], "month": p["month"], "weekday": p["weekday"]})
               .value_counts().rename("count").reset_index().sort_values(["year", "month", "weekday"]))
    anchors = anchors.loc[anchors["count"] >= min_count].reset_index(drop=True)
    if anchors.empty:
        # tiny data (e.g. the MIMIC-III demo): fall back to month x weekday and weekday cells, year-free
        anchors = _coarse_anchors(p, min_count)
    # the real first-visit years: a year-free cell's day is drawn uniformly in them
    anchors["year_lo"], anchors["year_hi"] = int(p["year"].min()), int(p["year"].max())
    x = v["start_day"].to_numpy(dtype=float)
    slot = np.clip(np.floor((x - np.floor(x)) * SLOTS_PER_DAY).astype(np.int64), 0, SLOTS_PER_DAY - 1)
    et = v["event_type"].astype("string").fillna("").to_numpy(dtype=object)
    tod = pd.concat([pd.DataFrame({"event_type": et, "slot": slot}),
                     pd.DataFrame({"event_type": ALL, "slot": slot})], ignore_index=True)
    tod = tod.value_counts().rename("count").reset_index()
    n_stratum = tod.groupby("event_type")["count"].transform("sum")
    tod = tod.loc[n_stratum >= min_count].sort_values(["event_type", "slot"]).reset_index(drop=True)
    later = v.loc[v["visit_index"] > 0]
    lp = calendar_parts(later["start_day"].to_numpy(dtype=float))
    let = later["event_type"].astype("string").fillna("").to_numpy(dtype=object)
    wdays = pd.concat([pd.DataFrame({"event_type": let, "month": lp["month"], "weekday": lp["weekday"]}),
                       pd.DataFrame({"event_type": ALL, "month": lp["month"], "weekday": lp["weekday"]})],
                      ignore_index=True)
    wdays = wdays.value_counts().rename("count").reset_index()
    wdays = wdays.loc[wdays.groupby("event_type")["count"].transform("sum") >= min_count]
    wdays = wdays.sort_values(["event_type", "month", "weekday"]).reset_index(drop=True)
    return anchors.astype({"year": np.int64, "month": np.int64, "weekday": np.int64, "count": np.int64,
                           "year_lo": np.int64, "year_hi": np.int64}), tod, wdays


def _coarse_anchors(p: dict, min_count: int) -> pd.DataFrame:
    """Year-free anchor cells (year = -1 means any): (month, weekday) cells, else weekday cells, else one cell."""
    for keys in (("month", "weekday"), ("weekday",), ()):
        df = pd.DataFrame({k: p[k] for k in keys}) if keys else pd.DataFrame(index=range(len(p["day"])))
        c = df.value_counts().rename("count").reset_index() if keys else pd.DataFrame({"count": [len(df)]})
        c = c.loc[c["count"] >= min_count]
        if len(c):
            for k in ("year", "month", "weekday"):
                if k not in c:
                    c[k] = -1
            return c[["year", "month", "weekday", "count"]].reset_index(drop=True)
    raise DataError(f"build_calendar_tables: fewer than min_count={min_count} real patients with a first visit; "
                    "lower min_count or use more data.")


def write_calendar_tables(anchors: pd.DataFrame, tod: pd.DataFrame, weekdays: pd.DataFrame, out_dir: str) -> None:
    """Write the two tables beside the KDE grids (the kde-grids stage's output dir)."""
    import pyarrow as pa

    for name, df in ((ANCHOR_FILE, anchors), (TOD_FILE, tod), (WEEKDAY_FILE, weekdays)):
        storage.write_parquet(storage.join(str(out_dir), name), pa.Table.from_pandas(df, preserve_index=False))


def read_calendar_tables(grids_dir: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None:
    """``(anchors, time_of_day, weekdays)`` from a grids dir, or None when the kde-grids stage did not write them."""
    paths = [storage.join(str(grids_dir), f) for f in (ANCHOR_FILE, TOD_FILE, WEEKDAY_FILE)]
    if not all(storage.exists(p) for p in paths):
        return None
    return tuple(storage.read_parquet(p).to_pandas() for p in paths)


"""Temporal realism: visit dates that agree with the sampled calendar tokens, and aggregate time-series metrics.

The model samples calendar tokens per visit (``cal_year``, ``cal_month``, ``cal_weekday``, ``cal_hour``; see
docs/canonical-tables.md) and a gap bin (``gap_days_binned``). The KDE stage fills a gap value inside the bin, but
a cumulative sum of gaps from a random anchor lands on arbitrary weekdays and months, so weekly cycles, seasonal
peaks and trends disappear (the published pipeline also drew day of week from a marginal table, independent of
the date). Here:

1. **First visit**: a calendar cell (year, month, weekday) is drawn from the real training data's first-visit
   counts restricted to the patient's sampled tokens; the day is uniform among the cell's days; time of day is
   drawn from the real time-of-day histogram (10-minute slots) of the visit's event type inside its hour band.
2. **Later visits**, one visit index at a time over all patients at once: time of day as above, then every
   integer day whose gap from the previous visit lies in the sampled gap bin (and not before the previous visit
   ends) is a candidate; candidates whose weekday, month and year equal the visit's tokens are kept and one is
   drawn with weight = the KDE gap density at its gap. Where none is left, constraints are relaxed in a fixed
   order (year, then month, then weekday, then the no-overlap rule), each relaxation counted.
3. ``start_day``, ``start_offset_days`` and the gap column are written consistently; ``calendar_agreement``
   recomputes the calendar from ``start_day`` and counts the visits whose date disagrees with a token.

Privacy: the anchor cells (first visits per year-month-weekday, cells below ``min_count`` dropped) and the
time-of-day histogram come from real training data and are outside any DP guarantee, like the KDE grids.

Metrics (``temporal_metrics``): monthly and weekly visit counts by event type (Pearson r, normalised MAE),
month-of-year profile (seasonal amplitude ratio, winter/summer ratio), weekday and hour-of-day profiles (max
absolute difference in percentage points), autocorrelation of daily counts at lags 7 and 365. Definitions:
docs/temporal.md. No torch or kfp import: this runs in the KDE and evaluate images.
"""
from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import storage
from ..data.schema import HOUR_BANDS, MONTHS, WEEKDAYS, calendar_parts, parse_bin, read_tables, write_tables
from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

CAL_KINDS = ("year", "month", "weekday", "hour")
SLOTS_PER_DAY = 144                       # 10-minute time-of-day slots; arbitrary, fine enough for hour bands
ANCHOR_FILE = "calendar_anchors.parquet"
TOD_FILE = "calendar_time_of_day.parquet"
WEEKDAY_FILE = "calendar_weekdays.parquet"
DEFAULT_MIN_COUNT = 10                    # privacy guard, as the KDE grids' (docs/kde.md)
MAX_CELLS_PER_CHUNK = 2_000_000           # rows x candidate days per vectorised block (memory bound)
TOD_RETRIES = 8                           # fresh times of day tried before a token is given up; arbitrary
# later-visit levels, first non-empty wins: drop_year keeps month + weekday, drop_month keeps year + weekday,
# drop_year_month keeps the weekday, drop_weekday keeps no token (the gap bin always holds)
RELAX_ORDER = ("exact", "drop_filled", "drop_year", "drop_month", "drop_year_month", "drop_weekday",
               "allow_overlap")
ALL = "*"                                 # time-of-day stratum of all event types
MONTH_DROPPED = ("drop_month", "drop_year_month", "drop_weekday", "allow_overlap")   # levels that give up the month
MONTH_TOKEN_DECAY = 0.25   # default weight factor per month from a given-up month token (KDE time.month_token_decay)


# ============================================================================================ calendar parts
def _day_parts(day: np.ndarray, keys: Sequence[str] = ("year", "month", "weekday", "month_index")
               ) -> dict[str, np.ndarray]:
    """``calendar_parts`` of integer days through a lookup table over their range (cheap for big candidate
    matrices, whose days span a few years at most); adds ``month_index`` (months since 1970-01)."""
    lo, hi = int(day.min()), int(day.max())
    table = calendar_parts(np.arange(lo, hi + 1, dtype=float))
    table["month_index"] = (table["year"] - 1970) * 12 + table["month"] - 1
    i = day - lo
    return {k: table[k][i] for k in keys}


def _month_start(month_index: np.ndarray) -> np.ndarray:
    """First day (days since 1970) of each month index (months since 1970-01), by a lookup table."""
    lo, hi = int(month_index.min()), int(month_index.max())
    table = np.arange(lo, hi + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)
    return table[month_index - lo]


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
                        "Run reconstruct_calendar_times first.")
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


# ============================================================================================ drawing helpers
def _draw(item_keys: np.ndarray, weights: np.ndarray, row_keys: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, an item index drawn with ``weights`` among the items whose key equals the row's key; -1 if none.

    ``item_keys`` need not be sorted. One ``searchsorted`` for the groups, one for the draws.
    """
    order = np.argsort(item_keys, kind="stable")
    k, w = item_keys[order], weights[order].astype(float)
    cum = np.concatenate([[0.0], np.cumsum(w)])
    lo, hi = np.searchsorted(k, row_keys, "left"), np.searchsorted(k, row_keys, "right")
    total = cum[hi] - cum[lo]
    ok = (hi > lo) & (total > 0)
    target = cum[lo] + u * total
    idx = np.clip(np.searchsorted(cum, target, "right") - 1, lo, np.maximum(hi - 1, lo))
    return np.where(ok, order[np.minimum(idx, len(order) - 1)] if len(order) else -1, -1)


def _calendar_days(first_year: int, last_year: int) -> dict[str, np.ndarray]:
    lo = np.datetime64(f"{first_year:04d}-01-01", "D").astype(np.int64)
    hi = np.datetime64(f"{last_year + 1:04d}-01-01", "D").astype(np.int64)
    return calendar_parts(np.arange(lo, hi, dtype=float))


def _cell_key(year, month, weekday) -> np.ndarray:
    return (np.asarray(year, dtype=np.int64) + 1) * 10_000 + (np.asarray(month) + 1) * 10 + np.asarray(weekday) + 1


class _TimeOfDay:
    """Fraction of a day per row: a 10-minute slot from the row's event-type histogram (else all event types)
    inside its hour band (-1 = any), uniform inside the slot; uniform inside the band where there is no mass."""

    def __init__(self, tod: pd.DataFrame, event_type: np.ndarray):
        strata = {s: i for i, s in enumerate(pd.unique(tod["event_type"]))}
        self.slot = tod["slot"].to_numpy(dtype=np.int64)
        self.w = tod["count"].to_numpy(dtype=float)
        s_item = tod["event_type"].map(strata).to_numpy(dtype=np.int64)
        self.n_b = len(HOUR_BANDS) + 1
        self.items_band = s_item * self.n_b + self.slot * 24 // SLOTS_PER_DAY // 6
        self.items_any = s_item * self.n_b + len(HOUR_BANDS)
        self.et = pd.Series(event_type, dtype="string").map(strata).astype("Float64").fillna(-1).to_numpy(np.int64)
        self.all_code = strata.get(ALL, -2)

    def draw(self, rows: np.ndarray, band: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(len(rows))
        res = np.full(len(rows), -1, dtype=np.int64)
        for code in (self.et[rows], np.full(len(rows), self.all_code)):
            todo = res < 0
            key = code * self.n_b + np.where(band >= 0, band, len(HOUR_BANDS))
            hb, nb = todo & (band >= 0), todo & (band < 0)
            res[hb] = _draw(self.items_band, self.w, key[hb], u[hb])
            res[nb] = _draw(self.items_any, self.w, key[nb], u[nb])
        frac = (np.where(res >= 0, self.slot[np.maximum(res, 0)], 0) + rng.random(len(rows))) / SLOTS_PER_DAY
        fb = res < 0
        frac[fb] = np.maximum(band[fb], 0) * 0.25 + rng.random(int(fb.sum())) * np.where(band[fb] >= 0, 0.25, 1.0)
        return np.minimum(frac, np.nextafter(1.0, 0.0))


def _anchor_days(anchors: pd.DataFrame, tok: dict[str, np.ndarray], span_years: tuple[int, int],
                 rng: np.random.Generator, nxt=None) -> tuple[np.ndarray, dict[str, int]]:
    """Integer first-visit day per row agreeing with its (year, month, weekday) tokens where possible.

    Order: (0) a real anchor cell matching every present token, weighted by its count, then a uniform day of
    the cell; (1) a uniform calendar day in the real years matching every present token; then the year (2),
    month (3) and weekday (4) tokens are dropped in turn, drawing from the anchor cells each time. Inside a
    (year, month) cell the day prefers those from which the second visit (``nxt``: its gap bin and tokens) can
    reach its own tokens.
    """
    n = len(tok["weekday"])
    cal = _calendar_days(*span_years)
    cal_day = cal["day"]
    ay, am, aw = (anchors[k].to_numpy(dtype=np.int64) for k in ("year", "month", "weekday"))
    aw_ = anchors["count"].to_numpy(dtype=float)
    ty, tm, tw = (np.where(tok[k] >= 0, tok[k], -1) for k in ("year", "month", "weekday"))
    have_y, have_m, have_w = bool((ay >= 0).all()), bool((am >= 0).all()), bool((aw >= 0).all())
    day = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    levels = {"anchor_exact": 0, "calendar_exact": 0, "drop_year": 0, "drop_month": 0, "drop_weekday": 0}
    # a cell key over the kinds a row constrains: -1 in both item and row for unconstrained kinds
    for name, use in (("anchor_exact", (True, True, True)), ("calendar_exact", (True, True, True)),
                      ("drop_year", (False, True, True)), ("drop_month", (False, False, True)),
                      ("drop_weekday", (False, False, False))):
        todo = np.flatnonzero(day == np.iinfo(np.int64).min)
        if not todo.size:
            break
        ry, rm, rw = (np.where(u_, t[todo], -1) for u_, t in zip(use, (ty, tm, tw)))
        # rows constrain a subset of kinds; group rows by which kinds they constrain
        pattern = (ry >= 0) * 4 + (rm >= 0) * 2 + (rw >= 0)
        for pat in np.unique(pattern):
            sel = todo[pattern == pat]
            my, mm, mw = bool(pat & 4), bool(pat & 2), bool(pat & 1)
            rk = _cell_key(np.where(my, ty[sel], -1), np.where(mm, tm[sel], -1), np.where(mw, tw[sel], -1))
            u = rng.random(sel.size)
            if name == "calendar_exact":
                ik = _cell_key(np.where(my, cal["year"], -1), np.where(mm, cal["month"], -1),
                               np.where(mw, cal["weekday"], -1))
                j = _draw(ik, np.ones(len(ik)), rk, u)
                got = j >= 0
                day[sel[got]] = cal_day[j[got]]
                levels[name] += int(got.sum())
                continue
            # anchor cells; a coarse (year-free) table has -1 in a whole column: that kind is left to the day draw
            uy, um, uw = my and have_y, mm and have_m, mw and have_w
            ik = _cell_key(ay if uy else np.full(len(ay), -1), am if um else np.full(len(am), -1),
                           aw if uw else np.full(len(aw), -1))
            rk = _cell_key(ty[sel] if uy else np.full(sel.size, -1), tm[sel] if um else np.full(sel.size, -1),
                           tw[sel] if uw else np.full(sel.size, -1))
            j = _draw(ik, aw_, rk, u)
            got = j >= 0
            if not got.any():
                continue
            # a uniform calendar day of the chosen cell, constrained by the cell and by the row's tokens
            cy = np.where(ay[j[got]] >= 0, ay[j[got]], np.where(my, ty[sel[got]], -1))
            cm = np.where(am[j[got]] >= 0, am[j[got]], np.where(mm, tm[sel[got]], -1))
            cw = np.where(aw[j[got]] >= 0, aw[j[got]], np.where(mw, tw[sel[got]], -1))
            d = _uniform_calendar_day(cal, cy, cm, cw, rng)
            ym = (cy >= 0) & (cm >= 1)
            if nxt is not None and ym.any():
                r = sel[got][ym]
                d[ym] = _day_in_month(cy[ym], cm[ym], cw[ym], (nxt[0][r], nxt[1][r],
                                                               {kk: t[r] for kk, t in nxt[2].items()}), rng)
            ok = d > np.iinfo(np.int64).min
            day[sel[got][ok]] = d[ok]
            levels[name] += int(ok.sum())
    left = day == np.iinfo(np.int64).min
    if left.any():                                   # nothing matched at all: any day in the real years
        day[left] = cal_day[rng.integers(0, len(cal_day), int(left.sum()))]
        levels["drop_weekday"] += int(left.sum())
    return day, levels


def _day_in_month(y: np.ndarray, m: np.ndarray, w: np.ndarray, nxt, rng) -> np.ndarray:
    """A day of month (y, m) on weekday w (-1 = any) per row, uniform among those from which the next visit can
    reach its tokens (``_next_feasible``), else uniform among all matching days."""
    m0 = ((y - 1970) * 12 + m - 1).astype("datetime64[M]")
    first = m0.astype("datetime64[D]").astype(np.int64)
    last = (m0 + 1).astype("datetime64[D]").astype(np.int64)
    D = first[:, None] + np.arange(31)[None, :]
    ok = (D < last[:, None]) & ((w[:, None] < 0) | ((D + 3) % 7 == w[:, None]))
    good = ok & _next_feasible(D, *nxt)
    ww = np.where(good.any(1)[:, None], good, ok).astype(float)
    u = rng.random(len(y)) * ww.sum(1)
    pick = np.minimum((np.cumsum(ww, 1) <= u[:, None]).sum(1), 30)
    return D[np.arange(len(y)), pick]


def _uniform_calendar_day(cal: dict, y: np.ndarray, m: np.ndarray, w: np.ndarray, rng) -> np.ndarray:
    """A uniform calendar day matching (year, month, weekday) per row, -1 = any; int64 min where none exists."""
    out = np.full(len(y), np.iinfo(np.int64).min, dtype=np.int64)
    pattern = (y >= 0) * 4 + (m >= 0) * 2 + (w >= 0)
    for pat in np.unique(pattern):
        sel = np.flatnonzero(pattern == pat)
        my, mm, mw = bool(pat & 4), bool(pat & 2), bool(pat & 1)
        ik = _cell_key(cal["year"] if my else np.full(len(cal["day"]), -1),
                       cal["month"] if mm else np.full(len(cal["day"]), -1),
                       cal["weekday"] if mw else np.full(len(cal["day"]), -1))
        rk = _cell_key(y[sel] if my else np.full(sel.size, -1), m[sel] if mm else np.full(sel.size, -1),
                       w[sel] if mw else np.full(sel.size, -1))
        j = _draw(ik, np.ones(len(ik)), rk, rng.random(sel.size))
        out[sel[j >= 0]] = cal["day"][j[j >= 0]]
    return out


def _weekday_count(x: np.ndarray, y: np.ndarray, wd: np.ndarray) -> np.ndarray:
    """How many days in [x, y] (integer days since 1970) fall on weekday ``wd`` (0 = Mon)."""
    c = (wd - 3) % 7                                                   # day d has weekday (d + 3) % 7
    return np.floor_divide(y - c, 7) - np.floor_divide(x - 1 - c, 7)


def _next_feasible(D: np.ndarray, nlo: np.ndarray, nhi: np.ndarray, ntok: dict[str, np.ndarray]) -> np.ndarray:
    """One-step lookahead: can the next visit, whose gap bin is [nlo, nhi) days, land on its own (year, month,
    weekday) tokens when this visit is on day ``D``? ``D`` is (rows, candidates); the rest are per row (a row
    with no next visit has nlo = NaN and is always feasible). Time of day is ignored (the window widens a day)."""
    none = np.isnan(nlo)
    if D.size == 0:
        return np.ones(D.shape, dtype=bool)
    a = D + np.floor(np.nan_to_num(nlo))[:, None].astype(np.int64)
    b = D + np.ceil(np.minimum(np.nan_to_num(nhi, nan=0.0), 1e5))[:, None].astype(np.int64)
    y, m, w = (ntok[k][:, None] for k in ("year", "month", "weekday"))
    ma, mb = _day_parts(a, ("month_index",))["month_index"], _day_parts(b, ("month_index",))["month_index"]
    # the first month index >= ma that matches (year, month); -1 = any
    t = np.where(y >= 0, (y - 1970) * 12 + np.maximum(m, 1) - 1, ma)
    t = np.where((y < 0) & (m >= 1), ma + ((m - 1 - ma) % 12), t)
    t = np.where((y >= 0) & (m < 1), np.maximum(ma, (y - 1970) * 12), t)
    t_hi = np.where((y >= 0) & (m < 1), (y - 1970) * 12 + 11, t)
    free = (m < 1) & (y < 0)
    span_lo = np.where(free, a, _month_start(np.where(free, ma, t)))
    span_hi = np.where(free, b, _month_start(np.where(free, ma, t_hi) + 1) - 1)
    x0, x1 = np.maximum(a, span_lo), np.minimum(b, span_hi)
    ok = (x1 >= x0) & (t <= mb)
    ok &= (w < 0) | (_weekday_count(x0, x1, np.maximum(w, 0)) > 0)
    return ok | none[:, None]


# ============================================================================================ gap density
def gap_density(grid, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(starts, ends, density) of the unstratified level of a KDE gap grid (``KDEGrid`` or its table); None if
    the grid has no cells for ``column``."""
    t = grid.table if hasattr(grid, "table") else grid
    t = t.loc[t["_level"] == 0] if "_level" in t.columns else t
    if f"{column}_start" in t.columns:
        s, e = t[f"{column}_start"].to_numpy(float), t[f"{column}_end"].to_numpy(float)
        p = t["range_probability"].to_numpy(float)
    elif column in t.columns:                        # points: cells of half the spacing either side
        x = np.sort(t[column].to_numpy(float))
        half = np.diff(x).min() / 2 if len(x) > 1 else 0.5
        s, e, p = x - half, x + half, t.set_index(column).loc[x, "probability"].to_numpy(float)
    else:
        return None
    order = np.argsort(s)
    s, e, p = s[order], e[order], p[order]
    return s, e, p / np.maximum(e - s, 1e-12)


def _density_at(g: np.ndarray, dens: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    if dens is None:
        return np.ones_like(g)
    s, e, d = dens
    i = np.clip(np.searchsorted(s, g, "right") - 1, 0, len(s) - 1)
    return np.where((g >= s[i]) & (g < e[i]), d[i], 0.0)


# ============================================================================================ reconstruction
def reconstruct_calendar_times(patients: pd.DataFrame, visits: pd.DataFrame, anchors: pd.DataFrame,
                               time_of_day: pd.DataFrame, gap_grid=None, tcfg: Mapping | None = None,
                               rng: np.random.Generator | int = 0, weekdays: pd.DataFrame | None = None
                               ) -> tuple[pd.DataFrame, dict]:
    """Anchor each synthetic patient and date every visit so that it agrees with its calendar tokens.

    Args:
        patients, visits: a synthetic cohort after the KDE stage (``start_offset_days`` and the gap column
            filled, ``cal_<kind>`` columns from the sampler where the model has calendar tokens).
        anchors, time_of_day: ``build_calendar_tables`` of the real training split (``read_calendar_tables``).
        gap_grid: the KDE grid of the gap variable (weights of the candidate days); None = uniform in the bin.
        tcfg: the KDE config's ``time`` section (``gap``, ``gap_unit``, ``los``, ``los_unit``, ``allow_overlap``,
            ``month_token_decay``: per month away from a given-up month token, a candidate day's weight factor);
            None = ``{gap: gap_days, gap_unit: days}``.
        rng: the stage's generator, or an int seed.
        weekdays: ``build_calendar_tables``' later-visit (month, weekday) counts; a later visit whose row has no
            weekday token (while the cohort has ``cal_weekday``) gets a *filled* weekday drawn from them by event
            type, honoured like a token but given up first (``drop_filled``) and never counted as a disagreement;
            and every later visit's candidate days are weighted by its event type's real month profile (so a
            month token given up for the gap bin still leaves the date seasonal).
    Returns:
        ``(visits, report)``: visits with ``start_day``, ``start_offset_days`` and the gap column rewritten
        (``age_at_visit`` and ``start_date`` too where present); the report counts first-visit anchor levels,
        later-visit relaxations (``RELAX_ORDER``) and the final token disagreements (``calendar_agreement``).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    tcfg = dict({"gap": "gap_days", "gap_unit": "days"} if tcfg is None else tcfg)
    from .kde import UNIT_DAYS

    need = ["patient_id", "visit_index", "event_type", "start_offset_days"]
    missing = [c for c in need if c not in visits.columns]
    if missing:
        raise DataError(f"reconstruct_calendar_times: synthetic visits lack {missing}; columns: "
                        f"{sorted(visits.columns)}. Run the KDE stage (sample_kde_to_dir) first.")
    if not {"year", "month", "weekday", "count", "year_lo", "year_hi"} <= set(anchors.columns):
        raise DataError(f"reconstruct_calendar_times: the anchor table has columns {sorted(anchors.columns)}; "
                        "expected year, month, weekday, count, year_lo, year_hi. Rebuild it with build_calendar_tables.")
    if anchors.empty or time_of_day.empty:
        raise DataError("reconstruct_calendar_times: the anchor or time-of-day table is empty. Rebuild them with "
                        "build_calendar_tables on the real training split (lower min_count for tiny data).")
    v = visits.sort_values(["patient_id", "visit_index"], kind="stable").reset_index(drop=True)
    pid = v["patient_id"].to_numpy()
    n = len(v)
    first = np.ones(n, dtype=bool)
    first[1:] = pid[1:] != pid[:-1]
    pos = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
    tok = token_codes(v)
    et = v["event_type"].astype("string").to_numpy(dtype=object)
    tods = _TimeOfDay(time_of_day, et)
    fill = _fill_weekdays(weekdays, et, tok["weekday"], pos, "cal_weekday" in v.columns, rng)
    season = _month_weights(weekdays, et)
    tod = tods.draw(np.arange(n), tok["hour"], rng)
    ty = tok["year"][tok["year"] >= 0]
    span = (int(min(anchors["year_lo"].min(), ty.min() if ty.size else 9999)),
            int(max(anchors["year_hi"].max(), ty.max() if ty.size else 0)))
    fi = np.flatnonzero(first)
    gap_col = tcfg.get("gap")
    offset = v["start_offset_days"].to_numpy(dtype=float)
    gs = UNIT_DAYS[tcfg.get("gap_unit", "days")] if gap_col else 1.0
    dens = gap_density(gap_grid, gap_col) if gap_col and gap_grid is not None else None
    if dens is not None:
        dens = (dens[0] * gs, dens[1] * gs, dens[2] / gs)
    nxt = None
    if gap_col:                                        # per visit: the next visit's gap bin and tokens (lookahead)
        lo, hi = _gap_bounds(v, gap_col, gs, dens)
        has_next = np.zeros(n, dtype=bool)
        has_next[:-1] = ~first[1:]
        nidx = np.minimum(np.arange(n) + 1, max(n - 1, 0))
        nxt = (np.where(has_next, lo[nidx], np.nan), np.where(has_next, hi[nidx], np.nan),
               {kk: np.where(has_next, t[nidx], -1) for kk, t in tok.items()})
    start = np.full(n, np.nan)
    d0, anchor_levels = _anchor_days(anchors, {k: tok[k][fi] for k in tok}, span, rng,
                                     None if nxt is None else (nxt[0][fi], nxt[1][fi],
                                                               {k: t[fi] for k, t in nxt[2].items()}))
    start[fi] = d0 + tod[fi]
    report: dict = {"anchor_levels": anchor_levels, "relaxed": dict.fromkeys(RELAX_ORDER, 0), "n_kept_kde_gap": 0,
                    "n_lookahead_unmet": 0, "n_filled_weekday": int(np.count_nonzero(fill >= 0))}
    has_tokens = any((tok[k] >= 0).any() for k in CAL_KINDS)
    report["mode"] = "calendar" if has_tokens and gap_col else "anchor_only"
    if gap_col and has_tokens:
        los = (v[tcfg["los"]].to_numpy(dtype=float) * UNIT_DAYS[tcfg.get("los_unit", "days")]
               if tcfg.get("los") and tcfg["los"] in v.columns else np.zeros(n))
        no_overlap = not tcfg.get("allow_overlap", False)
        kde_gap = np.diff(offset, prepend=np.nan)
        for k in range(1, int(pos.max()) + 1 if n else 1):
            rows = np.flatnonzero(pos == k)
            prev = start[rows - 1]
            prev_los = np.where(no_overlap, np.nan_to_num(los[rows - 1]), 0.0)
            start[rows], tod[rows] = _place_visits(
                prev, prev_los, lo[rows], hi[rows],
                lambda ix, r=rows: tods.draw(r[ix], tok["hour"][r[ix]], rng),
                {**{kk: tok[kk][rows] for kk in tok}, "fill_weekday": fill[rows],
                 **({"season": season[rows]} if season is not None else {})}, dens, kde_gap[rows], rng, report,
                (nxt[0][rows], nxt[1][rows], {kk: t[rows] for kk, t in nxt[2].items()}),
                float(tcfg.get("month_token_decay", MONTH_TOKEN_DECAY)))
        new_gap = np.diff(start, prepend=np.nan) / gs
        new_gap[first] = v[gap_col].to_numpy(dtype=float)[first] if gap_col in v.columns else np.nan
        v[gap_col] = new_gap
    else:              # no tokens, or offset mode (months since baseline): anchor only, keep the KDE offsets
        base = np.repeat(start[fi], np.diff(np.append(fi, n)))
        start = base + np.nan_to_num(offset)
    base = np.repeat(start[fi], np.diff(np.append(fi, n)))
    v["start_day"] = start
    v["start_offset_days"] = start - base
    if "age_at_visit" in v.columns and tcfg.get("anchor_age") and tcfg["anchor_age"] in patients.columns:
        age = patients.set_index("patient_id")[tcfg["anchor_age"]].reindex(pid).to_numpy(dtype=float)
        v["age_at_visit"] = age + v["start_offset_days"].to_numpy() / 365.25
    if "start_date" in v.columns:
        v["start_date"] = pd.Series(calendar_parts(start)["day"].astype("datetime64[D]")).dt.strftime(
            "%Y-%m-%d").astype("string")
    report["agreement"] = calendar_agreement(v)
    return v, report


def _fill_weekdays(weekdays: pd.DataFrame | None, et: np.ndarray, wd_tok: np.ndarray, pos: np.ndarray,
                   has_column: bool, rng: np.random.Generator) -> np.ndarray:
    """A weekday (0-6) for each later visit without a weekday token, drawn from the real later-visit weekday
    counts of its event type (else all types); -1 elsewhere or without the table / the cal_weekday column."""
    out = np.full(len(et), -1, dtype=np.int64)
    if weekdays is None or weekdays.empty or not has_column:
        return out
    need = np.flatnonzero((pos > 0) & (wd_tok < 0))
    strata = {s: i for i, s in enumerate(pd.unique(weekdays["event_type"]))}
    item = weekdays["event_type"].map(strata).to_numpy(dtype=np.int64)
    w = weekdays["count"].to_numpy(dtype=float)
    code = pd.Series(et[need], dtype="string").map(strata).astype("Float64").fillna(-1).to_numpy(np.int64)
    u = rng.random(need.size)
    j = _draw(item, w, code, u)
    miss = j < 0
    j[miss] = _draw(item, w, np.full(int(miss.sum()), strata.get(ALL, -2)), u[miss])
    ok = j >= 0
    out[need[ok]] = weekdays["weekday"].to_numpy(dtype=np.int64)[j[ok]]
    return out


def _month_weights(weekdays: pd.DataFrame | None, et: np.ndarray) -> np.ndarray | None:
    """``(n, 12)``: each visit's relative intensity of later visits per calendar month (its event type's real
    counts, else all types; mean 1). It weights the candidate days of a later visit, so a visit whose month token
    is given up (or absent) still lands in a month as often as real later visits do. None without the table."""
    if weekdays is None or weekdays.empty or "month" not in weekdays.columns:
        return None
    by = weekdays.groupby(["event_type", "month"])["count"].sum().unstack("month").reindex(columns=range(1, 13))
    by = by.fillna(0.0)
    by = by.div(by.mean(axis=1).replace(0, 1), axis=0)
    if ALL not in by.index:
        return None
    rows = pd.Series(et, dtype="string").map({k: i for i, k in enumerate(by.index)}).fillna(
        list(by.index).index(ALL)).to_numpy(dtype=np.int64)
    return by.to_numpy(dtype=float)[rows]


def _gap_bounds(v: pd.DataFrame, gap_col: str, gs: float, dens) -> tuple[np.ndarray, np.ndarray]:
    """Per visit, the gap bin [lo, hi) in days, cut to the KDE grid's support; [0, support max) where null."""
    n = len(v)
    s_lo, s_hi = (float(dens[0].min()), float(dens[1].max())) if dens is not None else (0.0, 3650.0)
    lo, hi = np.full(n, s_lo), np.full(n, s_hi)
    bcol = f"{gap_col}_binned"
    if bcol in v.columns:
        codes, uniq = pd.factorize(v[bcol].astype("string"), use_na_sentinel=True)
        if len(uniq):
            lohi = np.array([parse_bin(u) for u in uniq], dtype=float).reshape(-1, 2) * gs
            ok = codes >= 0
            lo[ok], hi[ok] = lohi[codes[ok], 0], lohi[codes[ok], 1]
            cut_lo, cut_hi = np.maximum(lo, s_lo), np.minimum(hi, s_hi)
            inside = cut_hi > cut_lo                  # only cut where the grid has support in the bin
            lo, hi = np.where(inside, cut_lo, lo), np.where(inside, cut_hi, hi)
    return lo, hi


def _place_visits(prev, prev_los, lo, hi, draw_tod, tok, dens, kde_gap, rng, report, nxt=None,
                  decay: float = MONTH_TOKEN_DECAY) -> tuple[np.ndarray, np.ndarray]:
    """Start of one visit per row given the previous start: an integer day in the gap bin + a time of day,
    matching the tokens where possible, weighted by the gap density. Returns (start, time of day).

    A short gap bin couples the day to the time of day (a 0-1 day gap at 22:00 lands on the next day), so rows
    with no exact candidate first get ``TOD_RETRIES`` fresh times of day in their hour band; only then are the
    constraints relaxed in ``RELAX_ORDER``, each relaxation counted.
    """
    n = len(prev)
    idx_all = np.arange(n)
    tod = draw_tod(idx_all)
    out = np.full(n, np.nan)
    todo = idx_all
    for attempt in range(TOD_RETRIES + 1):
        last = attempt == TOD_RETRIES
        if attempt:
            tod[todo] = draw_tod(todo)
        got = _choose_days(prev[todo], prev_los[todo], lo[todo], hi[todo], tod[todo],
                           {k: t[todo] for k, t in tok.items()}, dens, rng, report, strict=not last,
                           nxt=None if nxt is None else (nxt[0][todo], nxt[1][todo],
                                                         {k: t[todo] for k, t in nxt[2].items()}), decay=decay)
        ok = ~np.isnan(got)
        out[todo[ok]] = got[ok]
        todo = todo[~ok]
        if not todo.size:
            break
    keep = np.isnan(out)                                              # empty bin (narrower than a day): KDE gap
    out[keep] = prev[keep] + np.nan_to_num(kde_gap[keep], nan=0.0)
    tod[keep] = out[keep] - np.floor(out[keep])
    report["n_kept_kde_gap"] += int(keep.sum())
    return out, tod


def _choose_days(prev, prev_los, lo, hi, tod, tok, dens, rng, report, strict: bool, nxt=None,
                 decay: float = MONTH_TOKEN_DECAY) -> np.ndarray:
    """One vectorised pass over candidate days (chunks of rows x candidates); NaN where nothing was chosen
    (with ``strict`` only the exact level is tried)."""
    n = len(prev)
    out = np.full(n, np.nan)
    dmin = np.ceil(prev + lo - tod).astype(np.int64)                  # gap = D + tod - prev in [lo, hi)
    dmax = np.ceil(prev + hi - tod).astype(np.int64) - 1
    n_c = np.maximum(dmax - dmin + 1, 0)
    order = np.argsort(n_c, kind="stable")
    names = ("lookahead", "exact") if strict else ("lookahead",) + RELAX_ORDER
    nc_sorted = np.maximum(n_c[order], 1)
    i = 0
    while i < n:                       # rows sorted by width: the chunk's widest row bounds rows x candidates
        guess = min(n, i + max(1, MAX_CELLS_PER_CHUNK // int(nc_sorted[i])))
        j = min(guess, i + max(1, MAX_CELLS_PER_CHUNK // int(nc_sorted[guess - 1])))
        sel = order[i:j]
        i = j
        width = max(int(n_c[sel].max()), 1)
        D = dmin[sel, None] + np.arange(width)[None, :]                  # (rows, candidates)
        valid = np.arange(width)[None, :] < n_c[sel, None]
        g = D + tod[sel, None] - prev[sel, None]
        p = _day_parts(D, [k for k in ("year", "month", "weekday") if (tok[k][sel] >= 0).any()])
        match = {k: ((tok[k][sel, None] < 0) | (p[k] == tok[k][sel, None])) if k in p else True
                 for k in ("year", "month", "weekday")}
        fits = g >= prev_los[sel, None]
        w = _density_at(g.ravel(), dens).reshape(D.shape) * valid
        if "season" in tok:                                   # real later-visit intensity of the day's month
            w = w * np.take_along_axis(tok["season"][sel], _day_parts(D, ("month",))["month"] - 1, axis=1)
        exact = valid & fits & match["year"] & match["month"] & match["weekday"]
        feas = _next_feasible(D, nxt[0][sel], nxt[1][sel], {k: t[sel] for k, t in nxt[2].items()}) \
            if nxt is not None else np.ones_like(exact)
        fill = tok["fill_weekday"][sel, None] if "fill_weekday" in tok else np.full((len(sel), 1), -1)
        filled = (fill < 0) | (_day_parts(D, ("weekday",))["weekday"] == fill) if (fill >= 0).any() else True
        levels = [exact & filled & feas, exact & filled, exact, valid & fits & match["month"] & match["weekday"],
                  valid & fits & match["year"] & match["weekday"], valid & fits & match["weekday"], valid & fits,
                  valid]
        # where the month token is given up, months nearer to it keep more weight (``decay`` per month away)
        near = w
        if "month" in p and decay < 1:
            away = np.abs(p["month"] - tok["month"][sel, None]) % 12
            near = w * np.where(tok["month"][sel, None] >= 0, decay ** np.minimum(away, 12 - away), 1.0)
        chosen = np.full(len(sel), -1, dtype=np.int64)
        for name, ok in zip(names, levels):
            todo = np.flatnonzero(chosen < 0)
            if not todo.size:
                break
            ww = np.where(ok[todo], (near if name in MONTH_DROPPED else w)[todo], 0.0)
            zero = ww.sum(1) == 0
            ww[zero] = ok[todo][zero]                                 # tokens match but no density: uniform
            tot = ww.sum(1)
            has = tot > 0
            u = rng.random(todo.size) * tot
            pick = np.minimum((np.cumsum(ww, 1) <= u[:, None]).sum(1), width - 1)
            chosen[todo[has]] = pick[has]
            report["relaxed"]["exact" if name == "lookahead" else name] += int(has.sum())
            report["n_lookahead_unmet"] += int(has.sum()) if name == "exact" else 0
        got = chosen >= 0
        out[sel[got]] = D[np.flatnonzero(got), chosen[got]] + tod[sel[got]]
    return out


def calendar_times_from_grids(patients: pd.DataFrame, visits: pd.DataFrame, grids_dir: str, cfg: Mapping,
                              rng: np.random.Generator) -> tuple[pd.DataFrame, dict | None]:
    """``reconstruct_calendar_times`` with the calendar tables, time section and gap grid of a grids dir (the
    kde-sample stage's call); ``(visits, None)`` unchanged when the grids dir has no calendar tables."""
    from .kde import GRID_FILE, read_kde_grid

    tables = read_calendar_tables(grids_dir)
    if tables is None:
        return visits, None
    tcfg = cfg.get("time") or {}
    grid = None
    for name, vcfg in cfg["variable_config"].items():
        if tcfg.get("gap") and vcfg.get("column", name) == tcfg["gap"] and vcfg["method"] == "kde_range":
            grid = read_kde_grid(storage.join(grids_dir, GRID_FILE.format(name)))
    anchors, tod, weekdays = tables
    return reconstruct_calendar_times(patients, visits, anchors, tod, grid, tcfg, rng, weekdays=weekdays)


def reconstruct_calendar_times_to_dir(kde_dir: str, grids_dir: str, out_dir: str, seed: int,
                                      overwrite: bool = False) -> dict:
    """Stage wrapper: a kde-sample output dir + its grids dir (holding the calendar tables) -> tables dir.

    Reads ``kde_config.json`` for the time section and the gap variable's grid; writes the re-timed tables,
    ``vocab.json`` and ``meta.json`` (the KDE meta plus ``calendar``: this function's report).
    """
    from .kde import load_kde_config

    if read_calendar_tables(grids_dir) is None:
        raise DataError(f"{grids_dir}: no {ANCHOR_FILE} / {TOD_FILE}. Regenerate the grids with "
                        "write_calendar_tables(build_calendar_tables(train patients, train visits), grids_dir).")
    cfg = load_kde_config(storage.read_json(storage.join(grids_dir, "kde_config.json")))
    patients, visits, codes = read_tables(kde_dir)
    v, report = calendar_times_from_grids(patients, visits, grids_dir, cfg,
                                          np.random.default_rng(np.random.SeedSequence([seed, 7])))
    meta_path = storage.join(kde_dir, "meta.json")
    meta = storage.read_json(meta_path) if storage.exists(meta_path) else {}
    meta["calendar"] = report
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(tmp, patients, v, codes)
        vp = storage.join(kde_dir, "vocab.json")
        if storage.exists(vp):
            storage.write_json(storage.join(str(tmp), "vocab.json"), storage.read_json(vp))
        storage.write_json(storage.join(str(tmp), "meta.json"), meta)
    return meta


# ============================================================================================ metrics
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _acf(x: np.ndarray, lag: int) -> float:
    if len(x) <= 2 * lag or x.std() == 0:
        return float("nan")
    x = x - x.mean()
    return float(np.dot(x[:-lag], x[lag:]) / np.dot(x, x))


def _profile(values: np.ndarray, n: int, offset: int = 0) -> np.ndarray:
    c = np.bincount(values - offset, minlength=n)[:n].astype(float)
    return c / max(c.sum(), 1.0)


def _dated(visits: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in ("start_day", "event_type") if c not in visits.columns]
    if missing:
        raise DataError(f"temporal_metrics: {where} visits lack {missing}; columns: {sorted(visits.columns)}. "
                        "Real tables get start_day from preprocess, synthetic ones from reconstruct_calendar_times.")
    v = visits.loc[visits["start_day"].notna(), ["start_day", "event_type"]]
    if v.empty:
        raise DataError(f"temporal_metrics: every start_day of the {where} visits is null. Date the synthetic "
                        "cohort first (reconstruct_calendar_times or the KDE stage's anchor).")
    p = calendar_parts(v["start_day"].to_numpy(dtype=float))
    return pd.DataFrame({"event_type": v["event_type"].astype("string").fillna("").to_numpy(dtype=object),
                         "month_index": (p["year"] - 1970) * 12 + p["month"] - 1, "week": (p["day"] + 3) // 7,
                         "day": p["day"], "month": p["month"], "weekday": p["weekday"],
                         "hour": np.floor((v["start_day"].to_numpy(float) % 1.0) * 24).astype(np.int64),
                         "has_time": (v["start_day"].to_numpy(float) % 1.0) > 0})


def _series(r: pd.DataFrame, s: pd.DataFrame, col: str, k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = int(min(r[col].min(), s[col].min())), int(max(r[col].max(), s[col].max()))
    rc = np.bincount(r[col].to_numpy() - lo, minlength=hi - lo + 1).astype(float)
    sc = np.bincount(s[col].to_numpy() - lo, minlength=hi - lo + 1).astype(float) * k
    return np.arange(lo, hi + 1), rc, sc


def temporal_metrics(real_visits: pd.DataFrame, synth_visits: pd.DataFrame, winter: Sequence[int] = (12, 1, 2),
                     summer: Sequence[int] = (6, 7, 8), min_visits: int = 20) -> dict:
    """Aggregate time-series fidelity of a synthetic cohort's visit dates (``start_day``) against real visits.

    Synthetic counts are scaled by ``n_real / n_synthetic`` visits. Per event type and for all visits: monthly
    and weekly count series over the union of both date ranges (Pearson r, normalised MAE = sum |real - synth| /
    sum real). For all visits: month-of-year profile (seasonal amplitude = (max - min) / mean, synth / real ratio;
    winter / summer visit ratio with ``winter``/``summer`` months, e.g. (6, 7, 8)/(12, 1, 2) in the southern
    hemisphere), weekday and hour-of-day profiles (max absolute difference in percentage points; hour only when
    both cohorts carry times of day) and the autocorrelation of daily counts at lags 7 and 365 (when the real span
    is over twice the lag). Event types with fewer than ``min_visits`` visits in either cohort are skipped.

    Returns ``{"metrics": {name: float}, "series": {...}}``; ``series`` feeds ``temporal_figure``.
    """
    r, s = _dated(real_visits, "real"), _dated(synth_visits, "synthetic")
    k = len(r) / len(s)
    m: dict[str, float] = {}
    series: dict = {"monthly": {}, "k": k}
    types = ["all"] + sorted(set(r["event_type"]) & set(s["event_type"]))
    for et in types:
        re_, se_ = (r, s) if et == "all" else (r[r["event_type"] == et], s[s["event_type"] == et])
        if len(re_) < min_visits or len(se_) < min_visits:
            continue
        for name, col in (("monthly", "month_index"), ("weekly", "week")):
            x, rc, sc = _series(re_, se_, col, k)
            m[f"temporal.{name}.{et}.r"] = _pearson(rc, sc)
            m[f"temporal.{name}.{et}.nmae"] = float(np.abs(rc - sc).sum() / max(rc.sum(), 1.0))
            if name == "monthly":
                series["monthly"][et] = (x, rc, sc)
        m[f"temporal.weekday.{et}.max_abs_diff_pp"] = float(100 * np.abs(
            _profile(re_["weekday"].to_numpy(), 7) - _profile(se_["weekday"].to_numpy(), 7)).max())
    pr, ps = _profile(r["month"].to_numpy(), 12, 1), _profile(s["month"].to_numpy(), 12, 1)
    amp = lambda p: (p.max() - p.min()) / p.mean()
    m["temporal.season.amplitude_real"], m["temporal.season.amplitude_synth"] = float(amp(pr)), float(amp(ps))
    m["temporal.season.amplitude_ratio"] = float(amp(ps) / amp(pr)) if amp(pr) > 0 else float("nan")
    wi, su = np.asarray(winter) - 1, np.asarray(summer) - 1
    ws_r, ws_s = pr[wi].sum() / max(pr[su].sum(), 1e-12), ps[wi].sum() / max(ps[su].sum(), 1e-12)
    m["temporal.season.winter_summer_real"], m["temporal.season.winter_summer_synth"] = float(ws_r), float(ws_s)
    m["temporal.season.winter_summer_rel_err"] = float(abs(ws_s / ws_r - 1.0))
    m["temporal.month_of_year.max_abs_diff_pp"] = float(100 * np.abs(pr - ps).max())
    m["temporal.month_of_year.r"] = _pearson(pr, ps)
    wr, wsy = _profile(r["weekday"].to_numpy(), 7), _profile(s["weekday"].to_numpy(), 7)
    m["temporal.weekday.max_abs_diff_pp"] = float(100 * np.abs(wr - wsy).max())
    series.update(month_of_year=(pr, ps), weekday=(wr, wsy))
    if r["has_time"].mean() > 0.5 and s["has_time"].mean() > 0.5:
        hr, hs = _profile(r["hour"].to_numpy(), 24), _profile(s["hour"].to_numpy(), 24)
        m["temporal.hour.max_abs_diff_pp"] = float(100 * np.abs(hr - hs).max())
        series["hour"] = (hr, hs)
    _, dr, ds = _series(r, s, "day", k)
    span = int(r["day"].max() - r["day"].min()) + 1
    for lag in (7, 365):
        if span > 2 * lag:
            m[f"temporal.acf{lag}.real"], m[f"temporal.acf{lag}.synth"] = _acf(dr, lag), _acf(ds, lag)
            m[f"temporal.acf{lag}.abs_diff"] = abs(m[f"temporal.acf{lag}.real"] - m[f"temporal.acf{lag}.synth"])
    return {"metrics": m, "series": series}


def temporal_figure(res: dict, title: str = "") -> str:
    """The series of ``temporal_metrics`` as one ``<img>`` (matplotlib Agg, base64 PNG) for the HTML report."""
    from matplotlib.figure import Figure

    sr = res["series"]
    monthly = sr["monthly"]
    n_rows = len(monthly) + 1
    fig = Figure(figsize=(12, 2.6 * n_rows))
    axes = fig.subplots(n_rows, 3, squeeze=False)
    for ax_row, (et, (x, rc, sc)) in zip(axes[:-1], monthly.items()):
        ax = fig.add_subplot(n_rows, 1, list(monthly).index(et) + 1)
        for a in ax_row:
            a.set_visible(False)
        dates = (x // 12 + 1970) + (x % 12) / 12.0
        ax.plot(dates, rc, label="real", color="#1f77b4")
        ax.plot(dates, sc, label=f"synthetic x {sr['k']:.2f}", color="#ff7f0e")
        ax.set_title(f"{title} visits per month: {et}".strip(), fontsize=10)
        ax.legend(fontsize=8)
    last = axes[-1]
    for ax, key, labels in ((last[0], "weekday", WEEKDAYS), (last[1], "month_of_year", [f"{i}" for i in range(1, 13)]),
                            (last[2], "hour", [str(i) for i in range(24)])):
        if key not in sr:
            ax.set_visible(False)
            continue
        pr, ps = sr[key]
        xx = np.arange(len(pr))
        ax.bar(xx - 0.2, 100 * pr, 0.4, label="real", color="#1f77b4")
        ax.bar(xx + 0.2, 100 * ps, 0.4, label="synthetic", color="#ff7f0e")
        ax.set_xticks(xx, labels, fontsize=7)
        ax.set_title(f"{key} (% of visits)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return f'<img alt="temporal" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def temporal_section(real_visits: pd.DataFrame, synth_visits: pd.DataFrame, winter: Sequence[int] = (12, 1, 2),
                     summer: Sequence[int] = (6, 7, 8)) -> dict:
    """``temporal_metrics`` for the evaluate stage: ``{"metrics", "notes", "series"}``, with a note instead of an
    error when either cohort has no dated visits (e.g. a cohort before time reconstruction)."""
    for who, v in (("real", real_visits), ("synthetic", synth_visits)):
        if "start_day" not in v.columns or not v["start_day"].notna().any():
            return {"metrics": {}, "series": None,
                    "notes": [(f"temporal: not compared: the {who} visits have no start_day (dates are written "
                               "by preprocess for real data and by reconstruct_calendar_times for synthetic data).")]}
    res = temporal_metrics(real_visits, synth_visits, winter=winter, summer=summer)
    return {"metrics": res["metrics"], "series": res["series"], "notes": [], "result": res}

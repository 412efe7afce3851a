"""Calendar-consistent dating: visit dates that agree with the sampled calendar tokens (docs/temporal.md).

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

The real tables come from ``calendar_tables.py``; the metrics that compare dated cohorts with the real data are in
``synthehr_core/evaluation/temporal.py``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.schema import HOUR_BANDS, calendar_parts, parse_bin
from ..errors import DataError
from .calendar_tables import ALL, CAL_KINDS, SLOTS_PER_DAY, calendar_agreement, token_codes
from .kde_config import MONTH_TOKEN_DECAY, UNIT_DAYS, TimeSpec, validate_time

MAX_CELLS_PER_CHUNK = 2_000_000           # rows x candidate days per vectorised block (memory bound)
TOD_RETRIES = 8                           # fresh times of day tried before a token is given up; arbitrary
# later-visit levels, first non-empty wins: drop_year keeps month + weekday, drop_month keeps year + weekday,
# drop_year_month keeps the weekday, drop_weekday keeps no token (the gap bin always holds)
RELAX_ORDER = ("exact", "drop_filled", "drop_year", "drop_month", "drop_year_month", "drop_weekday",
               "allow_overlap")
MONTH_DROPPED = ("drop_month", "drop_year_month", "drop_weekday", "allow_overlap")   # levels that give up the month
# first-visit levels, first that matches wins: which of the (year, month, weekday) tokens a level honours
ANCHOR_LEVELS = (("anchor_exact", (True, True, True)), ("calendar_exact", (True, True, True)),
                 ("drop_year", (False, True, True)), ("drop_month", (False, False, True)),
                 ("drop_weekday", (False, False, False)))
NO_DAY = np.iinfo(np.int64).min           # "no day chosen yet"


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


@dataclass
class _AnchorCells:
    """The anchor table as arrays; a coarse (year-free) table has -1 in a whole column."""
    year: np.ndarray
    month: np.ndarray
    weekday: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, anchors: pd.DataFrame) -> _AnchorCells:
        return cls(*(anchors[k].to_numpy(dtype=np.int64) for k in ("year", "month", "weekday")),
                   anchors["count"].to_numpy(dtype=float))

    def has(self, kind: str) -> bool:
        return bool((getattr(self, kind) >= 0).all())


def _calendar_day_matching(cal: dict, tok: tuple, sel: np.ndarray, use: tuple, u: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, days)``: a uniform day of the real years matching the ``use``d tokens of rows ``sel``."""
    rk = _cell_key(*(np.where(used, t[sel], -1) for used, t in zip(use, tok)))
    ik = _cell_key(*(np.where(used, cal[k], -1) for used, k in zip(use, ("year", "month", "weekday"))))
    j = _draw(ik, np.ones(len(ik)), rk, u)
    got = j >= 0
    return sel[got], cal["day"][j[got]]


def _anchor_cell_day(cells: _AnchorCells, cal: dict, tok: tuple, sel: np.ndarray, use: tuple, u: np.ndarray,
                     rng: np.random.Generator, nxt) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, days)``: a real anchor cell matching the ``use``d tokens (by count), then a uniform day of the cell
    and the row's tokens; inside a (year, month) cell the day prefers those from which the next visit can reach
    its own tokens. A kind a coarse table lacks is left to the day draw."""
    kinds = ("year", "month", "weekday")
    item = [(getattr(cells, k) if used and cells.has(k) else np.full(len(cells.count), -1)) for used, k in zip(use, kinds)]
    rows = [(t[sel] if used and cells.has(k) else np.full(sel.size, -1)) for used, t, k in zip(use, tok, kinds)]
    j = _draw(_cell_key(*item), cells.count, _cell_key(*rows), u)
    got = j >= 0
    if not got.any():
        return sel[got], np.empty(0, dtype=np.int64)
    cy, cm, cw = (np.where(getattr(cells, k)[j[got]] >= 0, getattr(cells, k)[j[got]], np.where(used, t[sel[got]], -1))
                  for used, t, k in zip(use, tok, kinds))
    d = _uniform_calendar_day(cal, cy, cm, cw, rng)
    ym = (cy >= 0) & (cm >= 1)
    if nxt is not None and ym.any():
        r = sel[got][ym]
        d[ym] = _day_in_month(cy[ym], cm[ym], cw[ym], (nxt[0][r], nxt[1][r],
                                                       {kk: t[r] for kk, t in nxt[2].items()}), rng)
    ok = d > NO_DAY
    return sel[got][ok], d[ok]


def _anchor_days(anchors: pd.DataFrame, tok: dict[str, np.ndarray], span_years: tuple[int, int],
                 rng: np.random.Generator, nxt=None) -> tuple[np.ndarray, dict[str, int]]:
    """Integer first-visit day per row agreeing with its (year, month, weekday) tokens where possible.

    Order (``ANCHOR_LEVELS``): (0) a real anchor cell matching every present token, weighted by its count, then a
    uniform day of the cell; (1) a uniform calendar day in the real years matching every present token; then the
    year (2), month (3) and weekday (4) tokens are dropped in turn, drawing from the anchor cells each time. Inside a
    (year, month) cell the day prefers those from which the second visit (``nxt``: its gap bin and tokens) can
    reach its own tokens.
    """
    cal = _calendar_days(*span_years)
    cells = _AnchorCells.of(anchors)
    t = tuple(np.where(tok[k] >= 0, tok[k], -1) for k in ("year", "month", "weekday"))
    day = np.full(len(tok["weekday"]), NO_DAY, dtype=np.int64)
    levels = {name: 0 for name, _ in ANCHOR_LEVELS}
    for name, use in ANCHOR_LEVELS:
        todo = np.flatnonzero(day == NO_DAY)
        if not todo.size:
            break
        # rows constrain a subset of kinds; group rows by which kinds they constrain
        ry, rm, rw = (np.where(u_, tt[todo], -1) for u_, tt in zip(use, t))
        pattern = (ry >= 0) * 4 + (rm >= 0) * 2 + (rw >= 0)
        for pat in np.unique(pattern):
            sel = todo[pattern == pat]
            kinds = (bool(pat & 4), bool(pat & 2), bool(pat & 1))
            u = rng.random(sel.size)
            rows, days = _calendar_day_matching(cal, t, sel, kinds, u) if name == "calendar_exact" else \
                _anchor_cell_day(cells, cal, t, sel, kinds, u, rng, nxt)
            day[rows] = days
            levels[name] += int(rows.size)
    left = day == NO_DAY
    if left.any():                                   # nothing matched at all: any day in the real years
        day[left] = cal["day"][rng.integers(0, len(cal["day"]), int(left.sum()))]
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
    out = np.full(len(y), NO_DAY, dtype=np.int64)
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
@dataclass
class _Visits:
    """Synthetic visits sorted by patient and visit index, with the per-visit arrays the dating reads."""
    v: pd.DataFrame
    first: np.ndarray                 # the first visit of its patient
    pos: np.ndarray                   # position of the visit within its patient (0 = first)
    tok: dict[str, np.ndarray]        # token_codes
    et: np.ndarray                    # event type

    @classmethod
    def sort(cls, visits: pd.DataFrame) -> _Visits:
        v = visits.sort_values(["patient_id", "visit_index"], kind="stable").reset_index(drop=True)
        pid, n = v["patient_id"].to_numpy(), len(v)
        first = np.ones(n, dtype=bool)
        first[1:] = pid[1:] != pid[:-1]
        pos = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
        return cls(v, first, pos, token_codes(v), v["event_type"].astype("string").to_numpy(dtype=object))

    @property
    def fi(self) -> np.ndarray:
        return np.flatnonzero(self.first)

    def base(self, start: np.ndarray) -> np.ndarray:
        """Each visit's patient's first start."""
        return np.repeat(start[self.fi], np.diff(np.append(self.fi, len(self.v))))


def _take(nxt, rows: np.ndarray):
    """The lookahead ``(next lo, next hi, next tokens)`` at ``rows``; None stays None."""
    return None if nxt is None else (nxt[0][rows], nxt[1][rows], {k: t[rows] for k, t in nxt[2].items()})


def _check_inputs(visits: pd.DataFrame, anchors: pd.DataFrame, time_of_day: pd.DataFrame) -> None:
    missing = [c for c in ("patient_id", "visit_index", "event_type", "start_offset_days") if c not in visits.columns]
    if missing:
        raise DataError(f"reconstruct_calendar_times: synthetic visits lack {missing}; columns: "
                        f"{sorted(visits.columns)}. Run the KDE stage (sample_kde_to_dir) first.")
    if not {"year", "month", "weekday", "count", "year_lo", "year_hi"} <= set(anchors.columns):
        raise DataError(f"reconstruct_calendar_times: the anchor table has columns {sorted(anchors.columns)}; "
                        "expected year, month, weekday, count, year_lo, year_hi. Rebuild it with build_calendar_tables.")
    if anchors.empty or time_of_day.empty:
        raise DataError("reconstruct_calendar_times: the anchor or time-of-day table is empty. Rebuild them with "
                        "build_calendar_tables on the real training split (lower min_count for tiny data).")


def _year_span(anchors: pd.DataFrame, year_tok: np.ndarray) -> tuple[int, int]:
    """The calendar years a day may fall in: the real first-visit years and every sampled year token."""
    ty = year_tok[year_tok >= 0]
    return (int(min(anchors["year_lo"].min(), ty.min() if ty.size else 9999)),
            int(max(anchors["year_hi"].max(), ty.max() if ty.size else 0)))


def _lookahead(c: _Visits, gap_col: str, gs: float, dens) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Per visit: its gap bin ``[lo, hi)`` in days, and the next visit's gap bin and tokens (NaN / -1 at a
    patient's last visit)."""
    n = len(c.v)
    lo, hi = _gap_bounds(c.v, gap_col, gs, dens)
    has_next = np.zeros(n, dtype=bool)
    has_next[:-1] = ~c.first[1:]
    nidx = np.minimum(np.arange(n) + 1, max(n - 1, 0))
    nxt = (np.where(has_next, lo[nidx], np.nan), np.where(has_next, hi[nidx], np.nan),
           {kk: np.where(has_next, t[nidx], -1) for kk, t in c.tok.items()})
    return lo, hi, nxt


def _date_later_visits(c: _Visits, start: np.ndarray, tod: np.ndarray, tcfg: TimeSpec, bounds: tuple,
                       tods: _TimeOfDay, fill: np.ndarray, season: np.ndarray | None, dens,
                       rng: np.random.Generator, report: dict) -> None:
    """Later visits, one visit index at a time over all patients (``_place_visits``); fills ``start`` and ``tod``."""
    lo, hi, nxt = bounds
    n, tok = len(c.v), c.tok
    los = (c.v[tcfg.los].to_numpy(dtype=float) * UNIT_DAYS[tcfg.los_unit]
           if tcfg.los and tcfg.los in c.v.columns else np.zeros(n))
    no_overlap = not tcfg.allow_overlap
    kde_gap = np.diff(c.v["start_offset_days"].to_numpy(dtype=float), prepend=np.nan)
    for k in range(1, int(c.pos.max()) + 1 if n else 1):
        rows = np.flatnonzero(c.pos == k)
        prev = start[rows - 1]
        prev_los = np.where(no_overlap, np.nan_to_num(los[rows - 1]), 0.0)
        start[rows], tod[rows] = _place_visits(
            prev, prev_los, lo[rows], hi[rows],
            lambda ix, r=rows: tods.draw(r[ix], tok["hour"][r[ix]], rng),
            {**{kk: tok[kk][rows] for kk in tok}, "fill_weekday": fill[rows],
             **({"season": season[rows]} if season is not None else {})}, dens, kde_gap[rows], rng, report,
            _take(nxt, rows), float(tcfg.month_token_decay))


def _write_dates(c: _Visits, start: np.ndarray, patients: pd.DataFrame, tcfg: TimeSpec) -> None:
    v = c.v
    v["start_day"] = start
    v["start_offset_days"] = start - c.base(start)
    if "age_at_visit" in v.columns and tcfg.anchor_age and tcfg.anchor_age in patients.columns:
        age = patients.set_index("patient_id")[tcfg.anchor_age].reindex(v["patient_id"].to_numpy())
        v["age_at_visit"] = age.to_numpy(dtype=float) + v["start_offset_days"].to_numpy() / 365.25
    if "start_date" in v.columns:
        v["start_date"] = pd.Series(calendar_parts(start)["day"].astype("datetime64[D]")).dt.strftime(
            "%Y-%m-%d").astype("string")


def reconstruct_calendar_times(patients: pd.DataFrame, visits: pd.DataFrame, anchors: pd.DataFrame,
                               time_of_day: pd.DataFrame, gap_grid=None, tcfg: TimeSpec | Mapping | None = None,
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
            None = ``{gap: gap_days, gap_unit: days}``; without ``gap`` only the first visits are anchored.
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
    tcfg = TimeSpec(gap="gap_days") if tcfg is None else validate_time(tcfg)
    _check_inputs(visits, anchors, time_of_day)
    c = _Visits.sort(visits)
    n, fi, tok, gap_col = len(c.v), c.fi, c.tok, tcfg.gap
    tods = _TimeOfDay(time_of_day, c.et)
    fill = _fill_weekdays(weekdays, c.et, tok["weekday"], c.pos, "cal_weekday" in c.v.columns, rng)
    season = _month_weights(weekdays, c.et)
    tod = tods.draw(np.arange(n), tok["hour"], rng)
    gs = UNIT_DAYS[tcfg.gap_unit] if gap_col else 1.0
    dens = gap_density(gap_grid, gap_col) if gap_col and gap_grid is not None else None
    dens = None if dens is None else (dens[0] * gs, dens[1] * gs, dens[2] / gs)
    lo, hi, nxt = _lookahead(c, gap_col, gs, dens) if gap_col else (None, None, None)
    start = np.full(n, np.nan)
    d0, anchor_levels = _anchor_days(anchors, {k: t[fi] for k, t in tok.items()}, _year_span(anchors, tok["year"]),
                                     rng, _take(nxt, fi))
    start[fi] = d0 + tod[fi]
    report: dict = {"anchor_levels": anchor_levels, "relaxed": dict.fromkeys(RELAX_ORDER, 0), "n_kept_kde_gap": 0,
                    "n_lookahead_unmet": 0, "n_filled_weekday": int(np.count_nonzero(fill >= 0))}
    has_tokens = any((tok[k] >= 0).any() for k in CAL_KINDS)
    report["mode"] = "calendar" if has_tokens and gap_col else "anchor_only"
    if gap_col and has_tokens:
        _date_later_visits(c, start, tod, tcfg, (lo, hi, nxt), tods, fill, season, dens, rng, report)
        new_gap = np.diff(start, prepend=np.nan) / gs
        new_gap[c.first] = c.v[gap_col].to_numpy(dtype=float)[c.first] if gap_col in c.v.columns else np.nan
        c.v[gap_col] = new_gap
    else:              # no tokens, or offset mode (months since baseline): anchor only, keep the KDE offsets
        start = c.base(start) + np.nan_to_num(c.v["start_offset_days"].to_numpy(dtype=float))
    _write_dates(c, start, patients, tcfg)
    report["agreement"] = calendar_agreement(c.v)
    return c.v, report


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


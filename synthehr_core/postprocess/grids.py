"""KDE grids: per variable and stratum, a Gaussian kernel density of the real *training* data integrated over cells.

A grid is a long table of cells (``<var>_start``/``<var>_end`` and ``range_probability``) or of discrete points
(``<var>`` and ``probability``), one block per stratum and back-off level (``_level`` = stratification columns
used), written as ``grid_<name>_kde.parquet`` with the spec in the schema metadata. The cells come from the
variable's grid method (``axes.py``); the mass of a cell is the exact Gaussian-kernel integral over it.

Privacy. The grids are computed from real patient data and are **outside any differential-privacy guarantee**
(DP-SGD, if used, covers the model only). Two guards limit what a grid reveals: strata with fewer than
``min_count`` real rows (default 10) are not fitted on their own, and every bandwidth is at least
``bandwidth_floor`` times the median width of the grid cells that hold the real values, so no cell can hold a
single real value's mass alone. ``value_counts`` grids are exact frequencies of categorical values and rely on
``min_count`` only. See docs/kde.md.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import ndtr

from .. import storage
from ..errors import DataError
from .axes import Axis
from .kde_config import DEFAULT_BANDWIDTH_FLOOR, GRID_FILE, KDEConfig, Variable, load_kde_config

KERNEL_REACH = 8.0              # Gaussian mass beyond 8 bandwidths is < 1e-15
META_KEY = b"synthehr_kde"


# ============================================================================================ helpers
def as_key(s: pd.Series) -> pd.Series:
    """Stratum values as strings, so '1', 1 and 1.0 all match; null stays null."""
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(dtype=float, na_value=np.nan)
        uniq, inv = np.unique(v, return_inverse=True)          # NaNs sort last and stay NaN
        names = np.array([None if np.isnan(x) else (str(int(x)) if x.is_integer() else repr(float(x))) for x in uniq],
                         dtype=object)
        return pd.Series(names[inv.ravel()] if len(v) else [], index=s.index, dtype="string")
    return s.astype("string")


def with_patient_columns(table: pd.DataFrame, patients: pd.DataFrame | None, cols: list[str]) -> pd.DataFrame:
    """Add patient-level columns (e.g. gender) to visits so visit variables can be stratified / filtered by them."""
    need = [c for c in cols if c not in table.columns]
    if not need or patients is None:
        return table
    have = [c for c in need if c in patients.columns]
    if not have:
        return table
    lookup = patients.set_index("patient_id")[have]
    joined = lookup.reindex(table["patient_id"].to_numpy())
    out = table.copy()
    for c in have:
        out[c] = joined[c].to_numpy()
    return out


def filter_mask(df: pd.DataFrame, flt: dict, skip: set[str] = frozenset()) -> np.ndarray:
    mask = np.ones(len(df), dtype=bool)
    for col, cond in flt.items():
        if col in skip or col not in df.columns:
            continue
        s = df[col]
        if "notnull" in cond:
            mask &= s.notna().to_numpy()
        elif "equals" in cond:
            mask &= (as_key(s) == as_key(pd.Series([cond["equals"]]))[0]).fillna(False).to_numpy(dtype=bool)
        else:
            allowed = set(as_key(pd.Series(cond["in"])).dropna())
            mask &= as_key(s).isin(allowed).fillna(False).to_numpy(dtype=bool)
    return mask




# ============================================================================================ cell masses
def _mass_edges(axis: Axis, step_hint: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Integration limits per cell; a point integrates over half the distance to its neighbours."""
    if axis.kind == "ranges":
        return axis.start, axis.end
    p = axis.start
    if len(p) == 1:
        half = np.array([0.5])
    else:
        d = np.diff(p)
        half = np.concatenate([[d[0]], np.minimum(d[:-1], d[1:]), [d[-1]]]) / 2
    return p - half, p + half


def _median_width(axis: Axis, x: np.ndarray) -> float:
    """Median width of the cells holding the real values ``x`` (cells without data do not count)."""
    lo, hi = _mass_edges(axis)
    if not len(lo):
        return 1.0
    order = np.argsort(lo, kind="stable")
    i = np.clip(np.searchsorted(lo[order], x, side="right") - 1, 0, len(lo) - 1)
    return float(np.median((hi - lo)[order][i])) if len(x) else float(np.median(hi - lo))


def silverman(x: np.ndarray) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    sd = float(np.std(x, ddof=1))
    iqr = float(np.subtract(*np.percentile(x, [75, 25]))) / 1.34
    s = min(sd, iqr) if iqr > 0 else sd
    return 0.9 * s * n ** (-0.2)


def _kde_cdf_1d(x: np.ndarray, h: float, at: np.ndarray) -> np.ndarray:
    """Unnormalised Gaussian-KDE CDF sum_i Phi((t - x_i)/h) at points ``at``.

    The data are pre-binned on a grid of width h/16 (shift <= h/32 per point), so the cost is O(n + len(at) * 260)
    instead of O(n * len(at)).
    """
    lo, hi = float(at.min()) - KERNEL_REACH * h, float(at.max()) + KERNEL_REACH * h
    below = float(np.count_nonzero(x < lo))
    xi = x[(x >= lo) & (x <= hi)]
    delta = max(h / 16.0, (hi - lo) / 4_000_000)
    k = math.ceil((hi - lo) / delta) + 1
    cnt = np.bincount(((xi - lo) / delta).astype(np.int64), minlength=k).astype(float)[:k]
    cum = np.concatenate([[0.0], np.cumsum(cnt)])
    reach = math.ceil(KERNEL_REACH * h / delta) + 1
    offsets = np.arange(-reach, reach + 1)[None, :]
    out = np.empty(len(at))
    for c0 in range(0, len(at), 4096):                                        # bounded memory for huge grids
        t = at[c0:c0 + 4096]
        j = ((t - lo) / delta).astype(np.int64)
        win = j[:, None] + offsets                                            # (chunk, 2*reach+1)
        valid = (win >= 0) & (win < k)
        winc = np.clip(win, 0, k - 1)
        part = np.where(valid, cnt[winc] * ndtr((t[:, None] - (lo + (winc + 0.5) * delta)) / h), 0.0).sum(axis=1)
        out[c0:c0 + 4096] = below + cum[np.clip(j - reach, 0, k)] + part
    return out


def _axis_masses(v: np.ndarray, axis: Axis, h: float) -> np.ndarray:
    a, b = _mass_edges(axis)
    pts = np.unique(np.concatenate([a, b]))
    F = _kde_cdf_1d(v, h, pts)
    return F[np.searchsorted(pts, b)] - F[np.searchsorted(pts, a)]


def _joint_masses(v: np.ndarray, axes: list[Axis], hs: list[float]) -> np.ndarray:
    """Mass of a product-Gaussian KDE on each cell of the product grid, shape (m1, m2)."""
    near = np.ones(len(v), dtype=bool)          # points beyond 8 bandwidths of the grid add no mass anywhere
    for d in range(2):
        a, b = _mass_edges(axes[d])
        near &= (v[:, d] >= a.min() - KERNEL_REACH * hs[d]) & (v[:, d] <= b.max() + KERNEL_REACH * hs[d])
    v = v[near]
    if not len(v):
        return np.zeros((len(axes[0].start), len(axes[1].start)))
    mats, codes = [], []
    for d in range(2):
        a, b = _mass_edges(axes[d])
        h = hs[d]
        lo = float(a.min()) - KERNEL_REACH * h
        delta = h / 4.0
        bidx = np.floor((v[:, d] - lo) / delta).astype(np.int64)
        uniq, inv = np.unique(bidx, return_inverse=True)
        centers = lo + (uniq + 0.5) * delta
        A = ndtr((b[None, :] - centers[:, None]) / h) - ndtr((a[None, :] - centers[:, None]) / h)   # (u_d, m_d)
        mats.append(A)
        codes.append(inv)
    from scipy import sparse

    C = sparse.coo_matrix((np.ones(len(v)), (codes[0], codes[1])),
                          shape=(mats[0].shape[0], mats[1].shape[0])).tocsr()
    return mats[0].T @ (C @ mats[1])                                                       # (m1, m2)


@dataclass
class KDEGrid:
    """A fitted grid of one configured variable: a long table plus the spec needed to sample from it."""
    name: str
    spec: dict                # method, variables, kinds, stratify_by, filter, n_levels
    table: pd.DataFrame       # _level, strata columns, _n, value / _start / _end columns, probability column
    _levels: dict = field(default_factory=dict, repr=False)

    @property
    def prob_column(self) -> str:
        return "range_probability" if "ranges" in self.spec["kinds"] else "probability"

    def levels(self) -> dict:
        """{level: {stratum tuple: (starts (m, d), ends (m, d), probs (m,), values or None)}}, built once."""
        if self._levels:
            return self._levels
        t = self.table
        strat = self.spec["stratify_by"]
        vars_, kinds = self.spec["variables"], self.spec["kinds"]
        out: dict[int, dict] = {}
        for lvl, part in t.groupby("_level", sort=True):
            cols = strat[:int(lvl)]
            groups = part.groupby(cols, sort=False, dropna=False) if cols else [((), part)]
            out[int(lvl)] = {}
            for key, g in groups:
                key = key if isinstance(key, tuple) else (key,)
                key = tuple(None if pd.isna(k) else str(k) for k in key)
                starts, ends = [], []
                for var, kind in zip(vars_, kinds):
                    if kind == "ranges":
                        starts.append(g[f"{var}_start"].to_numpy(dtype=float))
                        ends.append(g[f"{var}_end"].to_numpy(dtype=float))
                    elif kind == "points":
                        starts.append(g[var].to_numpy(dtype=float))
                        ends.append(starts[-1])
                    else:
                        starts.append(np.arange(len(g), dtype=float))
                        ends.append(starts[-1])
                vals = g[vars_[0]].to_numpy(dtype=object) if kinds[0] == "values" else None
                out[int(lvl)][key[:len(cols)]] = (np.stack(starts, 1), np.stack(ends, 1),
                                                  g[self.prob_column].to_numpy(dtype=float), vals)
        self._levels = out
        return out


def _fit_task(kind_args: tuple) -> tuple | None:
    """Fit one stratum. Returns (normalised cell masses, bandwidths), or None when the grid holds no mass."""
    method, x, axes, bws, floor = kind_args
    if method == "value_counts":
        return None
    hs = []
    for d, axis in enumerate(axes):
        h = bws[d] if bws is not None else silverman(x[:, d])
        hs.append(max(h, floor * _median_width(axis, x[:, d]), 1e-9))
    if method == "kde_range":
        m = _axis_masses(x[:, 0], axes[0], hs[0])
    else:
        m = _joint_masses(x, axes, hs).ravel()
    tot = m.sum()
    if not np.isfinite(tot) or tot <= 0:
        return None
    return m / tot, hs


def _n_jobs(num_cores: int) -> int:
    """-1 = the cores this process may run on (respects taskset / container CPU sets), else ``num_cores``."""
    if num_cores != -1:
        return num_cores
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)




# ============================================================================================ fitting
def _real_rows(vcfg: Variable, patients: pd.DataFrame | None, visits: pd.DataFrame | None,
               at: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(source table, its rows kept by the filter with the strata and value columns)`` of a variable."""
    src = patients if vcfg.data_source == "patients" else visits
    strat, vars_ = vcfg.stratify_by, vcfg.columns
    src = with_patient_columns(src, patients, strat + list(vcfg.filter))
    need = set(strat) | set(vcfg.filter) | set(vars_)
    missing = sorted(c for c in need if c not in src.columns)
    if missing:
        raise DataError(f"{at}: columns {missing} are not in the {vcfg.data_source} table (nor in patients); "
                        f"found {sorted(src.columns)}. Fix the column names in the KDE config.")
    keep = filter_mask(src, vcfg.filter)
    if vcfg.method != "value_counts":
        keep &= src[vars_].notna().all(axis=1).to_numpy()
    df = src.loc[keep, list(dict.fromkeys(strat + vars_))].reset_index(drop=True)   # positional index from here
    if len(df) < vcfg.min_count:
        raise DataError(f"{at}: only {len(df)} real rows after the filter {vcfg.filter}, fewer than min_count = "
                        f"{vcfg.min_count}; a grid cannot be released. Loosen the filter or lower min_count.")
    return src, df


def _strata_tasks(vcfg: Variable, df: pd.DataFrame, axes: list[Axis], bandwidth_floor: float
                  ) -> tuple[list[tuple], list[tuple], int]:
    """One fitting task per stratum of every level, finest first: ``(tasks, (level, key, n) each, n too small)``.
    A stratum below min_count is left to its back-off level."""
    strat, vars_, method = vcfg.stratify_by, vcfg.columns, vcfg.method
    keys = pd.DataFrame({c: as_key(df[c]) for c in strat}, index=df.index)
    X = df[vars_].to_numpy(dtype=float) if method != "value_counts" else None
    tasks, meta, n_small = [], [], 0
    for lvl in range(len(strat), -1, -1):
        cols = strat[:lvl]
        if cols:
            sub = keys[cols].dropna()
            groups = sub.groupby(cols if len(cols) > 1 else cols[0], sort=True).groups.items()
        else:
            groups = [((), np.arange(len(df)))]
        for key, idx in groups:
            key = key if isinstance(key, tuple) else (key,)
            if len(idx) < vcfg.min_count:
                n_small += 1
                continue
            idx = np.asarray(idx)
            meta.append((lvl, key, len(idx)))
            if method == "value_counts":
                tasks.append(("value_counts", df[vars_[0]].iloc[idx], None, None, None))
            else:
                tasks.append((method, X[idx], axes, getattr(vcfg, "bandwidth", None), bandwidth_floor))
    return tasks, meta, n_small


def _run_tasks(tasks: list[tuple], method: str, num_cores: int, min_parallel_rows: int) -> list:
    """Threads, not processes: the kernels (bincount, ndtr, sparse products) release the GIL and the strata arrays
    need no pickling; process pools measured 3x slower than serial on 1M QH rows (bench/kde.py)."""
    n_work = sum(len(t[1]) for t in tasks)
    jobs = min(_n_jobs(num_cores), len(tasks))
    if method != "value_counts" and jobs > 1 and n_work >= min_parallel_rows:
        from joblib import Parallel, delayed

        return Parallel(n_jobs=jobs, backend="threading")(delayed(_fit_task)(t) for t in tasks)
    return [_fit_task(t) for t in tasks]


def _stratum_table(method: str, vars_: list[str], kinds: list[str], axes: list[Axis], task: tuple,
                   res: tuple | None) -> pd.DataFrame | None:
    """The grid rows of one fitted stratum (None when its grid holds no mass)."""
    if method == "value_counts":
        vc = task[1].value_counts(dropna=True, sort=False)
        vc = vc.sort_index() if len(vc) else vc
        return pd.DataFrame({vars_[0]: vc.index.to_numpy(), "probability": vc.to_numpy(dtype=float) / vc.sum()})
    if res is None:
        return None
    probs, hs = res
    if method == "kde_range":
        grids = [(axes[0].start, axes[0].end)]
    else:
        i1, i2 = np.meshgrid(np.arange(len(axes[0].start)), np.arange(len(axes[1].start)), indexing="ij")
        i1, i2 = i1.ravel(), i2.ravel()
        grids = [(axes[0].start[i1], axes[0].end[i1]), (axes[1].start[i2], axes[1].end[i2])]
    cols: dict[str, Any] = {}
    for var, kind, (s, e) in zip(vars_, kinds, grids):
        if kind == "points":
            cols[var] = s
        else:
            cols[f"{var}_start"], cols[f"{var}_end"] = s, e
    for var, h in zip(vars_, hs):
        cols[f"_bandwidth_{var}"] = np.full(len(probs), h)
    cols["range_probability" if "ranges" in kinds else "probability"] = probs
    part = pd.DataFrame(cols)
    return part.loc[part.iloc[:, -1] > 1e-12 * probs.max()]


def fit_kde_grid(name: str, vcfg: Variable, patients: pd.DataFrame | None, visits: pd.DataFrame | None,
                 bandwidth_floor: float = DEFAULT_BANDWIDTH_FLOOR, num_cores: int = 1,
                 min_parallel_rows: int = 1_000_000) -> KDEGrid:
    """Fit one configured variable on real data (already restricted to the training split) and return its grid.

    Strata are fitted on ``num_cores`` threads (-1 = all) when they hold at least ``min_parallel_rows`` rows in
    total, serially below that (``_run_tasks``). Output is identical either way.
    """
    at = f"variable_config.{name}"
    strat, vars_, method = vcfg.stratify_by, vcfg.columns, vcfg.method
    src, df = _real_rows(vcfg, patients, visits, at)
    axes = [gp.axis(var, df[var].to_numpy(dtype=float), src, f"{at}.grid_params") for var, gp in vcfg.grids().items()]
    kinds = [a.kind for a in axes] if method != "value_counts" else ["values"]
    tasks, meta, n_small = _strata_tasks(vcfg, df, axes, bandwidth_floor)
    results = _run_tasks(tasks, method, num_cores, min_parallel_rows)
    parts = []
    for (lvl, key, n), task, res in zip(meta, tasks, results):
        part = _stratum_table(method, vars_, kinds, axes, task, res)
        if part is None:
            n_small += 1
            continue
        part.insert(0, "_n", n)
        for c in reversed(strat):
            part.insert(0, c, key[strat.index(c)] if strat.index(c) < lvl else None)
        part.insert(0, "_level", lvl)
        parts.append(part)
    if not parts or not any(p["_level"].eq(0).any() for p in parts):
        raise DataError(f"{at}: the unstratified grid has no mass: no real value lies on the grid. "
                        "Check grid_params (min/max/cut_points) against the data range.")
    table = pd.concat(parts, ignore_index=True)
    for c in strat:
        table[c] = table[c].astype("string")
    table["_level"] = table["_level"].astype("int32")
    spec = {"name": name, "method": method, "variables": vars_, "kinds": kinds, "stratify_by": list(strat),
            "filter": vcfg.filter, "data_source": vcfg.data_source, "n_strata_merged": n_small}
    return KDEGrid(name, spec, table)


def write_kde_grid(grid: KDEGrid, path: str) -> None:
    t = grid.table.copy()
    if grid.spec["kinds"][0] == "values":
        col = grid.spec["variables"][0]
        if not pd.api.types.is_numeric_dtype(t[col]):
            t[col] = t[col].astype("string")
    table = pa.Table.from_pandas(t, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(grid.spec).encode()})
    storage.write_parquet(path, table)


def read_kde_grid(path: str) -> KDEGrid:
    table = storage.read_parquet(path)
    md = table.schema.metadata or {}
    if META_KEY not in md:
        raise DataError(f"{path}: not a KDE grid written by synthehr (no {META_KEY.decode()!r} metadata). "
                        "Regenerate it with generate_kde_grids.")
    spec = json.loads(md[META_KEY])
    return KDEGrid(spec["name"], spec, table.to_pandas())


def generate_kde_grids(config: KDEConfig | Mapping | str, patients: pd.DataFrame, visits: pd.DataFrame,
                       out_dir: str | os.PathLike) -> dict:
    """Fit every configured variable and write ``grid_<name>_kde.parquet`` into ``out_dir`` (created if missing).

    ``patients``/``visits`` are real canonical tables, already restricted to the training split. Returns
    ``{name: {"rows": .., "strata": .., "strata_merged": ..}}``.
    """
    cfg = load_kde_config(config)
    summary = {}
    from tqdm import tqdm

    for name, vcfg in tqdm(cfg.variable_config.items(), desc="kde grids", disable=None):
        grid = fit_kde_grid(name, vcfg, patients, visits, cfg.bandwidth_floor, cfg.num_cores)
        write_kde_grid(grid, storage.join(str(out_dir), GRID_FILE.format(name)))
        strata = grid.table.drop_duplicates(["_level", *grid.spec["stratify_by"]])["_level"].value_counts()
        summary[name] = {"rows": len(grid.table), "strata": {int(k): int(v) for k, v in sorted(strata.items())},
                         "strata_merged": grid.spec["n_strata_merged"]}
    return summary



def add_code_columns(visits: pd.DataFrame, codes: pd.DataFrame, code_columns: Mapping[str, str]) -> pd.DataFrame:
    """Add a visit column per ``{column: namespace}`` holding the value of that visit's ``namespace:`` code.

    Lets a KDE variable be stratified by something the model generates as a code (QH: ``triage_category``
    from ``tri:<n>``). A visit without such a code gets null; with several, the first in code order.
    """
    if not code_columns:
        return visits
    visits = visits.copy()
    for col, ns in code_columns.items():
        c = codes[codes["code"].str.startswith(ns + ":")]
        c = c.sort_values(["patient_id", "visit_index", "code"]).drop_duplicates(["patient_id", "visit_index"])
        val = c.assign(**{col: c["code"].str.slice(len(ns) + 1)})[["patient_id", "visit_index", col]]
        visits = visits.drop(columns=[col], errors="ignore").merge(val, on=["patient_id", "visit_index"], how="left")
    return visits


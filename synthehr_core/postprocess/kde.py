"""KDE post-processing: restore continuous values and timestamps in a sampled (binned) cohort.

The generative model emits bins (``los_days_binned = "2-5"``), not numbers. This stage turns each bin back into a
value the way the real data would have filled it:

1. ``generate_kde_grids`` fits, per variable and per stratum (e.g. per ``triage_category``), a Gaussian kernel density
   on the *training split* of the real data and integrates it over a fixed grid of cells. A grid is a table of cells
   (``<var>_start``/``<var>_end`` and ``range_probability``) or of discrete points (``<var>`` and ``probability``).
2. ``sample_from_kde_grid`` fills a synthetic column: each row draws from its stratum's grid *restricted to the row's
   sampled bin*, by inverse CDF over all rows at once (one ``searchsorted`` on a concatenated CDF), then uniformly
   inside the chosen cell. Values always lie inside their bins.
3. ``reconstruct_times`` turns sampled gaps (or offsets since baseline) and lengths of stay into
   ``start_offset_days``, keeping visits in order and not overlapping unless configured.

Back-off. Stratification columns are dropped from the end: a row whose stratum ``(a, b)`` has no grid (never seen, or
fewer than ``min_count`` real rows, or no mass in the row's bin) uses ``(a,)``, then the unstratified grid. Rows whose bin
has no mass even there are drawn uniformly inside the bin and counted as ``n_uniform_fallback`` (a disagreement between
the model's bin and the real data).

Privacy. The grids are computed from real patient data and are released with the synthetic cohort pipeline; they are
**outside any differential-privacy guarantee** (DP-SGD, if used, covers the model only). Two guards limit what a grid
reveals: strata with fewer than ``min_count`` real rows (default 10) are not fitted on their own, and every bandwidth is
at least ``bandwidth_floor`` times the median width of the grid cells that hold the real values, so no cell can
hold a single real value's mass alone. ``value_counts`` grids are exact frequencies of categorical values and rely on ``min_count`` only. See docs/kde.md.

This module must not import torch or kfp: the KDE image has neither.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import ndtr

from .. import storage
from ..data.schema import parse_bin, read_tables, write_tables
from ..errors import ConfigError, DataError, bullet_list
from .temporal import MONTH_TOKEN_DECAY

log = logging.getLogger(__name__)

METHODS = ("kde_range", "kde_joint", "value_counts")
DATA_SOURCES = ("patients", "visits")
GRID_METHODS = ("range", "arange", "fine_bins", "custom")
TOP_KEYS = {"num_cores", "min_count", "bandwidth_floor", "variable_config", "time", "code_columns"}
VAR_KEYS = {
    "kde_range": {"method", "data_source", "column", "stratify_by", "filter", "grid_params", "bandwidth", "min_count"},
    "kde_joint": {"method", "data_source", "variables", "stratify_by", "filter", "grid_params", "bandwidth", "min_count"},
    "value_counts": {"method", "data_source", "column", "stratify_by", "filter", "min_count"},
}
GRID_KEYS = {
    "range": {"method", "min", "max", "use_data_bounds", "step", "offset"},
    "arange": {"method", "min", "max", "use_data_bounds", "step", "offset"},
    "fine_bins": {"method", "column", "points_per_bin", "step", "filter"},
    "custom": {"method", "cut_points"},
}
TIME_KEYS = {"gap", "gap_unit", "offset", "offset_unit", "los", "los_unit", "allow_overlap", "anchor_age", "anchor_date",
             "month_token_decay",
             "monotone"}
UNIT_DAYS = {"days": 1.0, "hours": 1.0 / 24.0, "months": 365.25 / 12.0, "years": 365.25}
DEFAULT_MIN_COUNT = 10          # privacy guard; arbitrary, tune per data-use agreement
DEFAULT_BANDWIDTH_FLOOR = 1.0   # bandwidth >= this x median width of cells holding data; arbitrary, tune
KERNEL_REACH = 8.0              # Gaussian mass beyond 8 bandwidths is < 1e-15
GRID_FILE = "grid_{}_kde.parquet"
META_KEY = b"synthehr_kde"


# ============================================================================================ config
def load_kde_config(config: Mapping | str | os.PathLike, where: str | None = None) -> dict:
    """Read and validate a KDE config: a dict (``KDE_CONFIG``), a YAML/JSON path, or a bundled name (``kde_qh``).

    Returns the normalised config (every optional key filled in). Raises one ConfigError listing every problem.
    """
    if isinstance(config, Mapping):
        return validate_kde_config(config, where or "KDE_CONFIG")
    text_path = str(config)
    if not storage.exists(text_path):             # a bundled name: "kde_qh" or "kde_qh.yml"
        name = Path(text_path).name
        bundled = Path(__file__).parents[1] / "configs" / (name if name.endswith((".yml", ".yaml")) else f"{name}.yml")
        if not bundled.exists():
            known = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("kde_*.yml"))
            raise ConfigError(f"KDE config {text_path!r}: no such file and no bundled config of that name; "
                              f"bundled: {known}. Pass a path, a bundled name or a dict.")
        text_path = str(bundled)
    import yaml

    try:
        raw = yaml.safe_load(storage.read_text(text_path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{text_path}: not valid YAML ({exc}). Fix the syntax.") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{text_path}: a KDE config must be a mapping with 'variable_config'; got {type(raw).__name__}.")
    return validate_kde_config(raw, where or text_path)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_filter(flt: Any, at: str, problems: list[str]) -> dict:
    """Filters: ``{col: scalar}`` equality, ``{col: [..]}`` membership, ``{col: {notnull: true}}``, ``{col: {equals|in: ..}}``."""
    if flt is None:
        return {}
    if not isinstance(flt, Mapping):
        problems.append(f"{at} = {flt!r} must be a mapping column -> condition, e.g. {{event_type: ED}}.")
        return {}
    out = {}
    for col, cond in flt.items():
        if isinstance(cond, Mapping):
            keys = set(cond)
            if keys == {"notnull"} and cond["notnull"] is True:
                out[col] = {"notnull": True}
            elif keys == {"equals"}:
                out[col] = {"equals": cond["equals"]}
            elif keys == {"in"} and isinstance(cond["in"], list) and cond["in"]:
                out[col] = {"in": list(cond["in"])}
            else:
                problems.append(f"{at}.{col} = {dict(cond)!r} is not a filter; use exactly one of "
                                "{notnull: true}, {equals: VALUE} or {in: [V1, V2]}.")
        elif isinstance(cond, list):
            if not cond:
                problems.append(f"{at}.{col} = [] keeps no rows; list at least one value or remove the filter.")
            else:
                out[col] = {"in": list(cond)}
        else:
            out[col] = {"equals": cond}
    return out


def _check_grid(gp: Any, at: str, problems: list[str]) -> dict:
    if not isinstance(gp, Mapping):
        problems.append(f"{at} = {gp!r} must be a mapping with 'method' in {list(GRID_METHODS)}.")
        return {}
    gm = gp.get("method")
    if gm not in GRID_METHODS:
        problems.append(f"{at}.method = {gm!r} is not one of {list(GRID_METHODS)}.")
        return {}
    unknown = set(gp) - GRID_KEYS[gm]
    if unknown:
        problems.append(f"{at} has unknown keys {sorted(unknown)} for grid method {gm!r}; allowed: {sorted(GRID_KEYS[gm])}.")
    g = dict(gp)
    if gm in ("range", "arange"):
        g.setdefault("use_data_bounds", False)
        g.setdefault("offset", 0)
        g.setdefault("step", 1)
        if not isinstance(g["use_data_bounds"], bool):
            problems.append(f"{at}.use_data_bounds = {g['use_data_bounds']!r} must be true or false.")
        elif not g["use_data_bounds"]:
            for k in ("min", "max"):
                if not _is_num(g.get(k)):
                    problems.append(f"{at}.{k} = {g.get(k)!r} must be a number (or set use_data_bounds: true).")
            if _is_num(g.get("min")) and _is_num(g.get("max")) and g["max"] < g["min"]:
                problems.append(f"{at}: max = {g['max']} < min = {g['min']}; swap them.")
        if not _is_num(g["step"]) or g["step"] <= 0:
            problems.append(f"{at}.step = {g['step']!r} must be a positive number.")
        if not _is_num(g["offset"]):
            problems.append(f"{at}.offset = {g['offset']!r} must be a number (added to max; default 0).")
    elif gm == "fine_bins":
        if "step" in g and "points_per_bin" in g:
            problems.append(f"{at}: give either step or points_per_bin, not both.")
        if "step" in g and (not _is_num(g["step"]) or g["step"] <= 0):
            problems.append(f"{at}.step = {g['step']!r} must be a positive number.")
        if "step" not in g:
            g.setdefault("points_per_bin", 10)
            ppb = g["points_per_bin"]
            if not isinstance(ppb, int) or isinstance(ppb, bool) or ppb < 1:
                problems.append(f"{at}.points_per_bin = {ppb!r} must be an integer >= 1.")
        f = g.get("filter")
        if f is not None and (not isinstance(f, Mapping) or set(f) != {"threshold", "modulo"}
                              or not _is_num(f.get("threshold")) or not _is_num(f.get("modulo")) or f["modulo"] <= 0):
            problems.append(f"{at}.filter = {f!r} must be {{threshold: NUMBER, modulo: POSITIVE_NUMBER}} "
                            "(beyond threshold keep only grid points that are multiples of modulo).")
    elif gm == "custom":
        cp = g.get("cut_points")
        if not isinstance(cp, list) or len(cp) < 2 or not all(_is_num(c) for c in cp):
            problems.append(f"{at}.cut_points = {cp!r} must be a list of at least 2 numbers.")
        elif any(b <= a for a, b in itertools.pairwise(cp)):
            problems.append(f"{at}.cut_points = {cp!r} must be strictly increasing; sort them and drop duplicates.")
    return g


def _check_bandwidth(bw: Any, n: int, at: str, problems: list[str]) -> list[float] | None:
    if bw is None:
        return None
    if not isinstance(bw, list) or len(bw) != n or not all(_is_num(b) and b > 0 for b in bw):
        problems.append(f"{at} = {bw!r} must be a list of {n} positive number(s) (one per variable), "
                        "or left out for Silverman's rule per stratum.")
        return None
    return [float(b) for b in bw]


def validate_kde_config(config: Mapping, where: str = "KDE_CONFIG") -> dict:
    """Check a KDE config and return it normalised; one ConfigError lists every problem found."""
    problems: list[str] = []
    unknown = set(config) - TOP_KEYS
    if unknown:
        problems.append(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}.")
    cc = config.get("code_columns", {}) or {}
    if not isinstance(cc, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cc.items()):
        problems.append(f"{where}: code_columns = {cc!r} must map a new visit column to a code namespace, "
                        "e.g. {triage_category: tri}.")
    nc = config.get("num_cores", -1)
    if not isinstance(nc, int) or isinstance(nc, bool) or (nc != -1 and nc < 1):
        problems.append(f"{where}: num_cores = {nc!r} must be -1 (all cores) or an integer >= 1.")
    mc = config.get("min_count", DEFAULT_MIN_COUNT)
    if not isinstance(mc, int) or isinstance(mc, bool) or mc < 1:
        problems.append(f"{where}: min_count = {mc!r} must be an integer >= 1 (strata with fewer real rows are merged).")
    bf = config.get("bandwidth_floor", DEFAULT_BANDWIDTH_FLOOR)
    if not _is_num(bf) or bf < 0:
        problems.append(f"{where}: bandwidth_floor = {bf!r} must be a number >= 0 (multiple of the median width of the cells holding real values).")
    vc = config.get("variable_config")
    out_vars: dict[str, dict] = {}
    if not isinstance(vc, Mapping) or not vc:
        problems.append(f"{where}: variable_config = {vc!r} must be a non-empty mapping NAME -> settings.")
        vc = {}
    for name, spec in vc.items():
        at = f"{where}: variable_config.{name}"
        if not isinstance(spec, Mapping):
            problems.append(f"{at} = {spec!r} must be a mapping with at least 'method' and 'data_source'.")
            continue
        method = spec.get("method")
        if method not in METHODS:
            problems.append(f"{at}.method = {method!r} is not one of {list(METHODS)}.")
            continue
        unknown = set(spec) - VAR_KEYS[method]
        if unknown:
            problems.append(f"{at} has unknown keys {sorted(unknown)} for method {method!r}; allowed: "
                            f"{sorted(VAR_KEYS[method])}.")
        v: dict[str, Any] = {"method": method}
        ds = spec.get("data_source")
        if ds not in DATA_SOURCES:
            problems.append(f"{at}.data_source = {ds!r} is not one of {list(DATA_SOURCES)}.")
        v["data_source"] = ds
        sb = spec.get("stratify_by", [])
        if isinstance(sb, str):
            sb = [sb]
        if not isinstance(sb, list) or not all(isinstance(c, str) for c in sb) or len(set(sb)) != len(sb):
            problems.append(f"{at}.stratify_by = {sb!r} must be a list of distinct column names.")
            sb = []
        v["stratify_by"] = list(sb)
        v["filter"] = _check_filter(spec.get("filter"), f"{at}.filter", problems)
        vmc = spec.get("min_count", mc)
        if not isinstance(vmc, int) or isinstance(vmc, bool) or vmc < 1:
            problems.append(f"{at}.min_count = {vmc!r} must be an integer >= 1.")
        v["min_count"] = vmc
        if method == "kde_joint":
            cols = spec.get("variables")
            if not isinstance(cols, list) or len(cols) != 2 or not all(isinstance(c, str) for c in cols) \
                    or cols[0] == cols[1]:
                problems.append(f"{at}.variables = {cols!r} must list two distinct column names, "
                                "e.g. [los_hours, los_triage_hours].")
                continue
            v["variables"] = list(cols)
            gp = spec.get("grid_params")
            if not isinstance(gp, Mapping) or set(gp) != set(cols):
                problems.append(f"{at}.grid_params = {gp!r} must map each of {cols} to a grid, "
                                "e.g. {los_hours: {method: arange, min: 0, max: 48, step: 0.5}, ...}.")
                v["grid_params"] = {}
            else:
                v["grid_params"] = {c: _check_grid(gp[c], f"{at}.grid_params.{c}", problems) for c in cols}
            v["bandwidth"] = _check_bandwidth(spec.get("bandwidth"), 2, f"{at}.bandwidth", problems)
        else:
            col = spec.get("column", name)
            if not isinstance(col, str):
                problems.append(f"{at}.column = {col!r} must be a column name (default: the variable name).")
            v["column"] = col
            if method == "kde_range":
                if "grid_params" not in spec:
                    problems.append(f"{at}: kde_range needs grid_params, e.g. {{method: fine_bins, step: 0.5}}.")
                    v["grid_params"] = {}
                else:
                    v["grid_params"] = _check_grid(spec["grid_params"], f"{at}.grid_params", problems)
                v["bandwidth"] = _check_bandwidth(spec.get("bandwidth"), 1, f"{at}.bandwidth", problems)
        out_vars[str(name)] = v
    time_cfg = _check_time(config.get("time"), f"{where}: time", problems)
    if problems:
        raise ConfigError(f"{where}: invalid KDE config ({len(problems)} problem(s)):\n" + bullet_list(problems))
    return {"code_columns": dict(cc) if isinstance(cc, Mapping) else {}, "num_cores": nc, "min_count": mc, "bandwidth_floor": float(bf), "variable_config": out_vars,
            "time": time_cfg}


def _check_time(t: Any, at: str, problems: list[str]) -> dict | None:
    if t is None:
        return None
    if not isinstance(t, Mapping):
        problems.append(f"{at} = {t!r} must be a mapping (gap or offset, los, anchor_age, ...).")
        return None
    unknown = set(t) - TIME_KEYS
    if unknown:
        problems.append(f"{at} has unknown keys {sorted(unknown)}; allowed: {sorted(TIME_KEYS)}.")
    out = {"gap": t.get("gap"), "gap_unit": t.get("gap_unit", "days"), "offset": t.get("offset"),
           "offset_unit": t.get("offset_unit", "days"), "los": t.get("los"), "los_unit": t.get("los_unit", "days"),
           "allow_overlap": t.get("allow_overlap", False), "anchor_age": t.get("anchor_age"),
           "anchor_date": t.get("anchor_date"), "monotone": t.get("monotone", []),
           "month_token_decay": t.get("month_token_decay", MONTH_TOKEN_DECAY)}
    mono = out["monotone"]
    if not isinstance(mono, list) or not all(isinstance(c, str) for c in mono):
        problems.append(f"{at}.monotone = {mono!r} must be a list of visit columns that never decrease within a "
                        "patient (e.g. [age] for a visit-level age).")
    if (out["gap"] is None) == (out["offset"] is None):
        problems.append(f"{at}: give exactly one of gap (column of gaps from the previous visit start) or offset "
                        f"(column of time since the first visit); got gap={out['gap']!r}, offset={out['offset']!r}.")
    for k in ("gap_unit", "offset_unit", "los_unit"):
        if out[k] not in UNIT_DAYS:
            problems.append(f"{at}.{k} = {out[k]!r} is not one of {list(UNIT_DAYS)}.")
    if not isinstance(out["allow_overlap"], bool):
        problems.append(f"{at}.allow_overlap = {out['allow_overlap']!r} must be true or false.")
    decay = out["month_token_decay"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        problems.append(f"{at}.month_token_decay = {decay!r} must be a number in (0, 1]: the weight factor per month "
                        "between a later visit's candidate day and its given-up month token (1 = ignore it).")
    ad = out["anchor_date"]
    if ad is not None:
        try:
            lo, hi = pd.Timestamp(ad["min"]), pd.Timestamp(ad["max"])
            if hi < lo or set(ad) != {"min", "max"}:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            problems.append(f"{at}.anchor_date = {ad!r} must be {{min: YYYY-MM-DD, max: YYYY-MM-DD}} with min <= max.")
    return out


def variable_columns(vcfg: dict) -> list[str]:
    """The column(s) a normalised variable config fills: its ``variables`` (kde_joint) or ``[column]``."""
    return list(vcfg["variables"]) if vcfg["method"] == "kde_joint" else [vcfg["column"]]


def _variable_grids(vcfg: dict) -> dict:
    return dict(vcfg["grid_params"]) if vcfg["method"] == "kde_joint" else {vcfg["column"]: vcfg["grid_params"]}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================================ helpers
def _as_key(s: pd.Series) -> pd.Series:
    """Stratum values as strings, so '1', 1 and 1.0 all match; null stays null."""
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        v = s.to_numpy(dtype=float, na_value=np.nan)
        uniq, inv = np.unique(v, return_inverse=True)          # NaNs sort last and stay NaN
        names = np.array([None if np.isnan(x) else (str(int(x)) if x.is_integer() else repr(float(x))) for x in uniq],
                         dtype=object)
        return pd.Series(names[inv.ravel()] if len(v) else [], index=s.index, dtype="string")
    return s.astype("string")


def _with_patient_columns(table: pd.DataFrame, patients: pd.DataFrame | None, cols: list[str]) -> pd.DataFrame:
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


def _filter_mask(df: pd.DataFrame, flt: dict, skip: set[str] = frozenset()) -> np.ndarray:
    mask = np.ones(len(df), dtype=bool)
    for col, cond in flt.items():
        if col in skip or col not in df.columns:
            continue
        s = df[col]
        if "notnull" in cond:
            mask &= s.notna().to_numpy()
        elif "equals" in cond:
            mask &= (_as_key(s) == _as_key(pd.Series([cond["equals"]]))[0]).fillna(False).to_numpy(dtype=bool)
        else:
            allowed = set(_as_key(pd.Series(cond["in"])).dropna())
            mask &= _as_key(s).isin(allowed).fillna(False).to_numpy(dtype=bool)
    return mask


# ============================================================================================ grids
@dataclass
class Axis:
    """One grid dimension: cells [start, end) (kind 'ranges') or discrete points (kind 'points', start == end)."""
    kind: str
    start: np.ndarray
    end: np.ndarray

    @property
    def width(self) -> np.ndarray:
        return self.end - self.start


def _fine_bin_axis(gp: dict, bins: pd.Series, values: np.ndarray, at: str) -> Axis:
    uniq = [b for b in pd.unique(bins.dropna().astype(str))]
    if not uniq:
        raise DataError(f"{at}: column {gp['column']!r} has no bin strings to build a fine_bins grid from. "
                        "Check that preprocess binned this variable, or use method: arange.")
    starts, ends = [], []
    for b in sorted(uniq, key=lambda s: parse_bin(s)):
        lo, hi = parse_bin(b)
        if not math.isfinite(lo) or not math.isfinite(hi):   # open-ended bin: stop at the real data's extent
            inside = values[(values >= lo) & (values <= hi)] if len(values) else values
            if not len(inside):
                continue
            lo = lo if math.isfinite(lo) else float(inside.min())
            hi = hi if math.isfinite(hi) else float(np.nextafter(inside.max(), np.inf))
            if hi <= lo:
                hi = lo + 1.0
        if "step" in gp:
            pts = np.arange(lo, hi, gp["step"])
        else:
            pts = np.linspace(lo, hi, gp["points_per_bin"] + 1)[:-1]
        f = gp.get("filter")
        if f is not None:
            keep = (pts <= f["threshold"]) | np.isclose(np.mod(pts, f["modulo"]), 0) \
                | np.isclose(np.mod(pts, f["modulo"]), f["modulo"])
            keep[0] = True                        # bin edges always stay, so cells never straddle two bins
            pts = pts[keep]
        cuts = np.append(pts, hi)
        starts.append(cuts[:-1])
        ends.append(cuts[1:])
    if not starts:
        raise DataError(f"{at}: no finite bins to build a fine_bins grid from.")
    s, e = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(s, kind="stable")
    return Axis("ranges", s[order], e[order])


def build_axis(gp: dict, values: np.ndarray, bins: pd.Series | None, at: str) -> Axis:
    """Grid cells for one variable from its grid_params (values: filtered real data, for use_data_bounds)."""
    gm = gp["method"]
    if gm in ("range", "arange"):
        if gp["use_data_bounds"]:
            if not len(values):
                raise DataError(f"{at}: use_data_bounds needs data, but no real rows are left after the filter.")
            lo, hi = float(np.min(values)), float(np.max(values))
        else:
            lo, hi = float(gp["min"]), float(gp["max"])
        if gm == "range":
            lo, hi = math.floor(lo), math.ceil(hi)
        pts = np.arange(lo, hi + gp["offset"], gp["step"], dtype=float)
        if gm == "range":
            if not len(pts):
                pts = np.array([lo])
            return Axis("points", pts, pts.copy())
        if len(pts) < 2:
            pts = np.array([lo, lo + gp["step"]])
        return Axis("ranges", pts[:-1], pts[1:])
    if gm == "custom":
        cp = np.asarray(gp["cut_points"], dtype=float)
        return Axis("ranges", cp[:-1], cp[1:])
    if bins is None:
        raise DataError(f"{at}: fine_bins needs the column {gp['column']!r} in the real table; it is missing. "
                        "Set grid_params.column to the '<var>_binned' column or use method: arange.")
    return _fine_bin_axis(gp, bins, values, at)


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


def fit_kde_grid(name: str, vcfg: dict, patients: pd.DataFrame | None, visits: pd.DataFrame | None,
                 bandwidth_floor: float = DEFAULT_BANDWIDTH_FLOOR, num_cores: int = 1,
                 min_parallel_rows: int = 1_000_000) -> KDEGrid:
    """Fit one configured variable on real data (already restricted to the training split) and return its grid.

    Strata are fitted on ``num_cores`` threads (-1 = all) when they hold at least ``min_parallel_rows`` rows in
    total, serially below that. Threads, not processes: the kernels (bincount, ndtr, sparse products) release the GIL
    and the strata arrays need no pickling; process pools measured 3x slower than serial on 1M QH rows (bench/kde.py).
    Output is identical either way.
    """
    at = f"variable_config.{name}"
    src = patients if vcfg["data_source"] == "patients" else visits
    strat, vars_, method = vcfg["stratify_by"], variable_columns(vcfg), vcfg["method"]
    src = _with_patient_columns(src, patients, strat + list(vcfg["filter"]))
    need = set(strat) | set(vcfg["filter"]) | set(vars_)
    missing = sorted(c for c in need if c not in src.columns)
    if missing:
        raise DataError(f"{at}: columns {missing} are not in the {vcfg['data_source']} table (nor in patients); "
                        f"found {sorted(src.columns)}. Fix the column names in the KDE config.")
    keep = _filter_mask(src, vcfg["filter"])
    if method != "value_counts":
        keep &= src[vars_].notna().all(axis=1).to_numpy()
    df = src.loc[keep, list(dict.fromkeys(strat + vars_))].reset_index(drop=True)   # positional index from here
    if len(df) < vcfg["min_count"]:
        raise DataError(f"{at}: only {len(df)} real rows after the filter {vcfg['filter']}, fewer than min_count = "
                        f"{vcfg['min_count']}; a grid cannot be released. Loosen the filter or lower min_count.")
    keys = pd.DataFrame({c: _as_key(df[c]) for c in strat}, index=df.index)
    X = df[vars_].to_numpy(dtype=float) if method != "value_counts" else None

    axes: list[Axis] = []
    if method == "value_counts":
        kinds = ["values"]
    else:
        for var in vars_:
            gp = dict(_variable_grids(vcfg)[var])
            if gp["method"] == "fine_bins":
                gp.setdefault("column", f"{var}_binned")
            bins = src[gp["column"]] if gp["method"] == "fine_bins" and gp["column"] in src.columns else None
            axes.append(build_axis(gp, df[var].to_numpy(dtype=float), bins, f"{at}.grid_params"))
        kinds = [a.kind for a in axes]

    # strata of every level, finest first; a stratum below min_count is left to its back-off level
    tasks, meta = [], []
    n_small = 0
    for lvl in range(len(strat), -1, -1):
        cols = strat[:lvl]
        if cols:
            sub = keys[cols].dropna()
            groups = sub.groupby(cols if len(cols) > 1 else cols[0], sort=True).groups.items()
        else:
            groups = [((), np.arange(len(df)))]
        for key, idx in groups:
            key = key if isinstance(key, tuple) else (key,)
            if len(idx) < vcfg["min_count"]:
                n_small += 1
                continue
            idx = np.asarray(idx)
            meta.append((lvl, key, len(idx)))
            if method == "value_counts":
                tasks.append(("value_counts", df[vars_[0]].iloc[idx], None, None, None))
            else:
                tasks.append((method, X[idx], axes, vcfg.get("bandwidth"), bandwidth_floor))
    n_work = sum(len(t[1]) for t in tasks)
    jobs = min(_n_jobs(num_cores), len(tasks))
    if method != "value_counts" and jobs > 1 and n_work >= min_parallel_rows:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=jobs, backend="threading")(delayed(_fit_task)(t) for t in tasks)
    else:
        results = [_fit_task(t) for t in tasks]

    parts = []
    for (lvl, key, n), task, res in zip(meta, tasks, results):
        if method == "value_counts":
            vc = task[1].value_counts(dropna=True, sort=False)
            vc = vc.sort_index() if len(vc) else vc
            part = pd.DataFrame({vars_[0]: vc.index.to_numpy(), "probability": vc.to_numpy(dtype=float) / vc.sum()})
        else:
            if res is None:
                n_small += 1
                continue
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
            part = part.loc[part.iloc[:, -1] > 1e-12 * probs.max()]
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
    spec = {"name": name, "method": method, "variables": vars_, "kinds": kinds, "stratify_by": strat,
            "filter": vcfg["filter"], "data_source": vcfg["data_source"], "n_strata_merged": n_small}
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


def generate_kde_grids(config: Mapping | str, patients: pd.DataFrame, visits: pd.DataFrame,
                       out_dir: str | os.PathLike) -> dict:
    """Fit every configured variable and write ``grid_<name>_kde.parquet`` into ``out_dir`` (created if missing).

    ``patients``/``visits`` are real canonical tables, already restricted to the training split. Returns
    ``{name: {"rows": .., "strata": .., "strata_merged": ..}}``.
    """
    cfg = load_kde_config(config)
    summary = {}
    from tqdm import tqdm

    for name, vcfg in tqdm(cfg["variable_config"].items(), desc="kde grids", disable=None):
        grid = fit_kde_grid(name, vcfg, patients, visits, cfg["bandwidth_floor"], cfg["num_cores"])
        write_kde_grid(grid, storage.join(str(out_dir), GRID_FILE.format(name)))
        strata = grid.table.drop_duplicates(["_level", *grid.spec["stratify_by"]])["_level"].value_counts()
        summary[name] = {"rows": len(grid.table), "strata": {int(k): int(v) for k, v in sorted(strata.items())},
                         "strata_merged": grid.spec["n_strata_merged"]}
    return summary


def _real_overlap_rate(visits: pd.DataFrame, tcfg: dict | None) -> float | None:
    if not tcfg or not tcfg.get("gap") or not tcfg.get("los") or not {tcfg["gap"], tcfg["los"]} <= set(visits.columns):
        return None
    v = visits.sort_values(["patient_id", "visit_index"], kind="stable")
    prev_los = v.groupby("patient_id", sort=False)[tcfg["los"]].shift(1).to_numpy(dtype=float)
    gap = v[tcfg["gap"]].to_numpy(dtype=float) * UNIT_DAYS[tcfg["gap_unit"]]
    ok = ~np.isnan(prev_los) & ~np.isnan(gap)
    return float(np.mean(gap[ok] < prev_los[ok] * UNIT_DAYS[tcfg["los_unit"]])) if ok.any() else None


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


def generate_kde_grids_to_dir(tables_dir: str, kde_config: Mapping | str, out_dir: str, overwrite: bool = False) -> dict:
    """Stage entry point: fit grids on the *train* split of a canonical tables dir; write grids, config and meta."""
    cfg = load_kde_config(kde_config)
    patients, visits, codes = read_tables(tables_dir)
    visits = add_code_columns(visits, codes, cfg.get("code_columns", {}))
    train = patients.loc[patients["split"] == "train"]
    if train.empty:
        raise DataError(f"{tables_dir}: no patients with split == 'train' (splits: {sorted(patients['split'].unique())}). "
                        "Grids must come from real training data: point at the preprocess output.")
    tv = visits.loc[visits["patient_id"].isin(set(train["patient_id"]))]
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        summary = generate_kde_grids(cfg, train, tv, tmp)
        storage.write_json(storage.join(str(tmp), "kde_config.json"), cfg)
        calendar = _write_calendar_tables(train, tv, cfg["min_count"], str(tmp))
        meta = {"tables_dir": str(tables_dir), "config_hash": config_hash(cfg), "n_patients": len(train),
                "n_visits": len(tv), "grids": summary, "real_overlap_rate": _real_overlap_rate(tv, cfg["time"]),
                "privacy": "grids are derived from real training data and are outside any DP guarantee",
                "calendar_tables": calendar}
        storage.write_json(storage.join(str(tmp), "meta.json"), meta)
    return meta


def _write_calendar_tables(train: pd.DataFrame, tv: pd.DataFrame, min_count: int, out_dir: str) -> bool:
    """Calendar anchor and time-of-day tables for temporal.reconstruct_calendar_times (docs/temporal.md), when
    the real visits carry ``start_day``; False (logged) when they do not or the data are too few."""
    from .temporal import build_calendar_tables, write_calendar_tables

    if "start_day" not in tv.columns or not tv["start_day"].notna().any():
        return False
    try:
        write_calendar_tables(*build_calendar_tables(train, tv, min_count), out_dir)
    except DataError as exc:
        log.warning("no calendar tables: %s", exc)
        return False
    return True


# ============================================================================================ sampling
def _bin_edges(bins: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Factorise bin strings; returns (codes, lo per code, hi per code). Code -1 = null bin."""
    codes, uniq = pd.factorize(bins.astype("string"), use_na_sentinel=True)
    lohi = np.array([parse_bin(u) for u in uniq], dtype=float).reshape(-1, 2)
    return codes.astype(np.int64), lohi[:, 0], lohi[:, 1]


def _restrict(starts, ends, probs, lo, hi, top):
    """Cell masses and clipped cells inside the bins [lo, hi) per dimension (hi closed where top)."""
    w = probs.copy()
    s, e = starts.copy(), ends.copy()
    for d in range(starts.shape[1]):
        if np.isnan(lo[d]):
            continue
        point = starts[:, d] == ends[:, d]
        inside = (starts[:, d] >= lo[d]) & ((starts[:, d] < hi[d]) | (top[d] & (starts[:, d] <= hi[d])))
        width = np.where(point, 1.0, ends[:, d] - starts[:, d])
        overlap = np.clip(np.minimum(ends[:, d], hi[d]) - np.maximum(starts[:, d], lo[d]), 0, None) / width
        w = w * np.where(point, inside, overlap)
        s[:, d], e[:, d] = np.where(point, s[:, d], np.maximum(s[:, d], lo[d])), \
            np.where(point, e[:, d], np.minimum(e[:, d], hi[d]))
    keep = w > 0
    return s[keep], e[keep], w[keep], keep


def inverse_cdf(cum: np.ndarray, first: np.ndarray, last: np.ndarray, group: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Cell index per draw: the first ``i`` in ``[first[g], last[g]]`` with ``cum[i] > g + u`` (guide-table search).

    ``cum`` concatenates the groups' CDFs, group ``g`` spanning ``(g, g + 1]``. Equal to
    ``clip(searchsorted(cum, g + u, side="right"), first[g], last[g])``, but each group gets a guide table of as many
    entries as cells (Chen's indexed search), so a draw starts at most a step or two before its answer: gathers instead
    of a binary search over all cells (about 3x faster on 1M draws).
    """
    g_ok = last >= first
    k = np.where(g_ok, last - first + 1, 0)                       # guide entries per group
    start = np.concatenate([[0], np.cumsum(k)[:-1]])
    gg = np.repeat(np.arange(len(k)), k)
    j = np.arange(int(k.sum())) - start[gg]
    guide = np.searchsorted(cum, gg + j / k[gg], side="right")
    q = group + u
    kg = k[group]
    idx = guide[start[group] + np.minimum((u * kg).astype(np.int64), kg - 1)]
    lo, hi = first[group], last[group]
    idx = np.clip(idx, lo, hi)
    act = np.flatnonzero((cum[idx] <= q) & (idx < hi))            # walk forward to the first cum > q
    while act.size:
        idx[act] += 1
        act = act[(cum[idx[act]] <= q[act]) & (idx[act] < hi[act])]
    act = np.flatnonzero((idx > lo) & (cum[np.maximum(idx - 1, 0)] > q))   # rounding guard: never overshoot
    while act.size:
        idx[act] -= 1
        act = act[(idx[act] > lo[act]) & (cum[idx[act] - 1] > q[act])]
    return idx


def sample_from_kde_grid(grid: KDEGrid | str, synthetic: pd.DataFrame, variable: str | None = None,
                         rng: np.random.Generator | int = 0, top_edges: Mapping[str, float] | None = None,
                         patients: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """Fill the grid's column(s) in ``synthetic`` and return ``(new_table, report)``.

    Each row draws from the grid of its stratum restricted to its ``<var>_binned`` bin (if that column exists), by
    inverse CDF over all rows at once. ``variable`` names the grid's first column (a check; None accepts any).
    ``top_edges`` maps a variable to its last bin edge (closed there). ``patients`` supplies patient-level
    stratification columns when sampling visits. Rows excluded by the grid's filter are left unchanged.
    Report: rows filled, back-offs (rows using a coarser fitted stratum than their own), uniform fallbacks (bin with
    no real mass anywhere; a model-vs-data disagreement), rows per level (-1 = uniform fallback).
    """
    if not isinstance(grid, KDEGrid):
        grid = read_kde_grid(str(grid))
    spec = grid.spec
    vars_, kinds, strat = spec["variables"], spec["kinds"], spec["stratify_by"]
    if variable is not None and variable not in vars_ and variable != grid.name:
        raise ConfigError(f"sample_from_kde_grid: variable {variable!r} is not in grid {grid.name!r} (columns {vars_}).")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    top_edges = top_edges or {}
    syn = _with_patient_columns(synthetic, patients, strat + list(spec["filter"]))
    missing = [c for c in strat if c not in syn.columns]
    if missing:
        raise DataError(f"grid {grid.name!r}: synthetic table lacks stratification columns {missing}; "
                        f"found {sorted(syn.columns)}. Sample with a model trained on the same dataset config.")
    skip = set(vars_) | {f"{v}_binned" for v in vars_}
    mask = _filter_mask(syn, spec["filter"], skip=skip)
    rows = np.flatnonzero(mask)
    n = len(rows)
    sel = (lambda col: col) if n == len(syn) else (lambda col: col.iloc[rows])   # skip the copy when all rows
    d = len(vars_)

    # one integer code per row for (stratum, bin per dim), then one group per distinct code
    code_cols, decoders = [], []
    for c in strat:
        cc, uniq = pd.factorize(_as_key(sel(syn[c])), use_na_sentinel=True)
        code_cols.append(cc.astype(np.int64))
        decoders.append(("s", np.asarray(uniq, dtype=object)))
    binned = [f"{v}_binned" in syn.columns and k != "values" for v, k in zip(vars_, kinds)]
    for v, has in zip(vars_, binned):
        if has:
            cc, lo, hi = _bin_edges(sel(syn[f"{v}_binned"]))
            code_cols.append(cc)
            decoders.append(("b", lo, hi))
    key = np.zeros(n, dtype=np.int64)
    radices = []
    for cc in code_cols:
        r = int(cc.max()) + 2 if len(cc) else 1
        radices.append(r)
        key = key * r + (cc + 1)
    gcode, gkeys = pd.factorize(key)
    gkeys = np.asarray(gkeys, dtype=np.int64)

    levels = grid.levels()
    top = np.array([v in top_edges for v in vars_])
    cum_parts, s_parts, e_parts = [], [], []
    first, last = np.zeros(len(gkeys), np.int64), np.zeros(len(gkeys), np.int64)
    skip_group = np.zeros(len(gkeys), dtype=bool)
    vals_by_group: list = []
    level_used = np.zeros(len(gkeys), dtype=np.int64)
    uniform = np.zeros(len(gkeys), dtype=bool)
    pos = 0
    for g, k in enumerate(gkeys):
        parts = []
        for r in reversed(radices):
            parts.append(int(k % r) - 1)
            k //= r
        parts = parts[::-1]
        stratum = tuple(None if p < 0 else str(decoders[i][1][p]) for i, p in enumerate(parts[:len(strat)]))
        lo, hi = np.full(d, np.nan), np.full(d, np.nan)
        null_bin = False
        j = len(strat)
        for dim in range(d):
            if binned[dim]:
                p = parts[j]
                j += 1
                if p < 0:
                    null_bin = True
                else:
                    lo[dim], hi[dim] = decoders[len(strat) + sum(binned[:dim])][1][p], \
                        decoders[len(strat) + sum(binned[:dim])][2][p]
        if null_bin:
            skip_group[g] = True
            vals_by_group.append(None)
            first[g], last[g] = 0, -1                 # no cells: never drawn from
            continue
        topd = np.array([top[i] and hi[i] == top_edges.get(vars_[i]) for i in range(d)])
        found = None
        for lvl in range(len(strat), -1, -1):
            cell = levels.get(lvl, {}).get(stratum[:lvl]) if None not in stratum[:lvl] else None
            if cell is None:
                continue
            s, e, w, keep = _restrict(cell[0], cell[1], cell[2], lo, hi, topd)
            if len(w):
                found = (lvl, s, e, w, cell[3][keep] if cell[3] is not None else None)
                break
        if found is None:                      # bin never seen in the real data: uniform inside the bin
            uniform[g] = True                  # (an unbinned dimension of a joint grid is left null)
            hi_f = np.where(np.isinf(hi), lo, hi)
            lo_f = np.where(np.isinf(lo), hi_f, lo)
            found = (-1, lo_f[None, :], hi_f[None, :], np.ones(1), None)
        lvl, s, e, w, vals = found
        level_used[g] = lvl
        c = np.cumsum(w)
        c = g + c / c[-1]
        c[-1] = g + 1.0
        cum_parts.append(c)
        s_parts.append(s)
        e_parts.append(e)
        vals_by_group.append(vals)
        first[g], last[g] = pos, pos + len(c) - 1
        pos += len(c)

    out = synthetic.copy(deep=False)           # copy-on-write: the caller's frame is never modified
    report = {"grid": grid.name, "n_rows": int(n), "n_filled": 0, "n_backoff": 0, "n_uniform_fallback": 0,
              "rows_by_level": {}}
    if pos == 0:
        return out, report
    cum = np.concatenate(cum_parts)
    S, E = np.concatenate(s_parts), np.concatenate(e_parts)
    live = ~skip_group[gcode]
    lg = gcode[live]
    u = rng.random(len(lg))
    idx = inverse_cdf(cum, first, last, lg, u)
    target = rows[live]
    if kinds[0] == "values":
        allv = np.concatenate([v if v is not None else np.array([None] * (last[i] - first[i] + 1), dtype=object)
                               for i, v in enumerate(vals_by_group) if not skip_group[i]])
        res = np.full(len(out), None, dtype=object)
        res[target] = allv[idx]
        col = vars_[0]
        numeric = pd.api.types.is_numeric_dtype(grid.table[col])
        newcol = out[col].to_numpy(dtype=object, copy=True) if col in out.columns else np.full(len(out), None, object)
        newcol[target] = res[target]
        out[col] = pd.Series(newcol, index=out.index).astype("float64" if numeric else "string")
    else:
        t = rng.random((len(lg), d))
        for dim, var in enumerate(vars_):
            s, e = np.ascontiguousarray(S[:, dim])[idx], np.ascontiguousarray(E[:, dim])[idx]
            val = s + t[:, dim] * (e - s)
            val = np.minimum(val, np.where(e > s, np.nextafter(e, -np.inf), e))   # half-open cells stay half-open
            newcol = out[var].to_numpy(dtype=float, copy=True) if var in out.columns else np.full(len(out), np.nan)
            newcol[target] = val
            out[var] = newcol
    per_group = np.bincount(lg, minlength=len(gkeys))                 # counts per group, then per level: O(groups)
    per_level = np.bincount(level_used + 1, weights=per_group, minlength=len(strat) + 2).astype(np.int64)
    report["n_filled"] = len(lg)
    report["n_backoff"] = int(per_level[1:len(strat) + 1].sum())
    report["n_uniform_fallback"] = int(per_group[uniform].sum())
    report["rows_by_level"] = {lvl - 1: int(c) for lvl, c in enumerate(per_level) if c}
    return out, report


# ============================================================================================ time
def _make_monotone(v: pd.DataFrame, col: str, pid: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Make ``col`` non-decreasing within each patient (``v`` sorted by patient, visit) while keeping bins.

    Values of a patient's visits that share a bin are sorted into visit order (they stay inside the bin); decreases
    left between different bins are raised to the running maximum. Returns (values, n_reordered, n_raised).
    """
    off = v[col].to_numpy(dtype=float)
    bins = v[f"{col}_binned"].astype("string").fillna("").to_numpy(dtype=object) if f"{col}_binned" in v else \
        np.full(len(v), "", dtype=object)
    order_slots = np.lexsort((v["visit_index"].to_numpy(), bins, pid))
    order_vals = np.lexsort((np.nan_to_num(off, nan=np.inf), bins, pid))
    new = off.copy()
    new[order_slots] = off[order_vals]
    n_fixed = int(np.count_nonzero(~np.isclose(new, off, equal_nan=True)))
    mono = pd.Series(new).groupby(pid, sort=False).cummax().to_numpy()
    raised = ~np.isnan(new) & (mono > new)
    return np.where(raised, mono, new), n_fixed, int(raised.sum())


def reconstruct_times(patients: pd.DataFrame, visits: pd.DataFrame, tcfg: dict,
                      rng: np.random.Generator | int = 0) -> tuple[pd.DataFrame, dict]:
    """Fill ``start_offset_days`` (and ``age_at_visit`` / ``start_date`` when anchored) from sampled gaps and LOS.

    Gap mode: start = cumulative sum of gaps within patient (first visit 0). Unless ``allow_overlap``, a gap shorter
    than the previous visit's LOS is resampled inside its bin above that LOS; if the bin cannot hold it, the previous
    LOS is resampled inside its own bin below the gap; if neither fits, the gap is set to the previous LOS (counted
    as unresolved). Offset mode (e.g. ``months_since_baseline``): within a patient, values of visits sharing a bin
    are sorted into visit order; remaining decreases are raised to the previous value (counted). Columns in
    ``monotone`` (e.g. a visit-level ``age``) get the same treatment.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    need = [(c, "visits", visits) for c in (tcfg.get("gap"), tcfg.get("offset"), tcfg.get("los"),
                                            *(tcfg.get("monotone") or [])) if c]
    need += [(tcfg["anchor_age"], "patients", patients)] if tcfg.get("anchor_age") else []
    missing = [f"{table}.{c}" for c, table, df in need if c not in df.columns]
    if missing:
        raise DataError(f"time reconstruction: columns {missing} are missing; visits has {sorted(visits.columns)}. "
                        "Fill them with a KDE variable first, or fix the names in the config's time section.")
    v = visits.sort_values(["patient_id", "visit_index"], kind="stable").reset_index(drop=True)
    pid = v["patient_id"].to_numpy()
    first = np.ones(len(v), dtype=bool)
    first[1:] = pid[1:] != pid[:-1]
    report = {"n_gap_resampled": 0, "n_los_resampled": 0, "n_unresolved": 0, "n_missing_filled": 0,
              "n_order_fixed": 0}

    def _bins(col: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
        if f"{col}_binned" not in v.columns:
            return np.full(len(v), -np.inf), np.full(len(v), np.inf)
        codes, lo, hi = _bin_edges(v[f"{col}_binned"])
        lo_a = np.where(codes >= 0, lo[np.clip(codes, 0, None)] if len(lo) else 0, -np.inf) * scale
        hi_a = np.where(codes >= 0, hi[np.clip(codes, 0, None)] if len(hi) else 0, np.inf) * scale
        return lo_a, hi_a

    if tcfg.get("gap"):
        gs = UNIT_DAYS[tcfg["gap_unit"]]
        gap = v[tcfg["gap"]].to_numpy(dtype=float) * gs
        los = v[tcfg["los"]].to_numpy(dtype=float) * UNIT_DAYS[tcfg["los_unit"]] if tcfg.get("los") else None
        prev_los = np.concatenate([[np.nan], los[:-1]]) if los is not None else np.full(len(v), np.nan)
        prev_los[first] = np.nan
        miss = ~first & np.isnan(gap)
        report["n_missing_filled"] = int(miss.sum())
        gap[miss] = np.nan_to_num(prev_los[miss], nan=0.0)
        gap[first] = 0.0
        if los is not None and not tcfg.get("allow_overlap", False):
            conflict = ~first & ~np.isnan(prev_los) & (gap < prev_los)
            glo, ghi = _bins(tcfg["gap"], gs)
            llo, lhi = _bins(tcfg["los"], UNIT_DAYS[tcfg["los_unit"]])
            c = np.flatnonzero(conflict)
            a = np.maximum(glo[c], prev_los[c])
            can_gap = a < ghi[c]
            hi_g = np.where(np.isinf(ghi[c]), a + 1.0, ghi[c])
            new_gap = a + rng.random(len(c)) * (hi_g - a)
            gap[c[can_gap]] = np.minimum(new_gap[can_gap], np.nextafter(hi_g[can_gap], -np.inf))
            gap[c[can_gap]] = np.maximum(gap[c[can_gap]], a[can_gap])
            rest = c[~can_gap]
            p = rest - 1                                        # previous visit of the same patient
            b = np.minimum(lhi[p], gap[rest])
            can_los = llo[p] < b
            lo_l = np.where(np.isinf(llo[p]), 0.0, llo[p])
            new_los = lo_l + rng.random(len(rest)) * (b - lo_l)
            fix = p[can_los]
            los[fix] = np.minimum(new_los[can_los], np.nextafter(b[can_los], -np.inf))
            unresolved = rest[~can_los]
            gap[unresolved] = prev_los[unresolved]
            report.update(n_gap_resampled=int(can_gap.sum()), n_los_resampled=int(can_los.sum()),
                          n_unresolved=len(unresolved))
            v[tcfg["los"]] = los / UNIT_DAYS[tcfg["los_unit"]]
        out_gap = gap / gs
        out_gap[first] = v[tcfg["gap"]].to_numpy(dtype=float)[first]
        v[tcfg["gap"]] = out_gap
        v["start_offset_days"] = pd.Series(gap).groupby(pid, sort=False).cumsum().to_numpy()
    else:
        col, scale = tcfg["offset"], UNIT_DAYS[tcfg["offset_unit"]]
        new, report["n_order_fixed"], report["n_unresolved"] = _make_monotone(v, col, pid)
        v[col] = new
        base = pd.Series(new).groupby(pid, sort=False).transform("first").to_numpy()
        v["start_offset_days"] = (new - base) * scale
        v.loc[first, "start_offset_days"] = 0.0
    for col in tcfg.get("monotone") or []:
        v[col], n_fixed, n_raised = _make_monotone(v, col, pid)
        report[f"n_order_fixed_{col}"], report[f"n_raised_{col}"] = n_fixed, n_raised
    if tcfg.get("anchor_age"):
        age = patients.set_index("patient_id")[tcfg["anchor_age"]].reindex(pid).to_numpy(dtype=float)
        v["age_at_visit"] = age + v["start_offset_days"].to_numpy() / 365.25
    if tcfg.get("anchor_date"):
        lo, hi = pd.Timestamp(tcfg["anchor_date"]["min"]), pd.Timestamp(tcfg["anchor_date"]["max"])
        upids, inv = np.unique(pid, return_inverse=True)
        day0 = rng.integers(0, (hi - lo).days + 1, len(upids))[inv]
        dates = lo + pd.to_timedelta(day0 + np.floor(v["start_offset_days"].to_numpy()), unit="D")
        v["start_date"] = pd.Series(dates).dt.strftime("%Y-%m-%d").astype("string")
    return v, report


# ============================================================================================ stage
def _top_edges(vocab_json: dict | None) -> dict[str, float]:
    if not vocab_json:
        return {}
    tops: dict[str, float] = {}
    for t in vocab_json.get("tokens", []):
        if t.get("variable") and t.get("hi") is not None:
            tops[t["variable"]] = max(tops.get(t["variable"], -np.inf), float(t["hi"]))
    return tops


def sample_kde_to_dir(shard_dir: str, grids_dir: str, out_dir: str, seed: int, overwrite: bool = False) -> dict:
    """Stage entry point: fill every configured variable and the visit times of a sampled shard; write a tables dir.

    Each variable gets its own child stream of ``SeedSequence(seed)`` (by config order), so adding a variable does
    not change the values of the others.
    """
    cfg = load_kde_config(storage.read_json(storage.join(grids_dir, "kde_config.json")),
                          where=storage.join(grids_dir, "kde_config.json"))
    patients, visits, codes = read_tables(shard_dir)
    derived = [c for c in cfg.get("code_columns", {}) if c not in visits.columns]
    visits = add_code_columns(visits, codes, cfg.get("code_columns", {}))
    vocab_path = storage.join(shard_dir, "vocab.json")
    vocab = storage.read_json(vocab_path) if storage.exists(vocab_path) else None
    tops = _top_edges(vocab)
    names = list(cfg["variable_config"])
    streams = np.random.SeedSequence(seed).spawn(len(names) + 2)    # variables, time, calendar
    reports = {}
    for name, ss in zip(names, streams):
        grid = read_kde_grid(storage.join(grids_dir, GRID_FILE.format(name)))
        rng = np.random.default_rng(ss)
        if grid.spec["data_source"] == "patients":
            patients, reports[name] = sample_from_kde_grid(grid, patients, None, rng, tops)
        else:
            visits, reports[name] = sample_from_kde_grid(grid, visits, None, rng, tops, patients=patients)
        log.info("kde %s: %s", name, reports[name])
    time_report = None
    if cfg["time"]:
        visits, time_report = reconstruct_times(patients, visits, cfg["time"],
                                                np.random.default_rng(streams[len(names)]))
    from .temporal import calendar_times_from_grids

    # dates that agree with the sampled cal_* tokens, when the grids dir holds calendar tables (docs/temporal.md)
    visits, calendar_report = calendar_times_from_grids(patients, visits, grids_dir, cfg,
                                                        np.random.default_rng(streams[len(names) + 1]))
    visits = visits.drop(columns=derived)   # code-derived strata stay codes in the output
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(tmp, patients, visits, codes)
        if vocab is not None:
            storage.write_json(storage.join(str(tmp), "vocab.json"), vocab)
        meta = {"seed": seed, "shard_dir": str(shard_dir), "grids_dir": str(grids_dir), "config_hash": config_hash(cfg),
                "n_patients": len(patients), "n_visits": len(visits), "variables": reports,
                "backoff_counts": {k: r["n_backoff"] for k, r in reports.items()},
                "disagreement_counts": {k: r["n_uniform_fallback"] for k, r in reports.items()},
                "time": time_report, "calendar": calendar_report}
        shard_meta = storage.join(shard_dir, "meta.json")
        if storage.exists(shard_meta):
            meta["upstream"] = storage.read_json(shard_meta)     # the sample stage's provenance, kept verbatim
        storage.write_json(storage.join(str(tmp), "meta.json"), meta)
    return meta

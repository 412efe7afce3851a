"""Fidelity of continuous values, binned columns and time: KS, Wasserstein, quantiles, gaps and calendar.

* Continuous variables are the float columns (other than the core time columns) present in both cohorts and
  non-null somewhere in the synthetic one (before the KDE stage they are all null and are reported as "not yet
  filled"). Visit variables are also compared per ``event_type`` stratum when there is more than one.
* Binned columns (``<var>_binned``) are compared by total variation distance, so a cohort before KDE is covered.
* Time: the inter-visit gap is the difference of consecutive ``start_offset_days`` within a patient; the
  visit-count-over-time distribution is that of ``start_offset_days`` of follow-up visits (index > 0).
* Calendar: weekday and month from ``start_day`` (days since 1970-01-01, a Thursday) or from ``cal_weekday`` /
  ``cal_month`` columns; "not available" when neither cohort has them.
* Correlations: Pearson matrix of the numeric visit variables (pairwise-complete), compared by mean and max
  absolute difference of the upper triangle (as the ADNI-style score comparisons).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ..data.schema import WEEKDAYS, calendar_parts
from .cohort import Cohort

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CORE_FLOATS = ("start_offset_days", "start_day", "visit_index")
MIN_STRATUM = 20   # arbitrary; smaller strata give noisy KS values


def _ks_w(r: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    return float(stats.ks_2samp(r, s).statistic), float(stats.wasserstein_distance(r, s))


def _num(df: pd.DataFrame, c: str) -> pd.Series:
    """A column as float (an all-null column may arrive as strings from a cohort before KDE)."""
    return pd.to_numeric(df[c], errors="coerce").astype(float)


def _numeric_columns(real: pd.DataFrame, synth: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(compared, skipped-because-null-in-synthetic) float columns of the real table also in the synthetic one."""
    cols = [c for c in real.columns if c in synth.columns and c not in CORE_FLOATS
            and pd.api.types.is_float_dtype(real[c]) and real[c].notna().any()]
    filled = [c for c in cols if _num(synth, c).notna().any()]
    return filled, [c for c in cols if c not in filled]


def tvd(real: pd.Series, synth: pd.Series) -> float:
    """Total variation distance of two categorical distributions (nulls dropped)."""
    p = real.dropna().astype(str).value_counts(normalize=True)
    q = synth.dropna().astype(str).value_counts(normalize=True)
    if not len(p) or not len(q):
        return float("nan")
    return float(0.5 * p.sub(q, fill_value=0).abs().sum())


def _gaps(c: Cohort) -> np.ndarray:
    off = _num(c.visits, "start_offset_days").to_numpy()
    same = c.visit_patient[1:] == c.visit_patient[:-1]
    g = (off[1:] - off[:-1])[same]
    return g[~np.isnan(g)]


def _calendar(c: Cohort) -> dict[str, pd.Series]:
    v = c.visits
    out = {}
    day = _num(v, "start_day").dropna() if "start_day" in v.columns else pd.Series(dtype=float)
    if len(day):
        parts = calendar_parts(day.to_numpy())
        out["weekday"] = pd.Series(np.asarray(WEEKDAYS)[parts["weekday"]])
        out["month"] = pd.Series(parts["month"]).map(lambda m: f"{m:02d}")
    else:
        if "cal_weekday" in v.columns and v["cal_weekday"].notna().any():
            out["weekday"] = v["cal_weekday"].dropna().astype(str)
        if "cal_month" in v.columns and v["cal_month"].notna().any():
            out["month"] = v["cal_month"].dropna().astype(str)
    return out


def values(real: Cohort, synth: Cohort) -> dict:
    """All value and time metrics plus the tables and samples the report draws."""
    m: dict[str, float] = {}
    notes: list[str] = []
    quant_rows, samples = [], {}
    for table, rt, st in (("patients", real.patients, synth.patients), ("visits", real.visits, synth.visits)):
        filled, empty = _numeric_columns(rt, st)
        for c in empty:
            notes.append(f"{table}.{c}: null in the synthetic cohort (before KDE?); compared by its bins only.")
        for c in filled:
            r, s = rt[c].dropna().to_numpy(float), _num(st, c).dropna().to_numpy(float)
            m[f"values.{c}.ks"], m[f"values.{c}.wasserstein"] = _ks_w(r, s)
            m[f"values.{c}.null_frac_diff"] = float(_num(st, c).isna().mean() - rt[c].isna().mean())
            samples[c] = (r, s)
            for who, x in (("real", r), ("synth", s)):
                quant_rows.append({"variable": c, "stratum": "all", "cohort": who, "n": len(x),
                                   **{f"q{int(q * 100)}": float(np.quantile(x, q)) for q in QUANTILES}})
            if table == "visits" and "event_type" in rt.columns and rt["event_type"].nunique() > 1:
                for ev, grp in rt.groupby("event_type"):
                    r2 = grp[c].dropna().to_numpy(float)
                    s2 = _num(st, c)[(st["event_type"] == ev).to_numpy()].dropna().to_numpy(float)
                    if len(r2) >= MIN_STRATUM and len(s2) >= MIN_STRATUM:
                        m[f"values.{c}[{ev}].ks"], m[f"values.{c}[{ev}].wasserstein"] = _ks_w(r2, s2)
        for c in rt.columns:
            if c.endswith("_binned") and c in st.columns:
                d = tvd(rt[c], st[c])
                if np.isfinite(d):
                    m[f"values.{c}.tvd"] = d
    if "event_type" in real.visits.columns and "event_type" in synth.visits.columns:
        m["values.event_type.tvd"] = tvd(real.visits["event_type"], synth.visits["event_type"])

    filled, _ = _numeric_columns(real.visits, synth.visits)
    if len(filled) >= 2:
        cr = real.visits[filled].corr().to_numpy()
        cs = pd.DataFrame({c: _num(synth.visits, c) for c in filled}).corr().to_numpy()
        iu = np.triu_indices(len(filled), k=1)
        diff = np.abs(cr[iu] - cs[iu])
        diff = diff[np.isfinite(diff)]
        if len(diff):
            m["values.corr.mean_abs_diff"], m["values.corr.max_abs_diff"] = float(diff.mean()), float(diff.max())

    gr, gs = _gaps(real), _gaps(synth)
    if len(gr) and len(gs):
        m["time.gap_days.ks"], m["time.gap_days.wasserstein"] = _ks_w(gr, gs)
        m["time.gap_days.real_median"], m["time.gap_days.synth_median"] = float(np.median(gr)), float(np.median(gs))
        fr = real.visits.loc[real.visit_position > 0, "start_offset_days"].dropna().to_numpy(float)
        fs = _num(synth.visits, "start_offset_days")[synth.visit_position > 0].dropna().to_numpy(float)
        if len(fr) and len(fs):
            m["time.offset_days.ks"], m["time.offset_days.wasserstein"] = _ks_w(fr, fs)
            samples["offset_days"] = (fr, fs)
        samples["gap_days"] = (gr, gs)
    else:
        notes.append("time: start_offset_days is null in the synthetic cohort (before KDE?); gaps not compared.")

    cal_r, cal_s = _calendar(real), _calendar(synth)
    calendar = {}
    for k in ("weekday", "month"):
        if k in cal_r and k in cal_s:
            m[f"time.{k}.tvd"] = tvd(cal_r[k], cal_s[k])
            calendar[k] = (cal_r[k].value_counts(normalize=True).sort_index(),
                           cal_s[k].value_counts(normalize=True).sort_index())
        else:
            notes.append(f"time.{k}: not available (no start_day or cal_{k} column in "
                         f"{'the real' if k not in cal_r else 'the synthetic'} cohort).")
    return {"metrics": m, "notes": notes, "quantiles": pd.DataFrame(quant_rows), "samples": samples,
            "calendar": calendar}

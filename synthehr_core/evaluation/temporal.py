"""Temporal realism metrics: aggregate time series of a synthetic cohort's visit dates against the real visits.

``temporal_metrics``: monthly and weekly visit counts by event type (Pearson r, normalised MAE), month-of-year
profile (seasonal amplitude ratio, winter/summer ratio), weekday and hour-of-day profiles (max absolute difference
in percentage points), autocorrelation of daily counts at lags 7 and 365. Definitions: docs/temporal.md. The dates
come from preprocess (real) and from the kde-sample stage's calendar dating (synthetic, ``postprocess/dating.py``).
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data.schema import WEEKDAYS, calendar_parts
from ..errors import DataError


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


def temporal_figure(res: dict, title: str = "", k: int = 0) -> str:
    """The series of ``temporal_metrics`` as one ``<img>`` (matplotlib Agg, base64 PNG) for the HTML report;
    real monthly counts of 1..k-1 visits are not drawn (the small-cell floor)."""
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
        ax.plot(dates, np.where((rc > 0) & (rc < k), np.nan, rc), label="real", color="#1f77b4")
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

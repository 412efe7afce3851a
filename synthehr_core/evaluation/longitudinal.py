"""Longitudinal structure: what a patient's next visit keeps, what may not go backwards, what goes together.

* **Persistence**: for the ``TOP_CODES`` most frequent real codes, P(c in visit k+1 | c in visit k) over all
  consecutive visit pairs, real training data vs synthetic; the largest absolute gaps are listed (codes whose real
  denominator is below the small-cell k are left out).
* **Ordinal progressions** (declared in the dataset config, ``longitudinal.ordinal``): a code family with ordered
  stages; a patient *regresses* when a visit's highest stage is below the highest stage of an earlier visit.
  Regressions per 1000 patients, real vs synthetic, and the excess.
* **Dependence between single-valued visit variables** (event type, weekday, hour band, month, visit bins, ...):
  Cramér's V of each pair, and the conditional shares P(b = v | a = u) for cells u with at least k real and k
  synthetic visits; the largest share gaps are listed (e.g. weekday = Sat given event type = elective).
* **Never together**: pairs among the ``TOP_CODES`` codes and the code categories (``mixing.code_categories``)
  that no real visit holds together although independence predicts at least k such visits; the share of synthetic
  visits holding one.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.schema import WEEKDAYS, calendar_parts
from .cohort import Cohort
from .fidelity import _transitions
from .mixing import code_categories

TOP_CODES = 50          # arbitrary; the most frequent real codes checked for persistence and exclusivity
TOP_LISTED = 10         # rows in each "worst" table
NOISE_SE = 2.0          # gaps are judged beyond this many standard errors of the difference of two shares
MAX_LEVELS = 30         # a variable with more values is not a single-valued category worth a contingency table
HOUR_BANDS = ("00-05", "06-11", "12-17", "18-23")


def beyond_noise(p_r, n_r, p_s, n_s) -> np.ndarray:
    """|p_s - p_r| minus ``NOISE_SE`` standard errors of the difference (pooled share), floored at 0."""
    p_r, p_s, n_r, n_s = (np.asarray(x, float) for x in (p_r, p_s, n_r, n_s))
    pool = (p_r * n_r + p_s * n_s) / (n_r + n_s)
    se = np.sqrt(pool * (1 - pool) * (1 / n_r + 1 / n_s))
    return np.maximum(np.abs(p_s - p_r) - NOISE_SE * se, 0.0)


def persistence(real: Cohort, synth: Cohort, k: int) -> tuple[dict, pd.DataFrame]:
    vis = np.asarray(real.X.sum(axis=0)).ravel()
    top = np.argsort(-vis, kind="stable")[:TOP_CODES]
    top = top[vis[top] > 0]

    def rates(c: Cohort) -> tuple[np.ndarray, np.ndarray]:
        cur = _transitions(c)
        prev, now = c.X[cur - 1][:, top], c.X[cur][:, top]
        return np.asarray(prev.sum(axis=0)).ravel(), np.asarray(prev.multiply(now).sum(axis=0)).ravel()

    (nr, kr), (ns, ks) = rates(real), rates(synth)
    ok = (nr >= k) & (ns > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tab = pd.DataFrame({"code": real.space.codes[top], "real": kr / nr, "synthetic": ks / ns,
                            "real_n": nr, "synthetic_n": ns})[ok]
    tab["gap"] = tab["synthetic"] - tab["real"]
    tab["beyond_noise"] = beyond_noise(tab["real"], tab["real_n"], tab["synthetic"], tab["synthetic_n"])
    tab = tab.sort_values(["beyond_noise", "gap"], ascending=False, key=lambda s: s.abs())
    m = {}
    if len(tab):
        m = {"longitudinal.persistence.max_abs_diff": float(tab["beyond_noise"].max()),
             "longitudinal.persistence.mean_abs_diff": float(tab["gap"].abs().mean()),
             "longitudinal.persistence.n_codes": float(len(tab))}
    return m, tab.head(TOP_LISTED).reset_index(drop=True)


def _regressions(c: Cohort, codes: list[str]) -> tuple[int, int]:
    """(patients with a stage decrease, patients with any stage code)."""
    cols = c.space.codes.get_indexer(codes)
    present = cols >= 0
    if not present.any():
        return 0, 0
    levels = sp.diags((np.arange(len(codes)) + 1.0)[present])
    lv = np.asarray((c.X[:, cols[present]] @ levels).max(axis=1).todense()).ravel()   # (visits,) 0 = none
    df = pd.DataFrame({"p": c.visit_patient, "lv": lv})[lv > 0]
    if df.empty:
        return 0, 0
    prev_max = df.groupby("p")["lv"].cummax().groupby(df["p"]).shift(1)
    down = df.loc[df["lv"].to_numpy() < prev_max.to_numpy(), "p"]
    return int(down.nunique()), int(df["p"].nunique())


def ordinal(real: Cohort, synth: Cohort, families: list[dict]) -> tuple[dict, pd.DataFrame]:
    rows = []
    for fam in families:
        (dr, hr), (ds, hs) = _regressions(real, list(fam["codes"])), _regressions(synth, list(fam["codes"]))
        rows.append({"family": fam["name"], "stages": " < ".join(fam["codes"]),
                     "real_per_1000": 1000 * dr / max(real.n_patients, 1), "real_patients": dr,
                     "synthetic_per_1000": 1000 * ds / max(synth.n_patients, 1), "synthetic_patients": ds,
                     "real_with_stage": hr, "synthetic_with_stage": hs})
    tab = pd.DataFrame(rows)
    m = {}
    if len(tab):
        tab["excess_per_1000"] = tab["synthetic_per_1000"] - tab["real_per_1000"]
        m["longitudinal.ordinal.excess_per_1000"] = float(tab["excess_per_1000"].max())
        for r in tab.itertuples():
            m[f"longitudinal.ordinal.{r.family}.real_per_1000"] = float(r.real_per_1000)
            m[f"longitudinal.ordinal.{r.family}.synthetic_per_1000"] = float(r.synthetic_per_1000)
    return m, tab


def visit_categories(visits: pd.DataFrame) -> pd.DataFrame:
    """Single-valued categorical visit variables as strings: event type, bins, categories, and the calendar
    (weekday, hour band, month from ``start_day``; else the ``cal_*`` token columns)."""
    out = {}
    for c in visits.columns:
        if c in ("patient_id", "split") or c.startswith("cal_") and "start_day" in visits.columns:
            continue
        s = visits[c]
        if c.endswith("_binned") or c == "event_type" or c.startswith("cal_") or \
                (s.dtype == object or pd.api.types.is_string_dtype(s)):
            out[c] = s.astype("string")
    if "start_day" in visits.columns:
        day = pd.to_numeric(visits["start_day"], errors="coerce").to_numpy(float)
        ok = np.isfinite(day)
        parts = calendar_parts(np.where(ok, day, 0.0))
        out["weekday"] = pd.Series(np.asarray(WEEKDAYS)[parts["weekday"]], index=visits.index).where(ok)
        out["month"] = pd.Series(parts["month"], index=visits.index).map("{:02d}".format).where(ok)
        frac = np.where(ok, day % 1.0, 0.0)
        if (frac > 0).any():
            out["hour_band"] = pd.Series(np.asarray(HOUR_BANDS)[np.floor(frac * 4).astype(int)],
                                         index=visits.index).where(ok)
    df = pd.DataFrame(out, index=visits.index)
    keep = [c for c in df.columns if 2 <= df[c].nunique() <= MAX_LEVELS]
    return df[keep]


def _cramers_v(tab: pd.DataFrame) -> float:
    n = tab.to_numpy().sum()
    r, c = tab.shape
    if n == 0 or min(r, c) < 2:
        return float("nan")
    e = np.outer(tab.sum(axis=1), tab.sum(axis=0)) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        chi2 = np.nansum((tab.to_numpy() - e) ** 2 / e)
    return float(np.sqrt(chi2 / (n * (min(r, c) - 1))))


def dependence(real: Cohort, synth: Cohort, k: int) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    R, S = visit_categories(real.visits), visit_categories(synth.visits)
    cols = [c for c in R.columns if c in S.columns]
    vrows, grows = [], []
    for a, b in combinations(cols, 2):
        tr, ts = pd.crosstab(R[a], R[b]), pd.crosstab(S[a], S[b])
        vr, vs = _cramers_v(tr), _cramers_v(ts)
        vrows.append({"a": a, "b": b, "real_v": vr, "synthetic_v": vs, "v_gap": vs - vr})
        for x, y, t_r, t_s in ((a, b, tr, ts), (b, a, tr.T, ts.T)):
            idx = t_r.index.union(t_s.index)
            colv = t_r.columns.union(t_s.columns)
            t_r, t_s = t_r.reindex(index=idx, columns=colv, fill_value=0), t_s.reindex(index=idx, columns=colv,
                                                                                       fill_value=0)
            nr, ns = t_r.sum(axis=1), t_s.sum(axis=1)
            ok = (nr >= k) & (ns >= k)
            if not ok.any():
                continue
            pr, ps = t_r[ok].div(nr[ok], axis=0), t_s[ok].div(ns[ok], axis=0)
            gap = (ps - pr).stack()
            for (u, v), g in gap.items():
                grows.append({"given": f"{x} = {u}", "share_of": f"{y} = {v}", "real": pr.loc[u, v],
                              "synthetic": ps.loc[u, v], "gap": g, "real_count": int(t_r.loc[u, v]),
                              "real_n": int(nr[u]), "synthetic_n": int(ns[u])})
    vt, gt = pd.DataFrame(vrows), pd.DataFrame(grows)
    m = {}
    if len(gt):
        gt["beyond_noise"] = beyond_noise(gt["real"], gt["real_n"], gt["synthetic"], gt["synthetic_n"])
        gt = gt.sort_values(["beyond_noise", "gap"], ascending=False, key=lambda s: s.abs()).reset_index(drop=True)
        m["longitudinal.dependence.max_share_gap"] = float(gt["beyond_noise"].max())
    if len(vt) and vt["v_gap"].notna().any():
        vt = vt.reindex(vt["v_gap"].abs().sort_values(ascending=False).index).reset_index(drop=True)
        m["longitudinal.dependence.max_cramers_v_gap"] = float(vt["v_gap"].abs().max())
    return m, vt.head(TOP_LISTED), gt.head(TOP_LISTED)


def _columns(c: Cohort, top: np.ndarray, cats: pd.Index) -> sp.csr_matrix:
    """(visits, top codes + categories) multi-hot."""
    cat_of = code_categories(pd.Series(c.space.codes))
    j = cats.get_indexer(cat_of.fillna(""))
    rows, cols = np.flatnonzero(j >= 0), j[j >= 0]
    M = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(c.space.n_codes, len(cats)))
    C = (c.X @ M).tocsr()
    C.data[:] = 1.0
    return sp.hstack([c.X[:, top], C], format="csr")


def never_together(real: Cohort, synth: Cohort, k: int) -> tuple[dict, pd.DataFrame]:
    vis = np.asarray(real.X.sum(axis=0)).ravel()
    top = np.argsort(-vis, kind="stable")[:TOP_CODES]
    top = top[vis[top] > 0]
    cats = pd.Index(sorted(code_categories(pd.Series(real.space.codes)).dropna().unique()))
    names = list(real.space.codes[top]) + [f"category {c}" for c in cats]
    R, S = _columns(real, top, cats), _columns(synth, top, cats)
    if R.shape[1] < 2 or not real.n_visits or not synth.n_visits:
        return {}, pd.DataFrame()
    co = (R.T @ R).toarray()
    n = np.diag(co)
    expected = np.outer(n, n) / real.n_visits
    never = (co == 0) & (expected >= k)
    never &= np.triu(np.ones_like(never), 1).astype(bool)
    m = {"longitudinal.exclusive.n_pairs": float(never.sum())}
    if not never.any():
        m["longitudinal.exclusive.synthetic_share"] = 0.0
        return m, pd.DataFrame()
    sym = sp.csr_matrix(never | never.T, dtype=np.float32)
    hit = np.asarray((S @ sym).multiply(S).sum(axis=1)).ravel() > 0
    m["longitudinal.exclusive.synthetic_share"] = float(hit.mean())
    cs = (S.T @ S).toarray()
    a, b = np.nonzero(never)
    tab = pd.DataFrame({"pair": [f"{names[i]} + {names[j]}" for i, j in zip(a, b)],
                        "real_expected_if_independent": expected[a, b], "real_visits": 0,
                        "synthetic_visits": cs[a, b]})
    tab = tab[tab["synthetic_visits"] > 0].sort_values("synthetic_visits", ascending=False)
    return m, tab.head(TOP_LISTED).reset_index(drop=True)


def longitudinal(real: Cohort, synth: Cohort, families: list[dict] | None, k: int) -> dict:
    """All four checks: metrics, the tables the report lists, notes."""
    notes: list[str] = []
    m, pers = persistence(real, synth, k)
    om, ordt = ordinal(real, synth, families or [])
    if not families:
        notes.append("longitudinal: no ordinal code families declared (dataset config longitudinal.ordinal); "
                     "stage regressions not checked.")
    dm, vt, gt = dependence(real, synth, k)
    nm, nt = never_together(real, synth, k)
    m.update(om)
    m.update(dm)
    m.update(nm)
    return {"metrics": m, "notes": notes, "persistence": pers, "ordinal": ordt, "cramers_v": vt, "shares": gt,
            "never_together": nt}

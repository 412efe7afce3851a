"""Code-level fidelity: HALO's six probability families, record shape and label prevalences.

As HALO's ``evaluate_datasets.py`` (Theodorou et al., Nat Commun 2023): probabilities are computed on the real
training split and on the synthetic cohort, and compared with sklearn ``r2_score(real, synth)`` over the union of
keys (a key missing from one side counts 0). "Codes" are the ``codes`` table (clinical codes); event types, bins
and calendar tokens are compared as columns in ``values.py``.

===================  ==========================================================  ===========================
family               probability of key                                          denominator
===================  ==========================================================  ===========================
``code_record``      code c anywhere in the record                               patients
``code_visit``       code c in a visit                                           visits
``pair_record``      unordered pair {a, b} together in some visit of the record  patients
``pair_visit``       unordered pair {a, b} together in a visit                   visits
``seq_record``       c in visit t-1 and c' in visit t, for some t                patients
``seq_visit``        c in visit t-1 and c' in visit t                            visits - patients
===================  ==========================================================  ===========================

Per-visit pairs are sparse products (``X.T @ X`` upper triangle; ``X_prev.T @ X_cur``). Per-record pairs need
each (patient, pair) once, so the pairs are expanded with vectorised index arithmetic and deduplicated with one
``np.unique`` over int64 keys.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import r2_score

from .cohort import Cohort

FAMILIES = ("code_record", "code_visit", "pair_record", "pair_visit", "seq_record", "seq_visit")

Stats = dict[str, tuple[np.ndarray, np.ndarray]]   # family -> (sorted int64 keys, probabilities)


def _within_visit_pairs(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (row, a, b) with a < b both in row of a sorted-index CSR multi-hot."""
    lens = np.diff(X.indptr)
    nnz = X.indptr[-1]
    q = np.arange(nnz) - np.repeat(X.indptr[:-1], lens)          # position within the row
    n_after = np.repeat(lens, lens) - 1 - q                       # partners later in the row
    left = np.repeat(np.arange(nnz), n_after)
    starts = np.cumsum(n_after) - n_after
    right = left + (np.arange(len(left)) - np.repeat(starts, n_after) + 1)
    row = np.repeat(np.repeat(np.arange(X.shape[0]), lens), n_after)
    return row, X.indices[left].astype(np.int64), X.indices[right].astype(np.int64)


def _transitions(c: Cohort) -> np.ndarray:
    """Visit rows t whose previous row t-1 is the same patient's previous visit."""
    vp = c.visit_patient
    return np.flatnonzero(vp[1:] == vp[:-1]) + 1


def _sequential_pairs(X: sp.csr_matrix, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (transition, a, b): a in row t-1, b in row t, for each t in ``cur``."""
    s1, k1 = X.indptr[cur - 1], np.diff(X.indptr)[cur - 1]
    s2, k2 = X.indptr[cur], np.diff(X.indptr)[cur]
    n = k1 * k2
    t = np.repeat(np.arange(len(cur)), n)
    i = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    a = X.indices[s1[t] + i // k2[t]].astype(np.int64)
    b = X.indices[s2[t] + i % k2[t]].astype(np.int64)
    return t, a, b


def sorted_unique(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their counts by one sort (numpy 2's hash-based ``np.unique`` is far slower on
    millions of structured int64 keys)."""
    x = np.sort(x, kind="stable")
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]]) if len(x) else np.zeros(0, np.int64)
    return x[first], np.diff(np.r_[first, len(x)])


def _unique_per_record(patient: np.ndarray, key: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Count, for each key, the number of distinct patients having it."""
    u, _ = sorted_unique(patient.astype(np.int64) * n_keys + key)
    return sorted_unique(u % n_keys)


def _from_sparse(M: sp.spmatrix, C: int) -> tuple[np.ndarray, np.ndarray]:
    M = sp.coo_matrix(M)
    key = M.row.astype(np.int64) * C + M.col
    order = np.argsort(key, kind="stable")
    return key[order], M.data[order].astype(np.float64)


def code_statistics(c: Cohort) -> Stats:
    """HALO's six probability families of one cohort (keys index the shared code space; pairs are a*C+b)."""
    C = c.space.n_codes
    n_p, n_v = max(c.n_patients, 1), max(c.n_visits, 1)
    X = c.X
    out: Stats = {}
    rec = np.asarray(c.P.sum(axis=0), dtype=np.float64).ravel()
    vis = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    nz = np.flatnonzero(rec)
    out["code_record"] = (nz.astype(np.int64), rec[nz] / n_p)
    out["code_visit"] = (nz.astype(np.int64), vis[nz] / n_v)
    keys, cnt = _from_sparse(sp.triu((X.T @ X).tocsr(), k=1), C)
    out["pair_visit"] = (keys, cnt / n_v)
    row, a, b = _within_visit_pairs(X)
    keys, cnt = _unique_per_record(c.visit_patient[row], a * C + b, C * C)
    out["pair_record"] = (keys, cnt / n_p)
    cur = _transitions(c)
    keys, cnt = _from_sparse((X[cur - 1].T @ X[cur]).tocsr(), C)
    out["seq_visit"] = (keys, cnt / max(c.n_visits - c.n_patients, 1))
    t, a, b = _sequential_pairs(X, cur)
    keys, cnt = _unique_per_record(c.visit_patient[cur[t]], a * C + b, C * C)
    out["seq_record"] = (keys, cnt / n_p)
    return out


def align(real: tuple[np.ndarray, np.ndarray], synth: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both probability vectors over the union of keys, missing = 0."""
    keys, _ = sorted_unique(np.r_[real[0], synth[0]])
    r = np.zeros(len(keys))
    s = np.zeros(len(keys))
    r[np.searchsorted(keys, real[0])] = real[1]
    s[np.searchsorted(keys, synth[0])] = synth[1]
    return keys, r, s


def r2_pearson(r: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """sklearn R² (coefficient of determination, real as truth) and Pearson r; nan with fewer than 2 keys."""
    if len(r) < 2:
        return float("nan"), float("nan")
    r2 = float(r2_score(r, s))
    pr = float(np.corrcoef(r, s)[0, 1]) if r.std() > 0 and s.std() > 0 else float("nan")
    return r2, pr


def compare_codes(real: Stats, synth: Stats, prefix: str = "fidelity") -> dict[str, float]:
    m: dict[str, float] = {}
    for f in FAMILIES:
        keys, r, s = align(real[f], synth[f])
        m[f"{prefix}.{f}.r2"], m[f"{prefix}.{f}.pearson"] = r2_pearson(r, s)
        m[f"{prefix}.{f}.n_keys"] = float(len(keys))
    return m


def distribution(name: str, real: np.ndarray, synth: np.ndarray) -> dict[str, float]:
    """Mean, sd (ddof=0 as numpy), Wasserstein distance and KS statistic of two samples."""
    real, synth = np.asarray(real, float), np.asarray(synth, float)
    if not len(real) or not len(synth):
        return {}
    return {f"{name}.real_mean": float(real.mean()), f"{name}.synth_mean": float(synth.mean()),
            f"{name}.real_sd": float(real.std()), f"{name}.synth_sd": float(synth.std()),
            f"{name}.wasserstein": float(stats.wasserstein_distance(real, synth)),
            f"{name}.ks": float(stats.ks_2samp(real, synth).statistic)}


def label_prevalence(c: Cohort) -> pd.Series:
    """Share of patients carrying each ``<col>=<value>`` of the shared label space."""
    return pd.Series(np.asarray(c.L.sum(axis=0), dtype=np.float64).ravel() / max(c.n_patients, 1), index=c.space.labels)


def _boot_r2(R: sp.csr_matrix, S: sp.csr_matrix, rng: np.random.Generator) -> np.ndarray:
    """R² of column prevalences of two patient-level 0/1 matrices under patient resampling of both, reflected
    about the point estimate (basic bootstrap, capped at 1): resampling adds noise to both sides, so raw
    replicates sit below the estimate and a percentile interval would not contain it."""
    from .intervals import weights

    ones = lambda n: np.ones((1, n))  # noqa: E731
    wr = np.vstack([ones(R.shape[0]), weights(R.shape[0], rng)])
    ws = np.vstack([ones(S.shape[0]), weights(S.shape[0], rng)])
    pr = (R.T @ wr.T).T / max(R.shape[0], 1)                                   # (1 + B, columns)
    ps = (S.T @ ws.T).T / max(S.shape[0], 1)
    keep = (np.asarray(R.sum(axis=0)).ravel() + np.asarray(S.sum(axis=0)).ravel()) > 0   # the union of keys
    pr, ps = pr[:, keep], ps[:, keep]
    ss_tot = ((pr - pr.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - ((pr - ps) ** 2).sum(axis=1) / ss_tot
    return np.minimum(2 * r2[0] - r2[1:], 1.0)


def headline_intervals(real: Cohort, synth: Cohort, rng: np.random.Generator) -> dict[str, dict]:
    """95 % bootstrap intervals of the per-record code and label prevalence R² (patients of both cohorts
    resampled)."""
    from .intervals import interval

    who = f"{real.n_patients} real train + {synth.n_patients} synthetic patients"
    out = {"fidelity.code_record.r2": interval(_boot_r2(real.P, synth.P, rng), synth.n_patients, who)}
    if real.L.shape[1] >= 2:
        out["fidelity.labels.r2"] = interval(_boot_r2(real.L, synth.L, rng), synth.n_patients, who)
    return out


def fidelity(real: Cohort, synth: Cohort, real_stats: Stats | None = None, baseline: Cohort | None = None) -> dict:
    """All code-level fidelity metrics plus the tables the report draws; ``baseline`` (held-out real) gives the
    same R² families for real-vs-real as a ceiling."""
    real_stats = real_stats or code_statistics(real)
    synth_stats = code_statistics(synth)
    m = compare_codes(real_stats, synth_stats)
    if baseline is not None and baseline.n_patients:
        base = compare_codes(real_stats, code_statistics(baseline), prefix="fidelity.baseline")
        m.update({k: v for k, v in base.items() if not k.endswith("n_keys")})
    m.update(distribution("fidelity.visits_per_patient", real.n_visits_per_patient, synth.n_visits_per_patient))
    m.update(distribution("fidelity.codes_per_visit", np.diff(real.X.indptr), np.diff(synth.X.indptr)))
    lab = pd.DataFrame({"real": label_prevalence(real), "synth": label_prevalence(synth)})
    if len(lab) >= 2:
        m["fidelity.labels.r2"], m["fidelity.labels.pearson"] = r2_pearson(lab["real"].to_numpy(), lab["synth"].to_numpy())
    if len(lab):
        m["fidelity.labels.max_abs_diff"] = float((lab["real"] - lab["synth"]).abs().max())
    _, r, s = align(real_stats["code_record"], synth_stats["code_record"])
    return {"metrics": m, "labels": lab, "code_record": (r, s),
            "visits_per_patient": (real.n_visits_per_patient, synth.n_visits_per_patient),
            "codes_per_visit": (np.diff(real.X.indptr), np.diff(synth.X.indptr))}

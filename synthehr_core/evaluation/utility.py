"""Utility: train on synthetic, test on real (TSTR) against train on real, test on real (TRTR).

One binary task per label value (``<col>=<value>`` one-vs-rest; a two-valued column gives one task). Features
are the bag of codes (number of visits with each code). Logistic regression (sklearn, liblinear, C=1), trained on
up to ``utility_sample`` records of each training source, tested on up to ``utility_sample`` real test records;
AUROC with a percentile bootstrap interval over the test records. HALO (``evaluate_synthetic_training.py``)
uses a BiLSTM on 5,000 records; a linear model keeps this stage CPU-only and fast.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from ..randomness import numpy_rng
from .cohort import Cohort

N_BOOT = 200        # bootstrap resamples of the test set
CI = 0.95


def tasks(space_labels: pd.Index, columns: tuple[str, ...]) -> list[str]:
    out = []
    for c in columns:
        vals = [t for t in space_labels if t.startswith(c + "=")]
        out += vals[:1] if len(vals) == 2 else vals
    return out


def weighted_auc(y: np.ndarray, score: np.ndarray, W: np.ndarray) -> np.ndarray:
    """AUROC (ties count one half) for each row of record weights ``W`` (n_rows, n), vectorised."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])               # tie groups of equal scores
    Wo = W[:, order].astype(np.float64)
    pos = y[order] == 1
    Gp = np.add.reduceat(Wo * pos, starts, axis=1)
    Gn = np.add.reduceat(Wo * ~pos, starts, axis=1)
    below = np.cumsum(Gn, axis=1) - Gn
    with np.errstate(invalid="ignore", divide="ignore"):
        return (Gp * (below + 0.5 * Gn)).sum(axis=1) / (Gp.sum(axis=1) * Gn.sum(axis=1))


def _auc_ci(y: np.ndarray, score: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    auc = float(weighted_auc(y, score, np.ones((1, len(y))))[0])
    W = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=N_BOOT)   # bootstrap resample counts
    boots = weighted_auc(y, score, W)
    boots = boots[np.isfinite(boots)]
    lo, hi = np.quantile(boots, [(1 - CI) / 2, 1 - (1 - CI) / 2]) if len(boots) else (np.nan, np.nan)
    return auc, float(lo), float(hi)


def _fit_score(Xtr: sp.csr_matrix, ytr: np.ndarray, Xte: sp.csr_matrix) -> np.ndarray:
    clf = LogisticRegression(solver="liblinear", C=1.0, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(Xtr, ytr)
    return clf.decision_function(Xte)


def utility(train: Cohort, test: Cohort, synth: Cohort, utility_sample: int, seed: int) -> dict:
    rng = numpy_rng(seed, "utility")   # not the privacy stream
    m: dict[str, float] = {}
    notes: list[str] = []
    rows = []
    if not test.n_patients:
        notes.append("utility: no real test records; TSTR/TRTR skipped.")
        return {"metrics": m, "notes": notes, "table": pd.DataFrame()}

    def pick(c: Cohort) -> np.ndarray:
        return np.sort(rng.choice(c.n_patients, size=min(utility_sample, c.n_patients), replace=False))

    i_tr, i_sy, i_te = pick(train), pick(synth), pick(test)
    feats = {"real": (train.counts[i_tr], train.L[i_tr]), "synth": (synth.counts[i_sy], synth.L[i_sy])}
    X_te, L_te = test.counts[i_te], test.L[i_te]
    labels = train.space.labels
    for task in tasks(labels, train.space.label_columns):
        j = labels.get_loc(task)
        y_te = L_te[:, j].toarray().ravel()
        row = {"label": task, "test_prevalence": float(y_te.mean())}
        if y_te.min() == y_te.max():
            notes.append(f"utility.{task}: the real test sample has one class; skipped.")
            continue
        for src, (X, L) in feats.items():
            y = L[:, j].toarray().ravel()
            if y.min() == y.max():
                notes.append(f"utility.{task}: the {src} training sample has one class; {src} model skipped.")
                continue
            auc, lo, hi = _auc_ci(y_te, _fit_score(X, y, X_te), rng)
            key = "tstr" if src == "synth" else "trtr"
            m[f"utility.{task}.{key}_auroc"] = auc
            row.update({f"{key}_auroc": auc, f"{key}_lo": lo, f"{key}_hi": hi})
        rows.append(row)
    tab = pd.DataFrame(rows)
    for key in ("tstr", "trtr"):
        if f"{key}_auroc" in tab.columns and tab[f"{key}_auroc"].notna().any():
            m[f"utility.mean_{key}_auroc"] = float(tab[f"{key}_auroc"].mean())
    if "utility.mean_tstr_auroc" in m and "utility.mean_trtr_auroc" in m:
        both = tab.dropna(subset=["tstr_auroc", "trtr_auroc"])
        m["utility.mean_auroc_gap"] = float((both["trtr_auroc"] - both["tstr_auroc"]).mean())
    m["utility.n_train"], m["utility.n_test"] = float(len(i_sy)), float(len(i_te))
    return {"metrics": m, "notes": notes, "table": tab}

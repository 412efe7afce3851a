"""Utility: train on synthetic, test on real (TSTR) against train on real, test on real (TRTR).

One binary task per label value (``<col>=<value>`` one-vs-rest; a two-valued column gives one task). Features
are the bag of codes (number of visits with each code). Logistic regression (sklearn, liblinear, C=1), trained on
up to ``utility_sample`` records of each training source, tested on up to ``utility_sample`` real test records;
AUROC with a percentile bootstrap interval over the test records (one set of resamples shared by every task and
both sources, so the mean AUROCs and their gap get intervals too). HALO (``evaluate_synthetic_training.py``)
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
from .intervals import interval, weights



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


def roc_curve_points(y: np.ndarray, score: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    """(fpr, tpr, threshold) at up to ``max_points`` score thresholds, descending (KFP ``log_roc_curve``)."""
    t = np.unique(score)[::-1]
    if len(t) > max_points:
        t = t[np.linspace(0, len(t) - 1, max_points).round().astype(int)]
    pos, neg = max(int((y == 1).sum()), 1), max(int((y == 0).sum()), 1)
    above = score[None, :] >= t[:, None]
    return {"fpr": ((above & (y == 0)).sum(axis=1) / neg).tolist(),
            "tpr": ((above & (y == 1)).sum(axis=1) / pos).tolist(), "threshold": t.astype(float).tolist()}


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
    W = weights(len(i_te), rng)                           # bootstrap resamples of the test records, shared
    boots: dict[str, list[np.ndarray]] = {"tstr": [], "trtr": [], "gap": []}
    curves: dict[str, dict] = {}
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
        task_boots = {}
        for src, (X, L) in feats.items():
            y = L[:, j].toarray().ravel()
            if y.min() == y.max():
                notes.append(f"utility.{task}: the {src} training sample has one class; {src} model skipped.")
                continue
            score = _fit_score(X, y, X_te)
            auc = float(weighted_auc(y_te, score, np.ones((1, len(y_te))))[0])
            key = "tstr" if src == "synth" else "trtr"
            task_boots[key] = weighted_auc(y_te, score, W)
            ci = interval(task_boots[key], len(i_te))
            m[f"utility.{task}.{key}_auroc"] = auc
            row.update({f"{key}_auroc": auc, f"{key}_lo": ci["lo"], f"{key}_hi": ci["hi"]})
            if key == "tstr":
                curves[task] = roc_curve_points(y_te, score)
        for key, b in task_boots.items():
            boots[key].append(b)
        if len(task_boots) == 2:
            boots["gap"].append(task_boots["trtr"] - task_boots["tstr"])
        rows.append(row)
    tab = pd.DataFrame(rows)
    for key in ("tstr", "trtr"):
        if f"{key}_auroc" in tab.columns and tab[f"{key}_auroc"].notna().any():
            m[f"utility.mean_{key}_auroc"] = float(tab[f"{key}_auroc"].mean())
    if "utility.mean_tstr_auroc" in m and "utility.mean_trtr_auroc" in m:
        both = tab.dropna(subset=["tstr_auroc", "trtr_auroc"])
        m["utility.mean_auroc_gap"] = float((both["trtr_auroc"] - both["tstr_auroc"]).mean())
    m["utility.n_train"], m["utility.n_test"] = float(len(i_sy)), float(len(i_te))
    iv = {}
    for key, name in (("tstr", "utility.mean_tstr_auroc"), ("trtr", "utility.mean_trtr_auroc"),
                      ("gap", "utility.mean_auroc_gap")):
        if boots[key] and name in m:
            iv[name] = interval(np.nanmean(np.vstack(boots[key]), axis=0), len(i_te), f"{len(i_te)} real test")
    return {"metrics": m, "notes": notes, "table": tab, "intervals": iv, "roc": curves}

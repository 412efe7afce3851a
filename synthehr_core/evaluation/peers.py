"""Peers' metrics on a patient-level table, as optional sections: SDMetrics' Quality and Diagnostic reports and
anonymeter's singling-out, linkability and inference risks (with their 95 % intervals).

Neither package is a dependency. ``pip install "sdmetrics==0.32.0"`` works beside the core pins (it needs pandas
< 3); anonymeter 1.1.0 declares numpy < 1.27, which the core's numpy >= 2 excludes, but it runs on numpy 2.4 when
installed with ``pip install --no-deps anonymeter==1.1.0 numba==0.68.1 llvmlite==0.50.0 polars==1.33.1``
(docs/evaluation.md). Missing packages give a note, not an error.

The table has one row per patient: the label columns, the number of visits, the mean codes per visit, the
continuous patient variables and 0/1 columns for the ``TOP_CODES`` most frequent real codes (anywhere in the
record). Longitudinal order is not in it: that is what our own sections measure.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .cohort import Cohort

TOP_CODES = 10          # arbitrary; 0/1 code columns in the patient table
N_ATTACKS = 500         # anonymeter attacks per evaluator (capped by the control set size)


def patient_table(c: Cohort, top: np.ndarray, numeric: list[str]) -> pd.DataFrame:
    df = pd.DataFrame({col: c.patients[col].astype("string").fillna("<NA>").astype(object)
                       for col in c.space.label_columns})
    df["n_visits"] = c.n_visits_per_patient.astype(float)
    nv = np.maximum(c.n_visits_per_patient, 1)
    df["codes_per_visit"] = np.asarray(c.counts.sum(axis=1)).ravel() / nv
    for col in numeric:
        df[col] = pd.to_numeric(c.patients[col], errors="coerce").astype(float)
    P = c.P[:, top].toarray()
    for j, i in enumerate(top):
        df[f"has {c.space.codes[i]}"] = np.where(P[:, j] > 0, "1", "0").astype(object)
    return df


def _tables(train: Cohort, test: Cohort, synth: Cohort):
    rec = np.asarray(train.P.sum(axis=0)).ravel()
    top = np.argsort(-rec, kind="stable")[:TOP_CODES]
    numeric = [c for c in train.patients.columns if c in synth.patients.columns and c not in ("patient_id",)
               and pd.api.types.is_float_dtype(train.patients[c])
               and pd.to_numeric(synth.patients[c], errors="coerce").notna().any()]
    return [patient_table(x, top, numeric) for x in (train, test, synth)]


def sdmetrics_section(real: pd.DataFrame, synth: pd.DataFrame) -> dict:
    from sdmetrics.reports.single_table import DiagnosticReport, QualityReport

    meta = {"columns": {c: {"sdtype": "numerical" if pd.api.types.is_float_dtype(real[c]) else "categorical"}
                        for c in real.columns}}
    m = {}
    for name, cls in (("quality", QualityReport), ("diagnostic", DiagnosticReport)):
        rep = cls()
        rep.generate(real, synth, meta, verbose=False)
        m[f"peers.sdmetrics.{name}.score"] = float(rep.get_score())
        for r in rep.get_properties().itertuples(index=False):
            if np.isfinite(r[1]):
                m[f"peers.sdmetrics.{name}.{str(r[0]).lower().replace(' ', '_')}"] = float(r[1])
    return m


def anonymeter_section(real: pd.DataFrame, control: pd.DataFrame, synth: pd.DataFrame) -> tuple[dict, dict]:
    from anonymeter.evaluators import InferenceEvaluator, LinkabilityEvaluator, SinglingOutEvaluator

    n = int(min(N_ATTACKS, len(control)))
    cols = list(real.columns)
    half = len(cols) // 2
    m, iv = {}, {}
    evals = {"singling_out": (SinglingOutEvaluator(ori=real, syn=synth, control=control, n_attacks=n),
                              {"mode": "univariate"}),
             "linkability": (LinkabilityEvaluator(ori=real, syn=synth, control=control, n_attacks=n,
                                                  aux_cols=(cols[:half], cols[half:]), n_neighbors=10),
                             {"n_jobs": 1})}
    secret = cols[0]
    evals["inference"] = (InferenceEvaluator(ori=real, syn=synth, control=control, n_attacks=n,
                                             aux_cols=cols[1:], secret=secret), {"n_jobs": 1})
    for name, (ev, kw) in evals.items():
        ev.evaluate(**kw)
        risk = ev.risk()
        m[f"peers.anonymeter.{name}.risk"] = float(risk.value)
        iv[f"peers.anonymeter.{name}.risk"] = {"lo": float(risk.ci[0]), "hi": float(risk.ci[1]), "n": n,
                                               "n_text": f"{n} attacks"}
    return m, iv


def peers(train: Cohort, test: Cohort, synth: Cohort) -> dict:
    """``{"metrics", "intervals", "notes"}``; each package's section only when it is installed."""
    notes: list[str] = []
    m: dict[str, float] = {}
    iv: dict[str, dict] = {}
    if not test.n_patients:
        return {"metrics": m, "intervals": iv, "notes": ["peers: no held-out test records; skipped."]}
    real, control, syn = _tables(train, test, synth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            m.update(sdmetrics_section(real, syn))
        except ImportError:
            notes.append('peers: sdmetrics is not installed (pip install "sdmetrics==0.32.0"); section skipped.')
        try:
            am, ai = anonymeter_section(real, control, syn)
            m.update(am)
            iv.update(ai)
        except ImportError:
            notes.append("peers: anonymeter is not installed (pip install --no-deps anonymeter==1.1.0 numba==0.68.1 "
                         "llvmlite==0.50.0 polars==1.33.1); section skipped.")
    return {"metrics": m, "intervals": iv, "notes": notes}

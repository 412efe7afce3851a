"""Small cells: codes and label combinations that fewer than k real training patients hold.

A synthetic patient carrying such a cell repeats a fact about at most k-1 real people (docs/privacy.md: the
vocabulary and label priors are outside any DP guarantee). :func:`small_cells` finds them; :func:`suppress`
drops the rare codes from a synthetic cohort and the patients whose label combination is rare (the merge stage's
``small_cell_k`` option; the evaluate stage reports what is left). Codes or combinations absent from the real
training data are not small cells (they repeat nobody) and are kept.
"""
from __future__ import annotations

import pandas as pd

from .vocab import Vocab


def label_columns_of(vocab: Vocab | None, patients: pd.DataFrame) -> list[str]:
    """Label columns from the vocabulary's label tokens (``v`` or ``v_binned``) present in ``patients``."""
    if vocab is None:
        return []
    cols = []
    for t in vocab.tokens[vocab.label_slice]:
        col = t.variable if t.lo is None else f"{t.variable}_binned"
        if col in patients.columns and col not in cols:
            cols.append(col)
    return cols


def combination_keys(patients: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One string per patient: ``col=value|col=value`` over ``columns`` (nulls as ``<NA>``)."""
    if not columns:
        return pd.Series("", index=patients.index)
    parts = [c + "=" + patients[c].astype("string").fillna("<NA>") for c in columns]
    out = parts[0]
    for p in parts[1:]:
        out = out + "|" + p
    return out


def real_counts(train_patients: pd.DataFrame, train_codes: pd.DataFrame, columns: list[str]) -> tuple[pd.Series, pd.Series]:
    """Real training patients per code and per label combination."""
    codes = train_codes.loc[train_codes["patient_id"].isin(train_patients["patient_id"]), ["patient_id", "code"]]
    per_code = codes.drop_duplicates().groupby("code").size()
    per_combo = combination_keys(train_patients, columns).value_counts() if columns else pd.Series(dtype=int)
    return per_code, per_combo


def small_cells(real_code_counts: pd.Series, real_combo_counts: pd.Series, patients: pd.DataFrame,
                codes: pd.DataFrame, columns: list[str], k: int) -> dict:
    """Which synthetic codes / patients fall in cells with 1..k-1 real training patients."""
    rare_codes = real_code_counts[(real_code_counts > 0) & (real_code_counts < k)]
    hit = codes["code"].isin(rare_codes.index)
    rare_combos = real_combo_counts[(real_combo_counts > 0) & (real_combo_counts < k)]
    combo = combination_keys(patients, columns)
    bad_combo = combo.isin(rare_combos.index) if columns else pd.Series(False, index=patients.index)
    code_patients = set(codes.loc[hit, "patient_id"])
    patients_hit = patients["patient_id"].isin(code_patients) | bad_combo
    return {"codes": codes.loc[hit, ["patient_id", "code"]].drop_duplicates().groupby("code").size()
            .sort_values(ascending=False), "combos": combo[bad_combo].value_counts(),
            "rows_with_rare_code": hit.to_numpy(), "patients_with_rare_combo": bad_combo.to_numpy(),
            "n_patients": int(patients_hit.sum()), "n_rare_real_codes": len(rare_codes),
            "n_rare_real_combos": len(rare_combos)}


def suppress(patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame, real: tuple, vocab: Vocab | None,
             k: int) -> tuple[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], dict]:
    """Drop codes held by 1..k-1 real training patients and patients whose label combination is that rare.

    ``real`` = the real (patients, visits, codes) tables with a ``split`` column; counts use ``split == "train"``.
    Returns the suppressed tables and a report (what was dropped, counts only).
    """
    rp, _, rc = real
    train = rp[rp["split"] == "train"]
    cols = label_columns_of(vocab, patients)
    cc, combos = real_counts(train, rc, [c for c in cols if c in train.columns])
    cells = small_cells(cc, combos, patients, codes, cols, k)
    drop_p = set(patients.loc[cells["patients_with_rare_combo"], "patient_id"])
    codes = codes[~cells["rows_with_rare_code"]]
    keep = lambda t: t[~t["patient_id"].isin(drop_p)].reset_index(drop=True)  # noqa: E731
    report = {"k": int(k), "codes_suppressed": int(cells["rows_with_rare_code"].sum()),
              "distinct_codes_suppressed": int(len(cells["codes"])), "patients_dropped_rare_labels": len(drop_p)}
    return (keep(patients), keep(visits), keep(codes)), report

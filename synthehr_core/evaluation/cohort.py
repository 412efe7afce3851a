"""A cohort as the evaluation metrics see it: canonical tables plus sparse multi-hot encodings.

Real and synthetic cohorts share one code space (the sorted union of their code strings) and one label space
(the union of ``<column>=<value>`` strings over the label columns), so their matrices line up column by column.
Patients are sorted by ``patient_id``; visits by (patient row, ``visit_index``). Nothing here loops in Python
over patients, visits or codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.vocab import Vocab
from ..errors import SchemaError


@dataclass(frozen=True)
class Space:
    """Column spaces shared by every cohort of one evaluation."""
    codes: pd.Index          # code strings, sorted
    label_columns: tuple[str, ...]
    labels: pd.Index         # "<column>=<value>" strings, sorted

    @property
    def n_codes(self) -> int:
        return len(self.codes)


def label_columns(patients_real: pd.DataFrame, patients_synth: pd.DataFrame, vocab: Vocab | None) -> tuple[str, ...]:
    """Label columns: from vocab.json's ``label`` tokens when present, else the shared string patient columns.

    A categorical variable ``v`` is the column ``v``; a binned one (token with ``lo``) is ``v_binned``.
    """
    if vocab is not None and vocab.n_labels:
        cols = []
        for t in vocab.tokens[vocab.label_slice]:
            col = t.variable if t.lo is None else f"{t.variable}_binned"
            if col not in cols:
                cols.append(col)
    else:
        cols = [c for c in patients_real.columns
                if c not in ("patient_id", "split") and not pd.api.types.is_numeric_dtype(patients_real[c])]
    return tuple(c for c in cols if c in patients_real.columns and c in patients_synth.columns)


def label_strings(patients: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """One string column per label column, ``"<col>=<value>"`` (null where the value is null)."""
    out = {}
    for c in columns:
        v = patients[c].astype("string")
        out[c] = (c + "=" + v).where(v.notna(), None)
    return pd.DataFrame(out, index=patients.index)


def make_space(tables: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]], columns: tuple[str, ...]) -> Space:
    codes = pd.Index(sorted(set().union(*[set(c["code"].unique()) for _, _, c in tables])))
    labs: set[str] = set()
    for p, _, _ in tables:
        for c in columns:
            labs |= set(label_strings(p, (c,))[c].dropna().unique())
    return Space(codes, columns, pd.Index(sorted(labs)))


class Cohort:
    """Tables of one cohort (e.g. real train, real test, synthetic) with their sparse encodings."""

    def __init__(self, name: str, patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame, space: Space):
        self.name = name
        self.space = space
        self.patients = patients.sort_values("patient_id", kind="stable").reset_index(drop=True)
        pidx = pd.Index(self.patients["patient_id"])
        vp = pidx.get_indexer(visits["patient_id"])
        visits, vp = visits[vp >= 0], vp[vp >= 0]
        vi = visits["visit_index"].to_numpy(dtype=np.int64)
        order = np.lexsort((vi, vp))
        self.visits = visits.iloc[order].reset_index(drop=True)
        self.visit_patient = vp[order].astype(np.int64)                       # (n_visits,)
        stride = int(vi.max()) + 1 if len(vi) else 1
        vkey = self.visit_patient * stride + vi[order]                          # sorted
        cp = pidx.get_indexer(codes["patient_id"]).astype(np.int64)
        codes, cp = codes[cp >= 0], cp[cp >= 0]
        ckey = cp * stride + codes["visit_index"].to_numpy(np.int64)
        row = np.minimum(np.searchsorted(vkey, ckey), max(len(vkey) - 1, 0))
        bad = ~(vkey[row] == ckey) if len(vkey) else np.ones(len(ckey), bool)
        if bad.any():
            raise SchemaError(f"{name}: {int(bad.sum())} codes point at visits that do not exist, e.g. "
                              f"{codes.loc[bad, ['patient_id', 'visit_index']].head(3).to_dict('records')}. "
                              "Validate the tables with synthehr_core.data.schema.validate_tables.")
        col = space.codes.get_indexer(codes["code"])
        X = sp.csr_matrix((np.ones(len(row), np.float32), (row, col)), shape=(len(vkey), space.n_codes))
        X.sum_duplicates()
        X.data[:] = 1.0                                                         # a code twice in a visit counts once
        X.sort_indices()
        self.X = X                                                              # (n_visits, n_codes) multi-hot
        self.n_visits_per_patient = np.bincount(self.visit_patient, minlength=len(self.patients))
        first = np.r_[0, np.cumsum(self.n_visits_per_patient)[:-1]]
        self.visit_position = np.arange(len(vkey)) - first[self.visit_patient]  # 0, 1, ... within the patient

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    @property
    def n_visits(self) -> int:
        return self.X.shape[0]

    @cached_property
    def visit_to_patient(self) -> sp.csr_matrix:
        """(n_patients, n_visits) incidence matrix."""
        n = self.n_visits
        return sp.csr_matrix((np.ones(n, np.float32), (self.visit_patient, np.arange(n))), shape=(self.n_patients, n))

    @cached_property
    def P(self) -> sp.csr_matrix:
        """(n_patients, n_codes) patient-level multi-hot: code c anywhere in the record."""
        P = (self.visit_to_patient @ self.X).tocsr()
        P.data[:] = 1.0
        return P

    @cached_property
    def counts(self) -> sp.csr_matrix:
        """(n_patients, n_codes) bag of codes: number of visits with code c."""
        return (self.visit_to_patient @ self.X).tocsr()

    @cached_property
    def label_strings(self) -> pd.DataFrame:
        return label_strings(self.patients, self.space.label_columns)

    @cached_property
    def L(self) -> sp.csr_matrix:
        """(n_patients, n_label_values) one-hot label matrix over the shared label space."""
        rows, cols = [], []
        for c in self.space.label_columns:
            s = self.label_strings[c]
            ok = s.notna().to_numpy()
            rows.append(np.flatnonzero(ok))
            cols.append(self.space.labels.get_indexer(s[ok]))
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        k = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        return sp.csr_matrix((np.ones(len(r), np.float32), (r, k)), shape=(self.n_patients, len(self.space.labels)))

    def take(self, rows: np.ndarray, name: str | None = None) -> Cohort:
        """A sub-cohort of the given patient rows (sorted, so identities stay stable)."""
        rows = np.sort(np.asarray(rows))
        sub = Cohort.__new__(Cohort)
        sub.name = name or self.name
        sub.space = self.space
        sub.patients = self.patients.iloc[rows].reset_index(drop=True)
        remap = np.full(self.n_patients, -1, np.int64)
        remap[rows] = np.arange(len(rows))
        vmask = np.isin(self.visit_patient, rows)
        sub.visits = self.visits[vmask].reset_index(drop=True)
        sub.visit_patient = remap[self.visit_patient[vmask]]
        sub.X = self.X[vmask]
        sub.n_visits_per_patient = self.n_visits_per_patient[rows]
        sub.visit_position = self.visit_position[vmask]
        return sub

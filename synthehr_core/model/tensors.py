"""Canonical tables <-> HALO tensors.

``EHRParquetDataset`` turns a tables directory into per-patient token index lists (cheap to pickle, so a
``DataLoader`` with worker processes works); ``collate_halo`` expands a batch into the dense multi-hot layout of
docs/canonical-tables.md; ``decode_rows`` turns sampled rows back into canonical patients/visits/codes tables.

Which patient columns are labels and which visit columns are binned is read from the vocabulary (kind ``label``
/ ``bin`` with their ``variable``), never hard-coded, so every dataset config works unchanged.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .. import storage
from ..data.schema import SYNTHETIC_SPLIT, read_tables
from ..data.vocab import Vocab, VocabRoles, token_column, token_value, vocab_roles  # noqa: F401  (re-exported)
from ..errors import ConfigError, SchemaError
from ..randomness import numpy_rng

log = logging.getLogger(__name__)


def _lookup(vocab: Vocab, tokens: pd.Series) -> np.ndarray:
    return vocab.lookup(tokens)


# ---------------------------------------------------------------------------------------------- dataset
class EHRParquetDataset(Dataset):
    """One item per patient: ``(label_indices, [visit_0_indices, visit_1_indices, ...])``, each sorted.

    Args:
        tables_dir: a canonical tables directory (local or gs://) holding ``vocab.json``.
        split: keep only patients of this split (``"train"``, ``"val"``, ``"test"``); None keeps everyone.
        n_ctx: rows of the HALO tensor; patients with more than ``n_ctx - vocab.first_visit_row`` visits keep
            their first visits and are counted in ``n_truncated``.
        vocab: use this vocabulary instead of ``tables_dir/vocab.json`` (e.g. the training vocabulary when
            reading a test set). Tokens it lacks are dropped and counted in ``n_unknown_tokens``.
        tables: ``read_tables(tables_dir)`` already in hand (one read for the train and val datasets).
    """

    def __init__(self, tables_dir: str | Path, split: str | None = "train", n_ctx: int = 48,
                 vocab: Vocab | None = None, tables: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None = None):
        self.tables_dir = str(tables_dir)
        self.vocab = vocab if vocab is not None else Vocab.load(storage.join(self.tables_dir, "vocab.json"))
        self.n_ctx = int(n_ctx)
        max_visits = self.n_ctx - self.vocab.first_visit_row
        if max_visits < 1:
            raise ConfigError(f"n_ctx={n_ctx} leaves no row for visits (first visit row is "
                              f"{self.vocab.first_visit_row}); use n_ctx >= {self.vocab.first_visit_row + 1}.")
        patients, visits, codes = tables if tables is not None else read_tables(self.tables_dir)
        if split is not None:
            if split not in set(patients["split"].dropna()):
                raise ConfigError(f"{self.tables_dir}: no patient has split={split!r}; found splits "
                                  f"{sorted(patients['split'].dropna().unique())}. Pass one of them or split=None.")
            patients = patients[patients["split"] == split]
        roles = vocab_roles(self.vocab)
        self._check_columns(patients, visits, roles)

        patients = patients.sort_values("patient_id", kind="stable").reset_index(drop=True)
        pid_pos = pd.Series(np.arange(len(patients)), index=patients["patient_id"].to_numpy())
        visits = self._first_visits(visits[visits["patient_id"].isin(pid_pos.index)], max_visits)
        self._index_visits(visits, codes, roles)
        # patients -> visit rows; patients with no visit at all are dropped (nothing to learn a sequence from)
        nvis = np.bincount(pid_pos.loc[visits["patient_id"]].to_numpy(), minlength=len(patients))
        has = nvis > 0
        self.n_no_visits = int((~has).sum())
        if self.n_no_visits:
            log.warning("%s: %d patients have no visits and were left out.", self.tables_dir, self.n_no_visits)
        self._patient_ptr = np.concatenate([[0], np.cumsum(nvis[has])]).astype(np.int64)
        kept = patients[has].reset_index(drop=True)
        self.patient_ids = kept["patient_id"].astype(str).tolist()
        self._index_labels(kept, roles)
        log.info("%s: %d patients (split=%s), %d visits, %d visit tokens.", self.tables_dir, len(self),
                 split, len(visits), len(self._visit_tokens))

    def _first_visits(self, visits: pd.DataFrame, max_visits: int) -> pd.DataFrame:
        """Visits in (patient, visit_index) order, each patient's first ``max_visits`` only (the rest counted)."""
        visits = visits.sort_values(["patient_id", "visit_index"], kind="stable").reset_index(drop=True)
        rank = visits.groupby("patient_id", sort=False).cumcount().to_numpy()
        too_many = rank >= max_visits
        self.n_truncated = int(visits.loc[too_many, "patient_id"].nunique())
        self.n_truncated_visits = int(too_many.sum())
        if self.n_truncated:
            log.warning("%s: %d patients have more than %d visits (n_ctx=%d); kept their first %d visits, dropped %d.",
                        self.tables_dir, self.n_truncated, max_visits, self.n_ctx, max_visits, self.n_truncated_visits)
        return visits[~too_many].reset_index(drop=True)

    def _index_visits(self, visits: pd.DataFrame, codes: pd.DataFrame, roles: VocabRoles) -> None:
        """Each visit row's sorted, unique tokens: event type, visit bins, calendar columns, then codes."""
        vkey = pd.MultiIndex.from_frame(visits[["patient_id", "visit_index"]])
        parts_row, parts_tok = [], []
        vrow = np.arange(len(visits))
        unknown = 0
        cand = [visits["event_type"].astype("object").map(lambda s: f"evt:{s}" if isinstance(s, str) else None)]
        for var in roles.visit_bin:
            col = visits[f"{var}_binned"].astype("object")
            cand.append(col.map(lambda s, var=var: f"bin:{var}={s}" if isinstance(s, str) else None))
        for col_name, prefix in roles.visit_col:
            col = visits[col_name].astype("object")
            cand.append(col.map(lambda s, p=prefix: f"{p}{s}" if isinstance(s, str) else None))
        for series in cand:
            idx = _lookup(self.vocab, series)
            unknown += int(((idx < 0) & series.notna().to_numpy()).sum())
            parts_row.append(vrow[idx >= 0])
            parts_tok.append(idx[idx >= 0])
        ckey = pd.MultiIndex.from_frame(codes[["patient_id", "visit_index"]])
        crow = vkey.get_indexer(ckey)  # -1 for codes of dropped (other split / truncated) visits
        keep = crow >= 0
        cidx = _lookup(self.vocab, codes["code"].astype("object")[keep])
        unknown += int((cidx < 0).sum())
        parts_row.append(crow[keep][cidx >= 0])
        parts_tok.append(cidx[cidx >= 0])
        self.n_unknown_tokens = unknown
        if unknown:
            log.info("%s: %d visit tokens are not in the vocabulary and were dropped.", self.tables_dir, unknown)
        row = np.concatenate(parts_row)
        tok = np.concatenate(parts_tok)
        not_visit = tok >= self.vocab.n_visit_tokens
        if not_visit.any():
            raise SchemaError(f"{self.tables_dir}: codes table holds non-visit tokens, e.g. "
                              f"{self.vocab.tokens[int(tok[not_visit][0])].token!r}; codes must be visit tokens.")
        order = np.lexsort((tok, row))
        row, tok = row[order], tok[order]
        dup = np.zeros(len(row), dtype=bool)
        dup[1:] = (row[1:] == row[:-1]) & (tok[1:] == tok[:-1])
        row, tok = row[~dup], tok[~dup]
        self._visit_tokens = tok.astype(np.int32)
        self._visit_ptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(visits)))]).astype(np.int64)

    def _index_labels(self, kept: pd.DataFrame, roles: VocabRoles) -> None:
        """Each kept patient's sorted label tokens: categorical columns and patient-level bins."""
        lrow, ltok = [], []
        prow = np.arange(len(kept))
        for col in roles.label_cat:
            s = kept[col].astype("object").map(lambda v, c=col: f"label:{c}={v}" if pd.notna(v) else None)
            idx = _lookup(self.vocab, s)
            lrow.append(prow[idx >= 0]), ltok.append(idx[idx >= 0])
        for var in roles.label_bin:
            s = kept[f"{var}_binned"].astype("object").map(lambda v, c=var: f"label:{c}={v}" if pd.notna(v) else None)
            idx = _lookup(self.vocab, s)
            lrow.append(prow[idx >= 0]), ltok.append(idx[idx >= 0])
        lr = np.concatenate(lrow) if lrow else np.zeros(0, np.int64)
        lt = np.concatenate(ltok) if ltok else np.zeros(0, np.int64)
        order = np.lexsort((lt, lr))
        self._label_tokens = lt[order].astype(np.int32)
        self._label_ptr = np.concatenate([[0], np.cumsum(np.bincount(lr, minlength=len(kept)))]).astype(np.int64)

    def _check_columns(self, patients: pd.DataFrame, visits: pd.DataFrame, roles: VocabRoles) -> None:
        problems = []
        for col in roles.label_cat:
            if col not in patients.columns:
                problems.append(f"patients lacks label column {col!r}")
        for var in roles.label_bin:
            if f"{var}_binned" not in patients.columns:
                problems.append(f"patients lacks binned label column {var + '_binned'!r}")
        for var in roles.visit_bin:
            if f"{var}_binned" not in visits.columns:
                problems.append(f"visits lacks binned column {var + '_binned'!r}")
        for col, _ in roles.visit_col:
            if col not in visits.columns:
                problems.append(f"visits lacks calendar column {col!r}")
        if problems:
            raise SchemaError(f"{self.tables_dir}: the vocabulary names columns the tables do not have: "
                              + "; ".join(problems) + ". Use the vocab.json written with these tables.")

    def __len__(self) -> int:
        return len(self.patient_ids)

    def n_visits(self, i: int) -> int:
        return int(self._patient_ptr[i + 1] - self._patient_ptr[i])

    def __getitem__(self, i: int) -> tuple[list[int], list[list[int]]]:
        labels = self._label_tokens[self._label_ptr[i]:self._label_ptr[i + 1]].tolist()
        visits = [self._visit_tokens[self._visit_ptr[v]:self._visit_ptr[v + 1]].tolist()
                  for v in range(self._patient_ptr[i], self._patient_ptr[i + 1])]
        return labels, visits


# ---------------------------------------------------------------------------------------------- collate
def collate_halo(batch: list[tuple[list[int], list[list[int]]]], vocab: Vocab, n_ctx: int = 48, trim: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense HALO batch: ``X (B, n_ctx, V)`` float32 multi-hot and ``mask (B, n_ctx, 1)`` (before the shift).

    Row 0 = <start>; row 1 = labels (if ``vocab.label_row``); then one row per visit with <end> on the last
    visit's row; <pad> rows after. Mask is 1 on rows 1..last visit. Visits beyond the context are cut.
    ``trim=True`` keeps rows 0..the longest patient's last row only (``(B, T, V)``, T <= n_ctx): the rows cut are
    masked <pad> rows for everyone, so the model gives the same loss when told the nominal ``n_ctx``
    (``HALO.forward(..., n_ctx=)``) for a fraction of the work (a MIMIC-like patient has 1.3 visits, n_ctx 48).
    """
    B, V, fvr = len(batch), vocab.size, vocab.first_visit_row
    visits_of = [visits[:n_ctx - fvr] for _, visits in batch]
    lasts = [fvr + len(visits) - 1 for visits in visits_of]  # row of each patient's last visit (holds <end>)
    T = max(lasts) + 1 if trim and batch else n_ctx
    X = torch.zeros(B, T, V)
    mask = torch.zeros(B, T, 1)
    X[:, 0, vocab.start_index] = 1.0
    b_idx, r_idx, t_idx = [], [], []
    for b, ((labels, _), visits, last) in enumerate(zip(batch, visits_of, lasts)):
        rows = ([(1, labels)] if vocab.label_row else []) + [(fvr + v, toks) for v, toks in enumerate(visits)]
        for r, toks in rows:
            b_idx += [b] * len(toks)
            r_idx += [r] * len(toks)
            t_idx += list(toks)
        X[b, last, vocab.end_index] = 1.0
        X[b, last + 1:, vocab.pad_index] = 1.0
        mask[b, 1:last + 1] = 1.0
    if t_idx:
        X[torch.tensor(b_idx), torch.tensor(r_idx), torch.tensor(t_idx)] = 1.0
    return X, mask


class HaloCollate:
    """Picklable ``collate_fn`` for DataLoader(num_workers>0): ``DataLoader(ds, collate_fn=HaloCollate(vocab))``."""

    def __init__(self, vocab: Vocab, n_ctx: int = 48, trim: bool = False):
        self.vocab, self.n_ctx, self.trim = vocab, n_ctx, trim

    def __call__(self, batch):
        return collate_halo(batch, self.vocab, self.n_ctx, self.trim)


# ---------------------------------------------------------------------------------------------- decode
def _pick(cands: dict[str, list[str]], rng: np.random.Generator, counts: dict, key: str) -> dict[str, str]:
    """One value per column; where a row holds several, one drawn uniformly (counted under ``key``)."""
    out = {}
    for col, vals in cands.items():
        if len(vals) > 1:
            counts[key] += 1
            out[col] = vals[int(rng.integers(len(vals)))]
        else:
            out[col] = vals[0]
    return out


def _label_values(rows: list[list[int]], vocab: Vocab) -> dict[str, list[str]]:
    lab: dict[str, list[str]] = {}
    if vocab.label_row and rows:
        for t in sorted(rows[0]):
            tok = vocab.tokens[t]
            if tok.kind == "label":
                lab.setdefault(token_column(tok), []).append(token_value(tok))
    return lab


def _visit_rows(rows: list[list[int]], vocab: Vocab, counts: dict) -> list[list[int]]:
    """The visit tokens of each non-empty visit row up to and including the row holding <end>."""
    visits, ended = [], False
    for row in rows[vocab.first_visit_row - 1:]:
        vt = sorted(t for t in row if t < vocab.n_visit_tokens)
        if vt:
            visits.append(vt)
        else:
            counts["n_empty_rows_skipped"] += 1
        if vocab.end_index in row:
            ended = True
            break
    counts["n_no_end"] += int(not ended)
    return visits


def _frames(prow: list[dict], vrow: list[dict], crow: list[tuple], roles: VocabRoles
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Decoded rows -> canonical tables; continuous columns and ``start_offset_days`` stay null."""
    patients = pd.DataFrame(prow, columns=["patient_id", "split"]
                            + list(roles.label_cat) + [f"{v}_binned" for v in roles.label_bin])
    for var in roles.label_bin:
        patients[var] = np.nan
    visits = pd.DataFrame(vrow, columns=["patient_id", "visit_index", "event_type"]
                          + [f"{v}_binned" for v in roles.visit_bin] + sorted({c for c, _ in roles.visit_col}))
    visits.insert(2, "start_offset_days", np.nan)
    visits.insert(4, "start_day", np.nan)  # anchored later by time reconstruction
    for var in roles.visit_bin:
        visits[var] = np.nan
    visits["visit_index"] = visits["visit_index"].astype("int32")
    codes = pd.DataFrame(crow, columns=["patient_id", "visit_index", "code"])
    codes["visit_index"] = codes["visit_index"].astype("int32")
    for df in (patients, visits, codes):
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].astype("string")
    return patients, visits, codes


def decode_rows(patients_rows: list[list[list[int]]], vocab: Vocab, seed: int, start: int = 0
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Sampled rows -> canonical (patients, visits, codes) DataFrames and a dict of counts.

    ``patients_rows[n]`` lists the token indices of rows 1, 2, ... of patient n (row 0, <start>, excluded).
    As in the reference decoder: labels come from the label row; visits are read until the row holding <end>
    (kept), rows without visit tokens are skipped; ``evt:``/``bin:``/``cal:`` tokens become visit columns (when a
    row holds two of one variable, one drawn uniformly with a generator seeded by ``(seed, start)``, counted),
    and patients left with no visit are dropped and counted.
    Patient ids are ``syn-<seed>-<start + n>``. Continuous columns and ``start_offset_days`` stay null for the
    KDE stage to fill.
    """
    prow, vrow, crow = [], [], []
    counts = {"n_sampled": len(patients_rows), "n_dropped_no_visits": 0, "n_empty_rows_skipped": 0,
              "n_label_conflicts": 0, "n_visit_value_conflicts": 0, "n_no_end": 0}
    # A row may hold two tokens of one single-valued variable (two weekdays, two LOS bins): keep one drawn
    # uniformly, not the first in vocabulary order, which would bias the marginal toward early tokens.
    rng = numpy_rng(seed, "decode", start)
    for n, rows in enumerate(patients_rows):
        pid = f"syn-{seed}-{start + n}"
        labels = _pick(_label_values(rows, vocab), rng, counts, "n_label_conflicts")  # drawn even if dropped
        visits = _visit_rows(rows, vocab, counts)
        if not visits:
            counts["n_dropped_no_visits"] += 1
            continue
        prow.append({"patient_id": pid, "split": SYNTHETIC_SPLIT, **labels})
        for vi, vt in enumerate(visits):
            vals: dict[str, list[str]] = {}
            for t in vt:
                tok = vocab.tokens[t]
                col = token_column(tok)
                if col is not None:
                    vals.setdefault(col, []).append(token_value(tok))
                else:
                    crow.append((pid, vi, tok.token))
            vrow.append({"patient_id": pid, "visit_index": vi, "event_type": None,
                         **_pick(vals, rng, counts, "n_visit_value_conflicts")})
    patients, visits, codes = _frames(prow, vrow, crow, vocab_roles(vocab))
    counts["n_patients"] = len(patients)
    return patients, visits, codes, counts

"""ConSequence rules: mining on the training split, and a sparse violation checker (the format: ``ruleset.py``).

Mined families (KI:utils/find_rules.py; thresholds are parameters, defaults are the reference's):

* ``label_exclusion``   ``[1]: +label l  =>  code c = 0``      c never occurs in a patient carrying l
* ``prerequisite``      ``all: -pc       =>  code c = 0``      every visit with c has pc in an earlier visit
* ``persistence``       ``[-1]: +c       =>  code c = 1``      c in the previous visit => c now
* ``label_exclusivity`` ``[]: cur +l     =>  label l2 = 0``    one value of a label column excludes the others
* ``within_visit``      ``[]: cur +a     =>  code b = 1``      a always comes with b

Mining reads the **training split only** (the reference mined on all data, leaking the test set). Rules are closed
under the within-visit pairs: ``a => b`` together with a past-only rule forcing ``b = 0`` adds the same rule for
``a`` (the reference's "bonus" label exclusions), so overwriting in order (``model/consequence.py``) cannot
leave a violated rule behind. Everything here is numpy / pandas / scipy.sparse: the evaluate image has no torch.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import storage
from ..data.schema import read_tables
from ..data.vocab import Vocab, vocab_roles
from ..errors import ConfigError, SchemaError, bullet_list
from .ruleset import (ALL_FAMILIES, CATEGORY_FAMILY, FAMILIES, LONGITUDINAL_FAMILIES, RULES_FILE, STATIC_FAMILIES,
                      Rule, save_rules, validate_rules)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Thresholds:
    label_min_prevalence: int = 500        # KI:utils/find_rules.py (visits with the code)
    pair_min_prevalence: int = 10          # KI:utils/find_rules.py
    pair_min_lift: float = 1.0             # P(b | a) / P(b); 1.0 = off, as KI. Guards against a => (very common b)
    persistence_min_prevalence: int = 10   # KI:utils/find_rules.py
    persistence_min_repeats: int = 5       # KI:utils/find_rules.py (repeats must be strictly greater)
    prerequisite_min_prevalence: int = 10  # KI:utils/find_rules.py
    min_confidence: float = 1.0            # KI mines exceptionless rules only
    exclusion_min_expected: float = 5.0    # mutual / value exclusion: visits expected together if independent
    exclusion_min_cross: float = 1.5       # mutual exclusion: patients with both at other visits / that expectation
    ordinal_min_support: int = 5           # ordinal: visits with b after an earlier a (the forward direction)
    families: tuple[str, ...] = FAMILIES + LONGITUDINAL_FAMILIES   # which families to mine
    close_under_pairs: bool = True         # KI's "bonus" label exclusions, generalised; keeps overrides consistent

    @classmethod
    def make(cls, **kw: Any) -> Thresholds:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise ConfigError(f"unknown rule-mining thresholds {unknown}; known: {sorted(names)}.")
        if "families" in kw:
            kw["families"] = tuple(kw["families"])
        t = cls(**kw)
        problems = []
        for f in fields(cls):
            v = getattr(t, f.name)
            if f.name == "pair_min_lift":
                if not (isinstance(v, (int, float)) and v >= 0):
                    problems.append(f"pair_min_lift must be a number >= 0 (1.0 = off); got {v!r}.")
            elif f.name == "min_confidence":
                if not 0.0 < v <= 1.0:
                    problems.append(f"min_confidence must be in (0, 1]; got {v!r}.")
            elif f.name == "families":
                bad = [x for x in v if x not in ALL_FAMILIES]
                if bad:
                    problems.append(f"families has unknown names {bad}; choose from {list(ALL_FAMILIES)}.")
            elif f.name in ("exclusion_min_expected", "exclusion_min_cross"):
                if not (isinstance(v, (int, float)) and v > 0):
                    problems.append(f"{f.name} must be a number > 0; got {v!r}.")
            elif f.type == "int" and (not isinstance(v, int) or v < 0):
                problems.append(f"{f.name} must be an int >= 0; got {v!r}.")
        if problems:
            raise ConfigError("invalid rule-mining thresholds:\n" + bullet_list(problems))
        return t


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class _Rows:
    """Every (patient, HALO row) of a cohort as a sparse multi-hot matrix, sorted by (patient, row)."""
    X: sp.csr_matrix           # (N, V) int8
    patient: np.ndarray        # (N,) patient ordinal
    pos: np.ndarray            # (N,) HALO row index (1 = label row, first_visit_row + visit_index)
    patient_ids: np.ndarray    # (P,)
    is_visit: np.ndarray       # (N,) bool
    _csc: sp.csc_matrix | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def csc(self) -> sp.csc_matrix:
        if self._csc is None:
            self._csc = self.X.tocsc()
        return self._csc

    def rows_with(self, col: int) -> np.ndarray:
        c = self.csc
        return c.indices[c.indptr[col]:c.indptr[col + 1]]

    def cur(self, col: int) -> np.ndarray:
        key = ("cur", col)
        if key not in self._cache:
            out = np.zeros(len(self.pos), dtype=bool)
            out[self.rows_with(col)] = True
            self._cache[key] = out
        return self._cache[key]

    def past(self, spec: str | tuple[int, ...], col: int) -> np.ndarray:
        """Is ``col`` in the aggregated past of each row (``"all"`` earlier rows, offsets or absolute rows)?"""
        key = ("past", spec, col)
        if key in self._cache:
            return self._cache[key]
        r = self.rows_with(col)
        out = np.zeros(len(self.pos), dtype=bool)
        if spec == "all":
            first = np.full(len(self.patient_ids), np.iinfo(np.int64).max)
            np.minimum.at(first, self.patient[r], self.pos[r])
            out = first[self.patient] < self.pos
        elif spec and spec[0] < 0:  # relative offsets: mark the rows k after each row holding col
            key_all = self.patient * self._stride + self.pos
            for k in spec:
                target = self.patient[r] * self._stride + self.pos[r] - k
                i = np.searchsorted(key_all, target)
                i = np.minimum(i, len(key_all) - 1)
                out[i[key_all[i] == target]] = True
        else:  # absolute rows: the patient had col in row v, and this row comes after v
            for v in spec:
                has = np.zeros(len(self.patient_ids), dtype=bool)
                has[self.patient[r[self.pos[r] == v]]] = True
                out |= has[self.patient] & (self.pos > v)
        self._cache[key] = out
        return out

    @property
    def _stride(self) -> int:
        return int(self.pos.max(initial=0)) + 64

    def fired(self, past_visits, past_pos, past_neg, cur_pos, cur_neg) -> np.ndarray:
        """Rows where the antecedent holds (indices are vocabulary columns)."""
        ok = np.ones(len(self.pos), dtype=bool)
        for c in past_pos:
            ok &= self.past(past_visits, c)
        for c in past_neg:
            ok &= ~self.past(past_visits, c)
        for c in cur_pos:
            ok &= self.cur(c)
        for c in cur_neg:
            ok &= ~self.cur(c)
        return ok


def _token_series(prefix: str, values: pd.Series) -> pd.Series:
    return values.astype("object").map(lambda s: f"{prefix}{s}" if isinstance(s, str) else None)


def build_rows(patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame, vocab: Vocab) -> _Rows:
    """(patient, row) multi-hot CSR matrix of a cohort, with tokens as the HALO tensors hold them.

    Label row: ``label:<col>=<value>`` of every patient column whose tokens the vocabulary has (categorical and
    ``<var>_binned``). Visit rows: ``evt:<event_type>``, ``bin:<var>=<bin>`` of ``<var>_binned`` columns,
    ``<prefix><value>`` of calendar columns, and the codes. Tokens the vocabulary lacks are ignored.
    """
    patients = patients.sort_values("patient_id", kind="stable").reset_index(drop=True)
    pids = patients["patient_id"].astype(str).to_numpy()
    pid_pos = pd.Series(np.arange(len(pids)), index=pids)
    visits = visits[visits["patient_id"].astype(str).isin(pid_pos.index)]
    roles = vocab_roles(vocab)
    label_vars = {**{v: False for v in roles.label_cat}, **{v: True for v in roles.label_bin}}
    bin_vars, col_vars = roles.visit_bin, dict(roles.visit_col)

    ent_p, ent_pos, ent_tok = [], [], []

    def add(p: np.ndarray, pos: np.ndarray, toks: pd.Series) -> None:
        idx = vocab.lookup(toks)
        keep = idx >= 0
        ent_p.append(p[keep]), ent_pos.append(pos[keep]), ent_tok.append(idx[keep])

    n_rows_p, n_rows_pos = [], []
    if vocab.label_row:
        pp = np.arange(len(pids))
        n_rows_p.append(pp), n_rows_pos.append(np.ones(len(pp), dtype=np.int64))
        for var, binned in label_vars.items():
            col = f"{var}_binned" if binned else var
            if col in patients.columns:
                add(pp, np.ones(len(pp), dtype=np.int64), _token_series(f"label:{var}=", patients[col]))
    vp = pid_pos.loc[visits["patient_id"].astype(str)].to_numpy()
    vpos = visits["visit_index"].to_numpy(dtype=np.int64) + vocab.first_visit_row
    n_rows_p.append(vp), n_rows_pos.append(vpos)
    add(vp, vpos, _token_series("evt:", visits["event_type"]))
    for var in bin_vars:
        if f"{var}_binned" in visits.columns:
            add(vp, vpos, _token_series(f"bin:{var}=", visits[f"{var}_binned"]))
    for col, prefix in col_vars.items():
        if col in visits.columns:
            add(vp, vpos, _token_series(prefix, visits[col]))
    codes = codes[codes["patient_id"].astype(str).isin(pid_pos.index)]
    add(pid_pos.loc[codes["patient_id"].astype(str)].to_numpy(),
        codes["visit_index"].to_numpy(dtype=np.int64) + vocab.first_visit_row, codes["code"])

    row_p = np.concatenate(n_rows_p)
    row_pos = np.concatenate(n_rows_pos)
    order = np.lexsort((row_pos, row_p))
    row_p, row_pos = row_p[order], row_pos[order]
    stride = int(row_pos.max(initial=0)) + 64
    row_key = row_p * stride + row_pos
    if len(row_key) > 1 and (np.diff(row_key) == 0).any():
        raise SchemaError("visits has duplicate (patient_id, visit_index) pairs; fix the tables first.")
    ep, epos, etok = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (ent_p, ent_pos, ent_tok))
    ekey = ep * stride + epos
    r = np.searchsorted(row_key, ekey)
    r = np.minimum(r, max(len(row_key) - 1, 0))
    keep = (row_key[r] == ekey) if len(row_key) else np.zeros(len(ekey), bool)  # codes of unknown visits drop
    X = sp.csr_matrix((np.ones(int(keep.sum()), dtype=np.int8), (r[keep], etok[keep])),
                      shape=(len(row_key), vocab.size))
    X.sum_duplicates()
    X.data[:] = 1
    return _Rows(X=X, patient=row_p, pos=row_pos, patient_ids=pids, is_visit=row_pos >= vocab.first_visit_row)


# ---------------------------------------------------------------------------------------------- checking
def _indexed(rule: Rule, vocab: Vocab) -> tuple:
    ix = lambda toks: tuple(vocab.index(t) for t in toks)
    return (rule.past_visits, ix(rule.past_pos), ix(rule.past_neg), ix(rule.cur_pos), ix(rule.cur_neg))


def _rule_outcomes(rules: list[Rule], rows: _Rows, vocab: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per rule: rows fired and rows violated; and per patient whether any rule is violated.

    Rules sharing an antecedent (e.g. every exclusion of one label) are evaluated together: the antecedent once,
    then the output columns as one sparse slice of the fired rows.
    """
    n_fired = np.zeros(len(rules), dtype=np.int64)
    n_viol = np.zeros(len(rules), dtype=np.int64)
    bad_patient = np.zeros(len(rows.patient_ids), dtype=bool)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rules):
        groups.setdefault(_indexed(r, vocab), []).append(i)
    for ante, members in groups.items():
        fired = np.flatnonzero(rows.fired(*ante))
        if not len(fired):
            continue
        outs = np.array([vocab.index(rules[i].output) for i in members])
        vals = np.array([rules[i].value for i in members])
        sub = rows.X[fired][:, outs]  # (n_fired, n_members) sparse
        ones = np.asarray(sub.sum(axis=0)).ravel()
        n_fired[members] = len(fired)
        n_viol[members] = np.where(vals == 1, len(fired) - ones, ones)
        if n_viol[members].any():
            z = sub[:, vals == 0]
            o = sub[:, vals == 1]
            row_bad = np.asarray(z.sum(axis=1)).ravel() > 0
            row_bad |= np.asarray(o.sum(axis=1)).ravel() < o.shape[1]
            bad_patient[rows.patient[fired[row_bad]]] = True
    return n_fired, n_viol, bad_patient


def check_violations(rules: list[Rule], patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame,
                     vocab: Vocab) -> dict:
    """Count rule violations in a cohort (real or synthetic), as ConSequence's metrics (KI:evaluate_rule*.py).

    A violation is one (patient, row, rule) where the antecedent held and ``output != value``. Returns totals,
    counts per family, static vs temporal totals, and ``percent_valid``: the share of patients with none.
    """
    validate_rules(rules, vocab)
    rows = build_rows(patients, visits, codes, vocab)
    n_fired, n_viol, bad = _rule_outcomes(rules, rows, vocab)
    fam = np.array([r.family for r in rules], dtype=object)
    by_family = {f: int(n_viol[fam == f].sum()) for f in dict.fromkeys([*FAMILIES, *fam.tolist()])}
    fired_family = {f: int(n_fired[fam == f].sum()) for f in by_family}
    static = np.isin(fam, STATIC_FAMILIES)
    worst = np.argsort(-n_viol, kind="stable")[:10]
    n_p = len(rows.patient_ids)
    return {
        "n_rules": len(rules), "n_patients": n_p, "n_rows": int(rows.X.shape[0]),
        "total_violations": int(n_viol.sum()),
        "violations_by_family": by_family, "fired_by_family": fired_family,
        "static_violations": int(n_viol[static].sum()), "temporal_violations": int(n_viol[~static].sum()),
        "n_patients_valid": int(n_p - bad.sum()),
        "percent_valid": float(100.0 * (n_p - bad.sum()) / n_p) if n_p else 100.0,
        "rules_violated": int((n_viol > 0).sum()),
        "top_violated": [{"rule": int(i), "family": rules[i].family, "output": rules[i].output,
                          "violations": int(n_viol[i])} for i in worst if n_viol[i] > 0],
    }


# ---------------------------------------------------------------------------------------------- mining
def _stat_rules(specs: list[tuple], rows: _Rows, vocab: Vocab, th: Thresholds) -> list[Rule]:
    """Turn candidate (family, past_visits, past_pos, past_neg, cur_pos, cur_neg, output, value, origin) tuples
    into rules with support and confidence measured on ``rows``; drop those below ``min_confidence``."""
    tok = lambda ids: tuple(vocab.tokens[i].token for i in ids)
    cands = [Rule(f, pv, tok(pp), tok(pn), tok(cp), tok(cn), vocab.tokens[o].token, v, origin=og)
             for (f, pv, pp, pn, cp, cn, o, v, og) in specs]
    if not cands:
        return []
    n_fired, n_viol, _ = _rule_outcomes(cands, rows, vocab)
    out = []
    for r, nf, nv in zip(cands, n_fired, n_viol):
        conf = 1.0 - nv / nf if nf else 1.0
        if conf + 1e-12 >= th.min_confidence:
            out.append(Rule(**{**asdict(r), "support": int(nf), "confidence": round(float(conf), 6)}))
    return out


def mine_rules(patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame, vocab: Vocab,
               thresholds: Thresholds | None = None, split: str | None = "train", val_split: str | None = None
               ) -> list[Rule]:
    """Mine ConSequence rules from the ``split`` patients (the training split; None = everyone).

    Counts are visits (prevalence = visits holding the code), as in KI. Only clinical codes (kind ``code``
    without a variable: not ``evt:``/``cal:``) are mined as antecedents and outputs of code rules.
    ``val_split``: keep only the rules that also hold on those patients (confidence >= ``min_confidence`` where
    they fire there; a rule that never fires on val is kept).
    """
    th = thresholds or Thresholds()
    everyone = patients
    if split is not None:
        if split not in set(patients["split"].dropna()):
            raise ConfigError(f"no patient has split={split!r}; found {sorted(patients['split'].dropna().unique())}. "
                              "Mine on the training split of the preprocess output.")
        patients = patients[patients["split"] == split]
    rows = build_rows(patients, visits, codes, vocab)
    cand = np.array([i for i, t in enumerate(vocab.tokens) if t.kind == "code" and t.variable is None], dtype=np.int64)
    Rv = rows.X[rows.is_visit][:, cand].astype(np.int64).tocsc()  # (n_visits, n_cand)
    prev = np.asarray(Rv.sum(axis=0)).ravel()
    slack = lambda n: (1.0 - th.min_confidence) * n + 1e-9
    specs: dict[str, list[tuple]] = {f: [] for f in FAMILIES + LONGITUDINAL_FAMILIES}
    categories = _category_tokens(vocab)
    if categories and (th.families == Thresholds().families or CATEGORY_FAMILY in th.families):   # on by default when declared
        specs[CATEGORY_FAMILY] = _category_exclusions(rows, vocab, categories, cand, Rv, slack)

    if "label_exclusion" in th.families and vocab.n_labels and vocab.label_row:
        lab = rows.X[~rows.is_visit][:, vocab.label_slice]               # (P, n_labels), patients in order
        lab_of_visit = lab[rows.patient[rows.is_visit]].astype(np.int64)  # (n_visits, n_labels)
        n_l = np.asarray(lab_of_visit.sum(axis=0)).ravel()
        LC = (lab_of_visit.T @ Rv).toarray()                              # (n_labels, n_cand) visits with both
        for li, ci in zip(*np.nonzero((LC <= slack(n_l)[:, None]) & (n_l[:, None] > 0)
                                      & (prev[None, :] >= max(th.label_min_prevalence, 1)))):
            specs["label_exclusion"].append(("label_exclusion", (1,), (vocab.n_visit_tokens + li,), (), (), (),
                                             cand[ci], 0, "mined"))

    if "within_visit" in th.families:
        co = (Rv.T @ Rv).tocoo()                                          # (n_cand, n_cand) co-occurring visits
        a, b, n = co.row, co.col, co.data
        n_vis = max(Rv.shape[0], 1)
        lift = (n / np.maximum(prev[a], 1)) / np.maximum(prev[b] / n_vis, 1e-12)
        ok = (a != b) & (prev[a] >= max(th.pair_min_prevalence, 1)) & (prev[a] - n <= slack(prev[a])) \
            & (lift >= th.pair_min_lift - 1e-12)
        for ai, bi in sorted(zip(a[ok], b[ok])):
            specs["within_visit"].append(("within_visit", (), (), (), (cand[ai],), (), cand[bi], 1, "mined"))

    if "persistence" in th.families:
        has_prev = np.zeros(len(rows.pos), dtype=bool)
        same = (rows.patient[1:] == rows.patient[:-1]) & (rows.pos[1:] == rows.pos[:-1] + 1)
        has_prev[1:] = same & rows.is_visit[:-1] & rows.is_visit[1:]
        cur_i = np.flatnonzero(has_prev)
        Rc = rows.X[cur_i][:, cand]
        Rp = rows.X[cur_i - 1][:, cand]
        repeats = np.asarray(Rc.multiply(Rp).sum(axis=0)).ravel()
        fired = np.asarray(Rp.sum(axis=0)).ravel()
        ok = (prev >= th.persistence_min_prevalence) & (repeats > th.persistence_min_repeats) \
            & (fired - repeats <= slack(fired)) & (fired > 0)
        for ci in np.flatnonzero(ok):
            specs["persistence"].append(("persistence", (-1,), (cand[ci],), (), (), (), cand[ci], 1, "mined"))

    if "prerequisite" in th.families:
        past = _past_all(rows, cand)                                      # (n_visits, n_cand): in an earlier visit
        A = (Rv.T @ past).tocoo()                                         # A[c, pc]: visits with c after pc
        c, pc, n = A.row, A.col, A.data
        ok = (c != pc) & (prev[c] >= max(th.prerequisite_min_prevalence, 1)) & (prev[c] - n <= slack(prev[c]))
        for ci, pi in sorted(zip(c[ok], pc[ok])):
            specs["prerequisite"].append(("prerequisite", "all", (), (cand[pi],), (), (), cand[ci], 0, "mined"))

    if {"mutual_exclusion", "ordinal"} & set(th.families):
        excl = _exclusive_pairs(Rv, prev, rows.patient[rows.is_visit], th)  # (a, b) column pairs, a < b
        if "ordinal" in th.families and len(excl):
            A = (Rv.T @ _past_all(rows, cand)).tocsr()                    # A[c, pc]: visits with c after pc
            fwd = np.asarray(A[excl[:, 1], excl[:, 0]]).ravel()           # b after a
            bwd = np.asarray(A[excl[:, 0], excl[:, 1]]).ravel()           # a after b
            order: set[tuple[int, int]] = set()
            for (ai, bi), f, b in zip(excl, fwd, bwd):
                lo, hi = (ai, bi) if f >= b else (bi, ai)                 # the direction seen: lo -> hi
                if max(f, b) >= max(th.ordinal_min_support, 1) and min(f, b) <= slack(max(f, b)):
                    order.add((int(lo), int(hi)))
            chains = _transitive(order)                                   # stage 1 -> 3 from 1 -> 2 -> 3
            excl = np.array(sorted({tuple(x) for x in excl.tolist()} | {(min(a, b), max(a, b)) for a, b in chains}),
                            dtype=np.int64).reshape(-1, 2)
            for lo, hi in sorted(chains):                                 # checked on train by _stat_rules
                specs["ordinal"].append(("ordinal", "all", (cand[hi],), (), (), (), cand[lo], 0,
                                         "mined" if (lo, hi) in order else "closure"))
        if "mutual_exclusion" in th.families:
            for ai, bi in excl:
                for x, y in ((ai, bi), (bi, ai)):
                    specs["mutual_exclusion"].append(("mutual_exclusion", (), (), (), (cand[x],), (), cand[y], 0,
                                                      "mined"))

    if "value_exclusion" in th.families:
        specs["value_exclusion"] = _value_exclusions(rows, vocab, th.exclusion_min_expected, slack)

    if "label_exclusivity" in th.families and vocab.label_row:
        by_var: dict[str, list[int]] = {}
        for i in range(vocab.label_slice.start, vocab.label_slice.stop):
            by_var.setdefault(vocab.tokens[i].variable, []).append(i)
        for ids in by_var.values():
            for l1 in ids:
                for l2 in ids:
                    if l1 != l2:
                        specs["label_exclusivity"].append(("label_exclusivity", (), (), (), (l1,), (), l2, 0, "static"))

    if th.close_under_pairs and specs["within_visit"]:
        _close(specs)
    _order_pairs(specs["within_visit"])
    rules: list[Rule] = []
    for f in ALL_FAMILIES:
        rules += _stat_rules(specs[f], rows, vocab, th) if f in specs else []
    if val_split is not None:
        rules = hold_on(rules, everyone[everyone["split"] == val_split], visits, codes, vocab, th.min_confidence)
    log.info("mined %d rules from %d patients: %s", len(rules), len(rows.patient_ids), _by_family(rules))
    return rules


def hold_on(rules: list[Rule], patients: pd.DataFrame, visits: pd.DataFrame, codes: pd.DataFrame, vocab: Vocab,
            min_confidence: float = 1.0) -> list[Rule]:
    """The rules whose confidence on this cohort (e.g. the validation split) is at least ``min_confidence``."""
    if not rules or not len(patients):
        return list(rules)
    n_fired, n_viol, _ = _rule_outcomes(rules, build_rows(patients, visits, codes, vocab), vocab)
    conf = 1.0 - n_viol / np.maximum(n_fired, 1)
    kept = [r for r, c in zip(rules, conf) if c + 1e-12 >= min_confidence]
    if len(kept) < len(rules):
        log.info("%d of %d mined rules do not hold on the %d held-out patients and were dropped", len(rules) - len(kept),
                 len(rules), len(patients))
    return kept


def _by_family(rules: list[Rule]) -> dict[str, int]:
    """Rules per family; the category family only where it was mined (outputs of datasets without it unchanged)."""
    fams = [*FAMILIES, *([CATEGORY_FAMILY] if any(r.family == CATEGORY_FAMILY for r in rules) else []),
            *[f for f in LONGITUDINAL_FAMILIES if any(r.family == f for r in rules)]]
    return {f: sum(r.family == f for r in rules) for f in fams}


def _category_tokens(vocab: Vocab) -> list[int]:
    return [i for i, t in enumerate(vocab.tokens) if t.kind == "code" and t.variable is not None
            and t.token.startswith("cat:")]


def _category_exclusions(rows: _Rows, vocab: Vocab, categories: list[int], cand: np.ndarray, Rv, slack) -> list[tuple]:
    """``cur +k => c = 0`` for each visit category token k and clinical code c that (almost) no real visit of
    category k holds (``min_confidence``). No prevalence floor: the point is to exclude every code of another
    code system, rare ones included."""
    K = rows.X[rows.is_visit][:, categories].astype(np.int64).tocsc()   # (n_visits, n_categories)
    n_k = np.asarray(K.sum(axis=0)).ravel()
    both = (K.T @ Rv).toarray()                                          # (n_categories, n_cand) visits with both
    seen = np.asarray(Rv.sum(axis=0)).ravel() > 0
    out = []
    for ki, ci in zip(*np.nonzero((both <= slack(n_k)[:, None]) & (n_k[:, None] > 0) & seen[None, :])):
        out.append((CATEGORY_FAMILY, (), (), (), (categories[ki],), (), cand[ci], 0, "mined"))
    return out


def _transitive(pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The transitive closure of an order given as (earlier, later) pairs."""
    out = set(pairs)
    while True:
        more = {(a, d) for a, b in out for c, d in out if b == c and a != d} - out
        if not more:
            return out
        out |= more


def _exclusive_pairs(Rv: sp.csc_matrix, prev: np.ndarray, patient: np.ndarray, th: Thresholds) -> np.ndarray:
    """``(k, 2)`` candidate-column pairs (a < b) that share no visit although independence would put at least
    ``exclusion_min_expected`` visits together, and that the same patients do hold at different visits at least
    ``exclusion_min_cross`` times as often as independence predicts for one visit (the signature of stages of
    one disease; codes that merely never meet by chance meet across visits less often than within one)."""
    n_vis = max(Rv.shape[0], 1)
    common = np.flatnonzero(prev * prev.max(initial=0) / n_vis >= th.exclusion_min_expected)
    if len(common) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    sub = Rv[:, common]
    co = (sub.T @ sub).toarray()                                          # (k, k) visits with both
    expected = np.outer(prev[common], prev[common]) / n_vis
    pv = sp.csr_matrix((np.ones(len(patient)), (patient, np.arange(len(patient)))),
                       shape=(int(patient.max(initial=-1)) + 1, len(patient)))
    Pm = (pv @ sub).tocsc()
    Pm.data[:] = 1.0
    cross = (Pm.T @ Pm).toarray()                                         # patients with both (here: other visits)
    ok = (co == 0) & (expected >= th.exclusion_min_expected) & (cross >= th.exclusion_min_cross * expected)
    a, b = np.nonzero(np.triu(ok, k=1))
    return np.stack([common[a], common[b]], axis=1).astype(np.int64)


def _value_exclusions(rows: _Rows, vocab: Vocab, min_expected: float, slack) -> list[tuple]:
    """``cur +u => w = 0`` for values u, w of two different single-valued visit variables (event type, bins,
    calendar kinds) that (almost) never share a visit although independence would put ``min_expected`` together."""
    from ..data.vocab import token_groups

    groups = [g for g in token_groups(vocab) if g.row == "visit"]
    cols = np.array([i for g in groups for i in range(g.start, g.stop)], dtype=np.int64)
    if len(groups) < 2:
        return []
    var = np.array([g.variable for g in groups for _ in range(g.start, g.stop)], dtype=object)
    M = rows.X[rows.is_visit][:, cols].astype(np.int64).tocsc()
    n_vis = max(M.shape[0], 1)
    n = np.asarray(M.sum(axis=0)).ravel()
    co = (M.T @ M).toarray()
    expected = np.outer(n, n) / n_vis
    out = []
    for i, j in zip(*np.nonzero((co <= slack(n)[:, None]) & (expected >= min_expected) & (var[:, None] != var[None, :]))):
        out.append(("value_exclusion", (), (), (), (int(cols[i]),), (), int(cols[j]), 0, "mined"))
    return out


def _past_all(rows: _Rows, cand: np.ndarray) -> sp.csr_matrix:
    """``(n_visit_rows, n_cand)``: candidate code c appeared in an earlier visit row of the same patient."""
    vis = np.flatnonzero(rows.is_visit)
    coo = rows.X[vis][:, cand].tocoo()
    first = pd.DataFrame({"p": rows.patient[vis][coo.row], "c": coo.col, "pos": rows.pos[vis][coo.row]})
    first = first.groupby(["p", "c"], sort=False)["pos"].min().reset_index()
    vrows = pd.DataFrame({"p": rows.patient[vis], "r": np.arange(len(vis)), "rpos": rows.pos[vis]})
    m = vrows.merge(first, on="p")
    m = m[m["pos"] < m["rpos"]]
    return sp.csr_matrix((np.ones(len(m), dtype=np.int64), (m["r"].to_numpy(), m["c"].to_numpy())),
                         shape=(len(vis), len(cand)))


def _order_pairs(pairs: list[tuple]) -> None:
    """Sort pair rules so ``a => b`` comes before any rule that reads ``b`` (by depth of the antecedent in the
    implication graph; cycles are capped), so one in-order pass of overrides is already consistent."""
    level: dict[int, int] = {}
    cap = 64
    for _ in range(cap):
        changed = False
        for s in pairs:
            a, b = s[4][0], s[6]
            lb = min(level.get(a, 0) + 1, cap)
            if lb > level.get(b, 0):
                level[b], changed = lb, True
        if not changed:
            break
    pairs.sort(key=lambda s: (level.get(s[4][0], 0), s[4][0], s[6]))


def _close(specs: dict[str, list[tuple]]) -> None:
    """Add ``antecedent => a = 0`` for every past-only rule ``antecedent => b = 0`` and pair ``a => b``.

    Without it, a sampled ``a`` re-creates ``b`` after ``b`` was excluded and one of the two rules ends violated.
    Iterated to a fixed point, so chains of pairs are covered too.
    """
    implies: dict[int, set[int]] = {}
    for s in specs["within_visit"]:
        implies.setdefault(s[6], set()).add(s[4][0])  # b -> {a : a => b}
    cats = specs.get(CATEGORY_FAMILY, [])                 # k => b = 0 and a => b: k => a = 0 too
    seen_cat, todo = {(s[4], s[6]) for s in cats}, list(cats)
    while todo:
        s = todo.pop()
        for a in sorted(implies.get(s[6], ())):
            if (s[4], a) not in seen_cat:
                seen_cat.add((s[4], a))
                new = (CATEGORY_FAMILY, (), (), (), s[4], (), a, 0, "closure")
                cats.append(new)
                todo.append(new)
    for fam in ("label_exclusion", "prerequisite", "ordinal"):
        if fam not in specs:
            continue
        seen = {(s[1], s[2], s[3], s[6]) for s in specs[fam]}
        todo = list(specs[fam])
        while todo:
            s = todo.pop()
            if s[4] or s[5] or s[7] != 0:
                continue
            for a in sorted(implies.get(s[6], ())):
                key = (s[1], s[2], s[3], a)
                if key not in seen:
                    seen.add(key)
                    new = (fam, s[1], s[2], s[3], (), (), a, 0, "closure")
                    specs[fam].append(new)
                    todo.append(new)


def mine_rules_to_dir(tables_dir: str | Path, out_dir: str | Path, split: str = "train", **thresholds: Any) -> dict:
    """The rules stage: mine ``rules.json`` from a tables directory's training split into ``out_dir``."""
    th = Thresholds.make(**thresholds)
    storage.check_output(out_dir, overwrite=True)          # the rules stage replaces its output; writable, unlocked
    vocab = Vocab.load(storage.join(tables_dir, "vocab.json"))
    patients, visits, codes = read_tables(tables_dir)
    rules = mine_rules(patients, visits, codes, vocab, th, split=split)
    n_train = int((patients["split"] == split).sum())
    by_family = _by_family(rules)
    th_json = {**asdict(th), "families": list(th.families)}
    with storage.atomic_dir(out_dir, overwrite=True) as tmp:
        save_rules(storage.join(tmp, RULES_FILE), rules, split=split, thresholds=th_json,
                   vocab_size=vocab.size, n_patients=n_train)
        info = {"n_rules": len(rules), "by_family": by_family, "split": split, "n_patients": n_train,
                "thresholds": th_json, "tables_dir": str(tables_dir)}
        storage.write_json(storage.join(tmp, "meta.json"), info)
    return info

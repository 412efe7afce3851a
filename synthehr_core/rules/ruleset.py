"""The ConSequence rule format: one ``Rule`` per line of ``rules.json``, validated against a vocabulary.

A rule (ConSequence, Theodorou et al. AAAI 2024, §4.1 of docs halo-consequence.md) says: *where the antecedent
holds, token ``output`` takes ``value``*. The antecedent has a temporal part, read from an aggregate of earlier
HALO rows, and a current part, read from the row being generated:

=============== ======================================================================================
``past_visits`` ``"all"`` (OR over every earlier row), relative offsets (``[-1]`` = the previous row), absolute
                rows (``[1]`` = the label row), or ``[]`` (no temporal part)
``past_pos``    tokens that must be present in the aggregated past
``past_neg``    tokens that must be absent from the aggregated past
``cur_pos``     tokens that must be present in the current row
``cur_neg``     tokens that must be absent from the current row
=============== ======================================================================================

Rows follow the HALO layout (docs/canonical-tables.md): row 0 = <start>, row 1 = labels (when the vocabulary has
a label row), visit ``i`` = row ``vocab.first_visit_row + i``. Mining and checking live in ``rules/mining.py``;
compiling rules into masks for training and sampling lives on the torch side, in ``model/consequence.py``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .. import storage
from ..data.vocab import Vocab
from ..errors import SchemaError, bullet_list

FAMILIES = ("label_exclusion", "prerequisite", "persistence", "label_exclusivity", "within_visit")
# Mined only when the dataset declares visit categories (data config ``visit_categories``): ``cur +cat:<col>=v =>
# code c = 0`` for every code no real visit of category v holds (e.g. ICD-10 codes in an ICD-9 visit).
CATEGORY_FAMILY = "category_exclusion"
# Families KI lacks (issue 17), mined by default next to KI's:
# ``mutual_exclusion``  ``[]: cur +a => code b = 0``       a and b never share a visit, though common enough to
#                                                          (at most one of a set, e.g. the stages of one disease)
# ``ordinal``           ``all: +b => code a = 0``          a mutually exclusive pair seen as a -> b, never b -> a:
#                                                          a later stage is never followed by an earlier one
# ``value_exclusion``   ``[]: cur +u => token w = 0``      values u, w of two single-valued visit variables never
#                                                          together (e.g. evt:ELECTIVE and cal:weekday=Sat)
LONGITUDINAL_FAMILIES = ("mutual_exclusion", "ordinal", "value_exclusion")
ALL_FAMILIES = (*FAMILIES[:4], CATEGORY_FAMILY, *LONGITUDINAL_FAMILIES, FAMILIES[4])  # exclusions before pairs
STATIC_FAMILIES = ("label_exclusivity", CATEGORY_FAMILY, "mutual_exclusion", "value_exclusion",
                   "within_visit")  # no temporal part (KI's "static" rules)
RULES_FILE = "rules.json"


# ---------------------------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class Rule:
    """One ConSequence rule, tokens by name. See the module docstring for the semantics."""
    family: str
    past_visits: str | tuple[int, ...]
    past_pos: tuple[str, ...]
    past_neg: tuple[str, ...]
    cur_pos: tuple[str, ...]
    cur_neg: tuple[str, ...]
    output: str
    value: int
    support: int = 0          # training rows where the antecedent held
    confidence: float = 1.0   # share of those rows where ``output == value``
    origin: str = "mined"     # "mined", "closure" (implied by a pair rule) or "static" (from the vocabulary)

    @property
    def antecedent(self) -> tuple:
        return (self.past_visits, self.past_pos, self.past_neg, self.cur_pos, self.cur_neg)

    def to_json(self) -> dict:
        d = asdict(self)
        d["past_visits"] = self.past_visits if isinstance(self.past_visits, str) else list(self.past_visits)
        for k in ("past_pos", "past_neg", "cur_pos", "cur_neg"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = RULES_FILE) -> Rule:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SchemaError(f"{where}: rule has unknown keys {unknown}; expected {sorted(names)}.")
        pv = d.get("past_visits", [])
        if pv == -1 or pv == "all":  # KI encodes "all earlier rows" as the scalar -1
            pv = "all"
        elif isinstance(pv, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in pv):
            pv = tuple(pv)
        else:
            raise SchemaError(f"{where}: past_visits={pv!r} must be 'all', a list of negative offsets "
                              "(e.g. [-1]) or a list of absolute rows (e.g. [1] = the label row).")
        try:
            return cls(family=str(d["family"]), past_visits=pv,
                       past_pos=tuple(d.get("past_pos", ())), past_neg=tuple(d.get("past_neg", ())),
                       cur_pos=tuple(d.get("cur_pos", ())), cur_neg=tuple(d.get("cur_neg", ())),
                       output=str(d["output"]), value=int(d["value"]), support=int(d.get("support", 0)),
                       confidence=float(d.get("confidence", 1.0)), origin=str(d.get("origin", "mined")))
        except KeyError as exc:
            raise SchemaError(f"{where}: rule lacks key {exc.args[0]!r}; got {d}.") from None


def validate_rules(rules: list[Rule], vocab: Vocab, where: str = RULES_FILE) -> list[Rule]:
    """Check every rule against the vocabulary; raise one SchemaError listing every problem."""
    problems: list[str] = []
    for i, r in enumerate(rules):
        tag = f"rule {i} ({r.family} -> {r.output})"
        if r.value not in (0, 1):
            problems.append(f"{tag}: value={r.value!r}; hard rules take 0 or 1.")
        for tok in (*r.past_pos, *r.past_neg, *r.cur_pos, *r.cur_neg, r.output):
            if tok not in vocab:
                problems.append(f"{tag}: token {tok!r} is not in the vocabulary.")
        pv = r.past_visits
        if pv != "all":
            if not isinstance(pv, tuple):
                problems.append(f"{tag}: past_visits={pv!r} is neither 'all' nor a tuple of ints.")
            elif pv and not (all(x < 0 for x in pv) or all(x >= 0 for x in pv)):
                problems.append(f"{tag}: past_visits={list(pv)} mixes relative (<0) and absolute (>=0) rows.")
            elif not pv and (r.past_pos or r.past_neg):
                problems.append(f"{tag}: has past tokens but past_visits=[]; give the rows to read.")
        if not (r.past_pos or r.past_neg or r.cur_pos or r.cur_neg):
            problems.append(f"{tag}: has an empty antecedent; a rule must read at least one token.")
    if problems:
        raise SchemaError(f"{where}: {len(problems)} invalid rules (is it from another vocabulary?):\n"
                          + bullet_list(problems[:20]))
    return rules


def save_rules(path: str | Path, rules: list[Rule], **meta: Any) -> None:
    """Write ``rules.json``: readable JSON, one object per rule with support and confidence."""
    storage.write_json(path, {"version": 1, **meta, "n_rules": len(rules), "rules": [r.to_json() for r in rules]})


def load_rules(path: str | Path) -> list[Rule]:
    storage.require_complete(path, "rules")
    d = storage.read_json(path)   # a damaged file is a DataError naming it
    if not isinstance(d, dict) or "rules" not in d:
        raise SchemaError(f"{path}: not a rules file (no 'rules' list). Write it with mine_rules_to_dir.")
    return [Rule.from_json(r, where=str(path)) for r in d["rules"]]

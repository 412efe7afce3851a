"""The vocabulary: token <-> index, kinds, bin edges. Layout and order are defined in docs/canonical-tables.md."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .. import storage
from ..errors import SchemaError
from .schema import format_bin

SPECIALS = ("<start>", "<end>", "<pad>")
KINDS = ("code", "bin", "label", "special")


@dataclass(frozen=True)
class Token:
    token: str
    kind: str
    variable: str | None = None
    lo: float | None = None
    hi: float | None = None


@dataclass
class Vocab:
    tokens: list[Token]
    n_visit_tokens: int
    n_labels: int
    label_row: bool = True
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._index = {t.token: i for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise SchemaError("vocabulary has duplicate tokens.")
        if len(self.tokens) != self.n_visit_tokens + self.n_labels + len(SPECIALS):
            raise SchemaError(f"vocabulary size {len(self.tokens)} != n_visit_tokens {self.n_visit_tokens} "
                              f"+ n_labels {self.n_labels} + 3 specials.")
        if [t.token for t in self.tokens[-3:]] != list(SPECIALS):
            raise SchemaError(f"vocabulary must end with the specials {SPECIALS}.")

    # -------------------------------------------------------------------- layout
    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def start_index(self) -> int:
        return self.n_visit_tokens + self.n_labels

    @property
    def end_index(self) -> int:
        return self.start_index + 1

    @property
    def pad_index(self) -> int:
        return self.start_index + 2

    @property
    def label_slice(self) -> slice:
        return slice(self.n_visit_tokens, self.n_visit_tokens + self.n_labels)

    @property
    def first_visit_row(self) -> int:
        """Row of the first visit in the HALO tensor: 2 with a label row, 1 for label-free datasets."""
        return 2 if self.label_row else 1

    def index(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary ({self.size} tokens).") from None

    def lookup(self, tokens: pd.Series) -> np.ndarray:
        """Vocabulary index of each token string (a hash map, vectorised); -1 where unknown or null."""
        return pd.Series(tokens, copy=False).map(self._index).fillna(-1).to_numpy(dtype=np.int64)

    def get(self, token: str, default: int | None = None) -> int | None:
        return self._index.get(token, default)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    # -------------------------------------------------------------------- io
    def to_json(self) -> dict:
        return {
            "version": 1,
            "n_visit_tokens": self.n_visit_tokens,
            "n_labels": self.n_labels,
            "label_row": self.label_row,
            "tokens": [{"token": t.token, "kind": t.kind, "variable": t.variable, "lo": t.lo, "hi": t.hi}
                       for t in self.tokens],
        }

    @classmethod
    def from_json(cls, d: dict, where: str = "vocab.json") -> "Vocab":
        try:
            toks = [Token(t["token"], t["kind"], t.get("variable"), t.get("lo"), t.get("hi")) for t in d["tokens"]]
            return cls(toks, int(d["n_visit_tokens"]), int(d["n_labels"]), bool(d.get("label_row", True)))
        except (KeyError, TypeError) as exc:
            raise SchemaError(f"{where}: malformed vocabulary ({exc!r}); regenerate it with `synthehr preprocess`.") from exc

    def save(self, path) -> None:
        storage.write_json(path, self.to_json())

    @classmethod
    def load(cls, path) -> "Vocab":
        storage.require_complete(path, "preprocess (or train / sample)")
        return cls.from_json(storage.read_json(path), where=str(path))


def token_column(t: Token) -> str | None:
    """The table column a single-valued token decodes to (``event_type``, ``<var>_binned``, ``cal_<kind>``, a label
    column), or None for a clinical code or a special. Decoding and the sampler's token groups share it."""
    if t.kind in ("label", "bin"):
        return f"{t.variable}_binned" if t.lo is not None else t.variable
    if t.kind == "code" and t.variable is not None and (t.variable == "event_type" or "=" in t.token):
        return t.variable
    return None


def token_value(t: Token) -> str:
    """The column value of a ``token_column`` token: ``"evt:ED" -> "ED"``, ``"bin:los_days=2-5" -> "2-5"``."""
    return t.token[4:] if t.token.startswith("evt:") else t.token.split("=", 1)[1]


@dataclass(frozen=True)
class VocabRoles:
    """How the vocabulary maps onto table columns (derived from token kinds, not typed in)."""
    label_cat: tuple[str, ...]      # categorical patient columns -> label:<col>=<value>
    label_bin: tuple[str, ...]      # patient-level binned variables -> column <var>_binned, label:<var>=<bin>
    visit_bin: tuple[str, ...]      # visit-level binned variables -> column <var>_binned, bin:<var>=<bin>
    visit_col: tuple[tuple[str, str], ...]  # (visit column, token prefix), e.g. ("cal_month", "cal:month=")


def vocab_roles(vocab: Vocab) -> VocabRoles:
    """Which table columns feed which tokens: the one mapping tensors, decoding and the rule checker share."""
    label_cat: dict[str, None] = {}
    label_bin: dict[str, None] = {}
    visit_bin: dict[str, None] = {}
    visit_col: dict[str, str] = {}
    for t in vocab.tokens:
        if t.kind == "label":
            (label_bin if t.lo is not None else label_cat)[t.variable] = None
        elif t.kind == "bin":
            visit_bin[t.variable] = None
        elif t.kind == "code" and t.variable not in (None, "event_type") and "=" in t.token:
            visit_col[t.variable] = t.token.split("=", 1)[0] + "="  # calendar tokens from cal_<kind> columns
    return VocabRoles(tuple(label_cat), tuple(label_bin), tuple(visit_bin), tuple(visit_col.items()))


@dataclass(frozen=True)
class TokenGroup:
    """The tokens of one single-valued variable: a visit (or the label row) holds at most one of them.

    ``start:stop`` is a contiguous index range (``build_vocab`` keeps each variable's tokens together);
    ``required`` means every real training row holds one (no null in ``column``), so a sampled row must too.
    """
    variable: str
    column: str       # the table column it decodes to: event_type, <var>_binned, cal_<kind>, a label column
    row: str          # "visit" or "label"
    start: int
    stop: int
    required: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TokenGroup":
        return cls(str(d["variable"]), str(d["column"]), str(d["row"]), int(d["start"]), int(d["stop"]),
                   bool(d.get("required", False)))


def token_groups(vocab: Vocab, patients=None, visits=None) -> list[TokenGroup]:
    """One ``TokenGroup`` per single-valued variable of the vocabulary (event type, visit bins, calendar kinds,
    label variables), in index order. With the training ``patients`` / ``visits`` tables, a group is ``required``
    when its column has no null there. Variables whose tokens are not contiguous are left out (cannot happen with
    ``build_vocab``; a hand-made vocab.json might)."""
    members: dict[tuple[str, str, str], list[int]] = {}
    for i, t in enumerate(vocab.tokens):
        col = token_column(t)
        if col is not None:
            members.setdefault(("label" if t.kind == "label" else "visit", t.variable, col), []).append(i)
    out = []
    for (row, var, col), idx in members.items():
        if idx != list(range(idx[0], idx[-1] + 1)):
            continue
        table = patients if row == "label" else visits
        required = table is not None and col in table.columns and len(table) > 0 and not table[col].isna().any()
        out.append(TokenGroup(var, col, row, idx[0], idx[-1] + 1, bool(required)))
    return sorted(out, key=lambda g: g.start)


TOKEN_GROUPS_FILE = "token_groups.json"   # in a checkpoint dir: written by train, read by sample


def save_token_groups(path, groups: Iterable[TokenGroup]) -> None:
    storage.write_json(path, {"groups": [g.to_json() for g in groups]})


def load_token_groups(path, vocab: Vocab) -> list[TokenGroup]:
    """Read ``token_groups.json`` and check every group against ``vocab`` (in range, one variable per group)."""
    d = storage.read_json(path)
    try:
        groups = [TokenGroup.from_json(x) for x in d["groups"]]
    except (KeyError, TypeError, ValueError) as e:
        raise SchemaError(f"{path}: not a token groups file ({e!r}); expected {{'groups': [{{variable, column, "
                          "row, start, stop, required}, ...]}}. Re-run the train stage to rewrite it.") from None
    for grp in groups:
        names = {vocab.tokens[i].variable for i in range(grp.start, grp.stop)} if 0 <= grp.start < grp.stop <= \
            vocab.size else None
        if names != {grp.variable} or grp.row not in ("visit", "label"):
            raise SchemaError(f"{path}: group {grp.variable!r} (tokens {grp.start}:{grp.stop}, row {grp.row!r}) "
                              f"does not match vocab.json (variables there: {sorted(map(str, names or []))}). "
                              "The file belongs to another vocabulary; re-run the train stage.")
    return groups


def build_vocab(event_types: Iterable[str], visit_bins: dict[str, list[float]], calendar_tokens: Iterable[str],
                codes: Iterable[str], label_values: dict[str, list[str]], label_bins: dict[str, list[float]],
                namespace_order: list[str] | None = None, categories: dict[str, list[str]] | None = None) -> Vocab:
    """Build the deterministic vocabulary from the distinct values found in the canonical tables.

    ``categories``: visit category column -> its values; tokens ``cat:<column>=<value>`` after the calendar ones.
    """
    toks: list[Token] = [Token(f"evt:{e}", "code", "event_type") for e in sorted(set(event_types))]
    for var, edges in visit_bins.items():
        toks += [Token(f"bin:{var}={format_bin(lo, hi)}", "bin", var, float(lo), float(hi))
                 for lo, hi in zip(edges[:-1], edges[1:])]
    # calendar tokens "cal:<kind>=<value>" come from the visit column "cal_<kind>"
    toks += [Token(t, "code", "cal_" + t[4:].split("=", 1)[0]) for t in calendar_tokens]
    for col, values in (categories or {}).items():
        toks += [Token(f"cat:{col}={v}", "code", col) for v in sorted(set(map(str, values)))]
    order = {ns: i for i, ns in enumerate(namespace_order or [])}

    def key(c: str):
        ns = c.split(":", 1)[0]
        return (order.get(ns, len(order)), ns, c)

    toks += [Token(c, "code") for c in sorted(set(codes), key=key)]
    n_visit = len(toks)
    labels: list[Token] = []
    for col, values in label_values.items():
        labels += [Token(f"label:{col}={v}", "label", col) for v in sorted(set(map(str, values)))]
    for var, edges in label_bins.items():
        labels += [Token(f"label:{var}={format_bin(lo, hi)}", "label", var, float(lo), float(hi))
                   for lo, hi in zip(edges[:-1], edges[1:])]
    specials = [Token(s, "special") for s in SPECIALS]
    return Vocab(toks + labels + specials, n_visit, len(labels), label_row=len(labels) > 0)

"""ConSequence: HALO with hard temporal rules (Theodorou et al., AAAI 2024; KI:ruleModels/consequenceModel.py).

The network is HALO unchanged (same parameters, same ``model.pt``). Rules (``synthehr_core.rules``) act outside
it, as hard overrides:

* training: on the teacher-forced batch, every entry of the target rows ``X[:, 1:]`` where a rule fires is left
  out of the loss (its probability is the rule's value, so its BCE is 0 and it has no gradient), for the rules
  whose current antecedent precedes the output in the row (KI reads the whole ground-truth row; see
  ``CompiledRules.loss_groups``);
* sampling: after each row is drawn, the rule groups are applied to it in order and it is overwritten.

KI compiles each rule group into dense ``2V x V`` antecedent matrices and an ``n_ctx x n_ctx`` aggregation
matrix (377 MB per group at V=6869). Here a group is index lists: for rule r, the columns that must be present
or absent in the current row and in the aggregated past, padded with an always-1 / always-0 column, so the
check is a gather and an ``all``. The past is aggregated as KI intends (its relative-offset branch never assigns
the matrix): a running OR for ``"all"``, shifted rows for offsets, fixed rows for absolute indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import storage
from ..data.vocab import Vocab
from ..rules.ruleset import RULES_FILE, Rule, load_rules, validate_rules
from .halo import HALO, HaloConfig


@dataclass
class RuleGroup:
    """Rules that read the same past and never read each other's outputs; rules sharing an output share its value
    (the output is forced where any of them fires)."""
    past_visits: str | tuple[int, ...]
    cur_pos: torch.Tensor    # (R, Kcp) long, padded with ONE
    cur_neg: torch.Tensor    # (R, Kcn) long, padded with ZERO
    past_pos: torch.Tensor   # (R, Kpp) long
    past_neg: torch.Tensor   # (R, Kpn) long
    out_pos: torch.Tensor    # (R,) long: rule -> position in ``output``
    output: torch.Tensor     # (U,) long, distinct vocabulary columns written by the group
    value: torch.Tensor      # (U,) float

    def to(self, device) -> RuleGroup:
        return RuleGroup(self.past_visits, *(t.to(device) for t in (self.cur_pos, self.cur_neg, self.past_pos,
                                                                    self.past_neg, self.out_pos, self.output,
                                                                    self.value)))

    def fires(self, cur: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
        """``cur``/``past``: (..., V + 2) with the ONE/ZERO columns appended; returns (..., U) bool per output."""
        ok = cur[..., self.cur_pos].bool().all(-1) & ~cur[..., self.cur_neg].bool().any(-1)  # (..., R)
        if past is not None:
            ok &= past[..., self.past_pos].bool().all(-1) & ~past[..., self.past_neg].bool().any(-1)
        if self.out_pos.numel() == self.output.numel():  # one rule per output: out_pos is the identity
            return ok
        hits = torch.zeros(*ok.shape[:-1], self.output.numel(), device=ok.device)
        return hits.index_add_(-1, self.out_pos, ok.float()) > 0  # (..., U)


def _pad(lists: list[list[int]], fill: int) -> torch.Tensor:
    k = max(1, max((len(x) for x in lists), default=0))
    return torch.tensor([x + [fill] * (k - len(x)) for x in lists], dtype=torch.long)


class CompiledRules:
    """Rules as ordered index-based groups; ``fired`` for training, ``apply_row`` for the sampler."""

    def __init__(self, rules: list[Rule], vocab: Vocab, max_passes: int = 8):
        self.vocab, self.rules, self.max_passes = vocab, list(rules), max_passes
        V = vocab.size
        self.ONE, self.ZERO = V, V + 1
        # the decoder's view of a row: label tokens on the label row, visit tokens on visit rows
        self._visit_cols = torch.zeros(V, dtype=torch.bool)
        self._visit_cols[:vocab.n_visit_tokens] = True
        self._label_cols = torch.zeros(V, dtype=torch.bool)
        self._label_cols[vocab.label_slice] = True
        self.groups = self._compile(rules)
        # training leaves out of the loss only what the sampler's prefix decides: rules whose current antecedent
        # lies before their output in the row's (vocabulary) order. A rule read from later columns (a within-visit
        # pair b <= a with a after b, a stage exclusion, an event type after a weekday) is applied after the row
        # is drawn; fixing b from the ground-truth row in training (as KI does) would hide b's own probability
        # from the loss in every row where a is there too, and the model would under-draw b (a syndrome's first
        # code, and with it the whole syndrome).
        self.loss_groups = self._compile([r for r in rules if _causal(r, vocab)])
        self._device = torch.device("cpu")
        self._plan_for(rules)

    def _compile(self, rules: list[Rule]) -> list[RuleGroup]:
        vocab = self.vocab
        groups: list[RuleGroup] = []
        for chunk in _group(rules, vocab):
            ix = lambda toks: [vocab.index(t) for t in toks]
            outs = list(dict.fromkeys(vocab.index(r.output) for r in chunk))
            value = {vocab.index(r.output): float(r.value) for r in chunk}
            groups.append(RuleGroup(
                chunk[0].past_visits,
                _pad([ix(r.cur_pos) for r in chunk], self.ONE), _pad([ix(r.cur_neg) for r in chunk], self.ZERO),
                _pad([ix(r.past_pos) for r in chunk], self.ONE), _pad([ix(r.past_neg) for r in chunk], self.ZERO),
                torch.tensor([outs.index(vocab.index(r.output)) for r in chunk], dtype=torch.long),
                torch.tensor(outs, dtype=torch.long), torch.tensor([value[o] for o in outs])))
        return groups

    def _plan_for(self, rules: list[Rule]) -> None:
        vocab = self.vocab
        # Per row kind, the groups that can matter and whether one pass can be stale. On visit rows, groups whose
        # every rule needs a label in the current row are skipped (labels there are dropped by the decoder). A
        # second pass is needed only if some group writes a column that it or an earlier group reads.
        chunks = _group(rules, vocab)
        label_only = [all(any(vocab.tokens[vocab.index(t)].kind == "label" for t in r.cur_pos) for r in c)
                      for c in chunks]
        self._plan = {}
        for is_label_row in (False, True):
            keep = [i for i in range(len(chunks)) if is_label_row or not label_only[i]]
            read: set[str] = set()
            feedback = False
            for i in keep:
                read.update(t for r in chunks[i] for t in (*r.cur_pos, *r.cur_neg))
                feedback |= any(r.output in read for r in chunks[i])
            self._plan[is_label_row] = (keep, feedback)

    def __len__(self) -> int:
        return len(self.rules)

    def _on(self, device: torch.device) -> None:
        if device != self._device:
            self.groups = [g.to(device) for g in self.groups]
            self.loss_groups = [g.to(device) for g in self.loss_groups]
            self._visit_cols, self._label_cols = self._visit_cols.to(device), self._label_cols.to(device)
            self._device = device

    def _view(self, X: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """Zero what the decoder ignores: rows (B, T, V) starting at HALO row ``first_row``."""
        T = X.size(1)
        rows = torch.arange(first_row, first_row + T, device=X.device)
        fvr = self.vocab.first_visit_row
        keep = (rows[:, None] >= fvr) & self._visit_cols[None, :]  # (T, V)
        if self.vocab.label_row:
            keep |= (rows[:, None] == 1) & self._label_cols[None, :]
        return X * keep

    @staticmethod
    def _aug(x: torch.Tensor) -> torch.Tensor:
        one = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return torch.cat([x, one, torch.zeros_like(one)], dim=-1)  # (..., V + 2)

    # ------------------------------------------------------------------------------------------ training
    @torch.no_grad()
    def fired(self, X: torch.Tensor, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Where rules fire on the teacher-forced targets ``X[:, 1:]``: ``(fired (B, T-1, V) bool, values)``.

        ``values`` holds each fired entry's forced value (a later group overrides an earlier one, as in KI) and
        0 elsewhere. The past of target row t is rows 0..t-1 of the ground truth. ``causal=True``: only the rules
        whose current antecedent precedes their output (the loss mask of ``ConSequence.loss_weights``).
        """
        self._on(X.device)
        B, T, V = X.shape  # batch, rows, vocab
        cur = self._aug(X[:, 1:])  # (B, T-1, V+2): target rows 1..T-1
        pv = self._view(X)  # (B, T, V)
        fired = torch.zeros(B, T - 1, V, dtype=torch.bool, device=X.device)
        values = torch.zeros(B, T - 1, V, dtype=X.dtype, device=X.device)
        aggs: dict = {}  # past_visits -> (B, T-1, V+2) aggregated past of every target row
        for g in self.loss_groups if causal else self.groups:
            key = g.past_visits
            if key and key not in aggs:
                if key == "all":
                    past = torch.cummax(pv, dim=1).values[:, :-1]  # row t-1 holds the OR of rows 0..t-1
                else:
                    past = torch.zeros(B, T - 1, V, dtype=X.dtype, device=X.device)
                    for k in key:
                        if k < 0:  # target row t reads row t + k, i.e. targets from row -k on
                            if -k <= T - 1:
                                past[:, -k - 1:] = torch.maximum(past[:, -k - 1:], pv[:, :T + k])
                        elif k < T - 1:  # absolute row k is in the past of targets k+1.. (index k onwards)
                            past[:, k:] = torch.maximum(past[:, k:], pv[:, k:k + 1])
                aggs[key] = self._aug(past)
            f = g.fires(cur, aggs[key] if key else None)  # (B, T-1, U)
            fired[..., g.output] |= f
            values[..., g.output] = torch.where(f, g.value, values[..., g.output])
        return fired, values

    def _row_aggs(self, past: torch.Tensor, row: torch.Tensor, t: int) -> dict:
        """The aggregated past of row t per ``past_visits`` key, as ``(B, V + 2)`` with ONE/ZERO appended."""
        pv = self._view(past)  # (B, t, V)
        aggs: dict = {}
        for g in self.groups:
            key = g.past_visits
            if key in aggs or not key:
                continue
            if key == "all":
                agg = pv.amax(dim=1)
            else:
                rows = [t + k if k < 0 else k for k in key]
                rows = [r for r in rows if 0 <= r < t]
                agg = pv[:, rows].amax(dim=1) if rows else torch.zeros_like(row)
            aggs[key] = self._aug(agg)
        return aggs

    @torch.no_grad()
    def violated(self, past: torch.Tensor, row: torch.Tensor, row_index: int) -> torch.Tensor:
        """``(B,)`` bool: does row ``row_index`` (after ``apply_row``) still break a rule? Only where rules clash
        (a pair forcing back a code an exclusion removed); the sampler then draws that patient's row again."""
        self._on(row.device)
        aggs = self._row_aggs(past, row, row_index)
        keep, _ = self._plan[self.vocab.label_row and row_index == 1]
        aug = self._aug(row)
        bad = torch.zeros(row.size(0), dtype=torch.bool, device=row.device)
        for i in keep:
            g = self.groups[i]
            f = g.fires(aug, aggs.get(g.past_visits) if g.past_visits else None)  # (B, U)
            bad |= (f & (aug[:, g.output] != g.value.to(aug.dtype))).any(-1)
        return bad

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def apply_row(self, past: torch.Tensor, row: torch.Tensor, row_index: int) -> torch.Tensor:
        """Overwrite a freshly sampled row ``(B, V)`` given the earlier rows ``past (B, t, V)``; t = row_index.

        Groups run in order. When a group writes a column that it or an earlier group reads (a cycle such as
        ``a => b``, ``b => a``), the pass repeats until nothing changes (at most ``max_passes``).
        """
        self._on(row.device)
        t = row_index
        aggs = self._row_aggs(past, row, t)
        label_row = self.vocab.label_row and t == 1
        keep, feedback = self._plan[label_row]
        groups = [self.groups[i] for i in keep]
        aug = self._aug(row)  # (B, V+2), overwritten in place; outputs never touch the ONE/ZERO columns
        for _ in range(self.max_passes if feedback else 1):
            before = aug.clone() if feedback else None
            for g in groups:
                f = g.fires(aug, aggs.get(g.past_visits) if g.past_visits else None)  # (B, R)
                aug[:, g.output] = torch.where(f, g.value.to(aug.dtype), aug[:, g.output])
            if feedback and torch.equal(aug, before):
                break
        return aug[:, :-2]

    def fix_probs(self, logits: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Model probabilities with fired entries set to the rule value (for perplexity, as KI reports it)."""
        fired, values = self.fired(X)
        return torch.where(fired, values, torch.sigmoid(logits.float()))


def _causal(rule: Rule, vocab: Vocab) -> bool:
    """Does the rule's current antecedent lie wholly before its output in the row order?"""
    out = vocab.index(rule.output)
    return all(vocab.index(t) < out for t in (*rule.cur_pos, *rule.cur_neg))


def _group(rules: list[Rule], vocab: Vocab) -> list[list[Rule]]:
    """Split the ordered rule list into groups evaluated one after another (KI's rule neurons).

    A new group starts when ``past_visits`` changes, when a rule's current antecedent reads an output claimed
    in the group, when its output is read by a rule already in the group (that rule would see a stale value),
    or when its output is claimed with the other value (the later rule must win). KI also splits rules that
    merely share an output; with equal values they can share a group (the output is forced if any fires).
    """
    groups: list[list[Rule]] = []
    claimed: dict[str, int] = {}
    read: set[str] = set()
    for r in rules:
        cur = (*r.cur_pos, *r.cur_neg)
        clash = claimed.get(r.output, r.value) != r.value or r.output in read or any(t in claimed for t in cur)
        if not groups or r.past_visits != groups[-1][0].past_visits or clash:
            groups.append([])
            claimed, read = {}, set()
        groups[-1].append(r)
        claimed[r.output] = r.value
        read.update(cur)
    return groups


def compile_rules(rules: list[Rule], vocab: Vocab) -> CompiledRules:
    return CompiledRules(rules, vocab)


class ConSequence(HALO):
    """HALO whose loss leaves rule-fixed entries out. Attach rules with ``attach_rules`` (not saved in model.pt)."""

    def __init__(self, config: HaloConfig, rules: CompiledRules | None = None):
        super().__init__(config)
        self.rules = rules  # plain attribute: no buffers, so Opacus and strict state_dict loading are unaffected

    def attach_rules(self, rules: CompiledRules | None) -> ConSequence:
        self.rules = rules
        return self

    def loss_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     loss_weight: torch.Tensor | None = None) -> torch.Tensor:
        w = super().loss_weights(x, mask, loss_weight)
        if self.rules is None:
            return w
        # rules read the current and earlier rows only, so a trimmed batch fires where the padded one does
        fired, _ = self.rules.fired(x, causal=True)  # (B, T-1, V)
        return w * (~fired).to(w.dtype)  # fired entries: probability fixed, no loss, no gradient


def load_row_rules(model_dir, vocab: Vocab) -> CompiledRules | None:
    """A checkpoint's ``rules.json`` compiled for the sampler, or None when the checkpoint has none (HALO)."""
    path = storage.join(model_dir, RULES_FILE)
    if not storage.exists(path):
        return None
    return compile_rules(validate_rules(load_rules(path), vocab, str(path)), vocab)

"""Exact, batched, seeded sampling from a HALO (or ConSequence) checkpoint.

The sampler draws rows one at a time, each row code by code in vocabulary order, exactly from the model's
factorisation p(row_t | rows < t) = prod_j p(x_tj | rows < t, x_t,<j). Compared with the reference (HI:model.py
``sample``), it is faster without approximating anything:

* a KV cache, so each step runs only the new row through the transformer (HI recomputes the whole prefix);
* "skip-zeros" code sampling with a **cursor per patient**: draw every remaining column at once, commit the
  patient's own first drawn 1 (the zeros before it were drawn under the right, all-zero prefix), move that
  patient's cursor past it and repeat. Head passes per row = max over patients of (codes + 1); HI's batch-shared
  cursor commits the smallest first-1 column across the whole batch, so it needs one pass per distinct column;
* patients that sampled <end> leave the batch (HI keeps sampling them until everyone has ended);
* a **block-lazy head** (``head_block`` columns per block, default ``HEAD_BLOCK``): the row is filled block by block
  for all patients at once; a block's logits come from only the hidden units they can see, with the weights
  transposed once per shard, and after a commit only the rest of that patient's block is re-drawn, from the
  block's own hidden units. Each logit is then computed about once per row over the non-zero half of the masked
  weight, where the full-row head (``head_block=None``, the sampler before it) recomputes all V logits over all
  D units for every commit. Row 0 (<start>, the same for everyone) goes through the transformer once per batch.

Single-valued variables (event type, a visit bin, a calendar kind, a label: ``vocab.token_groups``) are drawn as
one categorical when a patient's cursor reaches them: from the model's categorical head where it has one
(``HaloConfig.groups``), else from HI's Bernoulli chain restricted to one value (or none where the variable is
optional). The checkpoint's ``token_groups.json`` says which are required.

``sample_to_dir`` is the stage: one shard of a checkpoint, defined by a ``SampleConfig`` (config.py).
``sample_reference`` is the plain reference algorithm, kept for the exactness tests and ``bench/sample.py``.
Probabilities and Bernoulli draws are fp32; one ``torch.Generator`` per cohort seed, so the same model, seed,
batch size and head block give the same cohort. The block head draws its uniforms in another order than the
full-row head, so a seed gives other patients from the same distribution (tests/test_sampling.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import storage, versions
from ..data.schema import write_tables
from ..data.vocab import TOKEN_GROUPS_FILE, TokenGroup, Vocab, load_token_groups
from ..errors import ConfigError, DataError
from ..randomness import torch_seed
from .checkpoint import load_model
from .config import SampleConfig, config_or_options
from .consequence import load_row_rules
from .tensors import decode_rows, vocab_roles

log = logging.getLogger(__name__)


class RowRules(Protocol):
    """ConSequence enforcement hook: overwrite a freshly sampled row given the rows before it."""

    def apply_row(self, past: torch.Tensor, row: torch.Tensor, row_index: int) -> torch.Tensor:
        """``past (B, t, V)`` rows 0..t-1, ``row (B, V)`` row t -> the corrected row ``(B, V)``."""
        ...


# ---------------------------------------------------------------------------------------------- label prefixes
def labels_from_probs(label_probs: pd.DataFrame, vocab: Vocab, n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` whole label vectors ``(n, n_labels)`` from the empirical joint distribution of train labels.

    ``label_probs`` has columns ``labels`` ('|'-joined label tokens, '' for none) and ``probability``.
    """
    missing = {"labels", "probability"} - set(label_probs.columns)
    if missing:
        raise DataError(f"label_probs lacks columns {sorted(missing)}; found {sorted(label_probs.columns)}. "
                        "It is written by the train stage as label_probs.parquet.")
    prob = torch.tensor(label_probs["probability"].to_numpy(dtype=np.float64))
    if len(prob) == 0 or not torch.isfinite(prob).all() or (prob < 0).any() or prob.sum() <= 0:
        raise DataError(f"label_probs.probability must be finite, non-negative and not all zero; got "
                        f"{label_probs['probability'].head(5).tolist()}.")
    table = torch.zeros(len(label_probs), vocab.n_labels)
    for i, joined in enumerate(label_probs["labels"].fillna("").astype(str)):
        for tok in filter(None, joined.split("|")):
            j = vocab.get(tok)
            if j is None or vocab.tokens[j].kind != "label":
                raise DataError(f"label_probs row {i}: {tok!r} is not a label token of this vocabulary.")
            table[i, j - vocab.n_visit_tokens] = 1.0
    pick = torch.multinomial(prob, n, replacement=True, generator=generator)
    return table[pick]


def labels_from_condition(condition: dict, vocab: Vocab, label_probs: pd.DataFrame | None) -> pd.DataFrame:
    """Restrict the label distribution to vectors matching ``{variable: value}`` (e.g. ``{"sex": "F"}``).

    With ``label_probs`` the other labels keep their empirical conditional mix; without it every label variable
    must be given.
    """
    roles = vocab_roles(vocab)
    known = set(roles.label_cat) | set(roles.label_bin)
    wanted = []
    for var, value in condition.items():
        tok = f"label:{var}={value}"
        if var not in known or tok not in vocab:
            raise ConfigError(f"condition {var}={value!r}: {tok!r} is not a label token; label variables are "
                              f"{sorted(known)} (values as in vocab.json).")
        wanted.append(tok)
    if label_probs is None:
        if set(condition) != known:
            raise ConfigError(f"condition {condition} fixes {sorted(condition)} but the model also has labels "
                              f"{sorted(known - set(condition))}; give them all, or use a checkpoint with "
                              "label_probs.parquet to draw the rest.")
        return pd.DataFrame({"labels": ["|".join(wanted)], "probability": [1.0]})
    rows = label_probs["labels"].fillna("").astype(str).str.split("|")
    keep = rows.map(lambda toks: set(wanted) <= set(toks))
    if not keep.any() or label_probs.loc[keep, "probability"].sum() <= 0:
        raise ConfigError(f"condition {condition} matches no label vector seen in training (label_probs.parquet).")
    return label_probs[keep].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- fast sampler
def _select_cache(kv: list, idx: torch.Tensor) -> list:
    return [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in kv]


class _IncrementalHead:
    """HALO's fine head, evaluated incrementally while one row is filled in (same math as ``model.head``).

    The first masked layer is linear in ``[h, row]``: its pre-activation starts at ``W1[:, :E] h + b1`` and
    committing code c adds column ``W1[:, E + c]``. The second layer only needs the V output units that are
    logits. A pass then costs one (V x D) product per patient instead of two (D x D) ones.
    """

    def __init__(self, model):
        self.model = model
        E, V = model.config.n_embd, model.config.vocab_size
        w1 = model.fine_1.masked_weight()
        self.w1_h, self.b1 = w1[:, :E], model.fine_1.bias  # (D, E), (D,)
        self.w1_row = w1[:, E:].t().contiguous()  # (V, D): what committing each code adds
        self.w2 = model.fine_2.masked_weight()[E - 1:E - 1 + V]  # (V, D): the logit units only
        self.b2 = model.fine_2.bias[E - 1:E - 1 + V]

    def start(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b1, h, self.w1_h.t())  # (B, D) pre-activation with an empty row

    def logits(self, pre: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        lg = torch.addmm(self.b2, torch.relu(pre), self.w2.t())  # (B, V)
        return lg if prior is None else lg + prior

    def commit(self, pre: torch.Tensor, idx: torch.Tensor, code: torch.Tensor) -> None:
        pre[idx] += self.w1_row[code]


class _Groups:
    """The single-valued token groups of one row type, as tensors: group k spans columns ``start[k]:stop[k]``."""

    def __init__(self, groups: Sequence[TokenGroup], device, model=None):
        self.groups = sorted(groups, key=lambda grp: grp.start)
        for a, b in zip(self.groups, self.groups[1:]):
            if b.start < a.stop:
                raise ConfigError(f"token groups {a.variable!r} ({a.start}:{a.stop}) and {b.variable!r} "
                                  f"({b.start}:{b.stop}) overlap; give each variable once (vocab.token_groups).")
        heads = {tuple(r): k for k, r in enumerate(getattr(model.config, "groups", None) or ())} if model else {}
        self.heads = [heads.get((grp.start, grp.stop)) for grp in self.groups]  # the model's categorical, or None
        self.has_head = torch.tensor([k is not None for k in self.heads] + [False], dtype=torch.bool, device=device)
        self.n = len(self.groups)
        self.start = torch.tensor([g.start for g in self.groups] + [1 << 62], dtype=torch.long, device=device)

    def __bool__(self) -> bool:
        return self.n > 0


def _with_model_heads(model, groups: list[TokenGroup]) -> list[TokenGroup]:
    """``groups`` plus, as optional groups, the model's categorical heads they do not cover: a model trained with
    heads scores those tokens only through them, on every row, so they are always drawn that way."""
    have = {(grp.start, grp.stop) for grp in groups}
    extra = [TokenGroup(f"group_{k}", "", "any", a, b) for k, (a, b) in enumerate(model.config.groups or ())
             if (a, b) not in have]
    return groups + extra


def _group_log_weights(lg0: torch.Tensor, lg_after: torch.Tensor, required: bool) -> torch.Tensor:
    """log p(x_G = e_j | prefix) for each member j (and, unless ``required``, of x_G = 0 as a last column).

    ``lg0 (n, k)``: the group's logits with none of it set; ``lg_after (n, k, k)``: ``[:, j, i]`` = logit of member
    i once member j is set (only i > j is used: the head is autoregressive over columns).
    """
    k = lg0.size(1)
    log_on0, log_off0 = F.logsigmoid(lg0), F.logsigmoid(-lg0)
    before = torch.cumsum(log_off0, dim=1) - log_off0                   # sum_{i<j} log(1 - p_i), exclusive
    later = torch.triu(torch.ones(k, k, dtype=torch.bool, device=lg0.device), diagonal=1)
    after = (F.logsigmoid(-lg_after) * later).sum(dim=2)                # sum_{i>j} log(1 - p_i | x_j = 1)
    logw = before + log_on0 + after
    if not required:
        logw = torch.cat([logw, log_off0.sum(dim=1, keepdim=True)], dim=1)
    return logw


def _draw_categorical(logw: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    p = torch.softmax(logw.double(), dim=1)
    return torch.multinomial(p, 1, generator=g).squeeze(1)


@torch.no_grad()
def _sample_row(model, h: torch.Tensor, V: int, temperature: float, g: torch.Generator,
                groups: _Groups | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Exact skip-zeros draw of one row for every patient, each with its own cursor. ``h (B, E)`` -> ``(B, V)``;
    ``prior (B, V)``: the model's recurrence offsets for this row (``HALO.prior``), or None.

    With ``groups``, each single-valued group is drawn as one categorical when the patient's cursor reaches it:
    member j with probability p(x_G = e_j | row so far), renormalised over the allowed patterns (one member, or
    none where the group is not required). Rows are exact draws from the model restricted, group by group, to
    rows that hold at most (exactly) one value per variable.
    """
    B = h.size(0)
    row = torch.zeros(B, V, device=h.device, dtype=h.dtype)
    if getattr(model.config, "coarse", False):  # codes independent given the history: one draw is exact
        logits = model.head(h, row, prior).float() / temperature
        row = (torch.rand(logits.shape, generator=g, device=h.device) < torch.sigmoid(logits)).to(row.dtype)
        for grp in groups.groups if groups else ():
            lg = logits[:, grp.start:grp.stop]
            k = lg.size(1)
            # independent members: p(x_j | x_j = 1) does not move the others, so "after" uses the same logits
            pick = _draw_categorical(_group_log_weights(lg, lg[:, None, :].expand(-1, k, -1), grp.required), g)
            row[:, grp.start:grp.stop] = 0.0
            on = pick < k
            row[on.nonzero().flatten(), grp.start + pick[on]] = 1.0
        return row
    head = _IncrementalHead(model)
    pre = head.start(h)  # (B, D)
    cursor = torch.zeros(B, dtype=torch.long, device=h.device)
    gnext = torch.zeros(B, dtype=torch.long, device=h.device)  # each patient's next undecided group
    live = torch.arange(B, device=h.device)
    cols = torch.arange(V, device=h.device)
    while live.numel():
        if groups:  # a group with a head that starts right at the cursor needs no Bernoulli pass: draw it now
            for _ in range(groups.n):
                nxt = gnext[live]
                at = (groups.start[nxt] == cursor[live]) & groups.has_head[nxt]
                if not at.any():
                    break
                _decide_groups(head, pre, row, None, live, at, gnext, cursor, groups, temperature, g, prior)
            live = live[cursor[live] < V]
            if not live.numel():
                break
        logits = head.logits(pre[live], None if prior is None else prior[live]).float() / temperature  # (n, V)
        draw = torch.rand(logits.shape, generator=g, device=h.device) < torch.sigmoid(logits)
        draw &= cols[None, :] >= cursor[live, None]  # committed columns stay as they are
        has = draw.any(dim=1)
        first = torch.where(has, draw.to(torch.int8).argmax(dim=1), V)  # first drawn 1 at or after the cursor
        if groups:  # the cursor reached the next group (every column before it drew 0): decide the group
            decide = first >= groups.start[gnext[live]]
        else:
            decide = torch.zeros_like(has)
        commit = has & ~decide
        idx, code = live[commit], first[commit]
        row[idx, code] = 1.0
        head.commit(pre, idx, code)
        cursor[idx] = code + 1
        if decide.any():
            _decide_groups(head, pre, row, logits, live, decide, gnext, cursor, groups, temperature, g, prior)
        live = live[has | decide]
    return row


def _after_logits(head, pre: torch.Tensor, grp: TokenGroup, temperature: float, prior: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``(n, k, k)``: ``[:, j, i]`` = logit of member i with member j committed (from the incremental head);
    ``prior (n, V)``: the patients' recurrence offsets, or None."""
    n, kk = pre.size(0), grp.stop - grp.start
    w2, b2 = head.w2[grp.start:grp.stop], head.b2[grp.start:grp.stop]
    b2 = b2 if prior is None else b2 + prior[:, None, grp.start:grp.stop]  # (kk,) or (n, 1, kk)
    out = torch.empty(n, kk, kk, device=pre.device)
    chunk = max(1, (1 << 24) // max(1, n * pre.size(1)))  # bound the (n, chunk, D) activations
    for j0 in range(0, kk, chunk):
        j1 = min(kk, j0 + chunk)
        z = torch.relu(pre[:, None, :] + head.w1_row[grp.start + j0:grp.start + j1][None])  # (n, c, D)
        out[:, j0:j1] = (torch.matmul(z, w2.t()) + b2).float() / temperature
    return out


def _decide_groups(head, pre, row, logits, live, decide, gnext, cursor, groups: _Groups, temperature, g,
                   prior=None) -> None:
    """Draw the next group of each patient in ``live[decide]`` as one categorical and commit it."""
    pos = decide.nonzero().flatten()  # positions in `live` / `logits`
    which = gnext[live[pos]]
    for k in torch.unique(which).tolist():
        grp = groups.groups[k]
        sel = pos[which == k]
        idx = live[sel]
        kk = grp.stop - grp.start
        pri = None if prior is None else prior[idx]
        if groups.heads[k] is not None:  # the model's own categorical over the group (+ "none")
            lg = head.model.group_logits(torch.relu(pre[idx]), groups.heads[k], pri, row[idx]).float() / temperature
            pick = _draw_categorical(lg[:, :kk] if grp.required else lg, g)
        else:  # a Bernoulli chain over the members, restricted to at most (exactly) one
            pick = _draw_categorical(_group_log_weights(logits[sel, grp.start:grp.stop],
                                                        _after_logits(head, pre[idx], grp, temperature, pri),
                                                        grp.required), g)
        on = pick < kk
        code = grp.start + pick[on]
        row[idx[on], code] = 1.0
        head.commit(pre, idx[on], code)
        cursor[idx] = grp.stop
        gnext[idx] = k + 1


# ---------------------------------------------------------------------------------------------- block-lazy head
HEAD_BLOCK = 128  # logit columns per block: 64-256 within noise on CPU, 128 best at the paper size (docs/speed.md)


class _BlockHead(_IncrementalHead):
    """The incremental head, evaluated lazily in column blocks; built once per model and shard.

    Logit j is unit E-1+j of the second masked layer, so it reads hidden units 0..E-1+j only, and those read h and
    row[:j]. The logits of a block [c0, c1) therefore need hidden units 0..E+c1-2 and their K weight rows over
    them, which are transposed and made contiguous here once: a pass over a block costs K * (E + c1) per patient,
    and the V logits of a row cost about the non-zero half of the (V x D) masked weight instead of all of it.
    """

    def __init__(self, model):
        super().__init__(model)
        self.E = model.config.n_embd
        self.V = model.config.vocab_size
        self._blocks: dict[tuple[int, int], tuple] = {}

    def block(self, a: int, b: int) -> tuple:
        """The ``_Segment`` tensors of columns a..b-1, made once (label and visit rows share most blocks)."""
        if (a, b) not in self._blocks:
            E, width, cols = self.E, self.E + b - 1, torch.arange(b - a, device=self.b2.device)
            weight = self.w2[a:b, :width].t().contiguous()
            self._blocks[a, b] = (weight, self.b2[a:b].contiguous(), width, self.w1_row[a:b],
                                  weight[E + a:].contiguous(), self.w1_row[a:b, E + a:width].contiguous(),
                                  cols[:, None] < cols[None, :])
        return self._blocks[a, b]


class _Segment(NamedTuple):
    """Columns ``start:stop`` of a row, drawn together: a block of Bernoulli columns, or one token group. The
    tensors are views and copies made once per shard, so a pass indexes them without slicing anything."""
    start: int
    stop: int
    weight: torch.Tensor            # (width, K): the block's logit units over the hidden units they read
    bias: torch.Tensor              # (K,)
    width: int                      # E + stop - 1: hidden units the block's logits read
    commit: torch.Tensor            # (K, D): what committing each column adds to the pre-activation
    inner: torch.Tensor             # (K - 1, K): the weight rows of the block's own units E+start .. width-1
    commit_in: torch.Tensor         # (K, K - 1): what committing each column adds to those units
    later: torch.Tensor             # (K, K) bool: later[j] = the columns after j (what a patient re-draws)
    group: TokenGroup | None = None
    group_head: tuple | None = None  # the model's categorical head: (weight, bias, direct weight or None)


def _segments(head: _BlockHead, groups: _Groups, V: int, block: int) -> list[_Segment]:
    """The row cut into blocks on the grid of multiples of ``block``, and each token group as a segment of its
    own (a group splits the block it falls in)."""
    def blocks(a: int, b: int) -> list[tuple[int, int]]:
        edges = sorted({a, b, *range((a // block + 1) * block, b, block)})
        return list(zip(edges, edges[1:]))

    cuts, c = [], 0
    for k, grp in enumerate(groups.groups if groups else ()):
        cuts += [(a, b, None, None) for a, b in blocks(c, grp.start)]
        gh = None
        if groups.heads[k] is not None:
            m, hk = head.model, groups.heads[k]
            direct = m.group_direct[str(hk)].weight if str(hk) in getattr(m, "group_direct", {}) else None
            gh = (m.group_heads[hk].weight, m.group_heads[hk].bias, direct)
        cuts.append((grp.start, grp.stop, grp, gh))
        c = grp.stop
    cuts += [(a, b, None, None) for a, b in blocks(c, V)]
    return [_Segment(a, b, *head.block(a, b), grp, gh) for a, b, grp, gh in cuts]


def _fill_block(seg: _Segment, pre: torch.Tensor, row: torch.Tensor, temperature: float, g: torch.Generator,
                prior: torch.Tensor | None = None) -> None:
    """Draw columns ``seg.start:seg.stop`` of every patient's row, exactly (skip-zeros within the block).

    Each pass draws the rest of the block from the logits given the row so far; a patient with a drawn 1 commits
    its first one (the zeros before it were drawn under the right prefix) and re-draws the columns after it in
    the next pass, a patient without one is done with the block. Passes = 1 + the most codes one patient has here.
    A code of the block moves only the block's own K-1 hidden units, so the logits are split into a fixed part
    (units before the block, once per block) and those units, which each patient carries: a later pass is a
    (K-1) x K product. The block's codes reach ``pre`` once, at the end. The loop is the sampler's hot path, one
    tensor op per line.
    """
    lo = seg.width - seg.inner.size(0)  # E + start: the block's first own unit
    fixed = torch.addmm(seg.bias, torch.relu(pre[:, :lo]), seg.weight[:lo])  # (B, K): what no code here moves
    if prior is not None:  # the recurrence offsets: fixed for the whole row
        fixed += prior[:, seg.start:seg.stop]
    own = pre[:, lo:seg.width]  # (B, K - 1): the block's own units (pre-activations)
    lg = torch.addmm(fixed, torch.relu(own), seg.inner)  # (B, K)
    act = open_ = None  # patients still in the block (None = everyone) and the columns they still draw
    who, what = [], []
    while True:
        if lg.dtype != torch.float32:  # probabilities and draws in fp32 whatever the model's dtype
            lg = lg.float()
        if temperature != 1.0:
            lg = lg / temperature
        draw = torch.rand(lg.shape, generator=g, device=lg.device) < lg.sigmoid_()
        if open_ is not None:
            draw &= open_  # columns up to the last commit are decided
        has, first = draw.max(dim=1)  # first drawn 1 among the open columns (max returns the first maximum)
        hit = torch.where(has)[0]
        if not hit.numel():
            break
        j = first[hit]
        act = hit if act is None else act[hit]
        fixed, own = fixed[hit], own[hit] + seg.commit_in[j]
        open_ = seg.later[j]  # a patient whose 1 was the block's last column draws nothing next pass
        who.append(act)
        what.append(j)
        lg = torch.addmm(fixed, torch.relu(own), seg.inner)  # (n, K)
    if who:
        idx, j = (torch.cat(who), torch.cat(what)) if len(who) > 1 else (who[0], what[0])
        row[:, seg.start:seg.stop][idx, j] = 1.0
        pre.index_add_(0, idx, seg.commit[j])


def _draw_group(head: _BlockHead, seg: _Segment, pre: torch.Tensor, row: torch.Tensor, temperature: float,
                g: torch.Generator, prior: torch.Tensor | None = None) -> None:
    """One token group for every patient, as one categorical given the row so far (see ``_decide_groups``)."""
    grp, kk = seg.group, seg.stop - seg.start
    if grp.required and kk == 1:  # one member, required: nothing to draw
        row[:, grp.start] = 1.0
        pre += seg.commit[0]
        return
    if seg.group_head is not None:  # the model's own categorical over the group (+ "none"): HALO.group_logits
        weight, bias, direct = seg.group_head
        lg = F.linear(torch.relu(pre[:, :head.E + grp.start]), weight, bias)
        if direct is not None:  # HALO.group_logits with group_direct: the row's columns before the group
            lg = lg + F.linear(row[:, :grp.start], direct)
        lg = lg.float()
        if prior is not None:  # HALO.group_logits: the members' offsets, none for "none"
            lg[:, :kk] += prior[:, grp.start:grp.stop]
        lg = lg[:, :kk] if grp.required else lg
        pick = _draw_categorical(lg / temperature if temperature != 1.0 else lg, g)
    else:  # a Bernoulli chain over the members, restricted to at most (exactly) one
        lg0 = torch.addmm(seg.bias, torch.relu(pre[:, :seg.width]), seg.weight).float()
        if prior is not None:
            lg0 += prior[:, grp.start:grp.stop]
        lg0 = lg0 / temperature
        pick = _draw_categorical(_group_log_weights(lg0, _after_logits(head, pre, grp, temperature, prior),
                                                    grp.required), g)
    if grp.required:  # every patient takes a member
        row[:, grp.start:grp.stop].scatter_(1, pick[:, None], 1.0)
        pre += seg.commit[pick]
        return
    on = torch.where(pick < kk)[0]
    row[on, grp.start + pick[on]] = 1.0
    pre.index_add_(0, on, seg.commit[pick[on]])


@torch.no_grad()
def _sample_row_blocks(head: _BlockHead, segments: list[_Segment], h: torch.Tensor, temperature: float,
                       g: torch.Generator, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Exact draw of one row for every patient, block by block in column order (the same law as ``_sample_row``,
    other uniforms). ``h (B, E)``, ``prior (B, V)`` or None -> ``(B, V)``."""
    row = torch.zeros(h.size(0), head.V, device=h.device, dtype=h.dtype)
    pre = head.start(h)  # (B, D)
    for seg in segments:
        if seg.group is None:
            _fill_block(seg, pre, row, temperature, g, prior)
        else:
            _draw_group(head, seg, pre, row, temperature, g, prior)
    return row


def _label_rows(labels, label_probs: pd.DataFrame | None, vocab: Vocab, n_patients: int, seed: int
                ) -> torch.Tensor | None:
    """The fixed label rows ``(n_patients, n_labels)``: given, drawn from ``label_probs``, or None (sampled)."""
    if labels is None and label_probs is not None and vocab.label_row:
        labels = labels_from_probs(label_probs, vocab, n_patients,   # not the row stream: its own bits
                                   torch.Generator().manual_seed(torch_seed(seed, "labels")))
    if labels is None:
        return None
    if not vocab.label_row:
        raise ConfigError("labels were given but this vocabulary has no label row (label_row: false).")
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.shape != (n_patients, vocab.n_labels):
        raise ConfigError(f"labels must have shape (n_patients, n_labels) = ({n_patients}, {vocab.n_labels}); "
                          f"got {tuple(labels.shape)}.")
    return labels


RowDrawer = Callable[[torch.Tensor, str, torch.Tensor | None], torch.Tensor]
# (h (n, E), "label" | "visit", recurrence offsets (n, V) or None) -> one row (n, V)


def _row_drawer(model, V: int, temperature: float, g: torch.Generator, row_groups: dict[str, _Groups],
                head_block: int | None) -> RowDrawer:
    """How each row is drawn: the block-lazy head (its weights transposed once, here), or with ``head_block=None``
    (and for HALO-Coarse) the full-row head of ``_sample_row``."""
    if head_block is None or getattr(model.config, "coarse", False):
        return lambda h, kind, prior: _sample_row(model, h, V, temperature, g, row_groups[kind], prior)
    head = _BlockHead(model)
    segments = {kind: _segments(head, grp, V, head_block) for kind, grp in row_groups.items()}
    return lambda h, kind, prior: _sample_row_blocks(head, segments[kind], h, temperature, g, prior)


MAX_REDRAWS = 32   # arbitrary; a row a rule still breaks after that keeps the rule's overwrite (counted in tests)


def _apply_rules(rules: RowRules, draw_row: RowDrawer, h: torch.Tensor, kind: str, past: torch.Tensor,
                 row: torch.Tensor, t: int, protect: torch.Tensor | None, prior: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """ConSequence's overwrite of a sampled row. A patient's row is drawn again (up to ``MAX_REDRAWS`` times)
    where the overwrite would erase the value of a single-valued variable (``protect``: its columns; e.g.
    ``evt:ELECTIVE => cal:weekday=Sat = 0``) or where clashing rules leave one broken (``rules.violated``), so such
    rows come from the model restricted to the rows the rules allow (rejection), not from a half-erased draw.
    Rows needing neither are the plain overwrite, as before."""
    fixed = rules.apply_row(past, row, t)
    check = getattr(rules, "violated", None)
    if protect is None and check is None:
        return fixed

    def bad_rows(r: torch.Tensor, f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        bad = ((r != f) & protect).any(-1) if protect is not None else torch.zeros(len(r), dtype=torch.bool,
                                                                                   device=r.device)
        return bad | check(p, f, t) if check is not None else bad

    bad = bad_rows(row, fixed, past).nonzero().flatten()
    for _ in range(MAX_REDRAWS):
        if bad.numel() == 0:
            break
        new = draw_row(h[bad], kind, None if prior is None else prior[bad])
        new_fixed = rules.apply_row(past[bad], new, t)
        fixed = fixed.clone()
        fixed[bad] = new_fixed
        bad = bad[bad_rows(new, new_fixed, past[bad])]
    return fixed


def _sample_batch(model, vocab: Vocab, B: int, labels: torch.Tensor | None, draw_row: RowDrawer,
                  rules: RowRules | None, device, shared_start: bool = False, protect: torch.Tensor | None = None
                  ) -> list[list[list[int]]]:
    """One batch of ``B`` patients, row by row with a KV cache; finished patients leave the batch.

    ``shared_start``: row 0 is <start> for everyone, so its transformer states are computed once and broadcast
    (a third of the transformer's work for a one-visit patient; the full-row head path keeps HI's batched row 0).
    """
    V, T, fvr = vocab.size, model.config.n_ctx, vocab.first_visit_row
    # (B, T, V) rows sampled so far; a patient's rows are read (rules, decoding) only once written, so no zero fill
    X = torch.empty(B, T, V, device=device)
    first = 2 if labels is not None else 1
    X[:, :first] = 0.0
    X[:, 0, vocab.start_index] = 1.0
    if labels is not None:
        X[:, 1, vocab.label_slice] = labels.to(device)
    if shared_start:
        h, kv = model.history(X[:1, :1])
        h, kv = h.expand(B, -1, -1), [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv]
        if labels is not None:
            h, kv = model.history(X[:, 1:2], kv)
    else:
        h, kv = model.history(X[:, :first])
    h = h[:, -1]  # (B, E) state that predicts row `first`
    act = torch.arange(B, device=device)  # batch rows still being sampled
    last_row = torch.full((B,), T - 1, dtype=torch.long)
    recur = bool(getattr(model.config, "recurrence", 0))
    seen = X[:, :first].amax(dim=1) if recur else None  # (B, V): the max of the rows so far (HALO.history_prior)
    for t in range(first, T):
        kind = "label" if t < fvr else "visit"
        prior = model.prior(X[act, t - 1], seen) if recur else None
        row = draw_row(h, kind, prior)  # (n_act, V)
        if rules is not None:
            row = _apply_rules(rules, draw_row, h, kind, X[act, :t], row, t, protect, prior)
        X[act, t] = row
        if t == T - 1:
            break
        ended = (row[:, vocab.end_index] > 0) & (t >= fvr)  # <end> only counts on a visit row
        if ended.any():
            last_row[act[ended].cpu()] = t
            keep = (~ended).nonzero().flatten()
            if keep.numel() == 0:
                break
            act, row = act[keep], row[keep]
            kv = _select_cache(kv, keep)
            seen = seen[keep] if recur else None
        h, kv = model.history(row[:, None, :], kv)  # only the new row goes through the transformer
        h = h[:, -1]
        if recur:
            seen = torch.maximum(seen, row)
    return _row_tokens(X, last_row)


def _row_tokens(X: torch.Tensor, last_row: torch.Tensor) -> list[list[list[int]]]:
    """Per patient b, the token indices of rows 1..last_row[b] of ``X (B, T, V)``, in one nonzero."""
    B, T, _ = X.shape
    keep = torch.arange(T)[None, :] <= last_row[:, None]  # (B, T): the rows written for each patient
    keep[:, 0] = False
    rows = keep.nonzero().tolist()  # (b, r), sorted
    out: list[list[list[int]]] = [[[] for _ in range(int(last_row[p]))] for p in range(B)]
    k, v = X.cpu()[keep].nonzero().T.tolist()  # (k-th kept row, token), sorted
    for ki, vi in zip(k, v):
        bi, ri = rows[ki]
        out[bi][ri - 1].append(vi)
    return out


@torch.no_grad()
def sample(model, vocab: Vocab, n_patients: int, seed: int, batch_size: int = 256, temperature: float = 1.0,
           labels: torch.Tensor | None = None, label_probs: pd.DataFrame | None = None, rules: RowRules | None = None,
           device: str | torch.device | None = None, progress: bool = True,
           groups: Sequence[TokenGroup] | None = None, head_block: int | None = HEAD_BLOCK) -> list[list[list[int]]]:
    """Sample ``n_patients`` patients; returns, per patient, the token indices of rows 1, 2, ... (``decode_rows`` input).

    Args:
        model: a HALO model (eval mode is set here).
        vocab: the checkpoint's vocabulary.
        n_patients: number of patients (before ``decode_rows`` drops those with no visit).
        seed: cohort seed; one ``torch.Generator`` drives every draw, so model + seed + batch size fix the output.
        batch_size: patients sampled together (memory ~ batch_size * n_ctx * (layers * 2 * n_embd + V)).
        temperature: logits are divided by it before the sigmoid (1.0 = the model's distribution).
        labels: ``(n_patients, n_labels)`` multi-hot label rows to condition on (row 1 is fixed, not sampled).
        label_probs: draw the label rows from this empirical joint distribution instead (``labels`` wins).
        rules: an object with ``apply_row(past, row, row_index)``, called on every sampled row (ConSequence).
        device: where to run; defaults to the model's device.
        progress: show a tqdm bar over batches.
        groups: single-valued token groups (``vocab.token_groups``, the checkpoint's ``token_groups.json``): each
            sampled row holds at most one member of each, exactly one where ``required`` (see ``_sample_row``).
        head_block: logit columns per block of the block-lazy head; None = the full-row head (the sampler before
            the block head, kept for benchmarks). Same distribution either way; other sizes draw other uniforms,
            so the same seed gives other (equally exact) patients.
    """
    if head_block is not None and (isinstance(head_block, bool) or not isinstance(head_block, int)
                                   or head_block < 1):
        raise ConfigError(f"head_block must be None (full-row head) or an int >= 1; got {head_block!r}. "
                          f"The default is {HEAD_BLOCK}.")
    if n_patients < 0 or batch_size < 1:
        raise ConfigError(f"n_patients must be >= 0 and batch_size >= 1; got {n_patients} and {batch_size}.")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0; got {temperature}. Use 1.0 for the model's distribution.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    cfg = model.config
    if (cfg.n_visit_tokens, cfg.n_labels) != (vocab.n_visit_tokens, vocab.n_labels):
        raise ConfigError(f"model sizes ({cfg.n_visit_tokens}, {cfg.n_labels}) do not match the vocabulary "
                          f"({vocab.n_visit_tokens}, {vocab.n_labels}); use the checkpoint's own vocab.json.")
    g = torch.Generator(device=device).manual_seed(torch_seed(seed))   # rows: the root stream
    row_groups = {kind: _Groups(_with_model_heads(model, [grp for grp in groups or () if grp.row == kind]),
                                device, model) for kind in ("label", "visit")}
    labels = _label_rows(labels, label_probs, vocab, n_patients, seed)
    draw_row = _row_drawer(model, vocab.size, temperature, g, row_groups, head_block)
    protect = None
    if rules is not None and groups:
        protect = torch.zeros(vocab.size, dtype=torch.bool, device=device)
        for grp in groups:
            protect[grp.start:grp.stop] = True
    out: list[list[list[int]]] = []
    starts = range(0, n_patients, batch_size)
    for b0 in tqdm(starts, desc="sample", unit="batch", disable=not progress or len(starts) < 2):
        B = min(batch_size, n_patients - b0)
        out += _sample_batch(model, vocab, B, None if labels is None else labels[b0:b0 + B], draw_row, rules,
                             device, shared_start=head_block is not None, protect=protect)
    return out


# ---------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def sample_reference(model, vocab: Vocab, n_patients: int, seed: int, batch_size: int = 256,
                     temperature: float = 1.0, groups: Sequence[TokenGroup] | None = None) -> list[list[list[int]]]:
    """HI's algorithm, for comparison only: full-prefix recompute per row, one cursor shared by the batch,
    finished patients keep being sampled until the whole batch has ended. Same output format as ``sample``.

    With ``groups``, the shared cursor stops at each group and draws it for the whole batch by enumeration: one
    full ``model.head`` pass per member (the fast sampler updates the head incrementally instead).
    """
    model.eval()
    cfg = model.config
    device = next(model.parameters()).device
    V, T, fvr = vocab.size, cfg.n_ctx, vocab.first_visit_row
    g = torch.Generator(device=device).manual_seed(torch_seed(seed))   # rows: the root stream
    cols = torch.arange(V, device=device)
    heads = {tuple(r): k for k, r in enumerate(cfg.groups or ())} if not cfg.coarse else {}
    out = []
    for b0 in range(0, n_patients, batch_size):
        B = min(batch_size, n_patients - b0)
        X = torch.zeros(B, T, V, device=device)
        X[:, 0, vocab.start_index] = 1.0
        n_rows = T
        for t in range(1, T):
            h, _ = model.history(X[:, :t])
            h = h[:, -1]
            prior = model.history_prior(X[:, :t])
            prior = None if prior is None else prior[:, -1]
            row = torch.zeros(B, V, device=device)
            pending = sorted(_with_model_heads(model, [grp for grp in groups or ()
                                                       if grp.row == ("label" if t < fvr else "visit")]),
                             key=lambda grp: grp.start)
            i = 0
            while i < V:
                logits = model.head(h, row, prior).float() / temperature
                draw = (torch.rand(logits.shape, generator=g, device=device) < torch.sigmoid(logits)) \
                    & (cols[None, :] >= i)
                anyc = draw.any(dim=0).nonzero()
                c = int(anyc[0]) if anyc.numel() else V
                if pending and c >= pending[0].start:
                    grp = pending.pop(0)
                    k = grp.stop - grp.start
                    hk = heads.get((grp.start, grp.stop))
                    if hk is not None:
                        lg = model.group_logits(model._fine(h, row)[0], hk, prior, row).float() / temperature
                        pick = _draw_categorical(lg[:, :k] if grp.required else lg, g)
                    else:
                        lg_after = torch.empty(B, k, k, device=device)
                        for j in range(k):
                            on = row.clone()
                            on[:, grp.start + j] = 1.0
                            lg_after[:, j] = model.head(h, on, prior).float()[:, grp.start:grp.stop] / temperature
                        pick = _draw_categorical(_group_log_weights(logits[:, grp.start:grp.stop], lg_after,
                                                                    grp.required), g)
                    hit = (pick < k).nonzero().flatten()
                    row[hit, grp.start + pick[hit]] = 1.0
                    i = grp.stop
                    continue
                if c == V:
                    break
                row[:, c] = draw[:, c].float()
                i = c + 1
            X[:, t] = row
            if t >= fvr and bool((X[:, fvr:t + 1, vocab.end_index] > 0).any(dim=1).all()):
                n_rows = t + 1
                break
        Xc = X[:, :n_rows].cpu()
        for b in range(B):
            rows = []
            for r in range(1, n_rows):
                rows.append(Xc[b, r].nonzero().flatten().tolist())
                if r >= fvr and vocab.end_index in rows[-1]:
                    break
            out.append(rows)
    return out


# ---------------------------------------------------------------------------------------------- stage API
def _label_mix(model_dir, condition, vocab: Vocab) -> pd.DataFrame | None:
    """The label distribution to draw label rows from: None (the model samples them), the checkpoint's
    ``label_probs.parquet``, or its rows matching a ``{variable: value}`` condition."""
    label_probs = None
    lp_path = storage.join(model_dir, "label_probs.parquet")
    if storage.exists(lp_path):
        label_probs = storage.read_parquet(lp_path).to_pandas()
    if condition is None:
        return None
    if isinstance(condition, dict):
        return labels_from_condition(condition, vocab, label_probs)
    if label_probs is None:  # condition == "label_probs" (SampleConfig allows nothing else)
        raise ConfigError(f"condition='label_probs' but {lp_path} does not exist; train with a label row, "
                          "or pass condition=None to let the model sample labels.")
    return label_probs


def _sample_config(config: SampleConfig | None, options: dict) -> SampleConfig:
    return config_or_options(SampleConfig, config, options, SampleConfig.from_dict)


def sample_to_dir(model_dir, out_dir, config: SampleConfig | None = None, *, device: str | None = None,
                  overwrite: bool = False, **options) -> dict:
    """Sample a cohort shard from a checkpoint directory and write a canonical tables directory.

    Args:
        model_dir: train-stage output (model.pt, config.json, vocab.json[, rules.json, label_probs.parquet,
            token_groups.json]).
        out_dir: output tables directory (binned columns only; continuous values and times stay null).
        config: what defines the shard (config.py): seed, n_patients, batch_size, temperature, condition
            (None = the model samples the label row; ``"label_probs"`` = label rows from the training label mix;
            ``{variable: value}`` = only label rows matching it) and constrain (one value per single-valued
            variable per row, from the checkpoint's ``token_groups.json``; older checkpoints lack it).
        device: torch device; defaults to CPU.
        overwrite: replace an existing ``out_dir``.
        options: instead of ``config``, its fields as keywords (``seed=3, n_patients=100``).
    Returns:
        a JSON-able summary (also written to ``meta.json``).
    """
    config = _sample_config(config, options)
    storage.check_output(out_dir, overwrite=overwrite)     # before the checkpoint is read
    model, vocab, info = load_model(model_dir, device)
    use_probs = _label_mix(model_dir, config.condition, vocab)
    rules = load_row_rules(model_dir, vocab)
    groups_path = storage.join(model_dir, TOKEN_GROUPS_FILE)
    constrain = config.constrain
    groups = load_token_groups(groups_path, vocab) if constrain and storage.exists(groups_path) else []
    if constrain and not groups:
        log.info("%s: no %s; sampling without single-value constraints.", model_dir, TOKEN_GROUPS_FILE)
    rows = sample(model, vocab, config.n_patients, config.seed, config.batch_size, config.temperature,
                  label_probs=use_probs, rules=rules, device=device, groups=groups)
    patients, visits, codes, counts = decode_rows(rows, vocab, config.seed)
    meta = {"stage": "sample", "seed": int(config.seed), "n_patients_requested": int(config.n_patients), **counts,
            "n_visits": len(visits), "n_codes": len(codes), "batch_size": int(config.batch_size),
            "temperature": float(config.temperature), "condition": config.condition,
            "model_type": info.get("model_type", "halo"), "rules": rules is not None, "model_dir": str(model_dir),
            "token_groups": {"n": len(groups), "required": [grp.column for grp in groups if grp.required]},
            "versions": versions("torch")}
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tables(tmp, patients, visits, codes)
        vocab.save(storage.join(tmp, "vocab.json"))
        storage.write_json(storage.join(tmp, "meta.json"), meta)
    log.info("sampled %d patients (%d dropped with no visit) -> %s", counts["n_patients"],
             counts["n_dropped_no_visits"], out_dir)
    return meta

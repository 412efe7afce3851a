"""HALO: a hierarchical autoregressive model of longitudinal EHRs (Theodorou et al., Nature Comms 2023).

A patient is a sequence of multi-hot rows (start, labels, visits; docs/canonical-tables.md). Two levels:
1. a GPT-2 style, pre-LayerNorm transformer over *rows* gives a history state h_t for every row t;
2. a MADE-style masked MLP over ``[h_t, x_{t+1}]`` gives p(code j of row t+1 | history, codes < j of row t+1),
   so a visit is itself generated code by code in vocabulary order.

Differences from the reference code (HI:model.py), all mathematically neutral: ``nn.Linear`` instead of
Conv1D (weights transposed), ``nn.LayerNorm`` instead of the custom one, causal attention by SDPA instead of a
-1e10 buffer, the head's triangular mask applied to the weight in forward instead of a D x D int buffer (Opacus
refuses trainable modules with buffers), and logits + BCEWithLogits instead of probabilities + BCELoss (AMP).
HALO-Coarse (``coarse=True``; HI:baselines/haloCoarse) replaces the fine head by a decoder tied to the visit
embedding, so codes within a visit are independent given the history.

One extension that is not neutral, opt-in through ``HaloConfig.groups`` (the train stage turns it on): each
single-valued variable (event type, a visit bin, a calendar kind, a label) gets a categorical head, a softmax over
its tokens + "none" read from the fine head's hidden units that see only h and the columns before the group.
HI scores those tokens as a chain of Bernoullis, which lets a visit hold no month or two, and hands the last token
whatever probability the earlier conditionals under-estimate (docs/temporal.md §1).

A second, opt-in through ``HaloConfig.recurrence`` (the train stage turns it on): per-token logit offsets for what the
patient already has (``Recurrence``): p(token j in row t+1) moves by ``last[j]`` where row t holds j and by
``ever[j]`` where any row up to t does. A chronic diagnosis recurs at the next admission ~90 % of the time; to say so
through h the transformer must carry every chronic code of the last visit in n_embd dimensions, which the tiny
preset did not learn in 680 steps (teacher-forced 0.15 vs 0.93 real; docs/fidelity.md). The offsets are 2V numbers,
start at 0 (the model starts as HALO) and keep the factorisation: they read earlier rows only.

Two more, also ours: ``HaloConfig.group_direct`` (each categorical head adds a zero-initialised linear term of the
row's columns before its group, so "electives fall on weekdays" is one weight; on with the heads in the train stage)
and ``HaloConfig.end_from_history`` (the <end> logit reads h only; an ablation, off).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's cached (key, value), each (B, n_head, S, head_dim)


class CausalSelfAttention(nn.Module):

    def __init__(self, config: "HaloConfig"):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head

    def forward(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        B, T, E = x.shape  # batch, new rows, embedding
        q, k, v = self.c_attn(x).split(E, dim=2)
        q, k, v = (t.view(B, T, self.n_head, E // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, S, hd)
        S = k.size(2)
        if S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new row attends to the whole cache
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # SDPA's is_causal aligns top-left; new rows sit at the bottom-right of the (T, S) score matrix
            keep = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        y = y.transpose(1, 2).contiguous().view(B, T, E)  # (B, T, E)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):

    def __init__(self, config: "HaloConfig"):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's tanh GELU, as HI


class Block(nn.Module):

    def __init__(self, config: "HaloConfig"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class MaskedLinear(nn.Module):
    """Square linear layer whose output unit o sees inputs 0..o only (lower triangle, diagonal included).

    The mask is ``torch.tril`` of the weight in forward, never a buffer, so Opacus accepts the module; it owns
    exactly ``weight`` (out, in) and ``bias``. Its per-sample gradient is the stock linear one, masked.
    ``narrow``: ``(o, c)`` pairs whose output unit o reads inputs 0..c-1 only (``HaloConfig.end_from_history``).
    """

    def __init__(self, dim: int, narrow: tuple[tuple[int, int], ...] = ()):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.narrow = tuple(narrow)
        self.reset_parameters()

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """``w (..., out, in)`` with the entries this layer never reads set to 0 (the triangle, then ``narrow``)."""
        w = torch.tril(w)
        for o, c in self.narrow:
            w[..., o, c:] = 0.0
        return w

    def reset_parameters(self) -> None:
        # PyTorch's default nn.Linear init, which HI's head gets (its mask multiplies the weight later)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.weight.size(1))
        nn.init.uniform_(self.bias, -bound, bound)

    def masked_weight(self) -> torch.Tensor:
        """``tril(weight)``; under no_grad it is computed once per weight version (sampling calls the head
        hundreds of times per row) and kept as a plain attribute, not a buffer. A forward with gradients drops
        it: the fused Adam updates weights in place without bumping their version."""
        if torch.is_grad_enabled():
            self.__dict__.pop("_tril_key", None)
            return self.mask(self.weight)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self.__dict__.get("_tril_key") != key:
            self.__dict__["_tril"], self.__dict__["_tril_key"] = self.mask(self.weight.detach()), key
        return self.__dict__["_tril"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class Recurrence(nn.Module):
    """Logit offsets ``gain * (prev * last + seen * ever)`` ``(..., V)`` for the next row, from ``prev`` (the
    patient's latest row) and ``seen`` (the elementwise max of all rows so far).

    ``gain`` is a fixed reparameterisation: each offset is one scalar that must travel several logits (from the base
    rate of a chronic code to its recurrence rate), while Adam moves a parameter by about lr per step; the gain makes
    that ``gain * lr``, which the hidden-unit sums of the fine head get from their width. Opacus' per-sample
    gradient rule for it is ``dp.recurrence_grad_sample``.
    """

    def __init__(self, dim: int, gain: float):
        super().__init__()
        self.last = nn.Parameter(torch.zeros(dim))
        self.ever = nn.Parameter(torch.zeros(dim))
        self.gain = gain

    def forward(self, prev: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return self.gain * (prev * self.last + seen * self.ever)


RECURRENCE_GAIN = 30.0  # HaloConfig.recurrence the train stage sets; 10 and 30 measured on the simulator (docs/fidelity.md)


PRESETS = {  # name -> (n_embd, n_layer, n_head)
    "tiny": (32, 2, 2),      # arbitrary; CPU tests and laptop pipeline runs
    "small": (256, 4, 4),    # arbitrary; quick real-data runs
    "paper": (768, 12, 12),  # HALO paper / HI:config.py
}


@dataclass(frozen=True)
class HaloConfig:
    n_visit_tokens: int                 # from vocab.json written by preprocess
    n_labels: int                       # from vocab.json
    n_ctx: int = 48                     # rows incl. start and label rows; HI:config.py
    n_embd: int = 768                   # HI:config.py
    n_layer: int = 12                   # HI:config.py
    n_head: int = 12                    # HI:config.py
    layer_norm_epsilon: float = 1e-5    # HI:config.py
    coarse: bool = False                # HALO-Coarse ablation; HI:baselines/haloCoarse
    pos_loss_weight: float | None = None  # weight on positive targets; None in HI:config.py / KI:config.py
    # column ranges [start, stop) of single-valued variables (vocab.token_groups), each given a categorical head
    # (ours, not HI's): p(value | history, codes < start) as one softmax over its tokens + "none"; None = pure HALO
    groups: tuple[tuple[int, int], ...] | None = None
    # each group head also reads the row's earlier columns directly (a linear term, zero at init; ours): an event
    # type -> weekday dependence is then one weight, not a product of two small ones through the fine head
    group_direct: bool = False
    # the <end> logit reads the history only (h), not the codes drawn before it in the row (ours): a sampled row
    # that differs from real ones cannot move the number of visits (exposure bias of the end token)
    end_from_history: bool = False
    # gain of the per-token offsets for tokens of the previous row / of any earlier row (``Recurrence``; ours,
    # not HI's); 0 = none (pure HALO). The train stage sets RECURRENCE_GAIN.
    recurrence: float = 0.0

    def __post_init__(self):
        r = self.recurrence
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            raise ConfigError(f"HaloConfig.recurrence must be a gain >= 0 (0 = off; the train stage uses "
                              f"{RECURRENCE_GAIN}); got {r!r}.")
        if self.groups is not None:  # JSON gives lists; keep a hashable, validated tuple of pairs
            g = tuple((int(a), int(b)) for a, b in self.groups)
            V = self.vocab_size
            bad = [r for r in g if not 0 <= r[0] < r[1] <= V]
            overlap = [(a, b) for a, b in zip(g, g[1:]) if b[0] < a[1]]
            if bad or overlap or list(g) != sorted(g):
                raise ConfigError(f"HaloConfig.groups must be sorted, non-overlapping [start, stop) ranges inside the "
                                  f"vocabulary (size {V}); got {list(self.groups)}. Take them from "
                                  "vocab.token_groups.")
            object.__setattr__(self, "groups", g or None)

    @property
    def vocab_size(self) -> int:
        return self.n_visit_tokens + self.n_labels + 3  # + start, end, pad

    @property
    def end_index(self) -> int:
        return self.n_visit_tokens + self.n_labels + 1  # Vocab.end_index

    @classmethod
    def preset(cls, name: str, n_visit_tokens: int, n_labels: int, **overrides) -> "HaloConfig":
        if name not in PRESETS:
            raise ConfigError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}.")
        E, L, H = PRESETS[name]
        return cls(n_visit_tokens, n_labels, **{"n_embd": E, "n_layer": L, "n_head": H, **overrides})

    @classmethod
    def tiny(cls, n_visit_tokens: int, n_labels: int, **overrides) -> "HaloConfig":
        return cls.preset("tiny", n_visit_tokens, n_labels, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config.json") -> "HaloConfig":
        """Build from a dict (e.g. config.json), ignoring keys that are not config fields (``model_type``)."""
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("n_visit_tokens", "n_labels") if n not in d]
        if missing:
            raise ConfigError(f"{where}: lacks {missing}; found keys {sorted(d)}. Re-run the train stage.")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"{where}: n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}.")
        return cfg


class HALO(nn.Module):

    def __init__(self, config: HaloConfig):
        super().__init__()
        self.config = config
        V, E = config.vocab_size, config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wve=nn.Linear(V, E, bias=False),     # visit embedding: the sum of the row's code embeddings
            wpe=nn.Embedding(config.n_ctx, E),   # HI allocates n_positions=56 > n_ctx; the slack is never read
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(E, eps=config.layer_norm_epsilon),
        ))
        if not config.coarse:
            self.fine_1 = MaskedLinear(E + V)
            self.fine_2 = MaskedLinear(E + V, narrow=((E - 1 + config.end_index, E),) if config.end_from_history
                                       else ())
            # group k reads hidden units 0 .. E+start-1 of the fine head: they see h and row[:start] only
            self.group_heads = nn.ModuleList([nn.Linear(E + a, b - a + 1) for a, b in config.groups or ()])
            if config.group_direct:  # keyed by group index; a group at column 0 has no earlier columns to read
                self.group_direct = nn.ModuleDict({str(k): nn.Linear(a, b - a + 1, bias=False)
                                                   for k, (a, b) in enumerate(config.groups or ()) if a > 0})
                for lin in self.group_direct.values():
                    nn.init.zeros_(lin.weight)
        elif config.groups:
            raise ConfigError("HaloConfig: groups need the fine head; HALO-Coarse (coarse=True) has none.")
        if config.recurrence:
            self.recurrence = Recurrence(V, float(config.recurrence))
        # HI inits its Conv1D projections N(0, 0.02) with zero bias; the visit embedding and the fine head keep
        # PyTorch's default Linear init and the position table nn.Embedding's default N(0, 1).
        for block in self.transformer.h:
            block.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def history(self, x: torch.Tensor, past_key_values: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Transformer states for rows x: ``h (B, T, E)``, and the new per-layer KV cache.

        With ``past_key_values`` from earlier rows, x holds only the new rows (positions continue after them).
        """
        B, T, V = x.shape  # batch, rows, vocab
        past_len = 0 if past_key_values is None else past_key_values[0][0].size(2)
        assert past_len + T <= self.config.n_ctx, f"{past_len + T} rows exceed n_ctx={self.config.n_ctx}"
        # (B, T), not (T,): the position lookup must carry the batch dimension, or Opacus' per-sample gradient of
        # wpe treats rows as samples (privacy.py); the values are the same either way
        pos = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        h = self.transformer.wve(x) + self.transformer.wpe(pos)  # (B, T, E)
        presents = []
        for i, block in enumerate(self.transformer.h):
            h, kv = block(h, None if past_key_values is None else past_key_values[i])
            presents.append(kv)
        return self.transformer.ln_f(h), presents

    def prior(self, prev: torch.Tensor, seen: torch.Tensor) -> torch.Tensor | None:
        """The recurrence offsets ``(..., V)`` of the row after ``prev`` (that row) given ``seen`` (the max of all
        rows up to it); None without ``HaloConfig.recurrence``."""
        return self.recurrence(prev, seen) if self.config.recurrence else None

    def history_prior(self, x: torch.Tensor) -> torch.Tensor | None:
        """``prior`` for every row of ``x (B, T, V)``: position t offsets row t+1, from rows 0..t."""
        return self.prior(x, torch.cummax(x, dim=1).values) if self.config.recurrence else None

    def head(self, h: torch.Tensor, row: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the next row given history states ``h (..., E)``, its (partial) multi-hot ``row (..., V)`` and the
        recurrence offsets ``prior (..., V)`` (``history_prior``; None without recurrence).

        Logit j depends on h and on row[..., :j] only, so the sampler may pass a row filled up to any column.
        """
        logits = self._fine(h, row)[1]
        return logits if prior is None else logits + prior

    def _fine(self, h: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(hidden activations of the fine head ``(..., E + V)``, logits ``(..., V)``); hidden is None when coarse."""
        if self.config.coarse:
            return None, h @ self.transformer.wve.weight  # (..., V): decoder tied to the visit embedding
        a = F.relu(self.fine_1(torch.cat([h, row], dim=-1)))  # (..., E + V): unit o sees inputs 0..o
        E = self.config.n_embd
        return a, self.fine_2(a)[..., E - 1:E - 1 + self.config.vocab_size]  # E-1+j sees h, row[:j]

    def output_bias(self) -> torch.Tensor:
        """The logits' biases ``(V,)``: a view of ``fine_2.bias`` (``_fine``: logit j is its unit E-1+j)."""
        E = self.config.n_embd
        return self.fine_2.bias[E - 1:E - 1 + self.config.vocab_size]

    def group_logits(self, hidden: torch.Tensor, k: int, prior: torch.Tensor | None = None,
                     row: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(..., size + 1)`` of group k's categorical (its tokens in order, then "none") from the fine head's
        hidden activations (``_fine``; the sampler passes relu of its incremental pre-activation), with
        ``group_direct`` a linear term of the row's columns before the group (``row (..., V)``, filled at least that
        far), plus the members' recurrence offsets from ``prior (..., V)`` ("none" gets none)."""
        a, b = self.config.groups[k]
        lg = self.group_heads[k](hidden[..., :self.config.n_embd + a])
        if self.config.group_direct and str(k) in self.group_direct:
            lg = lg + self.group_direct[str(k)](row[..., :a])
        if prior is None:
            return lg
        return lg + F.pad(prior[..., a:b], (0, 1))

    def group_target(self, targets: torch.Tensor, k: int) -> torch.Tensor:
        """Group k's class in each row of ``targets (..., V)``: its first member on, else "none" (the group's size)."""
        a, b = self.config.groups[k]
        t = targets[..., a:b]
        return torch.where(t.sum(-1) > 0, t.float().argmax(-1), b - a)

    def teacher_forced(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """For the target rows ``x[:, 1:]`` of ``x (B, T, V)``: the fine head's hidden activations (None when
        coarse), the logits ``(B, T-1, V)`` with the recurrence offsets, and those offsets (None without them)."""
        h, _ = self.history(x[:, :-1])  # (B, T-1, E)
        hidden, logits = self._fine(h, x[:, 1:])
        prior = self.history_prior(x[:, :-1])  # (B, T-1, V) or None
        return hidden, logits if prior is None else logits + prior, prior

    def loss_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     loss_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-entry loss weights ``(B, T-1, V)`` of the target rows of ``x``: ``loss_weight``, else ``mask[:, 1:]``
        (ConSequence also leaves its rule-fixed entries out)."""
        w = loss_weight if loss_weight is not None else mask[:, 1:]
        return w.float().expand(x.size(0), x.size(1) - 1, x.size(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, loss_weight: torch.Tensor | None = None,
                n_ctx: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits for rows 1..T-1: ``(B, T-1, V)``; and the loss when mask or loss_weight is given.

        Args:
            x: ``(B, T, V)`` multi-hot batch from ``collate_halo``.
            mask: ``(B, T, 1)`` row mask before the shift; the loss weight is ``mask[:, 1:]``.
            loss_weight: replaces ``mask[:, 1:]`` as the per-element BCE weight, broadcastable to ``(B, T-1, V)``
                (``loss_weights``; ConSequence's also leaves rule-fixed entries out of the loss).
            n_ctx: the rows per patient the loss is averaged as; default T. A batch trimmed to its longest patient
                (``collate_halo(..., trim=True)``) passes the nominal n_ctx: the cut rows are masked and, attention
                being causal, change no earlier output, so loss, gradients and DP-SGD's per-sample losses are the
                padded batch's.
        The loss is the weighted BCE averaged over all ``B*(n_ctx-1)*V`` elements, masked ones included: HI's scale.
        """
        B, T, V = x.shape  # batch, rows, vocab
        assert n_ctx is None or n_ctx >= T, f"n_ctx={n_ctx} < the batch's {T} rows"
        n_elem = B * ((n_ctx or T) - 1) * V  # the loss normaliser: fixed, never a count of unmasked entries
        targets = x[:, 1:]  # (B, T-1, V)
        hidden, logits, prior = self.teacher_forced(x)  # (B, T-1, V) logits
        if mask is None and loss_weight is None:
            return logits, None
        weight = self.loss_weights(x, mask, loss_weight)
        pos_weight = None
        if self.config.pos_loss_weight is not None:
            pos_weight = torch.tensor(self.config.pos_loss_weight, device=x.device, dtype=logits.dtype)
        if not self.config.groups and n_elem == targets.numel():  # not trimmed: HI's mean, bit for bit
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight,
                                                      pos_weight=pos_weight)
            return logits, loss
        if not self.config.groups:
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight,
                                                      pos_weight=pos_weight, reduction="sum")
            return logits, loss / n_elem
        # a group's tokens are scored by its categorical (one cross-entropy per row), every other token by BCE;
        # the sum is divided by the nominal element count, HI's scale
        in_group = torch.zeros(targets.size(-1), dtype=torch.bool, device=x.device)
        total = 0.0
        for k, (a, b) in enumerate(self.config.groups):
            in_group[a:b] = True
            cls = self.group_target(targets, k)
            ce = F.cross_entropy(self.group_logits(hidden, k, prior, targets).float().flatten(0, -2), cls.flatten(),
                                 reduction="none")
            # the row's weight: its mask (ConSequence zeroes rule-fixed members, e.g. label exclusivity, which the
            # categorical satisfies by construction; the row stays in the loss while any member is unfixed)
            total = total + (ce * weight[..., a:b].amax(-1).flatten()).sum()
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight * ~in_group,
                                                 pos_weight=pos_weight, reduction="sum")
        return logits, (bce + total) / n_elem

"""The fast sampler is exact: it matches the model's enumerated distribution and the reference sampler."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from synthehr_core import storage
from synthehr_core.data.schema import read_tables
from synthehr_core.data.vocab import build_vocab
from synthehr_core.errors import ConfigError
from synthehr_core.model.checkpoint import write_checkpoint
from synthehr_core.model.config import SampleConfig, parse_condition
from synthehr_core.model.halo import HALO, HaloConfig
from synthehr_core.model.sampling import labels_from_probs, sample, sample_reference, sample_to_dir


def _vocab(n_codes=4, labels=False):
    return build_vocab([], {}, [], [f"dx:{i}" for i in range(n_codes)],
                       {"sex": ["F", "M"]} if labels else {}, {}, ["dx"])


def _sharp_model(vocab, n_ctx, seed=0, **config):
    """A tiny untrained model whose head depends strongly on the earlier codes of the row (so mistakes show)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx, **config))
        with torch.no_grad():
            m.fine_1.weight.mul_(4.0)
            m.fine_2.weight.mul_(4.0)
            m.fine_2.bias.normal_(0.0, 1.0)
            m.fine_1.weight[:, m.config.n_embd:] *= 4.0  # the current row's codes matter
    return m.eval()


def _patterns(V):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=V)))  # (2^V, V)


def _log_prob(model, h, rows, prior=None):
    """log p(row | h) under the model's factorisation, for rows (N, V) and states h (N, E) (and the recurrence
    offsets ``prior (N, V)``)."""
    logits = model.head(h, rows, prior)
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits, rows, reduction="none").sum(-1)


def _key(row_tokens, V):
    return sum(1 << (V - 1 - t) for t in row_tokens)  # same order as _patterns


def _chi2_p(counts, expected):
    counts = np.asarray(counts, float)
    expected = np.asarray(expected, float)
    expected = expected * counts.sum() / expected.sum()  # probabilities -> expected counts
    small = expected < 5
    if small.any():  # pool sparse categories
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    assert len(counts) > 10, "too few categories for a meaningful test"
    return stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


class TestExactness:
    N = 12000

    def test_first_visit_matches_enumerated_distribution(self):
        vocab = _vocab(4)  # V = 4 codes + 3 specials = 7 -> 128 possible rows
        V = vocab.size
        m = _sharp_model(vocab, n_ctx=3)
        pats = _patterns(V)
        with torch.no_grad():
            h, _ = m.history(torch.eye(V)[vocab.start_index][None, None, :])
            p_exact = _log_prob(m, h[0, -1].expand(len(pats), -1), pats).exp().numpy()
            assert abs(p_exact.sum() - 1) < 1e-5
            rows = sample(m, vocab, self.N, seed=11, batch_size=3000, progress=False)
            # the naive sampler (all codes drawn at once from the empty prefix) must be detectably different
            p0 = torch.sigmoid(m.head(h[0, -1], torch.zeros(V)))
            p_naive = torch.prod(torch.where(pats > 0, p0, 1 - p0), dim=1).numpy()
        counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(pats))
        assert _chi2_p(counts, p_exact) > 1e-3
        assert self.N * np.sum((p_naive - p_exact) ** 2 / p_exact) > 300  # power: naive would fail

    def test_second_visit_matches_enumeration_through_kv_cache_and_end(self):
        vocab = _vocab(4)
        V = vocab.size
        m = _sharp_model(vocab, n_ctx=3, seed=1)
        pats = _patterns(V)
        P = len(pats)
        start = torch.eye(V)[vocab.start_index]
        with torch.no_grad():
            x = torch.stack([start.expand(P, V), pats], dim=1)  # (P, 2, V): every possible first visit
            h, _ = m.history(x)
            p1 = _log_prob(m, h[:, 0], pats).exp()  # (P,)
            h2 = h[:, 1].repeat_interleave(P, 0)  # (P*P, E)
            p2 = _log_prob(m, h2, pats.repeat(P, 1)).exp().view(P, P)  # p(row2 | row1)
        alive = pats[:, vocab.end_index] == 0
        p_row2 = (p1[alive, None] * p2[alive]).sum(0).numpy()
        p_stop = p1[~alive].sum().item()
        rows = sample(m, vocab, self.N, seed=5, batch_size=2500, progress=False)
        counts = np.zeros(P + 1)
        for r in rows:
            if len(r) == 1:
                counts[P] += 1
            else:
                counts[_key(r[1], V)] += 1
        assert _chi2_p(counts, np.append(p_row2, p_stop)) > 1e-3

    def test_fast_and_reference_samplers_agree(self):
        vocab = _vocab(3, labels=True)  # label row + visits
        m = _sharp_model(vocab, n_ctx=6, seed=2)
        with torch.no_grad():
            m.fine_2.bias[m.config.n_embd - 1 + vocab.end_index] += 3.0  # end is likely: few visits each
        fast = sample(m, vocab, 6000, seed=3, batch_size=500, progress=False)
        ref = sample_reference(m, vocab, 6000, seed=4, batch_size=500)
        V = vocab.size
        for feature in (lambda r: len(r), lambda r: _key(r[0], V), lambda r: _key(r[1], V) if len(r) > 1 else -1,
                        lambda r: sum(len(x) for x in r)):
            a, b = [feature(r) for r in fast], [feature(r) for r in ref]
            cats = sorted(set(a) | set(b))
            table = np.array([[a.count(c) for c in cats], [b.count(c) for c in cats]])
            table = table[:, table.sum(0) >= 10]
            assert stats.chi2_contingency(table).pvalue > 1e-3
        assert 1.5 < np.mean([len(r) for r in fast]) < 5  # the test exercises several visit rows


class TestBlockHead:
    """The block-lazy head (``head_block`` columns per block) samples the same law for any block size, the
    full-row head (``head_block=None``) included; sizes that do not divide V leave a short last block."""
    N = 12000

    @pytest.mark.parametrize("block", [None, 1, 3, 5])
    def test_first_visit_matches_enumeration_for_any_block_size(self, block):
        vocab = _vocab(4)  # V = 7: blocks of 3 and 5 leave a last block of 1 and 2
        V = vocab.size
        m = _sharp_model(vocab, n_ctx=3, seed=3)
        with torch.no_grad():  # dense rows: several codes per block, so the re-draws after a commit matter
            m.fine_2.bias[m.config.n_embd - 1:m.config.n_embd - 1 + V] += 1.0
        pats = _patterns(V)
        with torch.no_grad():
            h, _ = m.history(torch.eye(V)[vocab.start_index][None, None, :])
            p_exact = _log_prob(m, h[0, -1].expand(len(pats), -1), pats).exp().numpy()
        rows = sample(m, vocab, self.N, seed=12, batch_size=3000, progress=False, head_block=block)
        counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(pats))
        assert _chi2_p(counts, p_exact) > 1e-3

    @pytest.mark.parametrize("block", [3, 4])
    def test_groups_and_group_heads_across_block_edges(self, block):
        """Token groups split the blocks they fall in (V = 11: groups at 0:2, 2:4, 4:7); both group kinds stay exact."""
        vocab, groups = _group_vocab()
        V = vocab.size
        for m, log_prob in ((_sharp_model(vocab, n_ctx=3, seed=5), _constrained_log_prob),
                            (_head_model(vocab, groups, seed=8), _head_log_prob)):
            p_exact = _first_visit_law(m, vocab, groups, log_prob)
            rows = sample(m, vocab, self.N, seed=2, batch_size=3000, progress=False, groups=groups, head_block=block)
            counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
            assert counts[p_exact == 0].sum() == 0
            assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3

    def test_later_visits_and_the_reference_agree_with_small_blocks(self):
        vocab = _vocab(5, labels=True)  # V = 10 with a label row: blocks of 3 end at 9, a block of 1
        m = _sharp_model(vocab, n_ctx=6, seed=2)
        with torch.no_grad():
            m.fine_2.bias[m.config.n_embd - 1 + vocab.end_index] += 3.0
        fast = sample(m, vocab, 6000, seed=3, batch_size=500, progress=False, head_block=3)
        ref = sample_reference(m, vocab, 6000, seed=4, batch_size=500)
        V = vocab.size
        for feature in (lambda r: len(r), lambda r: _key(r[0], V), lambda r: _key(r[1], V) if len(r) > 1 else -1,
                        lambda r: sum(len(x) for x in r)):
            a, b = [feature(r) for r in fast], [feature(r) for r in ref]
            cats = sorted(set(a) | set(b))
            table = np.array([[a.count(c) for c in cats], [b.count(c) for c in cats]])
            table = table[:, table.sum(0) >= 10]
            assert stats.chi2_contingency(table).pvalue > 1e-3

    def test_block_logits_equal_the_model_head(self):
        """Every block's first-pass logits, and its split into a fixed part and the block's own units after a
        commit, are the model's logits (same column, same prefix)."""
        from synthehr_core.model.sampling import _BlockHead, _Groups, _segments

        vocab = _vocab(9, labels=True)  # V = 14
        m = _sharp_model(vocab, n_ctx=4)
        g = torch.Generator().manual_seed(0)
        h = torch.randn(5, m.config.n_embd, generator=g)
        with torch.no_grad():
            head = _BlockHead(m)
            for seg in _segments(head, _Groups([], "cpu"), vocab.size, 4):
                row = torch.zeros(5, vocab.size)
                row[:, :seg.start] = (torch.rand(5, seg.start, generator=g) < 0.4).float()
                pre = head.start(h) + row @ head.w1_row
                lg = torch.addmm(seg.bias, torch.relu(pre[:, :seg.width]), seg.weight)
                torch.testing.assert_close(lg, m.head(h, row)[:, seg.start:seg.stop], rtol=1e-5, atol=1e-5)
                lo = seg.width - seg.inner.size(0)
                fixed = torch.addmm(seg.bias, torch.relu(pre[:, :lo]), seg.weight[:lo])
                own = pre[:, lo:seg.width]
                for j in (0, seg.stop - seg.start - 1):  # two commits in the block: its first and last column
                    row[:, seg.start + j] = 1.0
                    own = own + seg.commit_in[j]
                    after = torch.addmm(fixed, torch.relu(own), seg.inner)
                    torch.testing.assert_close(after, m.head(h, row)[:, seg.start:seg.stop], rtol=1e-5, atol=1e-5)

    def test_determinism_per_seed_batch_and_block(self):
        vocab = _vocab(6, labels=True)
        m = _sharp_model(vocab, n_ctx=8)
        a = sample(m, vocab, 50, seed=7, batch_size=16, progress=False, head_block=3)
        assert a == sample(m, vocab, 50, seed=7, batch_size=16, progress=False, head_block=3)
        assert a != sample(m, vocab, 50, seed=8, batch_size=16, progress=False, head_block=3)

    def test_bad_head_block(self):
        vocab = _vocab(3)
        for bad in (0, -2, 2.5, True):
            with pytest.raises(ConfigError, match="head_block"):
                sample(_sharp_model(vocab, 4), vocab, 2, seed=0, head_block=bad, progress=False)


def test_incremental_head_equals_model_head():
    from synthehr_core.model.sampling import _IncrementalHead

    vocab = _vocab(6, labels=True)
    m = _sharp_model(vocab, n_ctx=4)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, m.config.n_embd, generator=g)
    row = torch.zeros(4, vocab.size)
    with torch.no_grad():
        inc = _IncrementalHead(m)
        pre = inc.start(h)
        for code in ([1, 0, 3, 2], [4, 2, 5, 5]):
            idx = torch.arange(4)
            row[idx, torch.tensor(code)] = 1.0
            inc.commit(pre, idx, torch.tensor(code))
            torch.testing.assert_close(inc.logits(pre), m.head(h, row), rtol=1e-5, atol=1e-5)


def _coarse_model(vocab, seed):
    """An untrained HALO-Coarse with a sharpened visit embedding (its tied decoder)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, 0, n_ctx=3, coarse=True)).eval()
        with torch.no_grad():
            m.transformer.wve.weight.mul_(4.0)
    return m


def test_coarse_model_first_visit_is_exact():
    vocab = _vocab(4)
    V = vocab.size
    m = _coarse_model(vocab, 3)
    pats = _patterns(V)
    with torch.no_grad():
        h, _ = m.history(torch.eye(V)[vocab.start_index][None, None, :])
        p_exact = _log_prob(m, h[0, -1].expand(len(pats), -1), pats).exp().numpy()
    rows = sample(m, vocab, 8000, seed=2, batch_size=2000, progress=False)
    counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(pats))
    assert _chi2_p(counts, p_exact) > 1e-3


# ---------------------------------------------------------------------------------------------- token groups
def _group_vocab(labels=False):
    """2 event types (required), 2 LOS bins (optional), 3 weekdays (required), 1 code: V = 8 + specials."""
    from dataclasses import replace

    from synthehr_core.data.vocab import token_groups

    vocab = build_vocab(["ED", "IP"], {"los": [0, 1, 2]}, ["cal:weekday=Mon", "cal:weekday=Tue", "cal:weekday=Wed"],
                        ["dx:0"], {"sex": ["F", "M"]} if labels else {}, {}, ["dx"])
    groups = [replace(grp, required=grp.variable != "los") for grp in token_groups(vocab)]
    return vocab, groups


def _allowed(pats, groups):
    ok = torch.ones(len(pats), dtype=torch.bool)
    for grp in groups:
        n_on = pats[:, grp.start:grp.stop].sum(1)
        ok &= (n_on == 1) if grp.required else (n_on <= 1)
    return ok


def _constrained_log_prob(model, h, pats, groups):
    """log p of each pattern under the group-by-group restricted factorisation (-inf where not allowed): the
    non-group columns keep the model's conditionals; each group's pattern is renormalised over its allowed patterns
    given the columns before it."""
    def colwise(rows):
        return -torch.nn.functional.binary_cross_entropy_with_logits(model.head(h, rows), rows, reduction="none")

    lp = colwise(pats)
    total = lp.sum(1)
    for grp in groups:
        k = grp.stop - grp.start
        options = [torch.eye(k)[j] for j in range(k)] + ([] if grp.required else [torch.zeros(k)])
        alt = []
        for a in options:
            rows = pats.clone()
            rows[:, grp.start:grp.stop] = a
            alt.append(colwise(rows)[:, grp.start:grp.stop].sum(1))
        total = total - torch.logsumexp(torch.stack(alt, 1), dim=1)
    return torch.where(_allowed(pats, groups), total, torch.tensor(float("-inf")))


def _first_visit_law(m, vocab, groups, log_prob):
    """Probability of every possible first-visit row (``_patterns`` order) under ``log_prob(model, h, pats, groups)``."""
    pats = _patterns(vocab.size)
    with torch.no_grad():
        h, _ = m.history(torch.eye(vocab.size)[vocab.start_index][None, None, :])
        p = log_prob(m, h[0, -1].expand(len(pats), -1), pats, groups).exp().numpy()
    assert abs(p.sum() - 1) < 1e-5
    return p


class TestTokenGroups:
    N = 12000

    def _first_visit_exact(self, m, vocab, groups):
        return _first_visit_law(m, vocab, groups, _constrained_log_prob)

    def test_groups_from_vocab_and_tables(self):
        from synthehr_core.data.vocab import token_groups

        vocab, _ = _group_vocab(labels=True)
        visits = pd.DataFrame({"event_type": ["ED", "IP"], "los_binned": ["0-1", None], "cal_weekday": ["Mon", "Tue"]})
        patients = pd.DataFrame({"sex": ["F", "M"]})
        got = {(g.row, g.column): (g.stop - g.start, g.required) for g in token_groups(vocab, patients, visits)}
        assert got == {("visit", "event_type"): (2, True), ("visit", "los_binned"): (2, False),
                       ("visit", "cal_weekday"): (3, True), ("label", "sex"): (2, True)}

    def test_fast_sampler_matches_the_restricted_distribution(self):
        vocab, groups = _group_vocab()
        V = vocab.size
        m = _sharp_model(vocab, n_ctx=3, seed=5)
        p_exact = self._first_visit_exact(m, vocab, groups)
        rows = sample(m, vocab, self.N, seed=2, batch_size=3000, progress=False, groups=groups)
        counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
        assert counts[p_exact == 0].sum() == 0                     # every row holds one event type and weekday
        assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3
        # power: the unconstrained model breaks the groups often, so the restriction is doing work
        free = sample(m, vocab, 2000, seed=2, batch_size=1000, progress=False)
        pats = _patterns(V)
        broken = ~_allowed(pats[[_key(r[0], V) for r in free]], groups)
        assert broken.float().mean() > 0.3

    def test_reference_sampler_with_groups_agrees(self):
        vocab, groups = _group_vocab()
        V = vocab.size
        m = _sharp_model(vocab, n_ctx=3, seed=6)
        p_exact = self._first_visit_exact(m, vocab, groups)
        rows = sample_reference(m, vocab, 6000, seed=9, batch_size=2000, groups=groups)
        counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
        assert counts[p_exact == 0].sum() == 0
        assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3

    def test_coarse_model_with_groups_is_exact(self):
        vocab, groups = _group_vocab()
        V = vocab.size
        m = _coarse_model(vocab, 4)
        p_exact = self._first_visit_exact(m, vocab, groups)
        rows = sample(m, vocab, 8000, seed=3, batch_size=2000, progress=False, groups=groups)
        counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
        assert counts[p_exact == 0].sum() == 0
        assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3

    def test_label_row_and_later_visits_keep_their_groups(self):
        vocab, groups = _group_vocab(labels=True)           # sex: a required label group
        assert {g.row for g in groups} == {"visit", "label"}
        with pytest.raises(ConfigError, match="overlap"):
            sample(_sharp_model(vocab, n_ctx=3), vocab, 2, seed=0, groups=groups + groups[:1], progress=False)
        m = _sharp_model(vocab, n_ctx=6, seed=7)
        rows = sample(m, vocab, 400, seed=1, batch_size=128, progress=False, groups=groups)
        sex = set(range(vocab.label_slice.start, vocab.label_slice.stop))
        n_visits = 0
        weekday = next(g for g in groups if g.variable == "cal_weekday")
        # the visit groups are not forced onto the label row: some label rows lack a weekday (the model's own mix)
        assert any(not set(p[0]) & set(range(weekday.start, weekday.stop)) for p in rows)
        for patient in rows:
            assert len(sex & set(patient[0])) == 1                        # label row: exactly one sex
            for r in patient[1:]:
                n_visits += 1
                for grp in groups:
                    if grp.row == "visit":
                        n = len(set(r) & set(range(grp.start, grp.stop)))
                        assert n == 1 if grp.required else n <= 1, (grp.variable, r)
        assert n_visits > 400                                             # several visit rows per patient


def _head_model(vocab, groups, n_ctx=3, seed=0):
    """``_sharp_model`` with a categorical head per group (HaloConfig.groups), heads sharpened too."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx,
                                 groups=[(g.start, g.stop) for g in groups]))
        with torch.no_grad():
            m.fine_1.weight.mul_(4.0)
            m.fine_1.weight[:, m.config.n_embd:] *= 4.0
            m.fine_2.weight.mul_(4.0)
            for head in m.group_heads:
                head.weight.mul_(6.0)
                head.bias.normal_(0.0, 1.0)
    return m.eval()


def _head_log_prob(model, h, pats, groups, prior=None, direct_row=None):
    """log p of each pattern when each group is one categorical (its heads), restricted to one value where
    required; other columns by the Bernoulli logits. ``prior``: recurrence offsets; ``direct_row``: what the heads'
    direct terms read (default the pattern itself; zeros = the heads without them)."""
    hidden, logits = model._fine(h, pats)
    if prior is not None:
        logits = logits + prior
    row = pats if direct_row is None else direct_row
    bern = -torch.nn.functional.binary_cross_entropy_with_logits(logits, pats, reduction="none")
    in_group = torch.zeros(pats.size(1), dtype=torch.bool)
    total = torch.zeros(len(pats))
    for k, grp in enumerate(groups):
        in_group[grp.start:grp.stop] = True
        kk = grp.stop - grp.start
        lg = model.group_logits(hidden, k, prior, row)
        lg = lg[:, :kk] if grp.required else lg
        t = pats[:, grp.start:grp.stop]
        cls = torch.where(t.sum(1) > 0, t.argmax(1), kk)
        total += torch.log_softmax(lg, 1).gather(1, cls.clamp(max=lg.size(1) - 1)[:, None])[:, 0]
    total += (bern * ~in_group).sum(1)
    return torch.where(_allowed(pats, groups), total, torch.tensor(float("-inf")))


class TestGroupHeads:
    """A model trained with categorical heads (HaloConfig.groups) is sampled through them, exactly."""

    def _exact(self, m, vocab, groups):
        return _first_visit_law(m, vocab, groups, _head_log_prob)

    def test_fast_and_reference_samplers_match_the_heads(self):
        vocab, groups = _group_vocab()
        V = vocab.size
        m = _head_model(vocab, groups, seed=8)
        p_exact = self._exact(m, vocab, groups)
        fast = sample(m, vocab, 12000, seed=4, batch_size=3000, progress=False, groups=groups)
        ref = sample_reference(m, vocab, 6000, seed=5, batch_size=2000, groups=groups)
        for rows in (fast, ref):
            counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
            assert counts[p_exact == 0].sum() == 0
            assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3
        # power: the heads are the model; the chain over the (untrained) Bernoulli logits is a different law
        p_chain = TestTokenGroups()._first_visit_exact(m, vocab, groups)
        counts = np.bincount([_key(r[0], V) for r in fast], minlength=len(p_exact))
        keep = p_chain > 0
        assert _chi2_p(counts[keep], p_chain[keep]) < 1e-6

    def test_heads_are_used_even_without_token_groups(self):
        """constrain=False passes no groups: the heads still draw their tokens, with "none" allowed."""
        vocab, groups = _group_vocab()
        V = vocab.size
        m = _head_model(vocab, groups, seed=9)
        optional = [__import__("dataclasses").replace(g, required=False) for g in groups]
        p_exact = self._exact(m, vocab, optional)
        rows = sample(m, vocab, 12000, seed=6, batch_size=3000, progress=False)
        counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
        assert counts[p_exact == 0].sum() == 0                        # never two values of one variable
        assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3


def _recurrent(m, scale=0.25, seed=0):
    """Give ``m``'s recurrence offsets large random values (times the gain: several logits either way)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.recurrence.last.copy_(torch.randn(m.config.vocab_size, generator=g) * scale)
        m.recurrence.ever.copy_(torch.randn(m.config.vocab_size, generator=g) * scale)
    return m


def _second_visit_law(m, vocab, log_prob):
    """Probabilities of every second-visit row (``_patterns`` order) and of stopping after the first, under
    ``log_prob(model, h, pats, prior)``, the history through the model's transformer and recurrence offsets."""
    V = vocab.size
    pats = _patterns(V)
    P = len(pats)
    start = torch.eye(V)[vocab.start_index].expand(P, V)
    with torch.no_grad():
        x = torch.stack([start, pats], dim=1)  # (P, 2, V): every possible first visit
        h, _ = m.history(x)
        prior = m.history_prior(x) if m.config.recurrence else torch.zeros_like(x)  # (P, 2, V)
        p1 = log_prob(m, h[:, 0], pats, prior[:, 0]).exp()
        p2 = log_prob(m, h[:, 1].repeat_interleave(P, 0), pats.repeat(P, 1),
                      prior[:, 1].repeat_interleave(P, 0)).exp().view(P, P)
    alive = pats[:, vocab.end_index] == 0
    return np.append((p1[alive, None] * p2[alive]).sum(0).numpy(), p1[~alive].sum().item())


def _second_visit_counts(rows, P, V):
    counts = np.zeros(P + 1)
    for r in rows:
        counts[P if len(r) == 1 else _key(r[1], V)] += 1
    return counts


class TestRecurrence:
    """HaloConfig.recurrence: offsets for the previous row's / any earlier row's tokens, sampled exactly."""

    @pytest.mark.parametrize("block", [None, 3])
    def test_second_visit_matches_enumeration(self, block):
        vocab = _vocab(4)
        V = vocab.size
        m = _recurrent(_sharp_model(vocab, n_ctx=3, seed=1, recurrence=10.0), seed=1)
        expected = _second_visit_law(m, vocab, _log_prob)
        rows = sample(m, vocab, 12000, seed=5, batch_size=2500, progress=False, head_block=block)
        counts = _second_visit_counts(rows, len(expected) - 1, V)
        assert _chi2_p(counts, expected) > 1e-3
        # power: the same weights without the offsets are a detectably different law
        m0 = _sharp_model(vocab, n_ctx=3, seed=1)
        off = _second_visit_law(m0, vocab, _log_prob)
        assert _chi2_p(counts, off) < 1e-6

    def test_reference_sampler_agrees(self):
        vocab = _vocab(4)
        V = vocab.size
        m = _recurrent(_sharp_model(vocab, n_ctx=3, seed=2, recurrence=10.0), seed=2)
        expected = _second_visit_law(m, vocab, _log_prob)
        rows = sample_reference(m, vocab, 6000, seed=3, batch_size=2000)
        assert _chi2_p(_second_visit_counts(rows, len(expected) - 1, V), expected) > 1e-3

    def test_group_heads_take_the_offsets_too(self):
        """The categorical heads add their members' offsets ("none" none): fast and reference samplers follow."""
        vocab, groups = _group_vocab()
        V = vocab.size
        with torch.random.fork_rng():
            torch.manual_seed(7)
            m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=3, recurrence=10.0,
                                     groups=[(g.start, g.stop) for g in groups]))
        _recurrent(m.eval(), scale=0.3, seed=7)

        def log_prob(model, h, pats, prior):
            return _head_log_prob(model, h, pats, groups, prior)

        expected = _second_visit_law(m, vocab, log_prob)
        assert abs(expected.sum() - 1) < 1e-4
        for rows in (sample(m, vocab, 12000, seed=4, batch_size=3000, progress=False, groups=groups),
                     sample(m, vocab, 12000, seed=4, batch_size=3000, progress=False, groups=groups, head_block=None),
                     sample_reference(m, vocab, 6000, seed=5, batch_size=2000, groups=groups)):
            counts = _second_visit_counts(rows, len(expected) - 1, V)
            assert counts[expected == 0].sum() == 0
            assert _chi2_p(counts[expected > 0], expected[expected > 0]) > 1e-3

        # power: the same law with the offsets left out of the group heads only is detectably different
        in_group = torch.zeros(V, dtype=torch.bool)
        for g in groups:
            in_group[g.start:g.stop] = True

        def without_group_offsets(model, h, pats, prior):
            return _head_log_prob(model, h, pats, groups, prior.masked_fill(in_group, 0.0))

        off = _second_visit_law(m, vocab, without_group_offsets)
        keep = (expected > 0) & (off > 0)
        assert _chi2_p(counts[keep], off[keep]) < 1e-6

    def test_forward_adds_the_offsets_of_earlier_rows_only(self):
        vocab = _vocab(4)
        m = _recurrent(_sharp_model(vocab, n_ctx=4, seed=3, recurrence=10.0), seed=3)
        x = (torch.rand(2, 4, vocab.size, generator=torch.Generator().manual_seed(0)) < 0.5).float()
        logits, _ = m(x)
        plain = m.head(m.history(x[:, :-1])[0], x[:, 1:])
        torch.testing.assert_close(logits - plain, m.history_prior(x[:, :-1]))
        changed = x.clone()
        changed[:, 3] = 1 - changed[:, 3]  # the last row is a target only: no offset may read it
        torch.testing.assert_close(m(changed)[0][:, :2], logits[:, :2])

    def test_end_from_history_reads_h_only_and_is_sampled_exactly(self):
        vocab = _vocab(4)
        V, end = vocab.size, vocab.end_index
        m = _recurrent(_sharp_model(vocab, n_ctx=3, seed=4, recurrence=10.0, end_from_history=True), seed=4)
        h = torch.randn(6, m.config.n_embd, generator=torch.Generator().manual_seed(0))
        rows = (torch.rand(6, V, generator=torch.Generator().manual_seed(1)) < 0.5).float()
        torch.testing.assert_close(m.head(h, rows)[:, end], m.head(h, torch.zeros_like(rows))[:, end])
        plain = _sharp_model(vocab, n_ctx=3, seed=4)
        assert not torch.allclose(plain.head(h, rows)[:, end], plain.head(h, torch.zeros_like(rows))[:, end])
        expected = _second_visit_law(m, vocab, _log_prob)
        for block in (None, 3):
            got = sample(m, vocab, 12000, seed=6, batch_size=2500, progress=False, head_block=block)
            assert _chi2_p(_second_visit_counts(got, len(expected) - 1, V), expected) > 1e-3

    @pytest.mark.parametrize("bad", [-1.0, float("nan"), True, "10"])
    def test_bad_gain_is_a_config_error(self, bad):
        with pytest.raises(ConfigError, match="recurrence must be a gain >= 0"):
            HaloConfig.tiny(4, 0, recurrence=bad)


class TestBehaviour:
    def test_same_seed_and_batch_is_identical_other_seed_differs(self):
        vocab = _vocab(6, labels=True)
        m = _sharp_model(vocab, n_ctx=8)
        a = sample(m, vocab, 50, seed=7, batch_size=16, progress=False)
        b = sample(m, vocab, 50, seed=7, batch_size=16, progress=False)
        c = sample(m, vocab, 50, seed=8, batch_size=16, progress=False)
        assert a == b and a != c

    def test_fixed_labels_and_label_probs(self):
        vocab = _vocab(3, labels=True)
        m = _sharp_model(vocab, n_ctx=4)
        F, M = vocab.index("label:sex=F"), vocab.index("label:sex=M")
        labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(5, 1)
        rows = sample(m, vocab, 10, seed=0, labels=labels, progress=False)
        assert [r[0] for r in rows] == [[F], [M]] * 5
        lp = pd.DataFrame({"labels": ["label:sex=F", "label:sex=M"], "probability": [0.8, 0.2]})
        drawn = labels_from_probs(lp, vocab, 4000, torch.Generator().manual_seed(0))
        assert abs(drawn[:, 0].mean().item() - 0.8) < 0.03
        with pytest.raises(ConfigError, match="shape"):
            sample(m, vocab, 3, seed=0, labels=labels, progress=False)

    def test_rules_hook_overwrites_rows(self):
        vocab = _vocab(4)
        m = _sharp_model(vocab, n_ctx=5)
        banned = vocab.index("dx:0")
        seen = []

        class Ban:
            def apply_row(self, past, row, row_index):
                seen.append((tuple(past.shape), row_index))
                assert past.shape[1] == row_index and row.shape[1] == vocab.size
                row = row.clone()
                row[:, banned] = 0.0
                return row

        rows = sample(m, vocab, 200, seed=1, batch_size=64, rules=Ban(), progress=False)
        assert all(banned not in r for p in rows for r in p)
        assert seen and {t for _, t in seen} >= {1, 2}
        free = sample(m, vocab, 200, seed=1, batch_size=64, progress=False)
        assert any(banned in r for p in free for r in p)

    def test_bad_temperature(self):
        vocab = _vocab(3)
        with pytest.raises(ConfigError, match="temperature"):
            sample(_sharp_model(vocab, 4), vocab, 2, seed=0, temperature=0.0)


def test_sample_to_dir_writes_canonical_tables(tmp_path):
    from synthehr_core.data.toy import make_toy_tables, toy_vocab

    p, _, c = make_toy_tables(30, seed=0)
    vocab = toy_vocab(c, p)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=6))
    with storage.atomic_dir(tmp_path / "ckpt") as tmp:
        write_checkpoint(tmp, m, vocab)
        storage.write_parquet(storage.join(tmp, "label_probs.parquet"), __import__("pyarrow").Table.from_pandas(
            pd.DataFrame({"labels": ["label:sex=F|label:age=18-40", "label:sex=M|label:age=60-80"],
                          "probability": [0.5, 0.5]})))
    meta = sample_to_dir(tmp_path / "ckpt", tmp_path / "s1", seed=3, n_patients=40, batch_size=16)
    sample_to_dir(tmp_path / "ckpt", tmp_path / "s2", seed=3, n_patients=40, batch_size=16)
    for f in ("patients.parquet", "visits.parquet", "codes.parquet"):
        assert (tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes()
    patients, visits, codes = read_tables(tmp_path / "s1")
    assert meta["n_patients"] == len(patients) == 40 - meta["n_dropped_no_visits"]
    assert patients["patient_id"].str.startswith("syn-3-").all() and (patients["split"] == "synthetic").all()
    assert visits["start_offset_days"].isna().all()
    sample_to_dir(tmp_path / "ckpt", tmp_path / "s3", seed=3, n_patients=20, condition={"sex": "M"})
    p3, _, _ = read_tables(tmp_path / "s3")
    assert set(p3["sex"]) == {"M"} and set(p3["age_binned"]) == {"60-80"}
    with pytest.raises(ConfigError, match="label token"):
        sample_to_dir(tmp_path / "ckpt", tmp_path / "s4", seed=3, n_patients=2, condition={"sex": "X"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampler_is_exact_and_deterministic():
    vocab = _vocab(4)
    V = vocab.size
    m = _sharp_model(vocab, n_ctx=3).cuda()
    pats = _patterns(V).cuda()
    with torch.no_grad():
        h, _ = m.history(torch.eye(V, device="cuda")[vocab.start_index][None, None, :])
        p_exact = _log_prob(m, h[0, -1].expand(len(pats), -1), pats).exp().cpu().numpy()
    rows = sample(m, vocab, 12000, seed=11, batch_size=3000, progress=False)
    assert rows == sample(m, vocab, 12000, seed=11, batch_size=3000, progress=False)
    counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(pats))
    assert _chi2_p(counts, p_exact) > 1e-3


class TestSampleConfig:
    """One frozen, validated config for a shard; the CLI and the component build it from their parameters."""

    def test_bad_values_are_collected_and_name_the_option_value_and_fix(self):
        with pytest.raises(ConfigError) as err:
            SampleConfig(seed=-1, n_patients=-5, batch_size=0, temperature=0.0, condition="sex=F", constrain="yes")
        msg = str(err.value)
        for want in ("seed must be an int in [0, 2**63); got -1.", "n_patients must be an int >= 1 (a shard of 0 patients is empty); got -5.",
                     "batch_size must be an int >= 1; got 0.", "temperature must be a finite number > 0; got 0.0. "
                     "Use 1.0", "condition must be None, 'label_probs' or a dict like {'sex': 'F'}; got 'sex=F'.",
                     "constrain must be True or False; got 'yes'."):
            assert want in msg, (want, msg)
        assert msg.count("\n  - ") == 6
        with pytest.raises(ConfigError, match=r"unknown \['temp'\], missing \['n_patients'\]"):
            SampleConfig.from_dict({"seed": 1, "temp": 0.5})

    def test_round_trip_frozen_and_condition_text(self):
        c = SampleConfig(seed=3, n_patients=10, batch_size=4, temperature=0.5, condition={"sex": "F"}, constrain=False)
        assert SampleConfig.from_dict(c.to_dict()) == c
        with pytest.raises(__import__("dataclasses").FrozenInstanceError):
            c.seed = 4
        assert parse_condition("") is None and parse_condition(" label_probs ") == "label_probs"
        assert parse_condition('{"sex": "F"}') == {"sex": "F"}
        with pytest.raises(ConfigError, match="not valid JSON"):
            parse_condition("{'sex': 'F'}")

    def test_cli_and_component_sample_the_shard_the_library_samples(self, tmp_path):
        kfp_dsl = pytest.importorskip("kfp.dsl")
        from typer.testing import CliRunner

        from components.sample import sample as sample_component
        from synthehr_core.cli import app
        from synthehr_core.data.toy import make_toy_tables, toy_vocab

        p, _, c = make_toy_tables(30, seed=0)
        vocab = toy_vocab(c, p)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=6))
        write_checkpoint(tmp_path / "ckpt", m, vocab)
        storage.write_parquet(tmp_path / "ckpt" / "label_probs.parquet", __import__("pyarrow").Table.from_pandas(
            pd.DataFrame({"labels": ["label:sex=F|label:age=18-40", "label:sex=M|label:age=60-80"],
                          "probability": [0.5, 0.5]})))
        config = SampleConfig(seed=5, n_patients=20, batch_size=8, temperature=0.9, condition={"sex": "M"})
        sample_to_dir(tmp_path / "ckpt", tmp_path / "lib", config, device="cpu")
        r = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "cli"),
                                     "--seed", "5", "--n-patients", "20", "--batch-size", "8", "--temperature", "0.9",
                                     "--condition", '{"sex": "M"}', "--device", "cpu"])
        assert r.exit_code == 0, r.output
        sample_component.python_func(model=kfp_dsl.Model(name="m", uri=str(tmp_path / "ckpt"), metadata={}),
                                     seed=5, n_patients_per_seed=20, batch_size=8, temperature=0.9,
                                     condition='{"sex": "M"}', device="cpu",
                                     shard=kfp_dsl.Dataset(name="s", uri=str(tmp_path / "comp"), metadata={}))
        for d in ("cli", "comp"):
            for f in ("patients.parquet", "visits.parquet", "codes.parquet"):
                assert (tmp_path / d / f).read_bytes() == (tmp_path / "lib" / f).read_bytes(), (d, f)
            meta = json.loads((tmp_path / d / "meta.json").read_text())
            assert meta["condition"] == {"sex": "M"} and meta["seed"] == 5 and meta["temperature"] == 0.9


class TestGroupDirect:
    """HaloConfig.group_direct: each group head also reads the row's earlier columns directly."""

    def _model(self, seed):
        vocab, groups = _group_vocab()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            m = HALO(HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=3, group_direct=True,
                                     groups=[(g.start, g.stop) for g in groups]))
            with torch.no_grad():
                for lin in m.group_direct.values():
                    lin.weight.normal_(0.0, 3.0)  # strong: e.g. the weekday follows the event type
        return m.eval(), vocab, groups

    def test_fast_block_full_row_and_reference_samplers_follow_the_direct_term(self):
        m, vocab, groups = self._model(11)
        V = vocab.size
        assert "0" not in m.group_direct and len(m.group_direct) == len(groups) - 1  # column 0 reads nothing
        p_exact = _first_visit_law(m, vocab, groups, _head_log_prob)
        without = _first_visit_law(m, vocab, groups, lambda mm, h, pats, gg: _head_log_prob(
            mm, h, pats, gg, direct_row=torch.zeros_like(pats)))
        for rows in (sample(m, vocab, 12000, seed=4, batch_size=3000, progress=False, groups=groups),
                     sample(m, vocab, 12000, seed=4, batch_size=3000, progress=False, groups=groups, head_block=None),
                     sample_reference(m, vocab, 6000, seed=5, batch_size=2000, groups=groups)):
            counts = np.bincount([_key(r[0], V) for r in rows], minlength=len(p_exact))
            assert counts[p_exact == 0].sum() == 0
            assert _chi2_p(counts[p_exact > 0], p_exact[p_exact > 0]) > 1e-3
        keep = without > 0  # power: the heads without the direct term are a detectably different law
        assert _chi2_p(counts[keep], without[keep]) < 1e-6

    @pytest.mark.filterwarnings("ignore:Full backward hook is firing")
    def test_starts_at_zero_and_its_per_sample_gradients_are_opacus_exact(self):
        from opacus.grad_sample import GradSampleModule

        from synthehr_core.model.dp import register_grad_samplers

        vocab, groups = _group_vocab()
        cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=4, n_embd=8, group_direct=True,
                              recurrence=10.0, groups=[(g.start, g.stop) for g in groups])
        torch.manual_seed(0)
        m = HALO(cfg)
        assert all(float(lin.weight.abs().sum()) == 0 for lin in m.group_direct.values())
        X = (torch.rand(3, 4, vocab.size, generator=torch.Generator().manual_seed(1)) < 0.4).float()
        mask = torch.ones(3, 4, 1)
        ref = {}
        for b in range(3):
            m.zero_grad()
            m(X[b:b + 1], mask[b:b + 1])[1].backward()
            for n, p in m.named_parameters():
                ref.setdefault(n, []).append(p.grad.detach().clone())
        register_grad_samplers()
        gsm = GradSampleModule(m, batch_first=True, loss_reduction="mean", strict=True)
        try:
            gsm(X, mask)[1].backward()
            for n, p in m.named_parameters():
                torch.testing.assert_close(p.grad_sample, torch.stack(ref[n]), rtol=1e-4, atol=1e-7)
        finally:
            gsm._close()
        assert any(float(torch.stack(ref[n]).abs().sum()) > 0 for n in ref if n.startswith("group_direct"))

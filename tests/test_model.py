"""HALO model: causality across rows, autoregression within a row, KV cache, loss scale, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from synthehr_core import storage
from synthehr_core.data.vocab import build_vocab
from synthehr_core.errors import ConfigError
from synthehr_core.model.checkpoint import load_model, write_checkpoint
from synthehr_core.model.halo import HALO, HaloConfig, MaskedLinear


def _build(cfg, seed=0):
    with torch.random.fork_rng():  # parameter init draws from the global RNG; keep it local to the test
        torch.manual_seed(seed)
        return HALO(cfg)


def _model(coarse=False, seed=0, **kw):
    return _build(HaloConfig.tiny(9, 3, n_ctx=8, coarse=coarse, **kw)).eval()


def _batch(cfg, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, cfg.n_ctx, cfg.vocab_size, generator=g) < 0.3).float()


@pytest.mark.parametrize("coarse", [False, True])
def test_changing_row_t_plus_1_leaves_logits_up_to_t(coarse):
    m = _model(coarse)
    x = _batch(m.config)
    t = 4
    y = x.clone()
    y[:, t + 1] = 1.0 - y[:, t + 1]  # flip the whole next row; logits index k predicts row k+1
    y[:, t + 2:] = 1.0 - y[:, t + 2:]
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(y)
    assert torch.equal(a[:, :t], b[:, :t])          # predictions of rows 1..t unchanged
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # and the test can fail


def test_head_logit_j_ignores_codes_from_j_on():
    m = _model()
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, m.config.n_embd, generator=g)
    row = (torch.rand(5, V, generator=g) < 0.5).float()
    with torch.no_grad():
        base = m.head(h, row)
        for j in range(V):
            other = row.clone()
            other[:, j:] = 1.0 - other[:, j:]
            out = m.head(h, other)
            assert torch.equal(out[:, :j + 1], base[:, :j + 1]), f"logit {j} saw codes >= {j}"
            if j + 1 < V:
                assert not torch.allclose(out[:, j + 1:], base[:, j + 1:])


def test_kv_cache_matches_full_recompute():
    m = _model()
    x = _batch(m.config)
    with torch.no_grad():
        full, _ = m.history(x)
        h1, kv = m.history(x[:, :3])
        h2, kv = m.history(x[:, 3:5], kv)  # several new rows against a cache
        steps = [h1, h2]
        for t in range(5, 8):
            ht, kv = m.history(x[:, t:t + 1], kv)
            steps.append(ht)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_loss_is_masked_bce_over_all_elements():
    m = _model()
    x = _batch(m.config)
    mask = torch.zeros(3, 8, 1)
    mask[:, 1:5] = 1
    logits, loss = m(x, mask)
    expected = (F.binary_cross_entropy_with_logits(logits, x[:, 1:], reduction="none") * mask[:, 1:]).sum() \
        / logits.numel()
    torch.testing.assert_close(loss, expected)
    assert m(x)[1] is None
    keep = torch.ones_like(logits)
    keep[..., 0] = 0  # ConSequence-style: a fired column leaves the loss
    _, loss2 = m(x, loss_weight=mask[:, 1:] * keep)
    expected2 = (F.binary_cross_entropy_with_logits(logits, x[:, 1:], reduction="none") * mask[:, 1:] * keep).sum() \
        / logits.numel()
    torch.testing.assert_close(loss2, expected2)


def test_pos_loss_weight_raises_positive_terms():
    a, b = _model(), _model(pos_loss_weight=3.0)
    x = _batch(a.config)
    mask = torch.ones(3, 8, 1)
    assert b(x, mask)[1] > a(x, mask)[1]


def test_masked_linear_has_no_buffers_and_only_weight_bias():
    m = _model()
    assert [n for n, _ in m.named_buffers()] == []
    assert [n for n, _ in MaskedLinear(4).named_parameters()] == ["weight", "bias"]


def test_init_follows_reference():
    m = _build(HaloConfig(9, 3, n_ctx=8, n_embd=64, n_layer=1, n_head=2))
    fc = m.transformer.h[0].mlp.c_fc
    assert abs(fc.weight.std().item() - 0.02) < 0.003 and torch.count_nonzero(fc.bias) == 0
    assert m.transformer.wpe.weight.std().item() > 0.5  # nn.Embedding default N(0, 1), as HI


def test_presets_and_bad_config():
    assert HaloConfig.preset("paper", 6841, 25).vocab_size == 6869  # HALO inpatient, HI:config.py
    with pytest.raises(ConfigError, match="'huge'"):
        HaloConfig.preset("huge", 1, 1)
    with pytest.raises(ConfigError, match="n_labels"):
        HaloConfig.from_dict({"n_visit_tokens": 3})


def test_checkpoint_roundtrip(tmp_path):
    vocab = build_vocab(["a"], {}, [], ["dx:1", "dx:2"], {"sex": ["F", "M"]}, {}, ["dx"])
    cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=6)
    m = _build(cfg)
    with storage.atomic_dir(tmp_path / "ckpt") as tmp:
        write_checkpoint(tmp, m, vocab)
    m2, vocab2, info = load_model(tmp_path / "ckpt")
    assert info["model_type"] == "halo" and m2.config == cfg and vocab2.to_json() == vocab.to_json()
    x = _batch(cfg, B=2)
    with torch.no_grad():
        assert torch.equal(m.eval()(x)[0], m2(x)[0])
    with pytest.raises(ConfigError, match="missing"):
        load_model(tmp_path)


def test_masked_linear_inference_cache_follows_weight_updates():
    lin = MaskedLinear(5)
    x = torch.randn(3, 5)
    with torch.no_grad():
        a = lin(x)
        lin.weight.add_(1.0)  # in-place update (optimizer step, load_state_dict) must invalidate the cache
        b = lin(x)
    torch.testing.assert_close(b, F.linear(x, torch.tril(lin.weight), lin.bias))
    assert not torch.allclose(a, b)
    assert [n for n, _ in lin.named_buffers()] == [] and "_tril" not in lin.state_dict()


# ---------------------------------------------------------------------------------------------- categorical heads
def _one_hot_batch(cfg, B=3, seed=2):
    """Random rows that hold exactly one of columns 0..2 or none, and one of 3..4 (single-valued variables)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, cfg.n_ctx, cfg.vocab_size, generator=g) < 0.3).float()
    x[..., 0:5] = 0
    a = torch.randint(0, 4, (B, cfg.n_ctx), generator=g)        # 3 = none
    b = torch.randint(0, 2, (B, cfg.n_ctx), generator=g)
    x.scatter_(2, a.clamp(max=2)[..., None], (a < 3).float()[..., None])
    x.scatter_(2, (3 + b)[..., None], torch.ones(B, cfg.n_ctx, 1))
    return x, a, b


def test_group_loss_is_cross_entropy_plus_bce_elsewhere():
    m = _model(groups=[(0, 3), (3, 5)])
    x, a, b = _one_hot_batch(m.config)
    mask = torch.zeros(3, 8, 1)
    mask[:, 1:6] = 1
    logits, loss = m(x, mask)
    hidden, _ = m._fine(m.history(x[:, :-1])[0], x[:, 1:])
    w = mask[:, 1:, 0]
    ce = (F.cross_entropy(m.group_logits(hidden, 0).flatten(0, 1), a[:, 1:].flatten(), reduction="none")
          * w.flatten()).sum()
    ce += (F.cross_entropy(m.group_logits(hidden, 1).flatten(0, 1), b[:, 1:].flatten(), reduction="none")
           * w.flatten()).sum()
    bce = (F.binary_cross_entropy_with_logits(logits, x[:, 1:], reduction="none")[..., 5:] * mask[:, 1:]).sum()
    torch.testing.assert_close(loss, (ce + bce) / logits.numel())


def test_group_head_sees_only_the_columns_before_its_group():
    m = _model(groups=[(2, 5)])
    g = torch.Generator().manual_seed(0)                            # not the global RNG: the same inputs in any order
    h = torch.randn(4, m.config.n_embd, generator=g)
    row = (torch.rand(4, m.config.vocab_size, generator=g) < 0.5).float()
    base = m.group_logits(m._fine(h, row)[0], 0)
    changed = row.clone()
    changed[:, 2:] = 1 - changed[:, 2:]                            # the group itself and everything after it
    torch.testing.assert_close(m.group_logits(m._fine(h, changed)[0], 0), base)
    changed[:, 1] = 1 - changed[:, 1]                              # a column before it does matter
    assert not torch.allclose(m.group_logits(m._fine(h, changed)[0], 0), base)
    assert base.shape == (4, 4)                                     # 3 values + "none"


def test_group_config_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="non-overlapping"):
        HaloConfig.tiny(9, 3, groups=[(0, 3), (2, 4)])
    with pytest.raises(ConfigError, match="inside the vocabulary"):
        HaloConfig.tiny(9, 3, groups=[(10, 20)])
    with pytest.raises(ConfigError, match="Coarse"):
        HALO(HaloConfig.tiny(9, 3, coarse=True, groups=[(0, 3)]))
    vocab = build_vocab(["a", "b"], {}, [], ["dx:1", "dx:2"], {"sex": ["F", "M"]}, {}, ["dx"])
    cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=6, groups=[[0, 2], [4, 6]])
    assert cfg.groups == ((0, 2), (4, 6))
    with storage.atomic_dir(tmp_path / "ckpt") as tmp:
        write_checkpoint(tmp, _build(cfg), vocab)
    m2, _, _ = load_model(tmp_path / "ckpt")
    assert m2.config == cfg and len(m2.group_heads) == 2


def test_masked_weight_cache_follows_a_fused_adam_step():
    """The no_grad tril cache (sampling, validation) must not outlive an optimizer step: the fused Adam updates
    weights in place without bumping their version counter."""
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)
    x = _batch(m.config)
    mask = torch.ones(x.size(0), x.size(1), 1)
    with torch.no_grad():
        before = m(x)[0]  # fills the cache
    m.train()
    _, loss = m(x, mask)
    loss.backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        after = m(x)[0]
        torch.testing.assert_close(m.fine_1.masked_weight(), torch.tril(m.fine_1.weight))
    assert not torch.allclose(before, after)

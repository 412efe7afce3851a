"""DP-SGD: exact per-sample gradients through HALO's masked head, Poisson batches, accounting and its resume."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from synthehr_core.data.vocab import Vocab
from synthehr_core.errors import ConfigError
from synthehr_core.model.dp import (
    DPConfig,
    PrivateTraining,
    code_patient_counts,
    masked_linear_grad_sample,
    min_code_count_vocab,
    poisson_batch,
    register_grad_samplers,
)
from synthehr_core.model.halo import HALO, HaloConfig, MaskedLinear

# Opacus' full backward hook on the visit embedding (whose input, the data, needs no gradient) warns harmlessly
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _batch(B: int, cfg: HaloConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = (torch.rand(B, cfg.n_ctx, cfg.vocab_size, generator=g) < 0.25).float()
    mask = torch.ones(B, cfg.n_ctx, 1)
    for b in range(B):  # ragged patients: padding rows are masked out, as collate_halo does
        mask[b, 2 + b % (cfg.n_ctx - 2):] = 0
    mask[:, 0] = 0
    return X, mask


def _one_at_a_time(model: nn.Module, X: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: the gradient of each patient's own loss, one forward/backward per patient."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for b in range(len(X)):
        model.zero_grad()
        _, loss = model(X[b:b + 1], mask[b:b + 1])
        loss.backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in out.items()}


def _opacus_per_sample(model: nn.Module, X: torch.Tensor, mask: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    from opacus.grad_sample import GradSampleModule

    register_grad_samplers()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        _, loss = gsm(X, mask, **kw)  # batch-mean loss: Opacus rescales backprops by the batch size
        loss.backward()
        return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    finally:
        gsm._close()


class TestPerSampleGradients:

    def test_masked_linear_sampler_equals_autograd_per_sample(self):
        torch.manual_seed(0)
        layer = MaskedLinear(7)
        x = torch.randn(5, 3, 7)
        per = {"weight": [], "bias": []}
        for b in range(5):
            layer.zero_grad()
            (layer(x[b:b + 1]) ** 2).sum().backward()
            per["weight"].append(layer.weight.grad.clone())
            per["bias"].append(layer.bias.grad.clone())
        backprops = 2 * layer(x).detach()  # d/dy of sum(y^2)
        got = masked_linear_grad_sample(layer, [x], backprops)
        torch.testing.assert_close(got[layer.weight], torch.stack(per["weight"]))
        torch.testing.assert_close(got[layer.bias], torch.stack(per["bias"]))
        assert got[layer.weight].triu(1).abs().sum() == 0  # never-read entries carry no gradient (no norm inflation)

    @pytest.mark.parametrize("n_labels,recurrence,end_h", [(3, 0.0, False), (0, 0.0, False), (3, 10.0, True)])
    def test_whole_halo_opacus_per_sample_equals_one_at_a_time(self, n_labels, recurrence, end_h):
        cfg = HaloConfig.tiny(9, n_labels, n_ctx=6, n_embd=8, n_head=2, recurrence=recurrence, end_from_history=end_h)
        torch.manual_seed(1)
        model = HALO(cfg)
        if recurrence:  # trained-looking offsets, so their gradients move the others' too
            with torch.no_grad():
                model.recurrence.last.normal_(0.0, 0.2)
                model.recurrence.ever.normal_(0.0, 0.2)
        X, mask = _batch(5, cfg, seed=2)
        ref = _one_at_a_time(model, X, mask)
        got = _opacus_per_sample(model, X, mask)
        assert got.keys() == ref.keys()
        for n in ref:
            assert got[n].shape == ref[n].shape, n  # batch dimension first, for wpe too
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    def test_consequence_with_mined_rules_opacus_per_sample_equals_one_at_a_time(self):
        """Rule-fixed entries leave the loss per patient, so per-sample gradients stay exact for ConSequence."""
        from synthehr_core.data.toy import make_toy_tables, toy_vocab
        from synthehr_core.model.consequence import ConSequence, compile_rules
        from synthehr_core.model.tensors import collate_halo
        from synthehr_core.rules.mining import Thresholds, mine_rules

        p, v, c = make_toy_tables(120, seed=1)
        vocab = toy_vocab(c, p)
        rules = mine_rules(p, v, c, vocab, Thresholds.make(label_min_prevalence=20))
        assert rules
        cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=8, n_embd=8, n_head=2)
        torch.manual_seed(3)
        model = ConSequence(cfg, compile_rules(rules, vocab))
        items = []
        for pid in p["patient_id"].iloc[:5]:
            labels = [vocab.index(f"label:sex={p.set_index('patient_id').at[pid, 'sex']}")]
            visits = [sorted(vocab.index(t) for t in c[(c["patient_id"] == pid) & (c["visit_index"] == k)]["code"])
                      for k in sorted(v.loc[v["patient_id"] == pid, "visit_index"])]
            items.append((labels, visits[:6]))
        X, mask = collate_halo(items, vocab, 8)
        fired, _ = model.rules.fired(X)
        assert fired.any()  # the rules do take entries out of the loss in this batch
        ref = _one_at_a_time(model, X, mask)
        got = _opacus_per_sample(model, X, mask)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    @pytest.mark.parametrize("consequence", [False, True])
    def test_trimmed_batch_gives_the_padded_per_sample_gradients(self, consequence):
        """A batch cut after its longest patient (nominal n_ctx kept as the normaliser) has the padded batch's
        per-sample gradients, so clipping, noise and the accounting are unchanged."""
        from synthehr_core.data.toy import make_toy_tables, toy_vocab
        from synthehr_core.model.consequence import ConSequence, compile_rules
        from synthehr_core.model.tensors import collate_halo
        from synthehr_core.rules.mining import Thresholds, mine_rules

        p, v, c = make_toy_tables(120, seed=1)
        vocab = toy_vocab(c, p)
        cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=12, n_embd=8, n_head=2)
        torch.manual_seed(4)
        if consequence:
            model = ConSequence(cfg, compile_rules(mine_rules(p, v, c, vocab, Thresholds.make(label_min_prevalence=20)),
                                                   vocab))
        else:
            model = HALO(cfg)
        sex = p.set_index("patient_id")["sex"]
        items = []
        for pid in p["patient_id"].iloc[:6]:
            visits = [sorted(vocab.index(t) for t in c[(c["patient_id"] == pid) & (c["visit_index"] == k)]["code"])
                      for k in sorted(v.loc[v["patient_id"] == pid, "visit_index"])]
            items.append(([vocab.index(f"label:sex={sex[pid]}")], visits))
        X, mask = collate_halo(items, vocab, 12)
        Xt, mt = collate_halo(items, vocab, 12, trim=True)
        assert Xt.size(1) < 12
        ref = _opacus_per_sample(model, X, mask)
        got = _opacus_per_sample(model, Xt, mt, n_ctx=12)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")

    def test_stock_linear_rule_would_be_wrong_for_the_masked_head(self):
        """Why the custom sampler exists: the unmasked outer product differs (larger norm) from the true gradient."""
        from opacus.grad_sample.linear import compute_linear_grad_sample

        torch.manual_seed(0)
        layer = MaskedLinear(6)
        x, gy = torch.randn(4, 2, 6), torch.randn(4, 2, 6)
        stock = compute_linear_grad_sample(layer, [x], gy)[layer.weight]
        ours = masked_linear_grad_sample(layer, [x], gy)[layer.weight]
        assert (stock.flatten(1).norm(dim=1) > ours.flatten(1).norm(dim=1)).all()


class TestPrivateTrainingUnits:

    def test_poisson_batches_are_seeded_and_have_rate_q(self):
        a, b = poisson_batch(1000, 0.05, seed=3, step=7), poisson_batch(1000, 0.05, seed=3, step=7)
        assert torch.equal(a, b)
        assert not torch.equal(a, poisson_batch(1000, 0.05, seed=3, step=8))
        sizes = torch.tensor([len(poisson_batch(1000, 0.05, 0, s)) for s in range(200)], dtype=torch.float)
        assert abs(sizes.mean().item() - 50) < 3  # Binomial(1000, 0.05): mean 50, sd of the mean ~0.5

    def test_bad_options_are_collected_and_named(self):
        with pytest.raises(ConfigError) as e:
            DPConfig(target_epsilon=-1, delta=0.5, max_grad_norm=0, physical_batch_size=0,
                     accountant="gdp").validate(n_train=10)
        msg = str(e.value)
        for name in ("dp_target_epsilon", "dp_delta", "dp_max_grad_norm", "dp_physical_batch_size", "dp_accountant"):
            assert name in msg
        with pytest.raises(ConfigError, match="not both"):
            DPConfig(target_epsilon=1.0, noise_multiplier=1.0).validate()
        with pytest.raises(ConfigError, match="1/n_train"):
            DPConfig(target_epsilon=1.0, delta=0.01).validate(n_train=200)

    def test_coarse_and_fp16_are_refused(self):
        model = HALO(HaloConfig.tiny(5, 2, n_ctx=4, n_embd=8, n_head=2, coarse=True))
        opt = torch.optim.Adam(model.parameters())
        with pytest.raises(ConfigError, match="coarse"):
            PrivateTraining(model, opt, n_train=50, batch_size=5, steps=3, config=DPConfig(noise_multiplier=1.0), seed=0)
        model = HALO(HaloConfig.tiny(5, 2, n_ctx=4, n_embd=8, n_head=2))
        with pytest.raises(ConfigError, match="bf16"):
            PrivateTraining(model, torch.optim.Adam(model.parameters()), n_train=50, batch_size=5, steps=3,
                            config=DPConfig(noise_multiplier=1.0), seed=0, precision="fp16")

    def test_clipped_noiseless_step_and_empty_batch(self):
        """sigma -> 0: the update direction is the mean of per-sample gradients clipped to C; an empty Poisson
        batch still steps (noise only) and is accounted."""
        import contextlib

        cfg = HaloConfig.tiny(9, 3, n_ctx=6, n_embd=8, n_head=2)
        torch.manual_seed(0)
        model = HALO(cfg)
        X, mask = _batch(6, cfg, seed=4)
        ref = _one_at_a_time(model, X, mask)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref.values()], 1).norm(dim=1)
        C = float(norms.min()) / 2  # every sample is clipped
        expected = {n: (g * (C / (norms + 1e-6)).view(-1, *[1] * (g.dim() - 1))).sum(0) / 6 for n, g in ref.items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        dp = PrivateTraining(model, sgd, n_train=6, batch_size=6, steps=2,
                             config=DPConfig(noise_multiplier=1e-12, max_grad_norm=C, physical_batch_size=4,
                                             delta=1e-3), seed=0)
        data = [(X[i], mask[i]) for i in range(6)]
        collate = lambda items: (torch.stack([a for a, _ in items]) if items else torch.zeros(0, *X.shape[1:]),
                                 torch.stack([m for _, m in items]) if items else torch.zeros(0, *mask.shape[1:]))
        total, n = dp.step(0, torch.arange(6), data, collate, contextlib.nullcontext)  # 2 physical batches (4 + 2)
        assert n == 6
        for name, p in model.named_parameters():
            torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-7)
        _, n = dp.step(1, torch.arange(0), data, collate, contextlib.nullcontext)
        assert n == 0 and dp.steps_accounted == 2
        assert all(torch.isfinite(p).all() for p in model.parameters())
        dp.close()


    def test_accounting_state_refuses_other_dp_parameters(self):
        def make(sigma: float) -> PrivateTraining:
            model = HALO(HaloConfig.tiny(5, 2, n_ctx=4, n_embd=8, n_head=2))
            return PrivateTraining(model, torch.optim.Adam(model.parameters()), n_train=50, batch_size=5, steps=3,
                                   config=DPConfig(noise_multiplier=sigma, delta=1e-3), seed=0)

        a = make(1.0)
        a.accountant.step(noise_multiplier=1.0, sample_rate=0.1)
        b = make(1.0)
        b.load_state_dict(a.state_dict())
        assert b.steps_accounted == 1 and b.epsilon() == pytest.approx(a.epsilon())
        with pytest.raises(ConfigError, match="noise_multiplier: checkpoint 1.0 vs now 2.0"):
            make(2.0).load_state_dict(a.state_dict())
        with pytest.raises(ConfigError, match="non-DP run"):
            make(1.0).load_state_dict({})
        for x in (a, b):
            x.close()

    def test_default_delta_is_below_one_over_n(self):
        model = HALO(HaloConfig.tiny(5, 2, n_ctx=4, n_embd=8, n_head=2))
        for n, delta in ((50, 1e-5), (2_000_000, 5e-8)):  # min(1e-5, 1 / (10 n))
            dp = PrivateTraining(model, torch.optim.Adam(model.parameters()), n_train=n, batch_size=5, steps=3,
                                 config=DPConfig(noise_multiplier=1.0), seed=0)
            assert dp.delta == pytest.approx(delta) and dp.metrics()["dp_delta"] == pytest.approx(delta)
            dp.close()


class TestMinCodeCount:

    def test_rare_codes_leave_the_vocabulary(self, tmp_path):
        from synthehr_core.data.toy import write_toy_tables

        write_toy_tables(tmp_path / "t", 60, seed=0)
        vocab = Vocab.load(tmp_path / "t" / "vocab.json")
        counts = code_patient_counts(tmp_path / "t", split="train")
        k = int(counts.median()) + 1
        small, dropped = min_code_count_vocab(vocab, counts, k)
        assert dropped and set(dropped) == {c for c in counts.index if counts[c] < k and c in vocab}
        assert small.size == vocab.size - len(dropped) and small.n_labels == vocab.n_labels
        assert all(t not in small for t in dropped)
        assert min_code_count_vocab(vocab, counts, 0) == (vocab, [])
        with pytest.raises(ConfigError, match="min_code_count"):
            min_code_count_vocab(vocab, counts, -1)


@pytest.fixture(scope="module")
def mimic_demo(tmp_path_factory):
    from synthehr_core.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("mimic") / "t"
    preprocess("mimic3", d)  # the bundled MIMIC-III demo: 72 train / 8 val patients, vocab 780
    return d


def _ckpt(path) -> dict:
    return torch.load(io.BytesIO(open(path, "rb").read()), map_location="cpu", weights_only=True)


class TestDPTraining:
    """train_to_dir with DP-SGD on the MIMIC-III demo tables."""
    RUN = dict(preset="tiny", n_embd=16, batch_size=8, eval_every=None, progress=False, seed=0)

    def test_demo_run_reaches_the_target_epsilon(self, mimic_demo, tmp_path):
        from synthehr_core.model.train import train_to_dir

        info = train_to_dir(mimic_demo, tmp_path / "dp", epochs=2, dp_target_epsilon=3.0, dp_delta=1e-3,
                            dp_max_grad_norm=1.0, dp_physical_batch_size=4, **self.RUN)
        val = pd.read_parquet(tmp_path / "dp" / "history.parquet").query("split == 'val'")
        assert len(val) == 2 and val["epsilon"].is_monotonic_increasing  # validated at each epoch end
        assert val["epsilon"].iloc[-1] == pytest.approx(info["dp_epsilon"])
        assert info["dp_steps"] == info["steps"] == 18  # 2 epochs of ceil(72 / 8) Poisson steps, q = 8/72
        assert abs(info["dp_epsilon"] - 3.0) / 3.0 < 0.10 and info["dp_epsilon"] <= 3.0 + 0.01
        meta = json.loads((tmp_path / "dp" / "meta.json").read_text())
        assert meta["dp_epsilon"] == pytest.approx(info["dp_epsilon"])
        last = _ckpt(sorted(Path(info["checkpoints"]).glob("step_*.pt"))[-1])
        assert last["privacy"]["noise_multiplier"] == pytest.approx(info["dp_noise_multiplier"])
        assert sum(h[2] for h in last["privacy"]["accountant"]["history"]) == 18
        state = _ckpt(tmp_path / "dp" / "model.pt")
        assert all(torch.isfinite(v).all() for v in state.values())
        assert "_module." not in "".join(state)  # the plain model's keys, loadable by load_model

    def test_resumed_run_continues_its_privacy_accounting(self, mimic_demo, tmp_path):
        from synthehr_core.model.train import train_to_dir

        dp = dict(dp_noise_multiplier=1.1, dp_delta=1e-3)
        full = train_to_dir(mimic_demo, tmp_path / "full", max_steps=6, ckpt_every=3, keep_checkpoints=None,
                            **dp, **self.RUN)
        mid = Path(full["checkpoints"]) / "step_00000003.pt"
        assert sum(h[2] for h in _ckpt(mid)["privacy"]["accountant"]["history"]) == 3
        resumed = train_to_dir(mimic_demo, tmp_path / "resumed", max_steps=6, resume_from=mid, **dp, **self.RUN)
        assert resumed["dp_steps"] == 6  # 3 restored + 3 new, not 3
        assert resumed["dp_epsilon"] == pytest.approx(full["dp_epsilon"], rel=1e-9)
        assert resumed["dp_epsilon"] > _eps(1.1, 8 / 72, 3, 1e-3)
        a, b = _ckpt(tmp_path / "full" / "model.pt"), _ckpt(tmp_path / "resumed" / "model.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)  # batches and noise are functions of (seed, step)
        for other in ({}, dict(dp_noise_multiplier=2.0, dp_delta=1e-3)):  # dropping or changing the DP options
            with pytest.raises(ConfigError, match="dp_"):
                train_to_dir(mimic_demo, tmp_path / "other", max_steps=6, resume_from=mid, **other, **self.RUN)


def test_dp_training_on_trimmed_batches_follows_the_padded_run(mimic_demo, tmp_path):
    """DP-SGD on trimmed physical batches: same Poisson batches and noise, same epsilon, weights to float rounding."""
    from synthehr_core.model.train import train_to_dir

    run = dict(max_steps=3, dp_noise_multiplier=1.1, dp_delta=1e-3, dp_physical_batch_size=4, **TestDPTraining.RUN)
    pad = train_to_dir(mimic_demo, tmp_path / "pad", legacy_step=True, **run)
    trim = train_to_dir(mimic_demo, tmp_path / "trim", **run)
    assert trim["dp_epsilon"] == pad["dp_epsilon"] and trim["dp_steps"] == pad["dp_steps"] == 3
    a, b = _ckpt(tmp_path / "pad" / "model.pt"), _ckpt(tmp_path / "trim" / "model.pt")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def _eps(sigma: float, q: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    from synthehr_core.model.dp import RDP_ALPHAS

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta, alphas=RDP_ALPHAS)


def test_train_stage_min_code_count_keeps_rare_codes_out_of_the_checkpoint(mimic_demo, tmp_path):
    from synthehr_core.model.train import train_to_dir

    counts = code_patient_counts(mimic_demo, "train")
    info = train_to_dir(mimic_demo, tmp_path / "o", preset="tiny", n_embd=16, max_steps=2, batch_size=8,
                        eval_every=None, progress=False, min_code_count=3)
    vocab, full = Vocab.load(tmp_path / "o" / "vocab.json"), Vocab.load(mimic_demo / "vocab.json")
    clinical = [t.token for t in full.tokens if t.kind == "code" and t.variable is None]
    rare = {c for c in clinical if counts.get(c, 0) < 3}  # includes codes no training patient has
    assert rare and info["n_rare_codes_dropped"] == len(rare)
    assert not rare & {t.token for t in vocab.tokens}
    assert all(c in vocab for c in clinical if c not in rare)
    assert vocab.size == full.size - len(rare)

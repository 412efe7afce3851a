"""ConSequence enforcement: torch rule evaluation agrees with the sparse checker, overrides leave no violation."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from synthehr_core.data.schema import read_tables, write_tables
from synthehr_core.data.toy import make_toy_tables, toy_vocab, write_toy_tables
from synthehr_core.model.checkpoint import load_model
from synthehr_core.model.consequence import CompiledRules, ConSequence, compile_rules
from synthehr_core.model.halo import HALO, HaloConfig
from synthehr_core.model.sampling import sample, sample_to_dir
from synthehr_core.model.tensors import EHRParquetDataset, collate_halo, decode_rows
from synthehr_core.model.train import train_to_dir
from synthehr_core.rules.mining import (
    Thresholds,
    check_violations,
    mine_rules,
    mine_rules_to_dir,
)
from synthehr_core.rules.ruleset import Rule, load_rules

TOY_TH = Thresholds.make(label_min_prevalence=20)
N_CTX = 8  # toy patients have at most 6 visits: start + labels + 6 rows


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Toy tables whose test split breaks the planted rules, with the rules mined on train."""
    p, v, c = make_toy_tables(300, seed=1)
    vocab = toy_vocab(c, p)
    rules = mine_rules(p, v, c, vocab, TOY_TH)
    test_ids = p.loc[p["split"] == "test", "patient_id"]
    males = v[v["patient_id"].isin(p.loc[(p["split"] == "test") & (p["sex"] == "M"), "patient_id"])]
    add = males[["patient_id", "visit_index"]].iloc[::2].assign(code="dx:V4581")  # label exclusion
    c = c[~((c["code"] == "dx:25000") & c["patient_id"].isin(test_ids[::2]))]      # within-visit pair
    c = c[~((c["code"] == "dx:4280") & c["patient_id"].isin(test_ids[1::3]) & (c["visit_index"] > 0))]  # persistence
    c = pd.concat([c, add], ignore_index=True)
    d = tmp_path_factory.mktemp("broken")
    write_tables(d, p, v, c)
    vocab.save(d / "vocab.json")
    return d, vocab, rules


def _masked_counts(cr: CompiledRules, X: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    fired, values = cr.fired(X)
    inside = fired & mask[:, 1:].bool().expand_as(fired)
    return int(inside.sum()), int((inside & (X[:, 1:] != values)).sum())


class TestAgreesWithChecker:
    @pytest.mark.parametrize("split", ["train", "test"])
    def test_fired_and_violations_per_rule(self, broken, split):
        d, vocab, rules = broken
        p, v, c = read_tables(d)
        ds = EHRParquetDataset(d, split, N_CTX, vocab)
        X, mask = collate_halo([ds[i] for i in range(len(ds))], vocab, N_CTX)
        total = 0
        for r in rules:
            m = check_violations([r], p[p["split"] == split], v, c, vocab)
            assert _masked_counts(compile_rules([r], vocab), X, mask) == \
                (m["fired_by_family"][r.family], m["total_violations"]), r
            total += m["total_violations"]
        assert (total > 0) == (split == "test")  # the test split was broken on purpose, train holds

    def test_relative_offset_and_absolute_row_aggregation(self, broken):
        *_, vocab, _ = broken
        V = vocab.size
        X = torch.zeros(1, 6, V)
        c, lab = vocab.index("dx:4280"), vocab.index("label:sex=M")
        X[0, 1, lab] = 1.0
        X[0, 2, c] = 1.0  # c in visit 0 only
        persist = compile_rules([Rule("persistence", (-1,), ("dx:4280",), (), (), (), "dx:4280", 1)], vocab)
        fired, values = persist.fired(X)
        assert fired[0, :, c].tolist() == [False, False, True, False, False]  # target row 3 only (not 4, 5)
        assert values[0, 2, c] == 1.0
        excl = compile_rules([Rule("label_exclusion", (1,), ("label:sex=M",), (), (), (), "dx:4280", 0)], vocab)
        assert excl.fired(X)[0][0, :, c].tolist() == [False, True, True, True, True]  # rows 2.. read row 1
        row = torch.ones(1, V)
        assert persist.apply_row(X[:, :3], torch.zeros(1, V), 3)[0, c] == 1.0
        assert persist.apply_row(X[:, :4], torch.zeros(1, V), 4)[0, c] == 0.0
        assert excl.apply_row(X[:, :3], row, 3)[0, c] == 0.0
        assert excl.apply_row(X[:, :1], row, 1)[0, c] == 1.0  # row 1 has no label row in its past


class TestOverrides:
    def test_chained_groups_are_consistent_in_either_order(self, broken):
        *_, vocab, _ = broken
        a, b, z = "dx:2724", "dx:5849", "dx:5990"
        ab = Rule("within_visit", (), (), (), (a,), (), b, 1)
        bz = Rule("within_visit", (), (), (), (b,), (), z, 1)
        for order in ([ab, bz], [bz, ab]):
            cr = compile_rules(order, vocab)
            assert len(cr.groups) == 2  # bz reads ab's output (or ab writes bz's antecedent): separate groups
            row = torch.zeros(2, vocab.size)
            row[0, vocab.index(a)] = 1.0
            out = cr.apply_row(torch.zeros(2, 2, vocab.size), row, 2)
            assert out[0, [vocab.index(a), vocab.index(b), vocab.index(z)]].tolist() == [1.0, 1.0, 1.0]
            assert out[1].sum() == 0

    def test_random_rows_have_zero_violations_after_apply_row(self, broken):
        _, vocab, rules = broken
        cr = compile_rules(rules, vocab)
        g = torch.Generator().manual_seed(0)
        B, V = 256, vocab.size
        outs = {}
        for enforce in (False, True):
            X = torch.zeros(B, N_CTX, V)
            X[:, 0, vocab.start_index] = 1.0
            g.manual_seed(0)
            for t in range(1, N_CTX):
                row = (torch.rand(B, V, generator=g) < 0.2).float()
                row[:, vocab.end_index] *= (torch.rand(B, generator=g) < 0.3).float()
                X[:, t] = cr.apply_row(X[:, :t], row, t) if enforce else row
            rows = [[X[b, r].nonzero().flatten().tolist() for r in range(1, N_CTX)] for b in range(B)]
            p, v, c, _ = decode_rows(rows, vocab, seed=0)
            outs[enforce] = check_violations(rules, p, v, c, vocab)
        assert outs[False]["total_violations"] > 100
        assert outs[True]["total_violations"] == 0 and outs[True]["percent_valid"] == 100.0
        assert outs[True]["fired_by_family"]["persistence"] > 0 and outs[True]["fired_by_family"]["within_visit"] > 0


class TestLoss:
    def test_fired_entries_are_left_out_of_the_loss(self, broken):
        d, vocab, rules = broken
        ds = EHRParquetDataset(d, "train", N_CTX, vocab)
        X, mask = collate_halo([ds[i] for i in range(32)], vocab, N_CTX)
        cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=N_CTX)
        torch.manual_seed(0)
        halo = HALO(cfg)
        cons = ConSequence(cfg, compile_rules(rules, vocab))
        cons.load_state_dict(halo.state_dict())
        logits, loss_c = cons(X, mask)
        _, loss_h = halo(X, mask)
        fired, _ = cons.rules.fired(X, causal=True)
        everything, _ = cons.rules.fired(X)
        assert not (fired & ~everything).any() and (everything & ~fired).any()   # only the causal rules
        assert int((fired & mask[:, 1:].bool()).sum()) > 100
        weight = mask[:, 1:] * (~fired).float()
        manual = F.binary_cross_entropy_with_logits(logits, X[:, 1:], weight=weight)  # mean over all B*(T-1)*V
        assert torch.allclose(loss_c, manual) and not torch.allclose(loss_c, loss_h)
        # no gradient reaches a fired entry: the loss is flat in its logit
        lg = logits.detach().requires_grad_(True)
        F.binary_cross_entropy_with_logits(lg, X[:, 1:], weight=weight).backward()
        assert (lg.grad[fired] == 0).all() and (lg.grad[~fired & mask[:, 1:].bool().expand_as(fired)] != 0).any()
        inside = fired & mask[:, 1:].bool().expand_as(fired)
        probs = cons.rules.fix_probs(logits, X)  # train data obeys its rules: fixed probabilities are the targets
        assert torch.equal(probs[inside], X[:, 1:][inside])
        assert torch.equal(probs[~everything], torch.sigmoid(logits)[~everything])


def test_categorical_heads_still_learn_where_rules_fix_members(broken):
    """Label exclusivity fixes every other value of a label column once one is on: with categorical heads the row
    still trains its head (the categorical holds that rule by construction)."""
    from synthehr_core.data.vocab import token_groups

    d, vocab, rules = broken
    assert any(r.family == "label_exclusivity" for r in rules)
    ds = EHRParquetDataset(d, "train", N_CTX, vocab)
    X, mask = collate_halo([ds[i] for i in range(32)], vocab, N_CTX)
    groups = token_groups(vocab)
    label = next(k for k, g in enumerate(groups) if g.row == "label")
    cfg = HaloConfig.tiny(vocab.n_visit_tokens, vocab.n_labels, n_ctx=N_CTX, groups=[(g.start, g.stop) for g in groups])
    torch.manual_seed(0)
    cons = ConSequence(cfg, compile_rules(rules, vocab))
    fired, _ = cons.rules.fired(X)
    g = groups[label]
    assert fired[:, 0, g.start:g.stop].any(-1).all()           # every label row has fixed members
    only_labels = torch.zeros_like(mask)
    only_labels[:, 1] = 1                                        # the loss of the label row alone
    _, loss = cons(X, only_labels)
    loss.backward()
    assert cons.group_heads[label].weight.grad.abs().sum() > 0


def test_consequence_samples_obey_the_rules_and_halo_samples_do_not(tmp_path):
    """(f) one trained checkpoint, sampled with and without its rules."""
    write_toy_tables(tmp_path / "t", 200, seed=0)
    mine_rules_to_dir(tmp_path / "t", tmp_path / "r", label_min_prevalence=20)
    train_to_dir(tmp_path / "t", tmp_path / "m", model_type="consequence", rules_dir=tmp_path / "r", epochs=2,
                 batch_size=16, lr=1e-3, eval_every=None, n_ctx=N_CTX, progress=False)
    model, vocab, info = load_model(tmp_path / "m")
    rules = load_rules(tmp_path / "m" / "rules.json")
    assert info["model_type"] == "consequence" and len(rules) > 0
    res = {}
    for name, rr in (("halo", None), ("consequence", compile_rules(rules, vocab))):
        rows = sample(model, vocab, 300, seed=3, batch_size=100, rules=rr, progress=False)
        p, v, c, _ = decode_rows(rows, vocab, seed=3)
        res[name] = check_violations(rules, p, v, c, vocab)
    assert res["halo"]["total_violations"] > 0 and res["halo"]["percent_valid"] < 100.0
    assert res["consequence"]["total_violations"] == 0 and res["consequence"]["percent_valid"] == 100.0
    assert res["consequence"]["n_patients"] > 200
    # the sample stage finds rules.json in the checkpoint (consequence.load_row_rules) and applies it
    sample_to_dir(tmp_path / "m", tmp_path / "s", seed=4, n_patients=200, batch_size=100)
    staged = check_violations(load_rules(tmp_path / "m" / "rules.json"), *read_tables(tmp_path / "s"), vocab)
    assert staged["total_violations"] == 0 and staged["n_patients"] > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_and_sampling_with_rules(tmp_path):
    write_toy_tables(tmp_path / "t", 200, seed=0)
    mine_rules_to_dir(tmp_path / "t", tmp_path / "r", label_min_prevalence=20)
    info = train_to_dir(tmp_path / "t", tmp_path / "m", model_type="consequence", rules_dir=tmp_path / "r",
                        epochs=2, batch_size=16, lr=1e-3, eval_every=None, n_ctx=N_CTX, device="cuda", progress=False)
    assert info["device"].startswith("cuda")
    model, vocab, _ = load_model(tmp_path / "m", device="cuda")
    rules = load_rules(tmp_path / "m" / "rules.json")
    rows = sample(model, vocab, 300, seed=3, batch_size=100, rules=compile_rules(rules, vocab), progress=False)
    p, v, c, _ = decode_rows(rows, vocab, seed=3)
    assert check_violations(rules, p, v, c, vocab)["total_violations"] == 0


def test_new_families_hold_in_consequence_samples(tmp_path):
    """Issue 17: mutual exclusion, ordinal stages and event type x weekday, mined on the simulator's train split
    (kept if they hold on val), enforced in sampling: 0 violations, and the weekday (a required single-valued
    variable a rule would erase) is drawn again instead of left empty."""
    from synthehr_core.data.fixtures import longitudinal
    from synthehr_core.data.preprocess import preprocess
    from synthehr_core.data.vocab import Vocab
    from synthehr_core.rules.ruleset import save_rules

    raw = longitudinal.write_raw(tmp_path / "raw", 1200, seed=2)
    preprocess(longitudinal.dataset_config(raw), tmp_path / "t")
    vocab = Vocab.load(tmp_path / "t" / "vocab.json")
    p, v, c = read_tables(tmp_path / "t")
    rules = mine_rules(p, v, c, vocab, split="train", val_split="val")
    fams = {r.family for r in rules}
    assert {"mutual_exclusion", "ordinal", "value_exclusion"} <= fams
    (tmp_path / "r").mkdir()
    save_rules(tmp_path / "r" / "rules.json", rules)
    train_to_dir(tmp_path / "t", tmp_path / "m", model_type="consequence", rules_dir=tmp_path / "r", epochs=1,
                 batch_size=64, lr=3e-3, eval_every=None, progress=False)
    sample_to_dir(tmp_path / "m", tmp_path / "s", seed=5, n_patients=300, batch_size=150)
    sp, sv, sc = read_tables(tmp_path / "s")
    m = check_violations(rules, sp, sv, sc, vocab)
    assert m["total_violations"] == 0 and m["n_patients"] > 200, m["violations_by_family"]
    assert sv["cal_weekday"].notna().all() and sv["event_type"].notna().all()
    assert not ((sv["event_type"] == "ELECTIVE") & sv["cal_weekday"].isin(["Sat", "Sun"])).any()
    # the same checkpoint without its rules breaks some of them (the untrained structure is not learnt)
    model, vocab2, _ = load_model(tmp_path / "m")
    rows = sample(model, vocab2, 300, seed=5, batch_size=150, progress=False)
    hp, hv, hc, _ = decode_rows(rows, vocab2, seed=5)
    assert check_violations(rules, hp, hv, hc, vocab)["total_violations"] > 0

"""Canonical tables -> HALO tensors -> decoded tables, on hand-made and toy cohorts."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from synthehr_core import storage
from synthehr_core.data.schema import read_tables, write_tables
from synthehr_core.data.toy import toy_vocab, write_toy_tables
from synthehr_core.data.vocab import build_vocab
from synthehr_core.errors import ConfigError, SchemaError
from synthehr_core.model.tensors import EHRParquetDataset, HaloCollate, collate_halo, decode_rows


def _write(tmp_path, patients, visits, codes, vocab, name="t"):
    out = tmp_path / name
    with storage.atomic_dir(out) as tmp:
        write_tables(tmp, patients, visits, codes)
        vocab.save(storage.join(tmp, "vocab.json"))
    return out


def _hand_made(tmp_path, with_labels=True):
    """Patient A: 3 visits; patient B: 1 visit; patient C (val split): 1 visit."""
    patients = pd.DataFrame({"patient_id": ["A", "B", "C"], "split": ["train", "train", "val"],
                             "sex": ["F", "M", "F"], "age_binned": ["40-60", "18-40", "18-40"]})
    visits = pd.DataFrame({"patient_id": ["A", "A", "A", "B", "C"], "visit_index": np.int32([0, 1, 2, 0, 0]),
                           "start_offset_days": [0.0, 10.0, 20.0, 0.0, 0.0],
                           "event_type": ["inpatient", "ED", "inpatient", "ED", "ED"],
                           "los_days_binned": ["0-2", None, "2-5", "0-2", "0-2"]})
    codes = pd.DataFrame({"patient_id": ["A", "A", "A", "A", "B", "C"], "visit_index": np.int32([0, 0, 2, 2, 0, 0]),
                          "code": ["dx:2", "dx:1", "dx:1", "px:9", "dx:2", "dx:1"]})
    if with_labels:
        vocab = build_vocab(["inpatient", "ED"], {"los_days": [0.0, 2.0, 5.0]}, [], ["dx:1", "dx:2", "px:9"],
                            {"sex": ["F", "M"]}, {"age": [18.0, 40.0, 60.0]}, ["dx", "px"])
    else:
        patients = patients[["patient_id", "split"]]
        vocab = build_vocab(["inpatient", "ED"], {"los_days": [0.0, 2.0, 5.0]}, [], ["dx:1", "dx:2", "px:9"],
                            {}, {}, ["dx", "px"])
    return _write(tmp_path, patients, visits, codes, vocab), vocab


def _row_tokens(X, vocab, b, r):
    return [vocab.tokens[i].token for i in X[b, r].nonzero().flatten().tolist()]


class TestLayout:
    def test_hand_made_patient_rows_and_mask(self, tmp_path):
        d, vocab = _hand_made(tmp_path)
        ds = EHRParquetDataset(d, split="train", n_ctx=7)
        assert ds.patient_ids == ["A", "B"]
        X, mask = collate_halo([ds[0], ds[1]], ds.vocab, 7)
        assert X.shape == (2, 7, vocab.size) and X.dtype == torch.float32 and mask.shape == (2, 7, 1)
        assert _row_tokens(X, vocab, 0, 0) == ["<start>"]
        assert _row_tokens(X, vocab, 0, 1) == ["label:sex=F", "label:age=40-60"]
        assert _row_tokens(X, vocab, 0, 2) == ["evt:inpatient", "bin:los_days=0-2", "dx:1", "dx:2"]
        assert _row_tokens(X, vocab, 0, 3) == ["evt:ED"]  # null bin -> no bin token; no codes
        assert _row_tokens(X, vocab, 0, 4) == ["evt:inpatient", "bin:los_days=2-5", "dx:1", "px:9", "<end>"]
        assert _row_tokens(X, vocab, 0, 5) == ["<pad>"] and _row_tokens(X, vocab, 0, 6) == ["<pad>"]
        assert mask[0, :, 0].tolist() == [0, 1, 1, 1, 1, 0, 0]
        assert _row_tokens(X, vocab, 1, 2) == ["evt:ED", "bin:los_days=0-2", "dx:2", "<end>"]
        assert mask[1, :, 0].tolist() == [0, 1, 1, 0, 0, 0, 0]
        assert X[:, 0].sum().item() == 2  # start row holds only <start>

    def test_trim_keeps_rows_up_to_the_longest_patient(self, tmp_path):
        """collate_halo(trim=True) is the padded batch cut after the longest patient's last visit row: the rows
        cut are <pad> rows with mask 0 for everyone (the model's loss is unchanged given the nominal n_ctx)."""
        d, vocab = _hand_made(tmp_path)
        ds = EHRParquetDataset(d, split="train", n_ctx=7)
        X, mask = collate_halo([ds[0], ds[1]], ds.vocab, 7)
        Xt, mt = collate_halo([ds[0], ds[1]], ds.vocab, 7, trim=True)
        assert Xt.shape == (2, 5, vocab.size) and mt.shape == (2, 5, 1)  # A: start, labels, 3 visits
        assert torch.equal(Xt, X[:, :5]) and torch.equal(mt, mask[:, :5]) and mask[:, 5:].sum() == 0
        assert collate_halo([ds[1]], ds.vocab, 7, trim=True)[0].shape == (1, 3, vocab.size)  # B: one visit
        assert HaloCollate(vocab, 7, trim=True)([ds[1]])[0].shape[1] == 3
        assert collate_halo([], ds.vocab, 7, trim=True)[0].shape == (0, 7, vocab.size)  # empty: nothing to cut to

    def test_label_free_switch_puts_first_visit_on_row_1(self, tmp_path):
        d, vocab = _hand_made(tmp_path, with_labels=False)
        assert vocab.label_row is False and vocab.first_visit_row == 1
        ds = EHRParquetDataset(d, split="train", n_ctx=5)
        X, mask = collate_halo([ds[0]], ds.vocab, 5)
        assert _row_tokens(X, vocab, 0, 1) == ["evt:inpatient", "bin:los_days=0-2", "dx:1", "dx:2"]
        assert "<end>" in _row_tokens(X, vocab, 0, 3)
        assert mask[0, :, 0].tolist() == [0, 1, 1, 1, 0]

    def test_truncation_is_counted(self, tmp_path):
        d, _ = _hand_made(tmp_path)
        ds = EHRParquetDataset(d, split="train", n_ctx=4)  # room for 2 visits
        assert ds.n_truncated == 1 and ds.n_truncated_visits == 1
        assert len(ds[0][1]) == 2

    def test_split_none_keeps_everyone(self, tmp_path):
        d, _ = _hand_made(tmp_path)
        assert EHRParquetDataset(d, split=None).patient_ids == ["A", "B", "C"]

    def test_unknown_split_is_a_config_error(self, tmp_path):
        d, _ = _hand_made(tmp_path)
        with pytest.raises(ConfigError, match="split='tset'"):
            EHRParquetDataset(d, split="tset")

    def test_missing_label_column_is_a_schema_error(self, tmp_path):
        d, vocab = _hand_made(tmp_path)
        p, v, c = read_tables(d)
        d2 = _write(tmp_path, p.drop(columns=["sex"]), v, c, vocab, name="t2")
        with pytest.raises(SchemaError, match="'sex'"):
            EHRParquetDataset(d2)


class TestToy:
    def test_dataloader_with_workers(self, tmp_path):
        vocab = write_toy_tables(tmp_path / "toy", n_patients=60, seed=1)
        ds = EHRParquetDataset(tmp_path / "toy", split=None, n_ctx=10)
        dl = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=HaloCollate(vocab, 10))
        batches = list(dl)
        assert sum(X.shape[0] for X, _ in batches) == len(ds)
        X0, m0 = collate_halo([ds[i] for i in range(16)], vocab, 10)
        assert torch.equal(batches[0][0], X0) and torch.equal(batches[0][1], m0)

    def test_vocab_order_is_deterministic(self, tmp_path):
        from synthehr_core.data.toy import make_toy_tables
        p, v, c = make_toy_tables(50, seed=3)
        a = toy_vocab(c, p).to_json()
        b = toy_vocab(c.sample(frac=1.0, random_state=7), p.sample(frac=1.0, random_state=8)).to_json()
        assert a == b

    def test_decode_roundtrip(self, tmp_path):
        vocab = write_toy_tables(tmp_path / "toy", n_patients=40, seed=2)
        ds = EHRParquetDataset(tmp_path / "toy", split=None, n_ctx=10)
        X, _ = collate_halo([ds[i] for i in range(len(ds))], vocab, 10)
        rows = [[X[b, r].nonzero().flatten().tolist() for r in range(1, 10)] for b in range(len(ds))]
        patients, visits, codes, counts = decode_rows(rows, vocab, seed=5)
        assert counts["n_patients"] == len(ds) and counts["n_dropped_no_visits"] == 0
        assert patients["patient_id"].tolist()[:2] == ["syn-5-0", "syn-5-1"]
        assert set(patients["split"]) == {"synthetic"}
        real_p, real_v, real_c = read_tables(tmp_path / "toy")
        real_p = real_p.set_index("patient_id").loc[ds.patient_ids]
        assert patients["sex"].tolist() == real_p["sex"].tolist()
        assert patients["age_binned"].tolist() == real_p["age_binned"].tolist()
        assert patients["age"].isna().all() and visits["start_offset_days"].isna().all()
        assert len(visits) == sum(len(ds[i][1]) for i in range(len(ds)))
        n_real_codes = real_c[real_c["patient_id"].isin(ds.patient_ids)].shape[0]
        assert len(codes) == n_real_codes
        (tmp_path / "out").mkdir()
        write_tables(tmp_path / "out", patients, visits, codes)  # decoded tables pass the schema validator

    def test_decode_stops_at_end_skips_empty_and_drops_empty_patients(self, tmp_path):
        d, vocab = _hand_made(tmp_path)
        dx1, end = vocab.index("dx:1"), vocab.end_index
        F = vocab.index("label:sex=F")
        rows = [
            [[F], [], [dx1], [dx1, end], [dx1]],   # empty row skipped; row after <end> ignored
            [[F], [end]],                          # no visit -> dropped
        ]
        patients, visits, codes, counts = decode_rows(rows, vocab, seed=0)
        assert patients["patient_id"].tolist() == ["syn-0-0"]
        assert visits["visit_index"].tolist() == [0, 1]
        assert counts["n_dropped_no_visits"] == 1 and counts["n_empty_rows_skipped"] == 2


def test_calendar_columns_become_visit_tokens_and_back(tmp_path):
    patients = pd.DataFrame({"patient_id": ["A"], "split": ["train"]})
    visits = pd.DataFrame({"patient_id": ["A", "A"], "visit_index": np.int32([0, 1]), "start_offset_days": [0.0, 3.0],
                           "event_type": ["ED", "ED"], "cal_month": ["02", "01"]})
    codes = pd.DataFrame({"patient_id": ["A"], "visit_index": np.int32([1]), "code": ["dx:1"]})
    vocab = build_vocab(["ED"], {}, ["cal:month=01", "cal:month=02"], ["dx:1"], {}, {}, ["dx"])
    d = _write(tmp_path, patients, visits, codes, vocab)
    ds = EHRParquetDataset(d, n_ctx=4)
    X, _ = collate_halo([ds[0]], vocab, 4)
    assert _row_tokens(X, vocab, 0, 1) == ["evt:ED", "cal:month=02"]
    assert _row_tokens(X, vocab, 0, 2) == ["evt:ED", "cal:month=01", "dx:1", "<end>"]
    rows = [[X[0, r].nonzero().flatten().tolist() for r in range(1, 4)]]
    _, v2, c2, _ = decode_rows(rows, vocab, seed=1)
    assert v2["cal_month"].tolist() == ["02", "01"] and c2["code"].tolist() == ["dx:1"]


def test_patient_without_visits_is_left_out_and_counted(tmp_path):
    d, vocab = _hand_made(tmp_path)
    p, v, c = read_tables(d)
    p = pd.concat([p, pd.DataFrame({"patient_id": ["D"], "split": ["train"], "sex": ["M"], "age_binned": ["18-40"]})])
    d2 = _write(tmp_path, p, v, c, vocab, name="t2")
    ds = EHRParquetDataset(d2, split="train")
    assert ds.patient_ids == ["A", "B"] and ds.n_no_visits == 1


def test_two_tokens_of_one_variable_decode_to_a_random_one_counted(tmp_path):
    """A row holding two LOS bins keeps one drawn uniformly (seeded), not the first in vocabulary order."""
    write_toy_tables(tmp_path / "t", n_patients=20, seed=0)
    from synthehr_core.data.vocab import Vocab

    vocab = Vocab.load(tmp_path / "t" / "vocab.json")
    a, b = vocab.index("bin:los_days=0-2"), vocab.index("bin:los_days=10-30")
    dx = vocab.index("dx:4019")
    F, M = vocab.index("label:sex=F"), vocab.index("label:sex=M")
    rows = [[[F, M], [a, b, dx, vocab.end_index]] for _ in range(400)]
    patients, visits, _, counts = decode_rows(rows, vocab, seed=3)
    share = (visits["los_days_binned"] == "0-2").mean()
    assert 0.4 < share < 0.6, share
    assert 0.4 < (patients["sex"] == "F").mean() < 0.6
    assert counts["n_visit_value_conflicts"] == 400 and counts["n_label_conflicts"] == 400
    again = decode_rows(rows, vocab, seed=3)[1]
    assert visits.equals(again)

"""Rule mining and the violation checker (no torch: the evaluate image has none)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from synthehr_core.data.fixtures.longitudinal import STAGES
from synthehr_core.data.toy import make_toy_tables, toy_vocab, write_toy_tables
from synthehr_core.data.vocab import build_vocab
from synthehr_core.errors import ConfigError, SchemaError
from synthehr_core.rules.mining import Thresholds, build_rows, check_violations, mine_rules, mine_rules_to_dir
from synthehr_core.rules.ruleset import Rule, load_rules, save_rules, validate_rules

TOY_TH = Thresholds.make(label_min_prevalence=20)  # the toy cohort has ~300 visits; KI's 500 finds nothing


def _key(r: Rule) -> tuple:
    return (r.family, r.past_visits, r.past_pos, r.past_neg, r.cur_pos, r.cur_neg, r.output, r.value)


@pytest.fixture(scope="module")
def toy():
    p, v, c = make_toy_tables(400, seed=0)
    return p, v, c, toy_vocab(c, p)


# ---------------------------------------------------------------------------------------------- hand-made cohort
def hand_made():
    """Three patients whose violations of five hand-written rules are counted by hand below."""
    vocab = build_vocab(["inpatient"], {}, [], ["dx:a", "dx:b", "dx:c", "dx:pc"], {"sex": ["F", "M"]}, {}, ["dx"])
    patients = pd.DataFrame({"patient_id": ["p1", "p2", "p3"], "split": ["train"] * 3, "sex": ["M", "F", "F"]})
    visit_codes = {("p1", 0): ["dx:a", "dx:b"], ("p1", 1): ["dx:a", "dx:c"], ("p1", 2): ["dx:b"],
                   ("p2", 0): ["dx:pc"], ("p2", 1): ["dx:c", "dx:a", "dx:b"], ("p2", 2): ["dx:c"], ("p2", 3): [],
                   ("p3", 0): ["dx:a", "dx:b"]}
    visits = pd.DataFrame([(p, i, 0.0, "inpatient") for p, i in visit_codes],
                          columns=["patient_id", "visit_index", "start_offset_days", "event_type"])
    visits["visit_index"] = visits["visit_index"].astype("int32")
    codes = pd.DataFrame([(p, i, c) for (p, i), cs in visit_codes.items() for c in cs],
                         columns=["patient_id", "visit_index", "code"])
    codes["visit_index"] = codes["visit_index"].astype("int32")
    rules = [
        Rule("label_exclusion", (1,), ("label:sex=M",), (), (), (), "dx:c", 0),
        Rule("prerequisite", "all", (), ("dx:pc",), (), (), "dx:c", 0),
        Rule("persistence", (-1,), ("dx:c",), (), (), (), "dx:c", 1),
        Rule("label_exclusivity", (), (), (), ("label:sex=F",), (), "label:sex=M", 0),
        Rule("within_visit", (), (), (), ("dx:a",), (), "dx:b", 1),
    ]
    return patients, visits, codes, vocab, rules


class TestChecker:
    def test_counts_are_exact_on_a_hand_made_cohort(self):
        patients, visits, codes, vocab, rules = hand_made()
        m = check_violations(rules, patients, visits, codes, vocab)
        # p1: v1 has a without b, c with sex=M, c without pc before; v2 lacks c after c in v1.
        # p2: v3 lacks c after c in v2 (an empty visit is still a visit row). p3 is clean.
        assert m["violations_by_family"] == {"label_exclusion": 1, "prerequisite": 1, "persistence": 2,
                                             "label_exclusivity": 0, "within_visit": 1}
        assert m["total_violations"] == 5
        assert m["static_violations"] == 1 and m["temporal_violations"] == 4
        assert m["n_patients_valid"] == 1 and m["percent_valid"] == pytest.approx(100 / 3)
        # fired: a in 4 visits; the sex=M patient has 3 visit rows; no pc before p1's visits, p2 v0, p3 v0
        assert m["fired_by_family"]["within_visit"] == 4
        assert m["fired_by_family"]["label_exclusion"] == 3
        assert m["fired_by_family"]["prerequisite"] == 8  # + the 3 label rows (no pc before them either)
        assert m["fired_by_family"]["persistence"] == 3  # rows after a visit with c: p1 v2, p2 v2, p2 v3

    def test_persistence_reads_only_the_previous_row(self):
        patients, visits, codes, vocab, rules = hand_made()
        persist = [r for r in rules if r.family == "persistence"]
        m = check_violations(persist, patients, visits, codes, vocab)
        # c in p1 v1 -> v2; c in p2 v1 -> v2 (holds), c in p2 v2 -> v3 (broken). p1 v2 -> v3 does not exist.
        assert m["fired_by_family"]["persistence"] == 3 and m["total_violations"] == 2
        as_all = [Rule("persistence", "all", ("dx:c",), (), (), (), "dx:c", 1)]
        # with "all" the antecedent also holds on every later row: same rows here, so add a visit to p1
        extra_v = pd.concat([visits, pd.DataFrame({"patient_id": ["p1"], "visit_index": np.int32([3]),
                                                   "start_offset_days": [0.0], "event_type": ["inpatient"]})])
        extra_v["visit_index"] = extra_v["visit_index"].astype("int32")
        assert check_violations(persist, patients, extra_v, codes, vocab)["total_violations"] == 2
        assert check_violations(as_all, patients, extra_v, codes, vocab)["total_violations"] == 3

    def test_label_row_offset_follows_the_vocabulary(self):
        patients, visits, codes, vocab, _ = hand_made()
        rows = build_rows(patients, visits, codes, vocab)
        assert rows.pos[rows.patient == 0].tolist() == [1, 2, 3, 4]  # label row 1, visits from row 2
        free = build_vocab(["inpatient"], {}, [], ["dx:a", "dx:b", "dx:c", "dx:pc"], {}, {}, ["dx"])
        rows = build_rows(patients, visits, codes, free)
        assert rows.pos[rows.patient == 0].tolist() == [1, 2, 3]  # label-free: first visit is row 1

    def test_large_vocabulary_stays_sparse(self):
        rng = np.random.default_rng(0)
        names = [f"dx:{i:05d}" for i in range(7000)]
        vocab = build_vocab(["inpatient"], {}, [], names, {"sex": ["F", "M"]}, {}, ["dx"])
        n = 300
        patients = pd.DataFrame({"patient_id": [f"{i}" for i in range(n)], "split": "train",
                                 "sex": rng.choice(["F", "M"], n)})
        visits = pd.DataFrame({"patient_id": patients["patient_id"], "visit_index": np.zeros(n, np.int32),
                               "start_offset_days": 0.0, "event_type": "inpatient"})
        codes = pd.DataFrame({"patient_id": np.repeat(patients["patient_id"], 10).to_numpy(),
                              "visit_index": np.zeros(10 * n, np.int32), "code": rng.choice(names, 10 * n)})
        codes = codes.drop_duplicates()
        rows = build_rows(patients, visits, codes, vocab)
        assert rows.X.nnz == len(codes) + n + n  # codes + evt + one label per patient: nothing dense
        rules = mine_rules(patients, visits, codes, vocab, Thresholds.make(label_min_prevalence=3,
                                                                          pair_min_prevalence=3))
        assert check_violations(rules, patients, visits, codes, vocab)["total_violations"] == 0


class TestMining:
    def test_finds_the_planted_rules(self, toy):
        p, v, c, vocab = toy
        keys = {_key(r) for r in mine_rules(p, v, c, vocab, TOY_TH)}
        assert ("within_visit", (), (), (), ("dx:4019",), (), "dx:25000", 1) in keys
        assert ("persistence", (-1,), ("dx:4280",), (), (), (), "dx:4280", 1) in keys
        assert ("label_exclusion", (1,), ("label:sex=M",), (), (), (), "dx:V4581", 0) in keys
        assert ("label_exclusivity", (), (), (), ("label:sex=F",), (), "label:sex=M", 0) in keys
        assert ("label_exclusivity", (), (), (), ("label:age=18-40",), (), "label:age=60-80", 0) in keys

    def test_mined_rules_hold_on_train_with_support(self, toy):
        p, v, c, vocab = toy
        rules = mine_rules(p, v, c, vocab, TOY_TH)
        assert all(r.confidence == 1.0 and r.support > 0 for r in rules)
        assert check_violations(rules, p[p["split"] == "train"], v, c, vocab)["total_violations"] == 0

    def test_reads_the_training_split_only(self, toy):
        p, v, c, vocab = toy
        planted = ("within_visit", (), (), (), ("dx:4019",), (), "dx:25000", 1)
        drop_test = c[~((c["code"] == "dx:25000") & c["patient_id"].isin(p.loc[p["split"] == "test", "patient_id"]))]
        assert planted in {_key(r) for r in mine_rules(p, v, drop_test, vocab, TOY_TH)}  # test rows ignored
        with pytest.raises(ConfigError, match="split='nope'"):
            mine_rules(p, v, c, vocab, TOY_TH, split="nope")

    def test_breaking_a_train_row_removes_the_rule(self, toy):
        p, v, c, vocab = toy
        train_ids = set(p.loc[p["split"] == "train", "patient_id"])
        hit = c[(c["code"] == "dx:4019") & c["patient_id"].isin(train_ids)].iloc[0]
        broken = c[~((c["patient_id"] == hit["patient_id"]) & (c["visit_index"] == hit["visit_index"])
                     & (c["code"] == "dx:25000"))]
        keys = {_key(r) for r in mine_rules(p, v, broken, vocab, TOY_TH)}
        assert ("within_visit", (), (), (), ("dx:4019",), (), "dx:25000", 1) not in keys
        loose = Thresholds.make(label_min_prevalence=20, min_confidence=0.9)
        kept = [r for r in mine_rules(p, v, broken, vocab, loose) if r.output == "dx:25000" and r.cur_pos == ("dx:4019",)]
        assert len(kept) == 1 and 0.9 <= kept[0].confidence < 1.0

    def test_thresholds_are_parameters(self, toy):
        p, v, c, vocab = toy
        default = mine_rules(p, v, c, vocab)  # KI's 500 visits: no label exclusion on a toy cohort
        assert not [r for r in default if r.family == "label_exclusion"]
        strict = mine_rules(p, v, c, vocab, Thresholds.make(label_min_prevalence=20, persistence_min_repeats=10_000))
        assert not [r for r in strict if r.family == "persistence"]
        pair = ("within_visit", (), (), (), ("dx:4019",), (), "dx:25000", 1)
        share = c.loc[c["code"] == "dx:25000"].merge(p.loc[p["split"] == "train", ["patient_id"]]).shape[0] / \
            v.merge(p.loc[p["split"] == "train", ["patient_id"]]).shape[0]  # P(25000) per train visit
        assert pair in {_key(r) for r in mine_rules(p, v, c, vocab, Thresholds.make(pair_min_lift=0.99 / share))}
        assert pair not in {_key(r) for r in mine_rules(p, v, c, vocab, Thresholds.make(pair_min_lift=1.01 / share))}
        only = mine_rules(p, v, c, vocab, Thresholds.make(families=["within_visit"]))
        assert {r.family for r in only} == {"within_visit"}
        with pytest.raises(ConfigError, match="unknown rule-mining thresholds"):
            Thresholds.make(label_min_prevalance=3)
        with pytest.raises(ConfigError, match="min_confidence"):
            Thresholds.make(min_confidence=0)

    def test_prerequisite_is_mined_with_the_past_encoding(self):
        vocab = build_vocab(["inpatient"], {}, [], ["dx:pc", "dx:c", "dx:x"], {}, {}, ["dx"])
        rows = []
        for i in range(12):
            rows += [(f"{i}", 0, "dx:pc"), (f"{i}", 1, "dx:c"), (f"{i}", 1, "dx:x")]
        codes = pd.DataFrame(rows, columns=["patient_id", "visit_index", "code"]).astype({"visit_index": "int32"})
        visits = codes[["patient_id", "visit_index"]].drop_duplicates().assign(start_offset_days=0.0,
                                                                              event_type="inpatient")
        patients = pd.DataFrame({"patient_id": [f"{i}" for i in range(12)], "split": "train"})
        keys = {_key(r) for r in mine_rules(patients, visits, codes, vocab)}
        assert ("prerequisite", "all", (), ("dx:pc",), (), (), "dx:c", 0) in keys
        assert ("prerequisite", "all", (), ("dx:c",), (), (), "dx:pc", 0) not in keys

    def test_closure_adds_exclusions_for_pair_antecedents(self):
        # a (rare) always comes with b; b never occurs with sex=M; so sex=M must exclude a as well
        vocab = build_vocab(["inpatient"], {}, [], ["dx:a", "dx:b", "dx:z"], {"sex": ["F", "M"]}, {}, ["dx"])
        rows, sexes = [], []
        for i in range(40):
            sex = "F" if i < 20 else "M"
            sexes.append(sex)
            rows.append((f"{i}", 0, "dx:z"))
            if sex == "F":
                rows.append((f"{i}", 0, "dx:b"))
                if i < 12:
                    rows.append((f"{i}", 0, "dx:a"))
        codes = pd.DataFrame(rows, columns=["patient_id", "visit_index", "code"]).astype({"visit_index": "int32"})
        visits = pd.DataFrame({"patient_id": [f"{i}" for i in range(40)], "visit_index": np.zeros(40, np.int32),
                               "start_offset_days": 0.0, "event_type": "inpatient"})
        patients = pd.DataFrame({"patient_id": [f"{i}" for i in range(40)], "split": "train", "sex": sexes})
        th = Thresholds.make(label_min_prevalence=15)  # b (20 visits) qualifies, a (12) does not by itself
        rules = mine_rules(patients, visits, codes, vocab, th)
        excl = {(r.output, r.origin) for r in rules if r.family == "label_exclusion"}
        assert ("dx:b", "mined") in excl and ("dx:a", "closure") in excl
        off = mine_rules(patients, visits, codes, vocab, Thresholds.make(label_min_prevalence=15,
                                                                         close_under_pairs=False))
        assert "dx:a" not in {r.output for r in off if r.family == "label_exclusion"}


class TestFiles:
    def test_rules_json_is_readable_and_round_trips(self, tmp_path):
        *_, rules = hand_made()
        save_rules(tmp_path / "rules.json", rules)
        d = json.loads((tmp_path / "rules.json").read_text())
        assert d["rules"][0]["past_pos"] == ["label:sex=M"] and d["rules"][1]["past_visits"] == "all"
        assert {"support", "confidence"} <= set(d["rules"][0])
        assert load_rules(tmp_path / "rules.json") == rules
        d["rules"][1]["past_visits"] = -1  # KI's scalar for "all earlier rows"
        (tmp_path / "ki.json").write_text(json.dumps(d))
        assert load_rules(tmp_path / "ki.json")[1].past_visits == "all"

    def test_invalid_rules_are_reported_together(self):
        *_, vocab, _ = hand_made()
        bad = [Rule("within_visit", (), (), (), ("dx:nope",), (), "dx:b", 1),
               Rule("persistence", (-1, 1), ("dx:c",), (), (), (), "dx:c", 1),
               Rule("within_visit", (), (), (), ("dx:a",), (), "dx:b", 2)]
        with pytest.raises(SchemaError) as e:
            validate_rules(bad, vocab)
        msg = str(e.value)
        assert "'dx:nope'" in msg and "mixes relative" in msg and "value=2" in msg

    def test_mine_rules_to_dir(self, tmp_path):
        write_toy_tables(tmp_path / "t", 200, seed=0)
        info = mine_rules_to_dir(tmp_path / "t", tmp_path / "r", label_min_prevalence=20)
        assert info["n_rules"] == len(load_rules(tmp_path / "r" / "rules.json")) > 0
        assert info["split"] == "train" and info["thresholds"]["label_min_prevalence"] == 20
        assert (tmp_path / "r" / "meta.json").exists()


def test_rules_module_does_not_import_torch():
    code = ("import sys, synthehr_core.rules.mining as r, synthehr_core.data.toy as t; p, v, c = t.make_toy_tables(50);"
            "r.check_violations(r.mine_rules(p, v, c, t.toy_vocab(c, p)), p, v, c, t.toy_vocab(c, p));"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------- issue 17 families
@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The longitudinal simulator (CKD stages, electives on weekdays only), preprocessed: (patients, visits, codes,
    vocab)."""
    from synthehr_core.data.fixtures import longitudinal
    from synthehr_core.data.preprocess import preprocess
    from synthehr_core.data.schema import read_tables
    from synthehr_core.data.vocab import Vocab

    d = tmp_path_factory.mktemp("sim")
    raw = longitudinal.write_raw(d / "raw", 1500, seed=1)
    preprocess(longitudinal.dataset_config(raw), d / "t")
    return (*read_tables(d / "t"), Vocab.load(d / "t" / "vocab.json"))


def _by(rules, family):
    return {(r.past_pos or r.cur_pos, r.output) for r in rules if r.family == family}


class TestLongitudinalFamilies:
    def test_planted_structure_is_mined(self, sim):
        p, v, c, vocab = sim
        rules = mine_rules(p, v, c, vocab, split="train", val_split="val")
        stage = {f"dx:{s}": i for i, s in enumerate(STAGES)}
        mutex = {(a[0], b) for a, b in _by(rules, "mutual_exclusion") if a[0] in stage and b in stage}
        assert mutex and all((b, a) in mutex for a, b in mutex)            # both directions of each pair
        ordinal = _by(rules, "ordinal")
        assert ordinal and all(a[0] in stage and b in stage for a, b in ordinal)
        assert all(stage[a[0]] > stage[b] for a, b in ordinal)             # a later stage seen => no earlier one
        assert {(("evt:ELECTIVE",), "cal:weekday=Sat"), (("evt:ELECTIVE",), "cal:weekday=Sun")} \
            <= _by(rules, "value_exclusion")
        assert not any(r.output.startswith("cal:weekday=") and r.cur_pos == ("evt:EMERGENCY",) for r in rules)
        ordinal = next(r for r in rules if r.family == "ordinal")
        assert ordinal.past_visits == "all" and ordinal.value == 0 and ordinal.support > 0
        m = check_violations(rules, p[p["split"] == "train"], v, c, vocab)
        assert m["total_violations"] == 0                                   # exceptionless on train

    def test_rules_that_fail_on_val_are_dropped(self, sim):
        p, v, c, vocab = sim
        val = set(p.loc[p["split"] == "val", "patient_id"])
        everything = mine_rules(p, v, c, vocab, split="train")
        (a,), b = sorted(x for x in _by(everything, "mutual_exclusion") if x[0][0].startswith("dx:585"))[0]
        sa = c[(c["code"] == a) & c["patient_id"].isin(val)]
        assert len(sa)
        broken = pd.concat([c, sa.assign(code=b)], ignore_index=True)          # two stages in one val visit
        kept = mine_rules(p, v, broken, vocab, split="train", val_split="val")
        assert ((a,), b) in _by(mine_rules(p, v, broken, vocab, split="train"), "mutual_exclusion")
        assert ((a,), b) not in _by(kept, "mutual_exclusion") and ((b,), a) not in _by(kept, "mutual_exclusion")
        assert _by(kept, "value_exclusion") == _by(everything, "value_exclusion")   # the others stay

    def test_checker_counts_the_new_families(self, sim):
        p, v, c, vocab = sim
        rules = [r for r in mine_rules(p, v, c, vocab, split="train") if r.family in
                 ("mutual_exclusion", "ordinal", "value_exclusion")]
        tp = p[p["split"] == "test"].head(60).copy()
        vv = v[v["patient_id"].isin(tp["patient_id"])].copy()
        cc = c[c["patient_id"].isin(tp["patient_id"])].copy()
        (a,), b = sorted(x for x in _by(rules, "mutual_exclusion") if x[0][0].startswith("dx:585"))[0]
        ckd = cc.loc[cc["code"] == a, ["patient_id", "visit_index"]]
        extra = ckd.assign(code=b)                                        # two stages in one visit: 2 violations
        vv.loc[vv["event_type"] == "ELECTIVE", "cal_weekday"] = "Sat"       # every elective on a Saturday
        m = check_violations(rules, tp, vv, pd.concat([cc, extra], ignore_index=True), vocab)
        n_el = int((vv["event_type"] == "ELECTIVE").sum())
        assert m["violations_by_family"]["value_exclusion"] == 2 * n_el   # both directions of the pair fire
        assert m["violations_by_family"]["mutual_exclusion"] >= 2 * len(ckd) > 0

    def test_thresholds_are_validated(self):
        with pytest.raises(ConfigError, match="exclusion_min_expected"):
            Thresholds.make(exclusion_min_expected=0)

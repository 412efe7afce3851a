"""The evaluate stage: known-answer tests for fidelity, privacy, rules, utility and the written report."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from synthehr_core.data.schema import write_tables
from synthehr_core.data.toy import make_toy_tables, toy_vocab, write_toy_tables
from synthehr_core.errors import ConfigError, DataError
from synthehr_core.evaluation.attacks import nearest
from synthehr_core.evaluation.cohort import Cohort, label_columns, make_space
from synthehr_core.evaluation.fidelity import code_statistics
from synthehr_core.evaluation.stage import evaluate_tables, evaluate_to_dir
from synthehr_core.evaluation.utility import weighted_auc

FAST = {"privacy_sample": 300, "utility_sample": 500}


@pytest.fixture(scope="module")
def real():
    return make_toy_tables(800, seed=0)


def _cohort_of(tables, pids, prefix=""):
    p, v, c = tables
    out = (p[p["patient_id"].isin(pids)].assign(split="synthetic"),
           v[v["patient_id"].isin(pids)], c[c["patient_id"].isin(pids)])
    return tuple(t.assign(patient_id=prefix + t["patient_id"]) for t in out)


def _train_ids(tables):
    p = tables[0]
    return p.loc[p["split"] == "train", "patient_id"]


class TestFidelity:
    def test_six_families_match_halo_reference_loops(self):
        """HALO's evaluate_datasets.py computes the families with itertools loops; ours must agree exactly."""
        p, v, c = make_toy_tables(60, seed=3)
        space = make_space([(p, v, c)], label_columns(p, p, None))
        st = code_statistics(Cohort("x", p, v, c, space))
        C, ci = space.n_codes, {k: i for i, k in enumerate(space.codes)}
        counts = {f: Counter() for f in ("code_record", "code_visit", "pair_record", "pair_visit",
                                          "seq_record", "seq_visit")}
        n_visits = 0
        for pid in p["patient_id"]:
            vis = [set(c.loc[(c.patient_id == pid) & (c.visit_index == i), "code"])
                   for i in sorted(v.loc[v.patient_id == pid, "visit_index"])]
            n_visits += len(vis)
            rec = {"code_record": set(), "pair_record": set(), "seq_record": set()}
            for j, visit in enumerate(vis):
                for x in visit:
                    counts["code_visit"][ci[x]] += 1
                    rec["code_record"].add(ci[x])
                for a, b in itertools.combinations(sorted(visit), 2):
                    counts["pair_visit"][ci[a] * C + ci[b]] += 1
                    rec["pair_record"].add(ci[a] * C + ci[b])
                if j:
                    for a in vis[j - 1]:
                        for b in visit:
                            counts["seq_visit"][ci[a] * C + ci[b]] += 1
                            rec["seq_record"].add(ci[a] * C + ci[b])
            for f, keys in rec.items():
                counts[f].update(keys)
        denom = {"code_visit": n_visits, "pair_visit": n_visits, "seq_visit": n_visits - len(p)}
        for f, cnt in counts.items():
            keys, probs = st[f]
            expect = {k: n / denom.get(f, len(p)) for k, n in cnt.items()}
            assert dict(zip(keys.tolist(), probs.tolist())) == pytest.approx(expect), f

    def test_identical_cohort_gives_r2_one_and_all_exact_copies(self, real):
        synth = _cohort_of(real, _train_ids(real))
        res = evaluate_tables(real, synth, toy_vocab(real[2], real[0]), **FAST)
        m = res["metrics"]
        for f in ("code_record", "code_visit", "pair_record", "pair_visit", "seq_record", "seq_visit", "labels"):
            assert m[f"fidelity.{f}.r2"] == pytest.approx(1.0), f
        assert m["privacy.exact_copies"] == len(synth[0]) == m["n.synthetic"]
        assert m["privacy.exact_copy_rate"] == 1.0
        assert m["privacy.mia.accuracy"] > 0.9
        assert any("exact copies" in f for f in res["flags"])
        assert m["values.los_days.ks"] == 0.0 and m["time.gap_days.ks"] == 0.0

    def test_shuffled_codes_keep_unigrams_but_lose_pairs(self, real):
        p, v, c = _cohort_of(real, _train_ids(real))
        c = c.assign(code=np.random.default_rng(0).permutation(c["code"].to_numpy()))
        m = evaluate_tables(real, (p, v, c), None, **FAST)["metrics"]
        assert m["fidelity.code_visit.r2"] > 0.85 and m["fidelity.code_record.r2"] > 0.85
        for f in ("pair_visit", "pair_record", "seq_visit"):
            assert m[f"fidelity.{f}.r2"] < 0.75, f
            assert m[f"fidelity.{f}.r2"] < m["fidelity.code_visit.r2"] - 0.15, f

    def test_visit_and_code_count_distributions(self, real):
        p, v, c = _cohort_of(real, _train_ids(real))
        first = v["visit_index"] == 0                      # every synthetic patient keeps one visit only
        m = evaluate_tables(real, (p, v[first], c[c["visit_index"] == 0]), None, **FAST)["metrics"]
        assert m["fidelity.visits_per_patient.synth_mean"] == 1.0 and m["fidelity.visits_per_patient.synth_sd"] == 0.0
        assert m["fidelity.visits_per_patient.real_mean"] > 1.5
        assert m["fidelity.visits_per_patient.ks"] > 0.3


class TestPrivacy:
    def test_mia_detects_a_cohort_that_copies_half_the_training_set(self, real):
        train = _train_ids(real)
        other = make_toy_tables(800, seed=7)
        fresh = other[0]["patient_id"].iloc[: len(train) - len(train) // 2]
        copied = _cohort_of(real, train.iloc[::2])
        new = _cohort_of(other, fresh, prefix="o")
        synth = tuple(pd.concat([a, b], ignore_index=True) for a, b in zip(copied, new))
        m = evaluate_tables(real, synth, None, **FAST)["metrics"]
        assert m["privacy.mia.accuracy"] > 0.65 and m["privacy.mia.auc"] > 0.7
        assert m["privacy.exact_copies"] >= len(copied[0])
        assert m["privacy.dcr_train.median"] < m["privacy.dcr_test.median"]
        honest = evaluate_tables(real, new, None, **FAST)["metrics"]
        # no member leaks: accuracy is a coin flip, within 3 standard errors of 0.5 for the records attacked
        assert abs(honest["privacy.mia.accuracy"] - 0.5) < 3 * 0.5 / honest["privacy.mia.n_records"] ** 0.5
        assert honest["privacy.mia.accuracy"] < m["privacy.mia.accuracy"] - 0.1

    def test_nearest_is_the_aligned_hamming_distance(self):
        from scipy import sparse as sp
        A = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 0, 0]], np.float32))
        B = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]], np.float32))
        d, arg = nearest(A, B, np.array([1, 2]), np.array([1, 1, 2]))
        # row 0: to B0 = 1, to B1 = 4, to B2 = 0 + 1 (visit counts differ); row 1: to B0 = 2+1, B1 = 2+1, B2 = 3
        assert d.tolist() == [1.0, 3.0] and arg[0] in (0, 2)
        d_self, _ = nearest(B, B, exclude_self=True)
        assert d_self.tolist() == [1.0, 3.0, 1.0]


class TestRules:
    def test_violations_counted_exactly_on_a_hand_made_cohort(self, real, tmp_path):
        from synthehr_core.rules.ruleset import Rule, save_rules

        rules = [Rule("within_visit", (), (), (), ("dx:4019",), (), "dx:25000", 1),
                 Rule("label_exclusion", (1,), ("label:sex=M",), (), (), (), "dx:V4581", 0)]
        save_rules(tmp_path / "rules.json", rules)
        patients = pd.DataFrame({"patient_id": ["a", "b", "c"], "split": "synthetic", "sex": ["F", "M", "F"],
                                 "age_binned": "40-60"})
        visits = pd.DataFrame({"patient_id": ["a", "a", "b", "b", "c"], "visit_index": [0, 1, 0, 1, 0],
                               "start_offset_days": [0.0, 10.0, 0.0, 5.0, 0.0], "event_type": "inpatient"})
        visits["visit_index"] = visits["visit_index"].astype("int32")
        codes = pd.DataFrame([("a", 0, "dx:4019"),                      # within_visit violated
                              ("a", 1, "dx:4019"), ("a", 1, "dx:25000"),
                              ("b", 0, "dx:V4581"),                     # label_exclusion violated
                              ("b", 1, "dx:V4581"), ("b", 1, "dx:4019"),  # both violated
                              ("c", 0, "dx:V4581"), ("c", 0, "dx:2724")], columns=["patient_id", "visit_index", "code"])
        codes["visit_index"] = codes["visit_index"].astype("int32")
        res = evaluate_tables(real, (patients, visits, codes), toy_vocab(real[2], real[0]),
                              rules_path=tmp_path / "rules.json", **FAST)
        m = res["metrics"]
        assert m["rules.violations.within_visit"] == 2 and m["rules.violations.label_exclusion"] == 2
        assert m["rules.total_violations"] == 4 and m["rules.static_violations"] == 2
        assert m["rules.percent_valid"] == pytest.approx(100 / 3)
        assert any("rule violations" in f for f in res["flags"])
        from synthehr_core.evaluation.report import render_html
        assert "Most violated rules" in render_html(res) and "dx:V4581" in render_html(res)

    def test_rules_without_vocabulary_is_a_note_not_a_crash(self, real, tmp_path):
        from synthehr_core.rules.ruleset import save_rules

        save_rules(tmp_path / "rules.json", [])
        res = evaluate_tables(real, _cohort_of(real, _train_ids(real)), None, rules_path=tmp_path / "rules.json",
                              **FAST)
        assert not any(k.startswith("rules.") for k in res["metrics"])
        assert any("vocab.json" in n for n in res["notes"])


class TestValuesAndUtility:
    @pytest.mark.parametrize("null", [np.nan, None])   # float NaN, or an all-None object column
    def test_before_kde_uses_bins_and_says_so(self, real, null):
        p, v, c = _cohort_of(real, _train_ids(real))
        v = v.assign(los_days=null, gap_days=null, start_offset_days=null)
        res = evaluate_tables(real, (p, v, c), None, **FAST)
        m = res["metrics"]
        assert "values.los_days.ks" not in m and "time.gap_days.ks" not in m
        assert m["values.los_days_binned.tvd"] == 0.0
        assert any("los_days: null in the synthetic" in n for n in res["notes"])

    def test_calendar_from_start_day(self, real):
        p, v, c = real
        v = v.assign(start_day=18000.0 + v["start_offset_days"].round())
        synth = _cohort_of((p, v, c), _train_ids(real))
        shifted = (synth[0], synth[1].assign(start_day=synth[1]["start_day"] + 1), synth[2])  # one weekday later
        same = evaluate_tables((p, v, c), synth, None, **FAST)["metrics"]
        moved = evaluate_tables((p, v, c), shifted, None, **FAST)["metrics"]
        assert same["time.weekday.tvd"] == 0.0 and same["time.month.tvd"] == 0.0
        assert moved["time.weekday.tvd"] > 0.05
        no_cal = evaluate_tables(real, _cohort_of(real, _train_ids(real)), None, **FAST)
        assert any("time.weekday: not available" in n for n in no_cal["notes"])

    def test_weighted_auc_matches_sklearn_with_ties_and_resamples(self):
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 300)
        s = np.round(rng.normal(size=300) + y, 1)
        i = rng.integers(0, 300, 300)
        W = np.vstack([np.ones(300), np.bincount(i, minlength=300)])
        assert weighted_auc(y, s, W) == pytest.approx([roc_auc_score(y, s), roc_auc_score(y[i], s[i])])

    def test_utility_tstr_close_to_trtr_on_copied_data_and_one_class_skipped(self, real):
        synth = _cohort_of(real, _train_ids(real))
        res = evaluate_tables(real, synth, None, **FAST)
        m = res["metrics"]
        # the toy's dx:V4581 never occurs with sex=M, so sex is learnable from codes
        assert m["utility.sex=F.trtr_auroc"] > 0.6
        assert abs(m["utility.sex=F.tstr_auroc"] - m["utility.sex=F.trtr_auroc"]) < 0.05
        tab = res["details"]["utility"]["table"].set_index("label")
        assert tab.loc["sex=F", "tstr_lo"] <= m["utility.sex=F.tstr_auroc"] <= tab.loc["sex=F", "tstr_hi"]
        one = (synth[0].assign(sex="F"), synth[1], synth[2])
        res1 = evaluate_tables(real, one, None, **FAST)
        assert "utility.sex=F.tstr_auroc" not in res1["metrics"] and "utility.sex=F.trtr_auroc" in res1["metrics"]
        assert any("sex=F: the synth training sample has one class" in n for n in res1["notes"])


class TestStage:
    def test_evaluate_to_dir_writes_metrics_report_summary(self, tmp_path):
        write_toy_tables(tmp_path / "real", 300, seed=0)
        p, v, c = make_toy_tables(300, seed=1)
        with __import__("synthehr_core").storage.atomic_dir(tmp_path / "syn") as d:
            write_tables(d, p.assign(split="synthetic"), v, c)
        out = evaluate_to_dir(tmp_path / "real", tmp_path / "syn", tmp_path / "eval", seed=1, **FAST)
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert metrics == out["metrics"] and metrics
        assert all(isinstance(k, str) and isinstance(v, float) and np.isfinite(v) for k, v in metrics.items())
        html = (tmp_path / "eval" / "report.html").read_text()
        assert html.count("data:image/png;base64,") >= 5 and "src=\"http" not in html
        assert html.index("Decision:") < html.index("<h2>Provenance") < html.index("<h2>Fidelity")  # verdicts first
        md = (tmp_path / "eval" / "summary.md").read_text()
        assert md.startswith("# Synthetic EHR release report") and "**Decision:" in md and "code_record" in md
        with pytest.raises(FileExistsError):
            evaluate_to_dir(tmp_path / "real", tmp_path / "syn", tmp_path / "eval", **FAST)

    def test_same_seed_same_metrics(self, real):
        synth = _cohort_of(make_toy_tables(300, seed=5), make_toy_tables(300, seed=5)[0]["patient_id"], "s")
        a = evaluate_tables(real, synth, None, seed=3, **FAST)["metrics"]
        b = evaluate_tables(real, synth, None, seed=3, **FAST)["metrics"]
        assert a == b

    @pytest.mark.parametrize("kw, err", [({"seed": -1}, ConfigError), ({"seed": 1.5}, TypeError),
                                         ({"privacy_sample": "2000"}, TypeError), ({"utility_sample": 0}, ConfigError)])
    def test_bad_parameters(self, real, kw, err):
        with pytest.raises(err, match=next(iter(kw))):
            evaluate_tables(real, _cohort_of(real, _train_ids(real)), None, **{**FAST, **kw})

    def test_real_tables_without_train_split(self, real):
        p, v, c = real
        with pytest.raises(DataError, match="split='train'"):
            evaluate_tables((p.assign(split="test"), v, c), _cohort_of(real, _train_ids(real)), None, **FAST)

    def test_codes_of_missing_visits_are_refused(self, real):
        from synthehr_core.errors import SchemaError

        p, v, c = _cohort_of(real, _train_ids(real))
        c = pd.concat([c, pd.DataFrame({"patient_id": [p["patient_id"].iloc[0]], "visit_index": [99],
                                        "code": ["dx:4019"]}).astype({"visit_index": "int32"})])
        with pytest.raises(SchemaError, match="1 codes point at visits that do not exist"):
            evaluate_tables(real, (p, v, c), None, **FAST)

    def test_report_module_stays_light(self):
        code = ("import sys, synthehr_core.evaluation.report, synthehr_core.evaluation; "
                "sys.exit(1 if {'torch', 'kfp', 'matplotlib.pyplot'} & set(sys.modules) else 0)")
        assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_real_tables_without_test_split_skip_held_out_parts(real):
    p, v, c = real
    p = p.assign(split=p["split"].replace({"test": "val"}))
    res = evaluate_tables((p, v, c), _cohort_of(real, _train_ids(real)), None, **FAST)
    m = res["metrics"]
    assert m["fidelity.code_record.r2"] == pytest.approx(1.0) and m["privacy.exact_copies"] > 0
    assert not any(k.startswith(("privacy.mia", "utility.", "fidelity.baseline")) for k in m)
    assert any("no 'test' split" in n for n in res["notes"])

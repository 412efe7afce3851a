"""The release report: known-answer tests for the verdicts, the gate (exit 3), intervals, small cells, the
longitudinal section, the provenance block and the policy file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from synthehr_core import storage
from synthehr_core.cli import app
from synthehr_core.data.config import load_config, validate_config
from synthehr_core.data.merge import merge_shards
from synthehr_core.data.schema import write_tables
from synthehr_core.data.toy import make_toy_tables, toy_vocab
from synthehr_core.errors import ConfigError
from synthehr_core.evaluation.policy import load_policy
from synthehr_core.evaluation.report import render_html
from synthehr_core.evaluation.stage import evaluate_tables, evaluate_to_dir

FAST = {"privacy_sample": 300, "utility_sample": 500}
STAGES = ["dx:stage1", "dx:stage2", "dx:stage3"]


@pytest.fixture(scope="module")
def real():
    return make_toy_tables(800, seed=0)


def _as_synthetic(tables, pids=None, prefix="s"):
    p, v, c = tables
    pids = p["patient_id"] if pids is None else pids
    out = (p[p["patient_id"].isin(pids)].assign(split="synthetic"),
           v[v["patient_id"].isin(pids)], c[c["patient_id"].isin(pids)])
    return tuple(t.assign(patient_id=prefix + t["patient_id"]) for t in out)


def _write(d, tables, vocab, meta):
    with storage.atomic_dir(d, overwrite=True) as tmp:
        write_tables(tmp, *tables)
        vocab.save(storage.join(tmp, "vocab.json"))
        storage.write_json(storage.join(tmp, "meta.json"), meta)
    return d


@pytest.fixture(scope="module")
def dirs(real, tmp_path_factory):
    """Real tables, an identical cohort (the training split) and an independent toy cohort, on disk."""
    root = tmp_path_factory.mktemp("release")
    vocab = toy_vocab(real[2], real[0])
    p = real[0]
    return {"real": _write(root / "real", real, vocab, {"dataset": "toy", "seed": 0, "config_hash": "abc"}),
            "copy": _write(root / "copy", _as_synthetic(real, p.loc[p["split"] == "train", "patient_id"]), vocab,
                           {"stage": "merge", "seeds": [0], "n_shards": 1, "n_patients": int((p.split == "train").sum())}),
            "indep": _write(root / "indep", _as_synthetic(make_toy_tables(800, seed=7)), vocab, {"seed": 0}),
            "root": root}


class TestDecision:
    def test_identical_cohort_is_not_released_and_the_cli_exits_3(self, dirs):
        res = CliRunner().invoke(app, ["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["copy"]),
                                       "--out", str(dirs["root"] / "ev-copy")])
        assert res.exit_code == 3, res.output
        assert "decision: do not release" in res.output and "exact copies" in res.output
        v = json.loads((dirs["root"] / "ev-copy" / "verdicts.json").read_text())
        st = {c["check"]: c["status"] for c in v["checks"]}
        assert st["exact_copies"] == st["membership_inference"] == "fail"
        assert v["properties"]["privacy"] == "fail"
        html = (dirs["root"] / "ev-copy" / "report.html").read_text()
        assert html.index("Decision: DO NOT RELEASE") < html.index("<h2>Provenance") < html.index("Fidelity: codes") \
            < html.index("Appendix: every metric")
        # --fail-on none: the same cohort is reported but does not stop the caller
        res = CliRunner().invoke(app, ["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["copy"]),
                                       "--out", str(dirs["root"] / "ev-copy2"), "--fail-on", "none"])
        assert res.exit_code == 0 and "release with warnings" in res.output

    def test_independent_cohort_is_released_with_warnings_only_where_intervals_are_wide(self, dirs):
        out = evaluate_to_dir(dirs["real"], dirs["indep"], dirs["root"] / "ev-indep", **FAST)
        assert out["decision"] in ("release", "release with warnings")
        bad = [c for c in out["verdicts"]["checks"] if c["status"] in ("warn", "fail")]
        assert not bad, bad
        for c in out["verdicts"]["checks"]:
            if c["status"] == "inconclusive":
                lo, hi = c["interval"]
                assert "too few records to conclude" in c["reason"] and hi - lo > 0.02

    def test_unknown_fail_on_name_is_refused_before_any_work(self, dirs):
        res = CliRunner().invoke(app, ["evaluate", "--real", str(dirs["real"]), "--synthetic", str(dirs["copy"]),
                                       "--out", str(dirs["root"] / "never"), "--fail-on", "exact_copy"])
        assert res.exit_code == 1 and "exact_copy" in res.stderr.strip().splitlines()[-1]   # one line, not exit 3
        assert not (dirs["root"] / "never").exists()


class TestIntervals:
    def test_privacy_utility_and_fidelity_have_intervals_with_the_records_behind_them(self, real):
        res = evaluate_tables(real, _as_synthetic(make_toy_tables(800, seed=7)), toy_vocab(real[2], real[0]),
                              seed=2, **FAST)
        m, iv = res["metrics"], res["intervals"]
        for key in ("privacy.mia.accuracy", "privacy.mia.auc", "privacy.nnaar", "privacy.attribute.f1_gap",
                    "privacy.exact_copy_excess", "utility.mean_tstr_auroc", "utility.mean_auroc_gap",
                    "fidelity.code_record.r2", "fidelity.labels.r2"):
            assert iv[key]["lo"] <= iv[key]["hi"] and iv[key]["n"] > 0, key
            assert m[f"{key}.ci_lo"] == iv[key]["lo"], key
        assert iv["privacy.mia.accuracy"]["lo"] <= m["privacy.mia.accuracy"] <= iv["privacy.mia.accuracy"]["hi"]
        n = int(m["privacy.sample_size"])
        assert n == min(300, int(m["n.real_test"]))             # all held-out records, up to the stated limit
        assert iv["privacy.mia.accuracy"]["n"] == 2 * n
        assert res == res | {} and evaluate_tables(real, _as_synthetic(make_toy_tables(800, seed=7)),
                                                   toy_vocab(real[2], real[0]), seed=2, **FAST)["intervals"] == iv

    def test_few_records_are_inconclusive_not_pass(self, real):
        p, v, c = real
        few = p[(p["split"] != "test") | p.index.isin(p.index[p["split"] == "test"][:12])]
        tables = (few, v[v.patient_id.isin(few.patient_id)], c[c.patient_id.isin(few.patient_id)])
        res = evaluate_tables(tables, _as_synthetic(make_toy_tables(300, seed=7)), None, **FAST)
        mia = next(x for x in res["verdicts"]["checks"] if x["check"] == "membership_inference")
        assert mia["status"] == "inconclusive" and "12 members + 12 non-members" in mia["reason"]


def _structured(tables, seed):
    """Toy tables with elective (weekday-only) and emergency visits, dates, and a 3-stage code that only rises."""
    p, v, c = tables
    rng = np.random.default_rng(seed)
    v = v.copy()
    v["event_type"] = np.where(rng.random(len(v)) < 0.35, "elective", "emergency")
    day = 17000 + np.floor(v["start_offset_days"].to_numpy() + rng.integers(0, 300, len(v)).repeat(1))
    wd = (day + 3) % 7                                                   # 0 = Monday
    day = np.where((v["event_type"] == "elective") & (wd >= 5), day + (7 - wd), day)
    v["start_day"] = day + 0.4
    staged = set(p["patient_id"].sample(frac=0.5, random_state=seed))
    s = v[v["patient_id"].isin(staged)]
    stage = pd.DataFrame({"patient_id": s["patient_id"], "visit_index": s["visit_index"],
                          "code": [STAGES[min(i // 2, 2)] for i in s["visit_index"]]})
    return p, v, pd.concat([c, stage], ignore_index=True)


class TestLongitudinal:
    def test_injected_regressions_weekend_electives_and_lost_persistence_are_listed(self, real):
        r = _structured(real, 0)
        sp_, sv, sc = _as_synthetic(_structured(make_toy_tables(800, seed=7), 1))
        rng = np.random.default_rng(3)
        multi = sv.groupby("patient_id").size()
        flip = set(rng.choice(multi.index[multi >= 3], 60, replace=False))
        stage = sc["code"].isin(STAGES) & sc["patient_id"].isin(flip)
        sc.loc[stage, "code"] = sc.loc[stage, "code"].map(dict(zip(STAGES, STAGES[::-1])))   # stages go down
        el = np.flatnonzero((sv["event_type"] == "elective").to_numpy())
        sat = rng.choice(el, len(el) // 4, replace=False)
        wd = (np.floor(sv["start_day"].to_numpy()) + 3) % 7
        sv.loc[sv.index[sat], "start_day"] += 5 - wd[sat]                      # weekend electives (Saturday)
        sc = sc[~((sc["code"] == "dx:4280") & (sc["visit_index"] > 0))]       # the chronic code stops recurring
        fams = [{"name": "stage", "codes": STAGES}]
        res = evaluate_tables(r, (sp_, sv, sc), toy_vocab(r[2], r[0]), ordinal=fams, **FAST)
        lon = res["details"]["longitudinal"]
        o = lon["ordinal"].set_index("family").loc["stage"]
        assert o["real_per_1000"] == 0 and o["synthetic_per_1000"] > 40
        top = lon["persistence"].iloc[0]
        assert top["code"] == "dx:4280" and top["real"] > 0.9 and top["synthetic"] < 0.2
        shares = lon["shares"]
        hit = shares[(shares["given"] == "event_type = elective") & (shares["share_of"] == "weekday = Sat")]
        assert len(hit) and hit["real"].iloc[0] == 0 and hit["synthetic"].iloc[0] > 0.15
        assert hit.index[0] < 3                                                # among the largest gaps
        st = {c["check"]: c["status"] for c in res["verdicts"]["checks"]}
        assert st["ordinal_regressions"] == st["persistence"] == st["dependence"] == "fail"
        html = render_html(res)
        assert "weekday = Sat" in html and "dx:stage1 &lt; dx:stage2 &lt; dx:stage3" in html
        clean = evaluate_tables(r, _as_synthetic(_structured(make_toy_tables(800, seed=7), 1)),
                                toy_vocab(r[2], r[0]), ordinal=fams, **FAST)
        st = {c["check"]: c["status"] for c in clean["verdicts"]["checks"]}
        assert st["ordinal_regressions"] == st["persistence"] == st["dependence"] == "pass"


class TestSmallCells:
    def test_planted_small_cells_are_flagged_then_suppressed_by_merge(self, real, tmp_path):
        p, v, c = real
        train = p.loc[p["split"] == "train", "patient_id"]
        c_real = pd.concat([c, pd.DataFrame({"patient_id": train.iloc[:3], "visit_index": 0, "code": "dx:RARE"})])
        p_real = p.copy()
        p_real.loc[p_real["patient_id"].isin(train.iloc[3:6]), ["sex", "age_binned"]] = ["F", "100-120"]
        vocab = toy_vocab(c_real, p_real)
        real_dir = _write(tmp_path / "real", (p_real, v, c_real.astype({"visit_index": "int32"})), vocab,
                          {"dataset": "toy"})
        sp_, sv, sc = _as_synthetic(make_toy_tables(400, seed=7))
        sc = pd.concat([sc, pd.DataFrame({"patient_id": sp_["patient_id"].iloc[:5], "visit_index": 0,
                                          "code": "dx:RARE"})]).astype({"visit_index": "int32"})
        sp_ = sp_.copy()
        sp_.loc[sp_.index[10:14], ["sex", "age_binned"]] = ["F", "100-120"]
        shard = _write(tmp_path / "shard", (sp_, sv, sc), vocab, {"seed": 0, "stage": "kde-sample"})
        flagged = evaluate_to_dir(real_dir, shard, tmp_path / "ev1", **FAST)
        m = flagged["metrics"]
        assert m["smallcells.synthetic_patients"] == 9 and m["smallcells.codes"] == 1
        assert m["smallcells.label_combinations"] >= 1
        assert flagged["decision"] == "do not release"
        html = (tmp_path / "ev1" / "report.html").read_text()
        assert "code dx:RARE" in html and "&lt; 10" in html                   # the real count stays hidden
        meta = merge_shards([shard], tmp_path / "merged", small_cell_k=10, real_dir=real_dir)
        assert meta["small_cells"]["codes_suppressed"] == 5 and meta["small_cells"]["patients_dropped_rare_labels"] == 4
        after = evaluate_to_dir(real_dir, tmp_path / "merged", tmp_path / "ev2", **FAST)
        assert after["metrics"]["smallcells.synthetic_patients"] == 0
        assert next(c for c in after["verdicts"]["checks"] if c["check"] == "small_cells")["status"] == "pass"

    def test_merge_small_cells_needs_the_real_tables(self, tmp_path):
        with pytest.raises(ConfigError, match="real_dir"):
            merge_shards([tmp_path], tmp_path / "out", small_cell_k=10)


class TestProvenanceAndPolicy:
    def test_provenance_reads_the_stages_meta(self, dirs, tmp_path):
        model = tmp_path / "model"
        model.mkdir()
        (model / "meta.json").write_text(json.dumps({"model_type": "halo", "preset": "tiny", "epochs_run": 3,
                                                     "steps": 42, "dp_epsilon": 2.5, "dp_delta": 1e-5,
                                                     "config_hash": "runhash1"}))
        evaluate_to_dir(dirs["real"], dirs["copy"], tmp_path / "ev", model_dir=model, run_id="run-7", **FAST)
        prov = json.loads((tmp_path / "ev" / "provenance.json").read_text())
        assert prov["model"] == "halo / preset tiny" and "42 steps" in prov["training"]
        assert "ε = 2.5" in prov["differential_privacy"] and prov["run_id"] == "run-7"
        assert "abc" in prov["config_hashes"] and "runhash1" in prov["config_hashes"]
        assert "no licence conditions" in prov["licence"] and "synthehr" in prov["versions"]
        html = (tmp_path / "ev" / "report.html").read_text()
        assert "run-7" in html and str(tmp_path) not in html.split("<h2>Provenance")[0]

    def test_mimic_licence_and_no_dp(self):
        from synthehr_core.evaluation.provenance import provenance

        pol = load_policy()
        assert "ODbL" in pol.licences["mimic3"]
        assert "no formal guarantee" in provenance(licences=pol.licences)["differential_privacy"]

    def test_bad_policy_files_name_the_key(self, tmp_path):
        bad = tmp_path / "p.yml"
        bad.write_text("checks:\n  x: {property: privacy, metric: m, worse: up}\n")
        with pytest.raises(ConfigError, match=r"checks\.x\.worse"):
            load_policy(bad)
        bad.write_text("fail_on: [nope]\nchecks: {}\n")
        with pytest.raises(ConfigError, match="nope"):
            load_policy(bad)
        with pytest.raises(ConfigError, match="does not exist"):
            load_policy(tmp_path / "missing.yml")

    def test_hostile_policy_files_are_bounded_and_quiet(self, tmp_path):
        bomb = tmp_path / "bomb.yml"
        bomb.write_text('a: &a ["x","x","x","x","x","x","x","x","x"]\n'
                        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n"
                                  for p, c in zip("abcdefgh", "bcdefghi")))
        with pytest.raises(ConfigError, match="bomb.yml"):
            load_policy(bomb)
        secret = tmp_path / "kube.yml"
        secret.write_text("checks: {}\ntoken: s3cr3t-value\n")
        with pytest.raises(ConfigError, match="token: unknown key") as err:
            load_policy(secret)
        assert "s3cr3t" not in str(err.value)

    def test_ordinal_families_in_the_dataset_config(self):
        base = load_config("mimic3").model_dump(mode="json")
        cfg = validate_config({**base, "longitudinal": {"ordinal": [{"name": "stage", "codes": STAGES}]}})
        assert cfg.longitudinal.ordinal[0].codes == STAGES
        assert cfg.config_hash() != load_config("mimic3").config_hash()   # declared: part of the hash
        with pytest.raises(ConfigError, match="longitudinal.ordinal.0.codes"):
            validate_config({**base, "longitudinal": {"ordinal": [{"name": "s", "codes": ["one"]}]}})


def test_peer_sections_when_installed(real):
    pytest.importorskip("sdmetrics")
    pytest.importorskip("anonymeter")
    res = evaluate_tables(real, _as_synthetic(make_toy_tables(300, seed=7)), toy_vocab(real[2], real[0]),
                          peers=True, **FAST)
    m, iv = res["metrics"], res["intervals"]
    assert 0 < m["peers.sdmetrics.quality.score"] <= 1 and 0 < m["peers.sdmetrics.diagnostic.score"] <= 1
    for name in ("singling_out", "linkability", "inference"):
        key = f"peers.anonymeter.{name}.risk"
        assert 0 <= iv[key]["lo"] <= iv[key]["hi"] <= 1, key

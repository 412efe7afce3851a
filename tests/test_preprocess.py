"""Preprocessing the bundled MIMIC-III demo: counts, accounting, determinism, header case, config validation."""
from __future__ import annotations

import gzip

import pandas as pd
import pytest
import yaml

from synthehr_core.data.config import bundled_config_path, bundled_data_dir, load_config
from synthehr_core.data.preprocess import assign_split, preprocess
from synthehr_core.data.schema import parse_bin, read_tables
from synthehr_core.data.vocab import Vocab
from synthehr_core.errors import ConfigError

DEMO = bundled_data_dir("mimic3_demo")


@pytest.fixture(scope="module")
def demo_tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("mimic") / "tables"
    meta = preprocess("mimic3", out)
    return out, meta


class TestMimicDemo:
    def test_counts(self, demo_tables):
        out, meta = demo_tables
        p, v, c = read_tables(out)
        assert len(p) == 100 and meta["n_patients"] == 100
        assert len(v) == 129 and meta["n_visits"] == 129
        assert sorted(meta["split_sizes"].values()) == [8, 20, 72]
        assert v.groupby("patient_id").size().max() == 15  # subject 41976
        assert v.loc[v["patient_id"] == "41976", "visit_index"].tolist() == list(range(15))

    def test_every_code_row_accounted_for(self, demo_tables):
        out, meta = demo_tables
        _, _, c = read_tables(out)
        n_dx = len(pd.read_csv(DEMO / "DIAGNOSES_ICD.csv"))
        n_px = len(pd.read_csv(DEMO / "PROCEDURES_ICD.csv"))
        kept = int(c["code"].str.startswith(("dx:", "px:")).sum())
        dropped = sum(n for k, n in meta["dropped"].items() if k.startswith("codes"))
        assert kept + dropped == n_dx + n_px
        assert meta["source_rows"]["DIAGNOSES_ICD"] == n_dx == 1761

    def test_codes_are_strings_with_leading_zeros(self, demo_tables):
        out, _ = demo_tables
        _, _, c = read_tables(out)
        assert "dx:03819" in set(c["code"])
        assert c["code"].str.match(r"^(dx|px|adm):").all()

    def test_offsets_gaps_and_bins(self, demo_tables):
        out, _ = demo_tables
        p, v, _ = read_tables(out)
        first = v[v["visit_index"] == 0]
        assert (first["start_offset_days"] == 0).all() and first["gap_days"].isna().all()
        later = v[v["visit_index"] > 0]
        assert (later["gap_days"] >= 0).all()
        for s, val in zip(v["los_days_binned"], v["los_days"]):
            lo, hi = parse_bin(s)
            assert lo <= val <= hi
        assert p["age"].max() == 90 and (p["age_capped"] == "yes").sum() == 8

    def test_vocab_layout(self, demo_tables):
        out, meta = demo_tables
        vocab = Vocab.load(out / "vocab.json")
        assert vocab.size == meta["vocab_size"] == vocab.n_visit_tokens + vocab.n_labels + 3
        assert vocab.tokens[0].token == "evt:inpatient"
        assert vocab.label_row and vocab.first_visit_row == 2
        kinds = [t.kind for t in vocab.tokens]
        assert kinds[-3:] == ["special"] * 3
        assert {t.token for t in vocab.tokens if t.kind == "label"} >= {"label:gender=F", "label:gender=M"}

    def test_meta_records_provenance(self, demo_tables):
        _, meta = demo_tables
        assert meta["seed"] == 4 and len(meta["config_hash"]) == 16
        assert set(meta["versions"]) >= {"synthehr", "pandas", "pyarrow"}


class TestDeterminism:
    def test_same_input_same_bytes(self, tmp_path, demo_tables):
        out, _ = demo_tables
        preprocess("mimic3", tmp_path / "again")
        for f in ("patients.parquet", "visits.parquet", "codes.parquet", "vocab.json", "meta.json"):
            assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes(), f

    def test_other_seed_other_split(self, tmp_path, demo_tables):
        out, _ = demo_tables
        preprocess("mimic3", tmp_path / "s5", seed=5)
        a = pd.read_parquet(out / "patients.parquet")["split"]
        b = pd.read_parquet(tmp_path / "s5" / "patients.parquet")["split"]
        assert (a != b).any()

    def test_split_is_by_patient_and_seeded(self):
        ids = pd.Series([str(i) for i in range(1000)])
        s1, s2 = assign_split(ids, (0.7, 0.1, 0.2), 1), assign_split(ids, (0.7, 0.1, 0.2), 1)
        assert s1.equals(s2)
        assert s1.value_counts().to_dict() == {"train": 700, "test": 200, "val": 100}


class TestRawFormats:
    def test_upper_case_headers_and_plain_csv(self, tmp_path, demo_tables):
        """The credentialed release has upper-case headers and plain .csv files: same result."""
        out, _ = demo_tables
        raw = tmp_path / "raw"
        raw.mkdir()
        for f in DEMO.iterdir():
            if f.suffix == ".gz":
                text = gzip.decompress(f.read_bytes()).decode()
                name = f.name[:-3]
            elif f.suffix == ".csv":
                text, name = f.read_text(), f.name
            else:
                continue
            head, rest = text.split("\n", 1)
            (raw / name).write_text(head.upper() + "\n" + rest)
        preprocess("mimic3", tmp_path / "t", raw=str(raw))
        for f in ("patients.parquet", "visits.parquet", "codes.parquet"):
            assert (tmp_path / "t" / f).read_bytes() == (out / f).read_bytes()


def _cfg(**over):
    data = yaml.safe_load(bundled_config_path("mimic3").read_text())
    data.update(over)
    return data


class TestConfigValidation:
    def test_unknown_key(self):
        with pytest.raises(ConfigError, match=r"n_ctxx: unknown key"):
            load_config(_cfg(n_ctxx=10))

    def test_wrong_type(self):
        with pytest.raises(ConfigError, match=r"n_ctx: .*integer.*got 'forty'"):
            load_config(_cfg(n_ctx="forty"))

    def test_bins_not_increasing(self):
        with pytest.raises(ConfigError, match=r"visit_bins.los_days: .*strictly increasing.*\[0.0, 5.0, 2.0\]"):
            load_config(_cfg(visit_bins={"los_days": {"edges": [0, 5, 2]}}))

    def test_bins_both_forms(self):
        with pytest.raises(ConfigError, match="exactly one of `edges`"):
            load_config(_cfg(visit_bins={"los_days": {"edges": [0, 1], "quantiles": 4}}))

    def test_split_must_sum_to_one(self):
        with pytest.raises(ConfigError, match=r"split: train \+ val \+ test must be 1"):
            load_config(_cfg(split={"train": 0.5, "val": 0.1, "test": 0.1, "seed": 1}))

    def test_missing_raw_path(self, tmp_path):
        cfg = load_config(_cfg(profiles={"local": {"raw": str(tmp_path / "nowhere")}}))
        with pytest.raises(ConfigError, match=r"profiles.local.raw = .*nowhere' does not exist"):
            preprocess(cfg, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_unknown_profile(self, tmp_path):
        with pytest.raises(ConfigError, match=r"profile 'cluster' is not defined; defined profiles: \['hpc', 'kubeflow', 'local'\]"):
            preprocess("mimic3", tmp_path / "out", profile="cluster")

    def test_unknown_adapter(self):
        with pytest.raises(ConfigError, match=r"unknown adapter 'no_such_adapter'"):
            load_config(_cfg(adapter="no_such_adapter"))

    def test_column_not_in_data(self, tmp_path):
        with pytest.raises(ConfigError, match=r"visit_bins: 'los_hours' is not a visit column"):
            preprocess(_cfg(visit_bins={"los_hours": {"edges": [0, 1]}}), tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_unknown_adapter_option(self, tmp_path):
        with pytest.raises(ConfigError, match=r"unknown key\(s\) \['agecap'\] for the mimic3 adapter"):
            preprocess(_cfg(adapter_options={"agecap": 90}), tmp_path / "out")

    def test_not_a_config(self, tmp_path):
        with pytest.raises(ConfigError, match="neither a bundled config"):
            load_config(str(tmp_path / "nope.yml"))

    def test_quantile_bins_fit_on_train(self, tmp_path):
        meta = preprocess(_cfg(visit_bins={"los_days": {"quantiles": 4}}), tmp_path / "q")
        v = pd.read_parquet(tmp_path / "q" / "visits.parquet")
        p = pd.read_parquet(tmp_path / "q" / "patients.parquet")
        assert 3 <= v["los_days_binned"].nunique() <= 4
        train_los = v.loc[v["patient_id"].isin(p.loc[p["split"] == "train", "patient_id"]), "los_days"]
        lo, hi = train_los.min(), train_los.max()   # the quantile edges span the train split exactly
        outside = int(((v["los_days"] < lo) | (v["los_days"] > hi)).sum())
        assert meta["clipped"]["visits.los_days"] == outside

    def test_values_outside_the_edges_are_clipped_and_counted(self, tmp_path):
        meta = preprocess(_cfg(visit_bins={"los_days": {"edges": [0, 5]}}), tmp_path / "c")
        v = pd.read_parquet(tmp_path / "c" / "visits.parquet")
        assert meta["clipped"]["visits.los_days"] == int((v["los_days"] > 5).sum()) > 0
        assert set(v["los_days_binned"]) == {"0-5"}


class TestCalendar:
    def test_calendar_tokens_follow_dates(self, tmp_path):
        meta = preprocess(_cfg(calendar={"enabled": True, "tokens": ["month", "weekday", "hour"]}), tmp_path / "c")
        v = pd.read_parquet(tmp_path / "c" / "visits.parquet")
        vocab = Vocab.load(tmp_path / "c" / "vocab.json")
        adm = pd.read_csv(DEMO / "ADMISSIONS.csv.gz", parse_dates=["admittime"])
        # visit of hadm 142345 (subject 10006) was admitted 2164-10-23 21:09, a Thursday... in shifted time
        t = adm.loc[adm["hadm_id"] == 142345, "admittime"].iloc[0]
        row = v[(v["patient_id"] == "10006") & (v["visit_index"] == 0)].iloc[0]
        assert row["cal_month"] == f"{t.month:02d}"
        assert row["cal_weekday"] == t.strftime("%a")
        assert row["cal_hour"] == "18-23"
        assert f"cal:weekday={row['cal_weekday']}" in vocab
        assert [t.variable for t in vocab.tokens if t.token.startswith("cal:month")] == ["cal_month"] * 12
        assert meta["vocab_size"] == vocab.size

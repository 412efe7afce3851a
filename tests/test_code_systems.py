"""Code systems: the version in the code key, a visit-level category as a token group, and evaluate's mixing share."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from synthehr_core.data.config import load_config
from synthehr_core.data.preprocess import preprocess
from synthehr_core.data.vocab import Vocab, token_groups
from synthehr_core.errors import ConfigError
from synthehr_core.evaluation.mixing import category_mixing, code_categories
from test_tables_adapter import VERSIONED, write_versioned_extract


def _config(raw, **over) -> dict:
    return {"name": "versioned", "adapter": "tables", "adapter_options": VERSIONED,
            "profiles": {"local": {"raw": str(raw)}}, "labels": ["sex"], "visit_categories": ["dx_version"],
            "visit_bins": {"los_hours": {"edges": [0, 12, 24, 48, 1000]}}, **over}


def test_a_visit_category_becomes_one_token_group(tmp_path):
    raw = write_versioned_extract(tmp_path / "raw")
    meta = preprocess(_config(raw), tmp_path / "tables")
    vocab = Vocab.load(tmp_path / "tables" / "vocab.json")
    assert "cat:dx_version=9" in vocab and "cat:dx_version=10" in vocab
    visits = pd.read_parquet(tmp_path / "tables" / "visits.parquet")
    groups = {g.variable: g for g in token_groups(vocab, visits=visits)}
    assert groups["dx_version"].column == "dx_version" and groups["dx_version"].row == "visit"
    assert groups["dx_version"].stop - groups["dx_version"].start == 2 and groups["dx_version"].required
    assert meta["adapter_notes"]["codes[0] dx.dx_version"]["codes_under_several_versions"] == 1
    assert json.loads((tmp_path / "tables" / "meta.json").read_text())["adapter_notes"]


def test_an_undeclared_category_column_is_named(tmp_path):
    raw = write_versioned_extract(tmp_path / "raw")
    with pytest.raises(ConfigError, match=r"visit_categories: 'icd_version' is not a visit column"):
        preprocess(_config(raw, visit_categories=["icd_version"]), tmp_path / "tables")


def test_unset_visit_categories_keep_the_config_hash():
    cfg = load_config("mimic3")
    assert cfg.config_hash() == load_config({**cfg.model_dump(), "visit_categories": []}).config_hash()
    assert cfg.config_hash() != load_config({**cfg.model_dump(), "visit_categories": ["x"]}).config_hash()


def _codes(rows):
    return pd.DataFrame(rows, columns=["patient_id", "visit_index", "code"])


def test_mixing_share_counts_synthetic_visits_that_mix_what_real_visits_never_do():
    cats = code_categories(pd.Series(["dx:9:250", "dx:4019"]))
    assert cats[0] == "dx:9" and pd.isna(cats[1])
    real = _codes([("a", 0, "dx:9:250"), ("a", 0, "dx:9:401"), ("b", 0, "dx:10:250"), ("b", 1, "px:10:1")])
    synth = _codes([("s", 0, "dx:9:250"), ("s", 0, "dx:10:E11"), ("s", 1, "dx:10:250"), ("t", 0, "dx:9:401")])
    res = category_mixing(real, synth)
    assert res["metrics"]["mixing.never_mixed_pairs"] == 1.0
    assert res["metrics"]["mixing.synthetic_visits_mixing"] == 1.0
    assert res["metrics"]["mixing.synthetic_share"] == pytest.approx(1 / 3)
    assert "dx:10+dx:9" in res["notes"][0]


def test_no_metric_for_codes_without_categories():
    real = _codes([("a", 0, "dx:4019"), ("a", 0, "px:3893")])
    assert category_mixing(real, real) == {"metrics": {}, "notes": []}


class TestCategoryExclusion:
    """A declared visit category lets ConSequence keep the code systems apart (no ICD-10 code in an ICD-9 visit)."""

    @pytest.fixture(scope="class")
    @staticmethod
    def tables(tmp_path_factory):
        d = tmp_path_factory.mktemp("cat")
        preprocess(_config(write_versioned_extract(d / "raw"), split={"train": 0.8, "val": 0.1, "test": 0.1, "seed": 0}),
                   d / "tables")
        return d

    def test_codes_no_real_visit_of_a_category_holds_are_excluded(self, tables):
        from synthehr_core.data.schema import read_tables
        from synthehr_core.rules.mining import check_violations, mine_rules

        p, v, c = read_tables(tables / "tables")
        vocab = Vocab.load(tables / "tables" / "vocab.json")
        rules = [r for r in mine_rules(p, v, c, vocab) if r.family == "category_exclusion"]
        pairs = {(r.cur_pos[0], r.output) for r in rules}
        assert ("cat:dx_version=9", "dx:10:E11") in pairs and ("cat:dx_version=10", "dx:9:401") in pairs
        assert ("cat:dx_version=9", "dx:9:401") not in pairs and all(r.value == 0 for r in rules)
        assert check_violations(rules, p, v, c, vocab)["total_violations"] == 0          # true of the real data

    def test_bundled_rules_are_unchanged_without_categories(self, tmp_path):
        from synthehr_core.data.toy import make_toy_tables, toy_vocab
        from synthehr_core.rules.mining import mine_rules

        p, v, c = make_toy_tables(80)
        assert not [r for r in mine_rules(p, v, c, toy_vocab(c, p)) if r.family == "category_exclusion"]

    def test_consequence_samples_never_mix_code_systems(self, tables):
        """HALO mixes the two code systems in most sampled visits (62% seen); ConSequence with the rules in none."""
        from synthehr_core.data.schema import read_tables
        from synthehr_core.model.sampling import sample_to_dir
        from synthehr_core.model.train import train_to_dir
        from synthehr_core.rules.mining import mine_rules_to_dir

        t = tables / "tables"
        info = mine_rules_to_dir(t, tables / "rules")
        assert info["by_family"]["category_exclusion"] > 0
        mixing = {}
        for model_type in ("halo", "consequence"):
            train_to_dir(t, tables / model_type, model_type=model_type, rules_dir=tables / "rules", epochs=2,
                         batch_size=8, lr=3e-3, progress=False)
            sample_to_dir(tables / model_type, tables / f"s-{model_type}", seed=1, n_patients=60, batch_size=30)
            res = category_mixing(read_tables(t)[2], read_tables(tables / f"s-{model_type}")[2])   # codes tables
            assert res["metrics"]["mixing.never_mixed_pairs"] >= 1
            mixing[model_type] = res["metrics"]["mixing.synthetic_visits_mixing"]
        assert mixing["halo"] > 10 and mixing["consequence"] == 0, mixing

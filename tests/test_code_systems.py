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

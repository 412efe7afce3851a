"""ADNI: the synthetic ADNIMERGE fixture generator and the adapter (bundled fixture, bad input)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthehr_core.data.adapters import adni
from synthehr_core.data.fixtures import adni as adni_fixture
from synthehr_core.data.adapters.base import DropReport
from synthehr_core.data.config import bundled_data_dir
from synthehr_core.data.preprocess import preprocess
from synthehr_core.errors import ConfigError, DataError, SchemaError

FIXTURE = bundled_data_dir("adni_fixture")


@pytest.fixture(scope="module")
def merge() -> pd.DataFrame:
    """The bundled fixture as a reader sees it (CSV round trip)."""
    return pd.read_csv(FIXTURE / "ADNIMERGE.csv", keep_default_na=False, na_values=[""],
                       dtype={c: str for c in adni.STRING_COLUMNS})   # as the readr col_types spec reads it


def _write(df: pd.DataFrame, tmp_path: Path) -> str:
    df.to_csv(tmp_path / "ADNIMERGE.csv", index=False)
    return str(tmp_path)


class TestFixture:
    def test_same_seed_same_bytes_other_seed_differs(self):
        a = adni_fixture.make_adnimerge(40, seed=3).to_csv(index=False)
        assert a == adni_fixture.make_adnimerge(40, seed=3).to_csv(index=False)
        assert a != adni_fixture.make_adnimerge(40, seed=4).to_csv(index=False)

    def test_bundled_fixture_is_the_generator_output(self, tmp_path):
        adni_fixture.write_fixture(tmp_path)  # defaults: 150 RIDs, seed 0, as the README says
        assert (tmp_path / "ADNIMERGE.csv").read_bytes() == (FIXTURE / "ADNIMERGE.csv").read_bytes()
        assert "synthetic" in (FIXTURE / "README.md").read_text()

    def test_columns_in_export_order_with_types(self, merge):
        assert list(merge.columns) == adni.COLUMNS
        assert "LDELTOTAL_BL" in merge.columns and "LDELTOTAL_bl" not in merge.columns
        assert len(adni.COLUMNS) == 113
        numeric = [c for c in adni.COLUMNS if c not in adni.STRING_COLUMNS + ["EXAMDATE", "EXAMDATE_bl", "update_stamp"]]
        not_numeric = [c for c in numeric if not pd.api.types.is_numeric_dtype(merge[c])]
        assert not_numeric == []
        assert pd.api.types.is_string_dtype(merge["ABETA"]) and pd.api.types.is_string_dtype(merge["DX"])
        assert merge["EXAMDATE"].dropna().str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
        assert merge["PTID"].str.fullmatch(r"\d{3}_S_\d{4}").all()
        assert merge.groupby("RID")["AGE"].nunique().max() == 1 and merge["AGE"].between(55, 91).all()
        assert merge["MMSE"].dropna().between(0, 30).all() and (merge["MMSE"].dropna() % 1 == 0).all()
        assert ((merge["CDRSB"].dropna() * 2) % 1 == 0).all() and merge["CDRSB"].dropna().between(0, 18).all()
        assert set(merge["DX"].dropna()) == {"CN", "MCI", "Dementia"}
        assert set(merge["DX_bl"]) <= {"CN", "SMC", "EMCI", "LMCI", "AD"}
        assert not merge.duplicated(["RID", "VISCODE"]).any()

    def test_viscode_ladders_follow_protocols(self, merge):
        assert merge["VISCODE"].str.fullmatch(r"bl|m\d{2,3}").all()
        month = merge["VISCODE"].str.lstrip("m").replace("bl", "0").astype(int)
        assert (month == merge["M"]).all() and (merge["Month"] == merge["M"]).all()
        assert set(merge.loc[merge["M"] == 3, "ORIGPROT"]) <= {"ADNIGO", "ADNI2"}      # m03: GO/2 imaging only
        assert set(merge.loc[merge["M"] == 18, "ORIGPROT"]) == {"ADNI1"}
        assert (merge.loc[merge["ORIGPROT"] == "ADNI3", "M"] % 12 == 0).all()
        assert (merge.groupby("RID")["VISCODE"].first() == "bl").all()

    def test_examdate_is_baseline_plus_months_and_elapsed_time_derived(self, merge):
        m = merge.dropna(subset=["EXAMDATE"])
        days = (pd.to_datetime(m["EXAMDATE"]) - pd.to_datetime(m["EXAMDATE_bl"])).dt.days
        assert (days - m["M"] * 30.4375).abs().max() <= 31
        np.testing.assert_allclose(m["Years_bl"], days / 365.25, atol=1e-6)
        np.testing.assert_allclose(m["Month_bl"], days / 30.5, atol=1e-5)
        assert merge["EXAMDATE"].isna().sum() >= 1                 # scheduled-but-not-done rows exist

    def test_bl_columns_copy_the_baseline_row(self, merge):
        base = merge[merge["VISCODE"] == "bl"].set_index("RID")
        for bl_col, src in adni.BL_SOURCE.items():
            expect = base[src].reindex(merge["RID"]).to_numpy()
            got = merge[bl_col].to_numpy()
            same = (pd.isna(expect) & pd.isna(got)) | (expect == got)
            assert same.all(), bl_col

    def test_missingness_is_protocol_driven(self, merge):
        m03 = merge["M"] == 3
        assert merge.loc[m03, ["MMSE", "ADAS13", "CDRSB", "DX"]].isna().all().all()
        assert merge.loc[m03, "Hippocampus"].notna().any()
        adni1 = merge["COLPROT"] == "ADNI1"
        assert merge.loc[adni1, ["MOCA", "AV45", "EcogPtMem", "EcogSPTotal"]].isna().all().all()
        assert merge.loc[~adni1, "DIGITSCOR"].isna().all() and merge.loc[adni1, "DIGITSCOR"].notna().any()
        pib_rids = merge.loc[merge["PIB"].notna(), "RID"].unique()
        assert set(merge.loc[merge["RID"].isin(pib_rids), "ORIGPROT"]) == {"ADNI1"}
        assert 0 < len(pib_rids) < 0.3 * (merge.drop_duplicates("RID")["ORIGPROT"] == "ADNI1").sum()
        assert merge["AV45"].isna().mean() > 0.5 and merge["FDG"].isna().mean() > 0.5

    def test_csf_strings_are_numbers_or_censored(self, merge):
        for col, lo, hi in (("ABETA", 200, 1700), ("TAU", 80, 1300), ("PTAU", 8, 120)):
            s = merge[col].dropna()
            assert s.str.fullmatch(r"[<>]?\d+(\.\d+)?").all(), col
            assert set(s[s.str.startswith("<")]) <= {f"<{lo}"} and set(s[s.str.startswith(">")]) <= {f">{hi}"}
        assert (merge["ABETA"] == ">1700").any() and merge["ABETA"].str.startswith("<").sum() + \
            merge["TAU"].str.startswith("<").sum() + merge["PTAU"].str.startswith("<").sum() > 0

    def test_cognitive_scores_correlate_like_adni(self, merge):
        r = merge[["MMSE", "ADAS11", "ADAS13", "CDRSB"]].corr()
        assert -0.93 < r.loc["MMSE", "ADAS13"] < -0.7           # ADNIMERGE: -0.84
        assert r.loc["ADAS11", "ADAS13"] > 0.95                  # 0.98
        assert -0.93 < r.loc["CDRSB", "MMSE"] < -0.65            # -0.79

    def test_dx_progresses_with_rare_reversions(self, merge):
        rank = merge.dropna(subset=["DX"]).assign(r=lambda d: d["DX"].map({"CN": 0, "MCI": 1, "Dementia": 2}))
        step = rank.groupby("RID")["r"].diff().dropna()
        assert (step > 0).sum() > 10
        assert 0 < (step < 0).mean() < 0.05


class TestAdapter:
    def test_bundled_fixture_counts(self, merge):
        report = DropReport()
        c = adni.load(str(FIXTURE), {}, report)
        dated = merge.dropna(subset=["EXAMDATE"])
        assert len(c.patients) == merge["RID"].nunique() == 150
        assert len(c.visits) == len(dated) and c.visits["visit_id"].is_unique
        assert report.as_dict() == {"ADNIMERGE: no EXAMDATE (visit scheduled but not done)": int(merge["EXAMDATE"].isna().sum())}
        n_dx = int(dated["DX"].notna().sum())
        assert (c.codes["code"].str.startswith("dxg:")).sum() == n_dx
        assert (c.codes["code"].str.startswith("prot:")).sum() == len(dated)
        assert set(c.visits["event_type"]) == {"study_visit"}
        assert set(c.patients.columns) == {"patient_id", "gender", "age", "dx_bl", "apoe4"}
        first = dated.drop_duplicates("RID").set_index(dated.drop_duplicates("RID")["RID"].astype(str))
        p = c.patients.set_index("patient_id")
        np.testing.assert_array_equal(p["age"], first.loc[p.index, "AGE"])
        v = c.visits.set_index("visit_id")
        assert v.loc["20:m06", "start"] == (pd.Timestamp(dated.set_index(["RID", "VISCODE"]).loc[(20, "m06"), "EXAMDATE"])
                                             - pd.Timestamp("1970-01-01")).days
        assert v["abeta"].max() == 1700.0 and v["abeta"].notna().sum() == dated["ABETA"].notna().sum()

    def test_include_protocol_false_and_unknown_option(self):
        c = adni.load(str(FIXTURE), {"include_protocol": False}, DropReport())
        assert c.codes["code"].str.startswith("dxg:").all()
        with pytest.raises(ConfigError, match=r"unknown key\(s\) \['protocol'\] for the adni adapter"):
            adni.load(str(FIXTURE), {"protocol": True}, DropReport())

    def test_preprocess_with_the_adni_config(self, tmp_path):
        meta = preprocess("adni", tmp_path / "t")
        assert meta["n_patients"] == 150 and meta["n_visits"] == 862
        vocab = (tmp_path / "t" / "vocab.json").read_text()
        for tok in ("dxg:CN", "dxg:Dementia", "prot:ADNI3", "label:apoe4=2", "bin:mmse=27-30.01", "evt:study_visit"):
            assert f'"{tok}"' in vocab

    def test_parse_censored(self):
        s = adni.parse_censored(pd.Series([">1700", "<8", " 741.5", None]), "ABETA", "f.csv")
        assert s.tolist()[:3] == [1700.0, 8.0, 741.5] and np.isnan(s.iloc[3])
        with pytest.raises(SchemaError, match=r"f.csv: column 'TAU' .*'n/a'"):
            adni.parse_censored(pd.Series(["n/a", "12"]), "TAU", "f.csv")


class TestBadInput:
    @pytest.fixture()
    def small(self) -> pd.DataFrame:
        return adni_fixture.make_adnimerge(6, seed=1)

    def test_missing_column(self, small, tmp_path):
        with pytest.raises(SchemaError, match=r"ADNIMERGE table lacks column\(s\) \['EXAMDATE'\]"):
            adni.load(_write(small.drop(columns="EXAMDATE"), tmp_path), {}, DropReport())

    def test_duplicate_rid_viscode(self, small, tmp_path):
        dup = pd.concat([small, small.iloc[[0]]])
        rid = small.iloc[0]["RID"]
        with pytest.raises(DataError, match=rf"\(RID, VISCODE\) must identify one visit.*RID {rid} bl"):
            adni.load(_write(dup, tmp_path), {}, DropReport())

    def test_wrong_dtype(self, small, tmp_path):
        bad = small.astype({"MMSE": object})
        bad.loc[1, "MMSE"] = "twenty"
        with pytest.raises(SchemaError, match=r"column 'MMSE' should be float .*'twenty'"):
            adni.load(_write(bad, tmp_path), {}, DropReport())

    def test_bad_censored_value(self, small, tmp_path):
        bad = small.copy()
        bad.loc[0, "ABETA"] = "below LOD"
        with pytest.raises(SchemaError, match=r"column 'ABETA' .*'below LOD'"):
            adni.load(_write(bad, tmp_path), {}, DropReport())

    def test_unexpected_dx_and_legacy_dx(self, small, tmp_path):
        bad = small.copy()
        bad.loc[0, "DX"] = "Alzheimer"
        with pytest.raises(SchemaError, match=r"column 'DX' has unexpected values \['Alzheimer'\]"):
            adni.load(_write(bad, tmp_path), {}, DropReport())
        legacy = small.copy()
        legacy.loc[0, "DX"] = "NL"
        legacy.loc[1, "DX"] = "MCI to Dementia"
        codes = adni.load(_write(legacy, tmp_path), {"include_protocol": False}, DropReport()).codes
        assert set(codes["code"]) <= {"dxg:CN", "dxg:MCI", "dxg:Dementia"}

    def test_implausible_age(self, small, tmp_path):
        bad = small.copy()
        bad["AGE"] = bad["AGE"].where(bad["RID"] != bad["RID"].iloc[0], 700.0)
        with pytest.raises(SchemaError, match=r"column 'AGE' has values outside the expected range, e.g. \[700.0\]"):
            adni.load(_write(bad, tmp_path), {}, DropReport())

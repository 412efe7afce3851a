"""Queensland-Health-style data: simulator structure, the KTAS-based sample, the adapter and bad input."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthehr_core.data.adapters import qh
from synthehr_core.data.fixtures import qh as qh_fixture
from synthehr_core.data.adapters.base import DropReport
from synthehr_core.data.config import bundled_data_dir
from synthehr_core.data.preprocess import preprocess
from synthehr_core.errors import ConfigError, DataError, SchemaError

SAMPLE = bundled_data_dir("qh_sample")
KTAS = bundled_data_dir("ktas_ed") / "ktas_triage_en.csv"


@pytest.fixture(scope="module")
def sim() -> pd.DataFrame:
    return qh_fixture.simulate(40_000, seed=11)


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return pd.read_csv(SAMPLE / "encounters.csv", parse_dates=["arrival"])


def _write(df: pd.DataFrame, tmp_path: Path) -> str:
    df.to_csv(tmp_path / "encounters.csv", index=False)
    return str(tmp_path)


class TestSimulator:
    def test_deterministic_per_seed(self, tmp_path):
        a = qh_fixture.write_encounters(qh_fixture.simulate(2000, seed=5), tmp_path / "a.csv")
        b = qh_fixture.write_encounters(qh_fixture.simulate(2000, seed=5), tmp_path / "b.csv")
        c = qh_fixture.write_encounters(qh_fixture.simulate(2000, seed=6), tmp_path / "c.csv")
        assert Path(a).read_bytes() == Path(b).read_bytes() != Path(c).read_bytes()

    def test_raw_schema_and_volumes(self, sim):
        assert list(sim.columns) == qh.RAW_COLUMNS
        assert sim["patient_id"].nunique() == 40_000 and sim["encounter_id"].is_unique
        assert 4.5 < len(sim) / 40_000 < 5.5                         # ~5 encounters per patient
        ed = sim["event_type"] == "ED"
        assert sim.loc[ed, "triage_category"].between(1, 5).all() and sim.loc[~ed, "triage_category"].isna().all()
        assert sim.loc[~ed, "los_triage"].isna().all() and (sim["los"] > 0).all()
        assert set(sim["gender"]) == {"F", "M"} and sim["age"].between(0, 110).all()
        assert set(sim["disposition"]) == set(qh.DISPOSITIONS)
        assert (sim.groupby("patient_id")["arrival"].diff().dropna() >= pd.Timedelta(0)).all()
        share = sim.loc[ed, "disposition"].isin(["admitted_ward", "admitted_icu", "admitted_surgery"]).mean()
        assert 0.2 < share < 0.4                                     # KTAS: 32 % admitted
        assert sim.loc[ed].groupby("triage_category")["los"].median().idxmax() == 2   # KTAS: level 2 stays longest

    def test_monday_ed_peak(self, sim):
        ed = sim.loc[sim["event_type"] == "ED", "arrival"]
        by_day = ed.dt.day_of_week.value_counts().sort_index()
        assert by_day.idxmax() == 0 and by_day[0] > 1.08 * by_day.mean()
        assert by_day[[5, 6]].max() < by_day[[1, 2, 3, 4]].min()

    def test_winter_respiratory_surge(self, sim):
        ed = sim.loc[(sim["event_type"] == "ED") & (sim["arrival"] < "2019-12-01") & (sim["arrival"] >= "2015-03-01"), "arrival"]
        per_day = ed.dt.month.value_counts() / pd.Series({m: pd.Period(f"2017-{m:02d}").days_in_month for m in range(1, 13)})
        winter, summer = per_day[[6, 7, 8]].mean(), per_day[[12, 1, 2]].mean()
        assert winter > 1.10 * summer
        assert per_day.idxmax() in (6, 7, 8)

    def test_elective_admissions_on_weekday_mornings(self, sim):
        prev = sim.groupby("patient_id")["disposition"].shift()
        prev_adm = prev.isin(["admitted_ward", "admitted_icu", "admitted_surgery"])
        elective = sim[(sim["event_type"] == "Inpatient") & ~prev_adm]
        assert len(elective) > 0.05 * len(sim)
        assert elective["arrival"].dt.day_of_week.isin([5, 6]).mean() < 0.04
        assert elective["arrival"].dt.hour.between(7, 9).mean() > 0.97   # the rest: follow-ons after an elective

    def test_follow_on_starts_at_ed_departure(self, sim):
        nxt = sim.groupby("patient_id")[["event_type", "arrival"]].shift(-1)
        adm = (sim["event_type"] == "ED") & sim["disposition"].isin(["admitted_ward", "admitted_icu", "admitted_surgery"])
        assert (nxt.loc[adm, "event_type"] == "Inpatient").mean() > 0.97   # the rest: a same-minute tie
        gap_h = (nxt.loc[adm, "arrival"] - sim.loc[adm, "arrival"]).dt.total_seconds() / 3600
        expect = np.minimum(sim.loc[adm, "los"], 48.0)
        assert (np.abs(gap_h - expect) <= 1 / 60 + 0.01).mean() > 0.97

    def test_rejects_bad_size(self):
        with pytest.raises(ConfigError, match="n_patients must be a positive int, got 0"):
            qh_fixture.simulate(0)


class TestSample:
    def test_bundled_sample_is_the_builder_output(self, tmp_path):
        out = qh_fixture.write_encounters(qh_fixture.make_qh_sample(seed=0), tmp_path / "encounters.csv")
        assert Path(out).read_bytes() == (SAMPLE / "encounters.csv").read_bytes()
        prov = (SAMPLE / "PROVENANCE.md").read_text()
        assert "CC BY 4.0" in prov and "10.1371/journal.pone.0216972" in prov and "synthetic" in prov

    def test_ed_rows_are_the_ktas_records(self, sample):
        k = pd.read_csv(KTAS)
        ed = sample[sample["event_type"] == "ED"]
        assert len(ed) == len(k) == 1267
        assert ed["triage_category"].value_counts().sort_index().tolist() == [26, 220, 487, 459, 75]
        np.testing.assert_allclose(np.sort(ed["los"]), np.sort(np.round(k["Length of stay_min"] / 60, 2)))
        assert sorted(ed["age"]) == sorted(k["Age"])
        assert (ed["gender"] == "F").sum() == (k["Sex"] == 1).sum()
        admitted = k["Disposition"].isin([2, 3, 7]).sum()
        assert (sample["event_type"] == "Inpatient").sum() == admitted == 403

    def test_patients_are_consistent(self, sample):
        g = sample.groupby("patient_id")
        assert g["gender"].nunique().max() == 1 and g["age"].nunique().max() == 1
        assert 300 < sample["patient_id"].nunique() < 900 and g.size().max() > 3
        assert sample["arrival"].between("2016-10-01", "2017-10-15").all()


class TestAdapter:
    def test_bundled_sample_counts(self, sample):
        c = qh.load(str(SAMPLE), {}, DropReport())
        assert len(c.patients) == sample["patient_id"].nunique() == 638
        assert len(c.visits) == len(sample) == 1670 and c.visits["visit_id"].is_unique
        assert c.codes["code"].str.startswith("tri:").sum() == 1267
        assert c.codes["code"].str.startswith("disp:").sum() == 1670
        assert set(c.visits["event_type"]) == {"ED", "Inpatient"}
        assert {"los_hours", "los_triage_hours", "age"} <= set(c.visits.columns)
        assert c.source_rows == {"encounters": 1670, "ED": 1267, "Inpatient": 403}
        first = sample.sort_values(["patient_id", "arrival"]).drop_duplicates("patient_id").set_index("patient_id")
        p = c.patients.set_index(c.patients["patient_id"].astype(int))
        assert (p["age"] == first.loc[p.index, "age"]).all() and (p["gender"] == first.loc[p.index, "gender"]).all()
        v = c.visits.set_index("visit_id")
        assert v.loc["1", "start"] == pytest.approx((sample.loc[0, "arrival"] - pd.Timestamp("1970-01-01")).total_seconds() / 86400)

    def test_ed_los_clip_option(self):
        raw = qh.load(str(SAMPLE), {}, DropReport()).visits
        clipped = qh.load(str(SAMPLE), {"ed_los_clip_hours": 168}, DropReport()).visits
        ed = raw["event_type"] == "ED"
        assert raw.loc[ed, "los_hours"].max() > 10_000
        assert clipped.loc[ed, "los_hours"].max() == 168.0
        assert (clipped.loc[~ed, "los_hours"] == raw.loc[~ed, "los_hours"]).all()   # inpatient stays untouched
        assert (clipped["los_hours"] != raw["los_hours"]).sum() == (raw.loc[ed, "los_hours"] > 168).sum() == 65

    @pytest.mark.parametrize("options, message", [
        ({"los_clip": 3}, r"unknown key\(s\) \['los_clip'\] for the qh adapter"),
        ({"ed_los_clip_hours": -1}, r"ed_los_clip_hours must be a positive number of hours or null, got -1"),
        ({"include_disposition": "yes"}, r"include_disposition must be true or false, got 'yes'"),
    ])
    def test_bad_options(self, options, message):
        with pytest.raises(ConfigError, match=message):
            qh.load(str(SAMPLE), options, DropReport())

    def test_preprocess_with_the_qh_config(self, tmp_path):
        meta = preprocess("qh", tmp_path / "t")
        assert meta["n_patients"] == 638 and meta["n_visits"] == 1670 and meta["n_codes"] == 2937
        v = pd.read_parquet(tmp_path / "t" / "visits.parquet")
        assert {"cal_weekday", "cal_month", "los_hours_binned", "gap_days_binned"} <= set(v.columns)
        assert v.loc[v["event_type"] == "ED", "los_hours"].max() == 168.0        # ed_los_clip_hours in qh.yml

    def test_simulated_extract_round_trip_gzipped(self, tmp_path):
        df = qh_fixture.simulate(3000, seed=2)
        csv = Path(qh_fixture.write_encounters(df, tmp_path / "x.csv")).read_bytes()
        (tmp_path / "encounters.csv.gz").write_bytes(gzip.compress(csv))
        c = qh.load(str(tmp_path), {"include_disposition": False}, DropReport())
        assert len(c.patients) == 3000 and len(c.visits) == len(df)
        assert len(c.codes) == (df["event_type"] == "ED").sum()


class TestBadInput:
    @pytest.fixture()
    def small(self) -> pd.DataFrame:
        return qh_fixture.simulate(30, seed=3)

    def test_missing_column(self, small, tmp_path):
        with pytest.raises(SchemaError, match=r"encounters table lacks column\(s\) \['los_triage'\]"):
            qh.load(_write(small.drop(columns="los_triage"), tmp_path), {}, DropReport())

    def test_duplicate_encounter_ids(self, small, tmp_path):
        dup = small.copy()
        dup.loc[1, "encounter_id"] = dup.loc[0, "encounter_id"]
        with pytest.raises(DataError, match=r"encounters.encounter_id must be unique but 1 ids repeat, e.g. \['1'\]"):
            qh.load(_write(dup, tmp_path), {}, DropReport())

    @pytest.mark.parametrize("column, value, kind", [("arrival", "yesterday", "datetime"), ("los", "3h", "float"),
                                                     ("triage_category", "urgent", "int")])
    def test_wrong_dtype(self, small, tmp_path, column, value, kind):
        bad = small.astype({column: object})
        bad.loc[2, column] = value
        with pytest.raises(SchemaError, match=rf"column '{column}' should be {kind} but has 1 values that are not, e.g. \['{value}'\]"):
            qh.load(_write(bad, tmp_path), {}, DropReport())

    @pytest.mark.parametrize("column, value, message", [
        ("event_type", "Outpatient", r"'event_type' must be one of \['ED', 'Inpatient'\], got \['Outpatient'\]"),
        ("triage_category", 7, r"'triage_category' must be an integer 1-5, got \[7.0\]"),
        ("gender", "X", r"'gender' must be F or M \(or empty\), got \['X'\]"),
        ("los", -2.0, r"'los' has 1 negative values, e.g. \[-2.0\]"),
    ])
    def test_invalid_values(self, small, tmp_path, column, value, message):
        bad = small.astype({column: object})
        bad.loc[0, column] = value
        with pytest.raises(SchemaError, match=message):
            qh.load(_write(bad, tmp_path), {}, DropReport())

    def test_empty_ids_and_empty_file(self, small, tmp_path):
        bad = small.astype({"patient_id": object})
        bad.loc[3, "patient_id"] = None
        with pytest.raises(DataError, match=r"column 'patient_id' has 1 empty values"):
            qh.load(_write(bad, tmp_path), {}, DropReport())
        (tmp_path / "encounters.csv").write_text("")
        with pytest.raises(DataError, match="encounters table is empty"):
            qh.load(str(tmp_path), {}, DropReport())
        (tmp_path / "encounters.csv").write_text(",".join(qh.RAW_COLUMNS) + "\n")
        with pytest.raises(DataError, match="has a header but no rows"):
            qh.load(str(tmp_path), {}, DropReport())

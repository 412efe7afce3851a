"""Temporal realism: calendar tokens round-trip preprocess -> tensors/sampling -> time reconstruction; every
synthetic visit's date agrees with its tokens or the disagreement is counted; temporal metrics known answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from synthehr_core.data.fixtures import qh as qh_fixture
from synthehr_core.data.config import bundled_config_path
from synthehr_core.data.preprocess import preprocess
from synthehr_core.data.schema import calendar_parts, parse_bin, read_tables
from synthehr_core.errors import ConfigError, DataError
from synthehr_core.evaluation import temporal as evaluation_temporal
from synthehr_core.evaluation.temporal import temporal_figure, temporal_metrics
from synthehr_core.postprocess import calendar_tables, dating
from synthehr_core.postprocess.calendar_tables import CAL_KINDS, build_calendar_tables, calendar_agreement, token_codes
from synthehr_core.postprocess.dating import reconstruct_calendar_times
from synthehr_core.postprocess.stage import generate_kde_grids_to_dir, sample_kde_to_dir

TOKENS = ["month", "weekday", "hour", "year"]
KDE = {"num_cores": 1, "min_count": 10,
       "variable_config": {"gap_days": {"method": "kde_range", "data_source": "visits",
                                        "filter": {"gap_days": {"notnull": True}},
                                        "grid_params": {"method": "fine_bins", "step": 1,
                                                        "filter": {"threshold": 90, "modulo": 7}}}},
       "time": {"gap": "gap_days", "gap_unit": "days", "allow_overlap": True}}


@pytest.fixture(scope="module")
def qh_tables(tmp_path_factory):
    """A simulated QH extract (600 patients) preprocessed with all four calendar tokens; + its train split."""
    d = tmp_path_factory.mktemp("qh_cal")
    qh_fixture.write_encounters(qh_fixture.simulate(600, seed=3), d / "raw" / "encounters.csv")
    cfg = yaml.safe_load(bundled_config_path("qh").read_text())
    cfg["calendar"] = {**cfg["calendar"], "enabled": True, "tokens": TOKENS}   # hemisphere: south (qh.yml)
    preprocess(cfg, d / "tables", raw=str(d / "raw"))
    p, v, c = read_tables(d / "tables")
    tp = p[p["split"] == "train"]
    return d, p, v, c, tp, v[v["patient_id"].isin(set(tp["patient_id"]))]


def _as_synthetic(v: pd.DataFrame) -> pd.DataFrame:
    """Real visits as the KDE stage leaves a synthetic shard: tokens and gap values kept, dates unknown."""
    return v.assign(start_day=np.nan, start_offset_days=np.nan)


def _gaps_in_bins(out: pd.DataFrame) -> bool:
    later = out[out["visit_index"] > 0]
    lohi = np.array([parse_bin(b) for b in later["gap_days_binned"]])
    g = later["gap_days"].to_numpy(float)
    return bool(np.all((g >= lohi[:, 0] - 1e-9) & (g <= lohi[:, 1] + 1e-9)))


def _follow_ons(n: int, gap: float, gap_bin: str, **tokens) -> pd.DataFrame:
    """``n`` ED patients with two visits each (the second ``gap`` days later, in ``gap_bin``); each token column
    is a (first visit, second visit) pair, None for no token."""
    v = pd.DataFrame({"patient_id": np.repeat([f"p{i:03d}" for i in range(n)], 2),
                      "visit_index": np.int32([0, 1] * n), "event_type": "ED", "start_offset_days": np.nan,
                      "gap_days": [np.nan, gap] * n, "gap_days_binned": [None, gap_bin] * n})
    for col, pair in tokens.items():
        v[col] = pd.array(list(pair) * n, dtype="string")
    return v


class TestCalendarParts:
    def test_known_dates(self):
        day = (np.datetime64("2017-03-06T14:23") - np.datetime64("1970-01-01T00:00")) / np.timedelta64(1, "D")
        p = calendar_parts(np.array([0.0, day, day + 5.5]))
        assert p["weekday"].tolist() == [3, 0, 6]              # Thu 1970-01-01, Mon 2017-03-06, Sun 03-12
        assert p["year"].tolist() == [1970, 2017, 2017] and p["month"].tolist() == [1, 3, 3]
        assert p["hour"].tolist() == [0, 2, 0]                 # 14:23 -> "12-17"; +0.5 day -> 02:23

    def test_token_codes_read_the_preprocessed_columns(self, qh_tables):
        tok = token_codes(qh_tables[2])
        p = calendar_parts(qh_tables[2]["start_day"].to_numpy(float))
        for k in CAL_KINDS:
            assert np.array_equal(tok[k], p[k]), k


class TestRoundTrip:
    def test_tokens_survive_tensors_and_decode(self, qh_tables):
        """preprocess -> HALO rows -> decode_rows (the sampler's decoder) gives back the cal_* columns."""
        from synthehr_core.data.vocab import Vocab
        from synthehr_core.model.tensors import EHRParquetDataset, collate_halo, decode_rows

        d, *_ = qh_tables
        vocab = Vocab.load(d / "tables" / "vocab.json")
        ds = EHRParquetDataset(d / "tables", split="train", n_ctx=48)
        X, _ = collate_halo([ds[i] for i in range(40)], vocab, 48)
        rows = [[X[n, r].nonzero().flatten().tolist() for r in range(1, 48)] for n in range(40)]
        _, sv, _, _ = decode_rows(rows, vocab, seed=0)
        real_ids = sorted(qh_tables[4]["patient_id"])[:40]
        rv = qh_tables[5].set_index("patient_id").loc[real_ids].reset_index()
        rv = rv[rv.groupby("patient_id").cumcount() < 46]
        for k in CAL_KINDS:
            assert sv[f"cal_{k}"].astype(str).tolist() == rv[f"cal_{k}"].astype(str).tolist(), k

    def test_sampled_tokens_are_honoured_or_counted(self, qh_tables, tmp_path):
        """train (2 steps) -> sample_to_dir -> kde grids with calendar tables -> sample_kde_to_dir dates the visits."""
        from synthehr_core.model.sampling import sample_to_dir
        from synthehr_core.model.train import train_to_dir

        d = qh_tables[0]
        train_to_dir(d / "tables", tmp_path / "m", model_type="halo", preset="tiny", epochs=1, max_steps=2,
                     batch_size=32, eval_every=None, progress=False, device="cpu")
        smeta = sample_to_dir(tmp_path / "m", tmp_path / "s", seed=1, n_patients=60, batch_size=60)
        _, sv, _ = read_tables(tmp_path / "s")       # every real visit has a date: one token of each kind, always
        assert {f"cal_{k}" for k in CAL_KINDS} <= set(smeta["token_groups"]["required"])
        assert sv[[f"cal_{k}" for k in CAL_KINDS]].notna().all().all() and smeta["n_visit_value_conflicts"] == 0
        gmeta = generate_kde_grids_to_dir(str(d / "tables"), KDE, str(tmp_path / "g"))
        assert gmeta["calendar_tables"] is True
        meta = sample_kde_to_dir(str(tmp_path / "s"), str(tmp_path / "g"), str(tmp_path / "k"), seed=2)
        _, out, _ = read_tables(tmp_path / "k")                 # the kde-sample stage dates the visits itself
        assert {f"cal_{k}" for k in CAL_KINDS} <= set(out.columns)
        assert out["start_day"].notna().all()
        assert meta["calendar"]["agreement"] == calendar_agreement(out)       # every disagreement is counted
        assert meta["calendar"]["agreement"]["n_disagree_hour"] == 0
        first = out[out["visit_index"] == 0]
        assert (first["start_offset_days"] == 0).all()
        assert np.all(np.diff(out["start_day"].to_numpy())[(out["visit_index"].to_numpy() > 0)[1:]] >= 0)


class TestReconstruction:
    def test_real_tokens_give_dates_that_agree(self, qh_tables):
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        out, rep = reconstruct_calendar_times(tp, _as_synthetic(tv), anchors, tod, None, KDE["time"], rng=0)
        ag = rep["agreement"]
        assert ag == calendar_agreement(out)
        assert ag["n_disagree_hour"] == 0 and ag["n_disagree_weekday"] <= 0.03 * len(out)
        assert ag["n_disagree_any"] <= 0.12 * len(out)
        assert sum(rep["anchor_levels"].values()) == tp["patient_id"].nunique()
        assert _gaps_in_bins(out)                              # the gap bin is never given up
        first = out.groupby("patient_id")["start_day"].transform("first")
        assert np.allclose(out["start_offset_days"], out["start_day"] - first)

    def test_same_seed_same_dates(self, qh_tables):
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        a, _ = reconstruct_calendar_times(tp, _as_synthetic(tv), anchors, tod, None, KDE["time"], 5, weekdays)
        b, _ = reconstruct_calendar_times(tp, _as_synthetic(tv), anchors, tod, None, KDE["time"], 5, weekdays)
        pd.testing.assert_frame_equal(a, b)

    def test_absent_weekday_tokens_are_filled_from_the_weekday_table(self, qh_tables):
        """Later visits whose rows hold no weekday token take one from the weekday table (here: Wednesdays only);
        filled weekdays are honoured where the gap bin allows and never counted as disagreements."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        assert set(weekdays["weekday"]) == set(range(7)) and "*" in set(weekdays["event_type"])
        n = 200
        v = pd.DataFrame({"patient_id": np.repeat([f"p{i}" for i in range(n)], 3),
                          "visit_index": np.tile(np.int32([0, 1, 2]), n), "event_type": "ED",
                          "start_offset_days": np.nan, "gap_days": np.tile([np.nan, 40.0, 50.0], n),
                          "gap_days_binned": np.tile([None, "30-90", "30-90"], n),
                          "cal_weekday": pd.array(np.tile(["Fri", None, None], n), dtype="string")})
        wed = pd.DataFrame({"event_type": ["*"], "weekday": [2], "count": [100]})
        out, rep = reconstruct_calendar_times(v[["patient_id"]].drop_duplicates(), v, anchors, tod, None,
                                                KDE["time"], 0, wed)
        wd = calendar_parts(out["start_day"].to_numpy())["weekday"]
        assert (wd[out["visit_index"].to_numpy() == 0] == 4).all() and (wd[out["visit_index"].to_numpy() > 0] == 2).all()
        assert rep["n_filled_weekday"] == 2 * n and rep["agreement"]["n_disagree_weekday"] == 0
        _, rep0 = reconstruct_calendar_times(v[["patient_id"]].drop_duplicates(), v, anchors, tod, None,
                                               KDE["time"], 0)
        assert rep0["n_filled_weekday"] == 0

    def test_later_visits_without_a_month_follow_the_real_month_profile(self, qh_tables):
        """A 30-90 day follow-on of a May visit can land in June, July or August; with no month token the candidate
        days are weighted by the real later-visit month profile (here: July-heavy), without it they are not."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, _ = build_calendar_tables(tp, tv, min_count=3)
        year = str(int(tv["cal_year"].astype(int).min()))
        v = _follow_ons(300, 60.0, "30-90", cal_year=(year, None), cal_month=("05", None))
        months = pd.DataFrame({"event_type": "*", "month": range(1, 13), "weekday": 0,
                               "count": [10] * 6 + [200] + [10] * 5})
        pids = v[["patient_id"]].drop_duplicates()
        out, _ = reconstruct_calendar_times(pids, v, anchors, tod, None, KDE["time"], 0, months)
        flat, _ = reconstruct_calendar_times(pids, v, anchors, tod, None, KDE["time"], 0,
                                               months.drop(columns="month"))
        later = out["visit_index"].to_numpy() == 1
        july = (calendar_parts(out["start_day"].to_numpy())["month"][later] == 7).mean()
        july_flat = (calendar_parts(flat["start_day"].to_numpy())["month"][later] == 7).mean()
        assert july > 0.75 and july_flat < 0.6

    def test_a_given_up_month_still_pulls_the_date_toward_it(self, qh_tables):
        """A 30-90 day follow-on of a May visit cannot reach its September token: the month is given up and, with
        time.month_token_decay < 1, candidate days nearer September (August) weigh more; 1 turns the pull off.
        Every gap stays inside its bin either way."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, _ = build_calendar_tables(tp, tv, min_count=3)
        year = str(int(tv["cal_year"].astype(int).min()))
        n = 300
        v = _follow_ons(n, 60.0, "30-90", cal_year=(year, year), cal_month=("05", "09"))
        pids = v[["patient_id"]].drop_duplicates()
        aug = {}
        for decay in (0.25, 1.0):
            out, rep = reconstruct_calendar_times(pids, v, anchors, tod, None,
                                                    {**KDE["time"], "month_token_decay": decay}, 0)
            later = out["visit_index"].to_numpy() == 1
            aug[decay] = (calendar_parts(out["start_day"].to_numpy())["month"][later] == 8).mean()
            assert rep["agreement"]["n_disagree_month"] == n and _gaps_in_bins(out)
        assert aug[0.25] > 1.5 * aug[1.0] + 0.05, aug

    def test_impossible_weekday_is_relaxed_and_counted(self, qh_tables):
        """A same-day follow-on (gap 0-1) whose weekday token is three days later cannot agree: counted."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        v = pd.DataFrame({"patient_id": ["p", "p"], "visit_index": np.int32([0, 1]), "event_type": ["ED", "ED"],
                          "start_offset_days": [np.nan, np.nan], "gap_days": [np.nan, 0.5],
                          "gap_days_binned": [None, "0-1"], "cal_weekday": ["Mon", "Thu"], "cal_hour": ["06-11", "06-11"]})
        out, rep = reconstruct_calendar_times(pd.DataFrame({"patient_id": ["p"]}), v, anchors, tod, None,
                                                KDE["time"], rng=0)
        assert calendar_parts(out["start_day"].to_numpy())["weekday"].tolist()[0] == 0
        assert rep["agreement"]["n_disagree_weekday"] == 1 and rep["relaxed"]["drop_weekday"] == 1
        assert 0 <= out["gap_days"].iloc[1] < 1

    def test_impossible_month_keeps_year_and_weekday(self, qh_tables):
        """First visit in September, next one 90-180 days later (December to March) with a June month token: the
        month is given up (counted) but the year and weekday tokens still hold, so the date lands in December of
        the same year (level drop_month, before drop_year_month; weekday-only would mostly pick Jan-Mar)."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, _ = build_calendar_tables(tp, tv, min_count=3)
        year = str(int(tv["cal_year"].astype(int).min()))
        n = 20
        v = _follow_ons(n, 120.0, "90-180", cal_year=(year, year), cal_month=("09", "06"), cal_weekday=("Mon", "Wed"),
                        cal_hour=("06-11", "06-11"))
        out, rep = reconstruct_calendar_times(pd.DataFrame({"patient_id": v["patient_id"].unique()}), v, anchors,
                                                tod, None, KDE["time"], rng=0)
        parts = calendar_parts(out["start_day"].to_numpy())
        later = out["visit_index"].to_numpy() == 1
        assert rep["relaxed"]["drop_month"] == n and rep["agreement"]["n_disagree_month"] == n
        assert set(parts["year"]) == {int(year)} and set(parts["month"][later]) == {12}
        assert set(parts["weekday"][later]) == {2} and rep["agreement"]["n_disagree_year"] == 0
        assert ((out["gap_days"][later] >= 90) & (out["gap_days"][later] < 180)).all()

    def test_gap_density_weights_candidates(self, qh_tables):
        """With a gap grid putting all mass on 20-21 days, every 7-30 day gap lands there (weekday permitting)."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        n = 300
        v = pd.DataFrame({"patient_id": np.repeat([f"p{i}" for i in range(n)], 2),
                          "visit_index": np.tile(np.int32([0, 1]), n), "event_type": "ED",
                          "start_offset_days": np.nan, "gap_days": np.tile([np.nan, 10.0], n),
                          "gap_days_binned": np.tile([None, "7-30"], n), "cal_hour": "06-11"})
        grid = pd.DataFrame({"_level": [0, 0], "gap_days_start": [7.0, 20.0], "gap_days_end": [20.0, 21.0],
                             "range_probability": [0.0, 1.0]})
        out, _ = reconstruct_calendar_times(v.drop_duplicates("patient_id")[["patient_id"]], v, anchors, tod,
                                              grid, KDE["time"], rng=1)
        g = out.loc[out["visit_index"] == 1, "gap_days"].to_numpy()
        assert np.all((g >= 20) & (g < 21))

    def test_without_tokens_only_the_anchor_moves(self, qh_tables):
        """A cohort without cal_* columns keeps its KDE offsets; only the first visit is anchored."""
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        v = tv.drop(columns=[f"cal_{k}" for k in CAL_KINDS]).assign(start_day=np.nan)
        out, rep = reconstruct_calendar_times(tp, v, anchors, tod, None, KDE["time"], rng=0)
        assert rep["mode"] == "anchor_only"
        ref = v.sort_values(["patient_id", "visit_index"], kind="stable")["start_offset_days"].to_numpy()
        assert np.allclose(out["start_offset_days"].to_numpy(), ref)
        first = calendar_parts(out.loc[out["visit_index"] == 0, "start_day"].to_numpy())
        assert set(first["year"]) <= set(anchors["year"])

    def test_missing_inputs_are_named(self, qh_tables):
        _, _, _, _, tp, tv = qh_tables
        anchors, tod, weekdays = build_calendar_tables(tp, tv, min_count=3)
        with pytest.raises(DataError, match=r"lack \['start_offset_days'\]"):
            reconstruct_calendar_times(tp, tv.drop(columns="start_offset_days"), anchors, tod)
        with pytest.raises(ConfigError, match="min_count must be a positive int, got 0"):
            build_calendar_tables(tp, tv, min_count=0)
        with pytest.raises(ConfigError, match=r"time.gap_unit = 'weeks' is not one of"):
            reconstruct_calendar_times(tp, tv, anchors, tod, None, {"gap": "gap_days", "gap_unit": "weeks"})


class TestMetrics:
    def test_identical_cohorts_are_perfect(self, qh_tables):
        v = qh_tables[2]
        m = temporal_metrics(v, v, winter=(6, 7, 8), summer=(12, 1, 2))["metrics"]
        assert m["temporal.monthly.all.r"] == pytest.approx(1.0) and m["temporal.monthly.all.nmae"] == 0
        assert m["temporal.weekday.max_abs_diff_pp"] == 0 and m["temporal.hour.max_abs_diff_pp"] == 0
        assert m["temporal.season.winter_summer_rel_err"] == 0 and m["temporal.season.amplitude_ratio"] == 1
        assert m["temporal.acf7.abs_diff"] == 0

    def test_lost_structure_shows(self, qh_tables):
        """Uniform random dates over the same window: weekly and seasonal structure gone, metrics say so."""
        v = qh_tables[2]
        rng = np.random.default_rng(0)
        lo, hi = v["start_day"].min(), v["start_day"].max()
        flat = v.assign(start_day=np.floor(rng.uniform(lo, hi, len(v))))
        m = temporal_metrics(v, flat, winter=(6, 7, 8), summer=(12, 1, 2))
        real = calendar_parts(v["start_day"].to_numpy(float))["weekday"]
        mon_share = 100 * np.mean(real == 0)
        assert m["metrics"]["temporal.weekday.max_abs_diff_pp"] > 0.5 * (mon_share - 100 / 7)
        assert m["metrics"]["temporal.season.winter_summer_synth"] < m["metrics"]["temporal.season.winter_summer_real"]
        assert "temporal.hour.max_abs_diff_pp" not in m["metrics"]           # synthetic dates carry no time
        assert temporal_figure(m, "qh").startswith('<img alt="temporal" src="data:image/png;base64,')

    def test_missing_start_day_is_named(self, qh_tables):
        v = qh_tables[2]
        with pytest.raises(DataError, match=r"synthetic visits lack \['start_day'\]"):
            temporal_metrics(v, v.drop(columns="start_day"))
        with pytest.raises(DataError, match="every start_day of the synthetic visits is null"):
            temporal_metrics(v, v.assign(start_day=np.nan))


@pytest.mark.parametrize("module", [calendar_tables, dating, evaluation_temporal])
def test_module_imports_neither_torch_nor_kfp(module):
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"torch", "kfp"}



def test_evaluation_report_carries_the_temporal_section(qh_tables):
    from synthehr_core.evaluation.report import render_html
    from synthehr_core.evaluation.stage import evaluate_tables

    _, p, v, c, tp, _ = qh_tables
    synth = (tp.assign(split="synthetic"), v[v["patient_id"].isin(set(tp["patient_id"]))], c)
    res = evaluate_tables((p, v, c), synth, privacy_sample=50, utility_sample=50)
    assert res["metrics"]["temporal.monthly.all.r"] == pytest.approx(1.0)
    assert res["metrics"]["temporal.weekday.max_abs_diff_pp"] == 0
    assert 'alt="temporal"' in render_html(res)


def test_hemisphere_picks_the_winter_months(qh_tables, tmp_path):
    """qh.yml says calendar.hemisphere: south; preprocess records it and evaluate reads it: winter = Jun-Aug."""
    from synthehr_core import storage
    from synthehr_core.data.schema import write_tables
    from synthehr_core.errors import ConfigError
    from synthehr_core.evaluation.stage import evaluate, evaluate_tables

    d, p, v, c, tp, tv = qh_tables
    assert storage.read_json(d / "tables" / "meta.json")["calendar"]["hemisphere"] == "south"
    synth = (tp.assign(split="synthetic"), tv, c[c["patient_id"].isin(set(tp["patient_id"]))])
    north = evaluate_tables((p, v, c), synth, privacy_sample=50, utility_sample=50)["metrics"]
    write_tables(tmp_path / "s", *synth)
    res = evaluate(d / "tables", tmp_path / "s", privacy_sample=50, utility_sample=50)
    south = res["metrics"]
    assert res["params"]["hemisphere"] == "south"
    # the simulator's surge is in June-August: a winter excess in the south, a summer excess read as north
    assert south["temporal.season.winter_summer_real"] > 1.05 > north["temporal.season.winter_summer_real"]
    assert south["temporal.season.winter_summer_real"] == pytest.approx(1 / north["temporal.season.winter_summer_real"])
    with pytest.raises(ConfigError, match="hemisphere"):
        evaluate_tables((p, v, c), synth, privacy_sample=50, utility_sample=50, hemisphere="east")

"""KDE stage: config validation, grid methods, filters, strata, back-off, privacy guards, sampling and time."""
from __future__ import annotations

import copy
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import ks_2samp

from synthehr_core import storage
from synthehr_core.data.schema import bin_values, parse_bin, read_tables
from synthehr_core.data.toy import make_toy_tables, write_toy_tables
from synthehr_core.errors import ConfigError, DataError
from synthehr_core.postprocess import axes
from synthehr_core.postprocess.draw import inverse_cdf, reconstruct_times, sample_from_kde_grid
from synthehr_core.postprocess.grids import add_code_columns, fit_kde_grid, generate_kde_grids, read_kde_grid
from synthehr_core.postprocess.kde_config import load_kde_config, validate_kde_config
from synthehr_core.postprocess.stage import generate_kde_grids_to_dir, sample_kde_to_dir

TOY_CFG = {
    "num_cores": 1,
    "variable_config": {
        "age": {"method": "kde_range", "data_source": "patients", "stratify_by": ["sex"],
                "grid_params": {"method": "points", "min": 18, "max": 99, "offset": 1}, "bandwidth": [2.0]},
        "los_days": {"method": "kde_range", "data_source": "visits", "stratify_by": ["sex"],
                     "grid_params": {"method": "fine_bins", "step": 0.1, "filter": {"threshold": 30, "modulo": 1}}},
        "gap_days": {"method": "kde_range", "data_source": "visits", "filter": {"gap_days": {"notnull": True}},
                     "grid_params": {"method": "fine_bins", "step": 1, "filter": {"threshold": 90, "modulo": 7}}},
    },
    "time": {"gap": "gap_days", "los": "los_days", "anchor_age": "age"},
}


@pytest.fixture(scope="module")
def toy():
    return make_toy_tables(3000, seed=3)


def _cfg(**variables) -> dict:
    return validate_kde_config({"num_cores": 1, "variable_config": variables})


def _one(name, spec, patients, visits, **kw):
    cfg = _cfg(**{name: spec})
    return fit_kde_grid(name, cfg.variable_config[name], patients, visits, **kw)


def _assert_inside_bins(values: pd.Series, bins: pd.Series, top: float | None = None) -> int:
    ok = bins.notna().to_numpy()
    lohi = np.array([parse_bin(b) for b in bins[ok]])
    v = values.to_numpy(dtype=float)[ok]
    inside = (v >= lohi[:, 0]) & ((v < lohi[:, 1]) | ((lohi[:, 1] == top) & (v <= lohi[:, 1])))
    assert inside.all(), f"{(~inside).sum()} values outside their bins, e.g. {v[~inside][:3]} vs {lohi[~inside][:3]}"
    return int(ok.sum())


def _correlated(n: int, seed: int, rho: float = 0.7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], n)
    cat = rng.choice(["1", "2", "3"], n, p=[0.2, 0.5, 0.3])
    scale = pd.Series(cat).map({"1": 6.0, "2": 4.0, "3": 2.0}).to_numpy()
    df = pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "visit_index": np.zeros(n, dtype="int32"),
                       "event_type": "ED", "triage_category": cat,
                       "los_hours": scale * np.exp(0.4 * z[:, 0]), "los_triage_hours": 0.5 * np.exp(0.4 * z[:, 1])})
    df["los_hours_binned"] = bin_values(df["los_hours"], [0, 1, 2, 4, 8, 16, 48]).labels
    df["los_triage_hours_binned"] = bin_values(df["los_triage_hours"], [0, 0.25, 0.5, 1, 2, 8]).labels
    return df


# ============================================================================================ config
class TestConfig:
    @pytest.mark.parametrize("name", ["kde_mimic3", "kde_adni", "kde_qh"])
    def test_bundled_configs_validate_and_normalise_idempotently(self, name):
        cfg = load_kde_config(name)
        again = validate_kde_config(cfg.to_dict())
        assert again.to_dict() == cfg.to_dict() and again.config_hash() == cfg.config_hash()
        assert cfg.min_count == 10

    def test_yaml_file_and_dict_give_the_same_config(self, tmp_path):
        path = tmp_path / "kde.yml"
        path.write_text(yaml.safe_dump(TOY_CFG))
        assert load_kde_config(str(path)).to_dict() == load_kde_config(TOY_CFG).to_dict()

    BAD: ClassVar[list] = [  # (path into the config, bad value, text the message must contain)
        (("num_cores",), 0, "num_cores = 0 must be -1 (all cores) or an integer >= 1"),
        (("min_count",), 0, "min_count = 0 must be an integer >= 1"),
        (("bandwidth_floor",), -1, "bandwidth_floor = -1 must be a number >= 0"),
        (("colour",), "red", "unknown top-level keys ['colour']"),
        (("variable_config", "age", "method"), "kde", "variable_config.age.method = 'kde' is not one of"),
        (("variable_config", "age", "data_source"), "codes", "data_source = 'codes' is not one of"),
        (("variable_config", "age", "bins"), 3, "unknown keys ['bins'] for method 'kde_range'"),
        (("variable_config", "age", "stratify_by"), [1], "stratify_by = [1] must be a list of distinct column names"),
        (("variable_config", "age", "bandwidth"), [1.0, 2.0], "bandwidth = [1.0, 2.0] must be a list of 1 positive"),
        (("variable_config", "age", "bandwidth"), [0], "bandwidth = [0] must be a list of 1 positive"),
        (("variable_config", "age", "grid_params", "method"), "linspace", "grid_params.method = 'linspace' is not one of"),
        (("variable_config", "age", "grid_params", "step"), -1, "grid_params.step = -1 must be a positive number"),
        (("variable_config", "age", "grid_params", "max"), 10, "max = 10 < min = 18; swap them"),
        (("variable_config", "age", "grid_params", "min"), None, "grid_params.min = None must be a number (or set use_data_bounds"),
        (("variable_config", "age", "grid_params", "modulo"), 7, "unknown keys ['modulo'] for grid method 'points' (old name 'range')"),
        (("variable_config", "los_days", "grid_params", "filter"), {"threshold": 3},
         "filter = {'threshold': 3} must be {threshold: NUMBER, modulo: POSITIVE_NUMBER}"),
        (("variable_config", "los_days", "grid_params", "points_per_bin"), 5, "give either step or points_per_bin"),
        (("variable_config", "los_days", "grid_params"), {"method": "custom", "cut_points": [0, 5, 2]},
         "must be strictly increasing"),
        (("variable_config", "los_days", "filter"), {"sex": {"like": "F"}}, "filter.sex = {'like': 'F'} is not a filter"),
        (("variable_config", "los_days", "filter"), {"sex": []}, "filter.sex = [] keeps no rows"),
        (("variable_config", "gap_days", "grid_params"), None, "grid_params = None must be a mapping"),
        (("time", "offset"), "months", "give exactly one of gap"),
        (("time", "los_unit"), "weeks", "los_unit = 'weeks' is not one of"),
        (("time", "anchor_date"), {"min": "2020-01-01"}, "anchor_date = {'min': '2020-01-01'} must be"),
        (("time", "month_token_decay"), 0, "month_token_decay = 0 must be a number in (0, 1]"),
    ]

    @pytest.mark.parametrize("path,value,message", BAD, ids=[".".join(b[0]) + f"={b[1]!r}" for b in BAD])
    def test_bad_config_gives_a_clear_error(self, path, value, message):
        cfg = copy.deepcopy(TOY_CFG)
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        with pytest.raises(ConfigError) as exc:
            validate_kde_config(cfg, where="kde_toy.yml")
        assert message in str(exc.value)
        assert "kde_toy.yml" in str(exc.value)

    def test_joint_config_errors(self):
        spec = {"method": "kde_joint", "data_source": "visits", "variables": ["a"],
                "grid_params": {"a": {"method": "cells", "min": 0, "max": 1, "step": 0.1}}}
        with pytest.raises(ConfigError, match=r"variables = \['a'\] must list two distinct column names"):
            _cfg(j=spec)
        spec = {**spec, "variables": ["a", "b"]}
        with pytest.raises(ConfigError, match=r"must map each of \['a', 'b'\] to a grid"):
            _cfg(j=spec)

    def test_every_problem_is_reported_at_once(self):
        cfg = copy.deepcopy(TOY_CFG)
        cfg["num_cores"] = "all"
        cfg["variable_config"]["age"]["method"] = "kde"
        with pytest.raises(ConfigError) as exc:
            validate_kde_config(cfg)
        assert "2 problem(s)" in str(exc.value) and "num_cores = 'all'" in str(exc.value)

    def test_invalid_yaml_names_the_file(self, tmp_path):
        path = tmp_path / "broken.yml"
        path.write_text("variable_config: [unclosed\n")
        with pytest.raises(ConfigError, match="broken.yml: not valid YAML"):
            load_kde_config(str(path))


# ============================================================================================ grids
def _axis(grid_params: dict, values=(), bins: list | None = None) -> axes.Axis:
    table = pd.DataFrame({"b": bins}) if bins is not None else pd.DataFrame()
    return axes.grid_params(grid_params).axis("x", np.asarray(values, dtype=float), table, "t")


class TestGridMethods:
    def test_points_gives_integer_points_including_max_via_offset(self):
        ax = _axis({"method": "points", "min": 0, "max": 30, "step": 1, "offset": 1})
        assert ax.kind == "points" and ax.start[0] == 0 and ax.start[-1] == 30 and len(ax.start) == 31
        assert np.all(ax.start == np.round(ax.start))

    def test_cells_gives_float_cells_and_use_data_bounds(self):
        ax = _axis({"method": "cells", "use_data_bounds": True, "step": 0.5, "offset": 0.5}, [1.2, 3.9])
        assert ax.kind == "ranges"
        assert ax.start[0] == pytest.approx(1.2) and ax.end[-1] >= 3.9
        assert np.allclose(ax.end - ax.start, 0.5)

    @pytest.mark.parametrize("new,old", [("points", "range"), ("cells", "arange")])
    def test_old_names_are_aliases_stored_under_the_old_name(self, new, old):
        """range/arange were renamed; configs that use them keep working and keep their config_hash."""
        gp = {"min": 0, "max": 3, "step": 0.5}
        a, b = axes.grid_params({"method": new, **gp}), axes.grid_params({"method": old, **gp})
        assert type(a) is type(b) and a.to_dict() == b.to_dict() and a.to_dict()["method"] == old
        cfg = {"variable_config": {"x": {"method": "kde_range", "data_source": "visits", "grid_params": None}}}
        hashes = set()
        for name in (new, old):
            cfg["variable_config"]["x"]["grid_params"] = {"method": name, **gp}
            hashes.add(validate_kde_config(cfg).config_hash())
        assert len(hashes) == 1

    def test_fine_bins_with_threshold_modulo_keeps_bin_edges(self):
        ax = _axis({"method": "fine_bins", "column": "b", "step": 1, "filter": {"threshold": 1344, "modulo": 24}},
                   bins=["0-24", "24-72", "1300-1400"])
        widths = ax.end - ax.start
        assert np.all(widths[ax.start < 1344] <= 1.0 + 1e-9)          # hourly before day 56
        assert ax.start[ax.start > 1344].tolist() == [1368.0, 1392.0]  # then daily points only
        edges = {0.0, 24.0, 72.0, 1300.0, 1400.0}
        for lo, hi in zip(ax.start, ax.end):                            # no cell straddles a bin edge
            assert not any(lo < e < hi for e in edges)

    def test_fine_bins_points_per_bin_and_decimal_bins(self):
        ax = _axis({"method": "fine_bins", "column": "b", "points_per_bin": 4}, bins=["2.5-3.5", "1-2.5", None])
        assert len(ax.start) == 8 and ax.start[0] == 1 and ax.end[-1] == 3.5
        assert np.allclose(ax.end[4:] - ax.start[4:], 0.25)

    def test_fine_bins_without_its_bins_column_names_it(self):
        with pytest.raises(DataError, match=r"fine_bins needs the column 'x_binned'"):
            _axis({"method": "fine_bins", "step": 1})

    def test_custom_cut_points(self):
        ax = _axis({"method": "custom", "cut_points": [0, 1, 5, 20]})
        assert ax.start.tolist() == [0, 1, 5] and ax.end.tolist() == [1, 5, 20]

    def test_grid_file_layout_and_round_trip(self, toy, tmp_path):
        p, v, _ = toy
        summary = generate_kde_grids(TOY_CFG, p, v, tmp_path)
        assert set(summary) == {"age", "los_days", "gap_days"}
        g = read_kde_grid(str(tmp_path / "grid_los_days_kde.parquet"))
        assert {"_level", "sex", "_n", "los_days_start", "los_days_end", "range_probability"} <= set(g.table.columns)
        sums = g.table.groupby(["_level", "sex"], dropna=False)["range_probability"].sum()
        assert np.allclose(sums, 1.0)
        age = read_kde_grid(str(tmp_path / "grid_age_kde.parquet")).table
        assert {"age", "probability"} <= set(age.columns) and "age_start" not in age.columns


# ============================================================================================ registry
class TestGridRegistry:
    SPEC: ClassVar[dict] = {"method": "kde_range", "data_source": "visits"}

    def test_unknown_method_is_an_error_naming_the_known_ones(self):
        with pytest.raises(ConfigError) as exc:
            _cfg(x={**self.SPEC, "grid_params": {"method": "log_cells", "min": 1, "max": 9}})
        msg = str(exc.value)
        assert "variable_config.x.grid_params.method = 'log_cells' is not one of" in msg
        assert all(repr(m) in msg for m in ("points", "cells", "fine_bins", "custom")), msg
        assert "range = points" in msg and "register_grid_method" in msg

    def test_a_registered_method_is_picked_up(self, toy, monkeypatch):
        monkeypatch.setattr(axes, "GRID_METHODS", dict(axes.GRID_METHODS))     # registered for this test only

        @axes.register_grid_method("log_cells")
        class LogCells(axes.GridMethod):
            min: float
            max: float
            n: int = 20

            def axis(self, var, values, table, at):
                cuts = np.geomspace(self.min, self.max, self.n + 1)
                return axes.Axis("ranges", cuts[:-1], cuts[1:])

        p, v, _ = toy
        spec = {**self.SPEC, "grid_params": {"method": "log_cells", "min": 0.05, "max": 400, "n": 30}}
        assert _cfg(los_days=spec).to_dict()["variable_config"]["los_days"]["grid_params"] == spec["grid_params"]
        g = _one("los_days", spec, p, v)
        ratio = g.table["los_days_end"] / g.table["los_days_start"]
        assert np.allclose(ratio, ratio.iloc[0]) and g.table["range_probability"].sum() == pytest.approx(1.0)
        with pytest.raises(ConfigError, match=r"unknown keys \['k'\] for grid method 'log_cells'; allowed: "
                                              r"\['max', 'method', 'min', 'n'\]"):
            _cfg(x={**spec, "grid_params": {**spec["grid_params"], "k": 3}})
        with pytest.raises(ConfigError, match=r"grid_params.min: required key is missing"):
            _cfg(x={**spec, "grid_params": {"method": "log_cells", "max": 3}})

    def test_huge_values_are_cut_in_messages(self):
        """Hostile input: a shown value is at most ~80 characters, however big the value."""
        cfg = copy.deepcopy(TOY_CFG)
        cfg["variable_config"]["age"]["stratify_by"] = list(range(100_000))
        cfg["variable_config"]["age"]["x" * 10_000] = 1
        cfg["variable_config"]["los_days"]["grid_params"] = {"method": "custom", "cut_points": list(range(10**5, 0, -1))}
        with pytest.raises(ConfigError) as exc:
            validate_kde_config(cfg)
        msg = str(exc.value)
        assert "3 problem(s)" in msg and len(msg) < 1500 and msg.count("...") >= 3


# ============================================================================================ fitting
class TestFitting:
    def test_filters_equality_notnull_membership(self, toy):
        p, v, _ = toy
        base = {"method": "kde_range", "data_source": "visits", "grid_params": {"method": "fine_bins", "step": 1}}
        g = _one("gap_days", {**base, "filter": {"gap_days": {"notnull": True}}}, p, v)
        assert g.table["_n"].iloc[0] == v["gap_days"].notna().sum()
        g = _one("los_days", {**base, "filter": {"visit_index": 0}}, p, v)
        assert g.table["_n"].iloc[0] == (v["visit_index"] == 0).sum()
        fine = {**base, "grid_params": {"method": "cells", "min": 0, "max": 40, "step": 0.1}}
        g = _one("los_days", {**fine, "filter": {"los_days_binned": ["0-2", "2-5"]}}, p, v)
        assert g.table["_n"].iloc[0] == v["los_days_binned"].isin(["0-2", "2-5"]).sum()
        beyond = g.table.loc[g.table["los_days_start"] >= 5.0, "range_probability"].sum()
        assert beyond < 0.05                           # only kernel tail beyond the kept bins
        g = _one("los_days", {**base, "filter": {"sex": "F"}}, p, v)   # a patient column, joined onto visits
        assert g.table["_n"].iloc[0] == v["patient_id"].isin(p.loc[p["sex"] == "F", "patient_id"]).sum()

    def test_stratification_and_min_count_merge(self, toy):
        p, v, _ = toy
        g = _one("los_days", {"method": "kde_range", "data_source": "visits", "stratify_by": ["sex", "visit_index"],
                              "grid_params": {"method": "fine_bins", "step": 0.5}, "min_count": 40}, p, v)
        t = g.table.drop_duplicates(["_level", "sex", "visit_index"])
        sizes = v.assign(sex=v["patient_id"].map(p.set_index("patient_id")["sex"])).groupby(["sex", "visit_index"]).size()
        fitted = {(r.sex, int(r.visit_index)) for r in t.itertuples() if r._1 == 2}
        assert fitted == {k for k, n in sizes.items() if n >= 40}                   # small strata are not fitted
        assert g.spec["n_strata_merged"] == int((sizes < 40).sum())
        assert set(t["_level"]) == {0, 1, 2}
        for r in t.itertuples():
            if r._1 == 2:
                assert r._4 == sizes[(r.sex, int(r.visit_index))]

    def test_bandwidth_floor_spreads_a_single_value(self):
        v = pd.DataFrame({"patient_id": [f"{i}" for i in range(20)], "x": np.full(20, 5.03)})
        spec = {"method": "kde_range", "data_source": "visits", "bandwidth": [1e-6],
                "grid_params": {"method": "cells", "min": 0, "max": 10, "step": 0.1}}
        g = _one("x", spec, None, v)
        assert g.table["_bandwidth_x"].iloc[0] == pytest.approx(0.1)      # floor = 1 x median cell width
        assert g.table["range_probability"].max() < 0.5                    # no cell holds the real value alone
        g0 = _one("x", spec, None, v, bandwidth_floor=0.0)
        assert g0.table["range_probability"].max() > 0.99                 # what the floor prevents

    def test_parallel_fit_equals_serial(self, toy):
        p, v, _ = toy
        spec = {"method": "kde_range", "data_source": "visits", "stratify_by": ["sex"],
                "grid_params": {"method": "fine_bins", "step": 0.5}}
        serial = _one("los_days", spec, p, v, num_cores=1)
        parallel = _one("los_days", spec, p, v, num_cores=2, min_parallel_rows=0)
        pd.testing.assert_frame_equal(serial.table, parallel.table)

    def test_too_few_rows_is_a_data_error(self, toy):
        p, v, _ = toy
        with pytest.raises(DataError, match=r"fewer than min_count = 10; a grid cannot be released"):
            _one("los_days", {"method": "kde_range", "data_source": "visits", "filter": {"visit_index": 99},
                              "grid_params": {"method": "fine_bins", "step": 1}}, p, v)

    def test_missing_column_names_the_table(self, toy):
        p, v, _ = toy
        with pytest.raises(DataError, match=r"columns \['triage_category'\] are not in the visits table"):
            _one("los_days", {"method": "kde_range", "data_source": "visits", "stratify_by": ["triage_category"],
                              "grid_params": {"method": "fine_bins", "step": 1}}, p, v)

    def test_value_counts_are_exact_frequencies(self, toy):
        p, v, _ = toy
        g = _one("visit_index", {"method": "value_counts", "data_source": "visits", "stratify_by": ["sex"]}, p, v)
        lvl0 = g.table[g.table["_level"] == 0].set_index("visit_index")["probability"]
        expected = v["visit_index"].value_counts(normalize=True)
        assert np.allclose(lvl0.sort_index().to_numpy(), expected.sort_index().to_numpy())


# ============================================================================================ sampling
@pytest.fixture(scope="module")
def grids(toy):
    p, v, _ = toy
    cfg = validate_kde_config(TOY_CFG)
    return {n: fit_kde_grid(n, c, p, v) for n, c in cfg.variable_config.items()}


class TestSampling:
    @pytest.mark.parametrize("name", ["age", "los_days", "gap_days"])
    def test_values_inside_bins_and_marginals_match(self, toy, grids, name):
        p, v, _ = toy
        real = p if name == "age" else v
        syn = real.sample(n=20_000, replace=True, random_state=0).reset_index(drop=True)
        syn[name] = np.nan
        out, rep = sample_from_kde_grid(grids[name], syn, name, rng=7, top_edges={"age": 100.0},
                                            patients=p)
        n = _assert_inside_bins(out[name], out[f"{name}_binned"], top=100.0)
        assert rep["n_filled"] == n and rep["n_uniform_fallback"] == 0
        assert out[name].isna().sum() == syn[f"{name}_binned"].isna().sum()   # null bins stay null
        ks = ks_2samp(out[name].dropna(), real[name].dropna())
        assert ks.pvalue > 0.01, ks

    @pytest.mark.parametrize("grid_params", [
        {"method": "custom", "cut_points": [0, 0.7, 1.9, 3.3, 7.1, 12.5, 31, 200]},
        {"method": "cells", "min": 0, "max": 200, "step": 0.7},
    ], ids=["custom", "cells"])
    def test_cells_straddling_bin_edges_are_clipped_to_the_bin(self, toy, grid_params):
        p, v, _ = toy
        g = _one("los_days", {"method": "kde_range", "data_source": "visits", "grid_params": grid_params}, p, v)
        out, rep = sample_from_kde_grid(g, v.assign(los_days=np.nan), "los_days", rng=2)
        _assert_inside_bins(out["los_days"], out["los_days_binned"])
        assert rep["n_uniform_fallback"] == 0
        if grid_params["method"] == "cells":        # the coarse custom grid is uniform inside wide cells by design
            assert ks_2samp(out["los_days"], v["los_days"]).pvalue > 0.01

    def test_fine_grid_recovers_an_unbinned_marginal(self, toy, grids):
        p, v, _ = toy
        syn = v.drop(columns=["los_days_binned"]).assign(los_days=np.nan)
        out, _ = sample_from_kde_grid(grids["los_days"], syn, "los_days", rng=1, patients=p)
        assert ks_2samp(out["los_days"], v["los_days"]).pvalue > 0.01

    def test_guide_table_search_equals_binary_search(self):
        rng = np.random.default_rng(0)
        sizes = rng.integers(1, 300, 50)
        cum = np.concatenate([g + np.cumsum(w := rng.random(m) ** 4) / w.sum() for g, m in enumerate(sizes)])
        last = np.cumsum(sizes) - 1
        first = last - sizes + 1
        group = rng.integers(0, 50, 200_000)
        u = np.concatenate([rng.random(199_990), np.nextafter(1.0, 0.0) * np.ones(5), np.zeros(5)])
        expected = np.clip(np.searchsorted(cum, group + u, side="right"), first[group], last[group])
        assert np.array_equal(inverse_cdf(cum, first, last, group, u), expected)

    def test_deterministic_given_the_seed(self, toy, grids):
        p, v, _ = toy
        a, _ = sample_from_kde_grid(grids["los_days"], v, "los_days", rng=5, patients=p)
        b, _ = sample_from_kde_grid(grids["los_days"], v, "los_days", rng=np.random.default_rng(5), patients=p)
        c, _ = sample_from_kde_grid(grids["los_days"], v, "los_days", rng=6, patients=p)
        assert a["los_days"].equals(b["los_days"]) and not a["los_days"].equals(c["los_days"])
        assert v["los_days"].equals(make_toy_tables(3000, seed=3)[1]["los_days"])   # input untouched

    def test_backoff_order_and_counts(self):
        rng = np.random.default_rng(0)
        n = 600
        real = pd.DataFrame({"patient_id": [f"{i}" for i in range(n)], "a": rng.choice(["x", "y"], n),
                             "b": rng.choice(["u", "v"], n), "val": rng.gamma(2, 2, n)})
        real.loc[(real["a"] == "y") & (real["b"] == "v"), "b"] = "u"      # stratum (y, v) never occurs
        g = _one("val", {"method": "kde_range", "data_source": "visits", "stratify_by": ["a", "b"],
                         "grid_params": {"method": "cells", "min": 0, "max": 30, "step": 0.5}}, None, real)
        syn = pd.DataFrame({"patient_id": ["s"] * 4, "a": ["x", "y", "z", None], "b": ["u", "v", "u", "u"]})
        out, rep = sample_from_kde_grid(g, syn, "val", rng=0)
        assert rep["n_backoff"] == 3
        assert rep["rows_by_level"] == {0: 2, 1: 1, 2: 1}   # (y, v) -> (y,); z and null -> unstratified
        assert out["val"].notna().all()

    def test_stratum_without_mass_in_the_bin_backs_off(self):
        rng = np.random.default_rng(1)
        real = pd.DataFrame({"patient_id": [f"{i}" for i in range(400)], "a": ["x", "y"] * 200,
                             "val": np.where(np.arange(400) % 2 == 0, rng.uniform(0, 4, 400), rng.uniform(10, 20, 400))})
        g = _one("val", {"method": "kde_range", "data_source": "visits", "stratify_by": ["a"], "bandwidth": [0.1],
                         "grid_params": {"method": "cells", "min": 0, "max": 30, "step": 0.1}}, None, real)
        syn = pd.DataFrame({"patient_id": ["s"] * 3, "a": ["x", "x", "y"], "val_binned": ["10-20", "0-4", "10-20"]})
        out, rep = sample_from_kde_grid(g, syn, "val", rng=0)
        assert rep["rows_by_level"] == {0: 1, 1: 2} and rep["n_backoff"] == 1 and rep["n_uniform_fallback"] == 0
        _assert_inside_bins(out["val"], out["val_binned"])

    def test_bin_without_real_mass_falls_back_to_uniform_and_is_counted(self, toy, grids):
        p, v, _ = toy
        syn = v.head(50).assign(los_days_binned="300-400")
        out, rep = sample_from_kde_grid(grids["los_days"], syn, "los_days", rng=0, patients=p)
        assert rep["n_uniform_fallback"] == 50 and rep["n_backoff"] == 0 and rep["rows_by_level"] == {-1: 50}
        assert out["los_days"].between(300, 400).all()

    def test_joint_keeps_correlation_and_bins(self):
        real = _correlated(20_000, seed=1)
        spec = {"method": "kde_joint", "data_source": "visits", "variables": ["los_hours", "los_triage_hours"],
                "stratify_by": ["triage_category"],
                "grid_params": {"los_hours": {"method": "fine_bins", "points_per_bin": 12},
                                "los_triage_hours": {"method": "fine_bins", "points_per_bin": 12}},
                "bandwidth": [0.2, 0.03]}
        g = _one("ed_los", spec, None, real)
        assert g.prob_column == "range_probability"
        syn = real.sample(n=20_000, replace=True, random_state=1).reset_index(drop=True)
        syn[["los_hours", "los_triage_hours"]] = np.nan
        out, _ = sample_from_kde_grid(g, syn, "los_hours", rng=3)
        for c in ("los_hours", "los_triage_hours"):
            _assert_inside_bins(out[c], out[f"{c}_binned"])
            assert ks_2samp(out[c], real[c]).pvalue > 0.01
        r_real = np.corrcoef(real["los_hours"], real["los_triage_hours"])[0, 1]
        r_syn = np.corrcoef(out["los_hours"], out["los_triage_hours"])[0, 1]
        assert abs(r_syn - r_real) < 0.05, (r_real, r_syn)
        # without bins the correlation must come from the joint density itself
        free, _ = sample_from_kde_grid(g, syn.drop(columns=["los_hours_binned", "los_triage_hours_binned"]),
                                           None, rng=4)
        r_free = np.corrcoef(free["los_hours"], free["los_triage_hours"])[0, 1]
        assert abs(r_free - r_real) < 0.05, (r_real, r_free)

    def test_empty_synthetic_table(self, grids):
        out, rep = sample_from_kde_grid(grids["gap_days"], pd.DataFrame({"gap_days_binned": pd.Series([], dtype="string")}),
                                            "gap_days", rng=0)
        assert len(out) == 0 and rep["n_filled"] == 0

    def test_filter_restricts_which_rows_are_filled(self):
        real = pd.DataFrame({"patient_id": [f"{i}" for i in range(400)], "event_type": ["ED", "Inpatient"] * 200,
                             "los_hours": np.r_[np.tile([3.0, 300.0], 200)] + np.linspace(0, 1, 400)})
        ed = _one("ed_los", {"method": "kde_range", "data_source": "visits", "column": "los_hours",
                             "filter": {"event_type": "ED"}, "grid_params": {"method": "cells", "min": 0, "max": 400,
                                                                             "step": 1}}, None, real)
        syn = real.assign(los_hours=np.nan)
        out, rep = sample_from_kde_grid(ed, syn, "los_hours", rng=0)
        assert rep["n_filled"] == 200
        assert out.loc[out["event_type"] == "ED", "los_hours"].lt(20).all()
        assert out.loc[out["event_type"] == "Inpatient", "los_hours"].isna().all()

    def test_value_counts_sampling_matches_frequencies(self):
        rng = np.random.default_rng(2)
        days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        real = pd.DataFrame({"patient_id": ["p"] * 5000, "event_type": rng.choice(["ED", "Inpatient"], 5000),
                             "event_day": rng.choice(days, 5000, p=[.25, .15, .15, .15, .1, .1, .1])})
        real.loc[real["event_type"] == "Inpatient", "event_day"] = rng.choice(["Mon", "Tue"], (real["event_type"] == "Inpatient").sum())
        g = _one("event_day", {"method": "value_counts", "data_source": "visits", "stratify_by": ["event_type"]},
                 None, real)
        syn = real.sample(n=50_000, replace=True, random_state=0).assign(event_day=None).reset_index(drop=True)
        out, _ = sample_from_kde_grid(g, syn, "event_day", rng=0)
        for et in ("ED", "Inpatient"):
            a = out.loc[out["event_type"] == et, "event_day"].value_counts(normalize=True)
            b = real.loc[real["event_type"] == et, "event_day"].value_counts(normalize=True)
            assert a.index.isin(b.index).all()
            assert (a.reindex(b.index, fill_value=0) - b).abs().max() < 0.015


# ============================================================================================ time
class TestTime:
    def test_gap_mode_offsets_order_and_no_overlap(self, toy):
        p, v, _ = toy
        v = v.assign(start_offset_days=np.nan)
        tcfg = validate_kde_config(TOY_CFG).time
        out, rep = reconstruct_times(p, v, tcfg, rng=0)
        first = out["visit_index"] == 0
        assert (out.loc[first, "start_offset_days"] == 0).all()
        assert (out.groupby("patient_id")["start_offset_days"].diff().dropna() >= 0).all()
        prev_los = out.groupby("patient_id")["los_days"].shift(1)
        gap = out.groupby("patient_id")["start_offset_days"].diff()
        assert (gap[~first] >= prev_los[~first] - 1e-9).all()             # a visit never starts before the last ends
        assert rep["n_gap_resampled"] + rep["n_los_resampled"] + rep["n_unresolved"] > 0
        # unresolved = gap bin entirely below the previous LOS bin: the gap leaves its bin, order wins
        lohi = np.array([parse_bin(b) if isinstance(b, str) else (np.nan, np.nan) for b in out["gap_days_binned"]])
        outside = (out["gap_days"] < lohi[:, 0]) | (out["gap_days"] >= lohi[:, 1])
        assert outside.sum() == rep["n_unresolved"] < 0.01 * len(out)
        _assert_inside_bins(out["los_days"], out["los_days_binned"])
        age = out["patient_id"].map(p.set_index("patient_id")["age"])
        assert np.allclose(out["age_at_visit"], age + out["start_offset_days"] / 365.25)

    def test_allow_overlap_keeps_gaps(self, toy):
        p, v, _ = toy
        tcfg = validate_kde_config(TOY_CFG).time.model_copy(update={"allow_overlap": True})
        out, rep = reconstruct_times(p, v, tcfg, rng=0)
        assert rep["n_gap_resampled"] == 0
        assert np.allclose(out["start_offset_days"], v.sort_values(["patient_id", "visit_index"])["start_offset_days"])

    def test_missing_time_column_is_a_data_error(self, toy):
        p, v, _ = toy
        tcfg = validate_kde_config(TOY_CFG).time.model_copy(update={"los": "los_hours"})
        with pytest.raises(DataError, match=r"columns \['visits.los_hours'\] are missing"):
            reconstruct_times(p, v, tcfg, rng=0)

    def test_monotone_visit_age(self):
        v = pd.DataFrame({"patient_id": ["a"] * 3 + ["b"] * 2, "visit_index": np.array([0, 1, 2, 0, 1], dtype="int32"),
                          "gap_days": [np.nan, 10.0, 10.0, np.nan, 5.0], "age": [34.0, 31.0, 52.0, 70.0, 60.0],
                          "age_binned": ["30-40", "30-40", "50-60", "70-80", "60-70"]})
        tcfg = validate_kde_config({**TOY_CFG, "time": {"gap": "gap_days", "monotone": ["age"]}}).time
        out, rep = reconstruct_times(pd.DataFrame({"patient_id": ["a", "b"]}), v, tcfg, rng=0)
        assert out["age"].tolist() == [31.0, 34.0, 52.0, 70.0, 70.0]   # reordered within a bin, then raised
        assert rep["n_order_fixed_age"] == 2 and rep["n_raised_age"] == 1
        assert out["start_offset_days"].tolist() == [0.0, 10.0, 20.0, 0.0, 5.0]

    def test_offset_mode_is_monotone_within_bins(self):
        rng = np.random.default_rng(0)
        pid = np.repeat([f"{i}" for i in range(300)], 4)
        m = np.tile([0.0, 6.0, 12.0, 24.0], 300) + rng.uniform(-1, 1, 1200)
        m[1::4] = m[2::4] + rng.uniform(-1, 0.5, 300)           # some visits sampled out of order in one bin
        v = pd.DataFrame({"patient_id": pid, "visit_index": np.tile(np.arange(4, dtype="int32"), 300),
                          "months_since_baseline": m})
        v["months_since_baseline_binned"] = bin_values(v["months_since_baseline"], [-1, 3, 9, 15, 30]).labels
        v.loc[1::4, "months_since_baseline_binned"] = v.loc[2::4, "months_since_baseline_binned"].to_numpy()
        tcfg = validate_kde_config({**TOY_CFG, "time": {"offset": "months_since_baseline", "offset_unit": "months",
                                                             "anchor_date": {"min": "2020-01-01", "max": "2020-12-31"}}}).time
        pts = pd.DataFrame({"patient_id": np.unique(pid)})
        out, rep = reconstruct_times(pts, v, tcfg, rng=0)
        assert rep["n_order_fixed"] > 0
        assert (out.groupby("patient_id")["start_offset_days"].diff().dropna() >= 0).all()
        assert (out.loc[out["visit_index"] == 0, "start_offset_days"] == 0).all()
        _assert_inside_bins(out["months_since_baseline"], out["months_since_baseline_binned"])
        d = pd.to_datetime(out["start_date"])
        first = out["visit_index"] == 0
        assert d.min() >= pd.Timestamp("2020-01-01") and d[first].max() <= pd.Timestamp("2020-12-31")
        lag = (d - d.groupby(out["patient_id"]).transform("first")).dt.days
        assert (np.abs(lag - out["start_offset_days"]) <= 1).all()


# ============================================================================================ stage
class TestStage:
    def test_grids_from_train_split_then_fill_a_shard(self, tmp_path):
        real = tmp_path / "real"
        write_toy_tables(real, n_patients=400, seed=1)
        meta = generate_kde_grids_to_dir(str(real), TOY_CFG, str(tmp_path / "grids"))
        p, v, c = read_tables(real)
        assert meta["n_patients"] == (p["split"] == "train").sum()
        los = read_kde_grid(str(tmp_path / "grids" / "grid_los_days_kde.parquet")).table
        n_train_visits = v["patient_id"].isin(p.loc[p["split"] == "train", "patient_id"]).sum()
        assert los.loc[los["_level"] == 0, "_n"].iloc[0] == n_train_visits < len(v)
        assert (tmp_path / "grids" / "grid_gap_days_kde.parquet").exists()
        assert (tmp_path / "grids" / "kde_config.json").exists()

        shard = tmp_path / "shard"                        # a "sampled" shard: bins only, values and times null
        with storage.atomic_dir(shard) as tmp:
            from synthehr_core.data.schema import write_tables
            write_tables(tmp, p.assign(split="synthetic", age=np.nan),
                         v.assign(los_days=np.nan, gap_days=np.nan, start_offset_days=np.nan), c)
            storage.write_bytes(storage.join(str(tmp), "vocab.json"), (real / "vocab.json").read_bytes())
        m1 = sample_kde_to_dir(str(shard), str(tmp_path / "grids"), str(tmp_path / "out1"), seed=11)
        sample_kde_to_dir(str(shard), str(tmp_path / "grids"), str(tmp_path / "out2"), seed=11)
        sp, sv, _ = read_tables(tmp_path / "out1")
        _assert_inside_bins(sp["age"], sp["age_binned"], top=100.0)
        _assert_inside_bins(sv["los_days"], sv["los_days_binned"])
        assert sv["start_offset_days"].notna().all() and "age_at_visit" in sv.columns
        assert m1["seed"] == 11 and set(m1["backoff_counts"]) == {"age", "los_days", "gap_days"}
        assert "disagreement_counts" in m1 and m1["time"]["n_unresolved"] == 0
        assert (tmp_path / "out1" / "vocab.json").read_bytes() == (real / "vocab.json").read_bytes()
        for f in ("patients.parquet", "visits.parquet"):          # same seed -> byte-identical tables
            assert (tmp_path / "out1" / f).read_bytes() == (tmp_path / "out2" / f).read_bytes()

    def test_module_imports_neither_torch_nor_kfp(self):
        code = "import sys, synthehr_core.postprocess.stage; sys.exit(int('torch' in sys.modules or 'kfp' in sys.modules))"
        assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

    def test_bundled_qh_config_end_to_end_on_a_qh_shaped_table(self):
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location("bench_kde", Path(__file__).parents[1] / "bench" / "kde.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)                  # by path: bench/__init__.py imports torch
        patients, visits = bench.qh_like_tables(30_000, seed=0)
        cfg = load_kde_config("kde_qh")
        grids = {n: fit_kde_grid(n, c, patients, visits) for n, c in cfg.variable_config.items()}
        syn_v = visits.assign(los_hours=np.nan, los_triage_hours=np.nan, age=np.nan, gap_days=np.nan, event_day=None)
        for name, g in grids.items():
            syn_v, rep = sample_from_kde_grid(g, syn_v, None, rng=1, patients=patients)
            assert rep["n_uniform_fallback"] == 0, name
        ed = syn_v["event_type"] == "ED"
        assert syn_v["los_hours"].notna().all() and syn_v.loc[ed, "los_triage_hours"].notna().all()
        assert syn_v.loc[~ed, "los_triage_hours"].isna().all()
        for c in ("los_hours", "los_triage_hours", "age", "gap_days"):
            _assert_inside_bins(syn_v[c], syn_v[f"{c}_binned"])
        out, rep = reconstruct_times(patients, syn_v, cfg.time, rng=2)
        assert out["start_date"].notna().all()
        assert (out.groupby("patient_id")["age"].diff().dropna() >= 0).all()
        real_r = visits.loc[visits["event_type"] == "ED", ["los_hours", "los_triage_hours"]].corr().iloc[0, 1]
        syn_r = out.loc[out["event_type"] == "ED", ["los_hours", "los_triage_hours"]].corr().iloc[0, 1]
        assert abs(real_r - syn_r) < 0.05

    def test_bundled_mimic3_config_on_the_demo_tables(self, tmp_path):
        from synthehr_core.data.preprocess import preprocess

        preprocess("mimic3", tmp_path / "tables", overwrite=True)   # its meta names the KDE config: kde_mimic3.yml
        kde_name = storage.read_json(tmp_path / "tables" / "meta.json")["kde"]
        meta = generate_kde_grids_to_dir(str(tmp_path / "tables"), kde_name, str(tmp_path / "grids"))
        assert set(meta["grids"]) == {"age", "los_days", "gap_days"}
        p, v, c = read_tables(tmp_path / "tables")
        with storage.atomic_dir(tmp_path / "shard") as tmp:
            from synthehr_core.data.schema import write_tables
            write_tables(tmp, p.assign(split="synthetic", age=np.nan),
                         v.assign(los_days=np.nan, gap_days=np.nan, start_offset_days=np.nan), c)
        sample_kde_to_dir(str(tmp_path / "shard"), str(tmp_path / "grids"), str(tmp_path / "out"), seed=0)
        sp, sv, _ = read_tables(tmp_path / "out")
        _assert_inside_bins(sv["los_days"], sv["los_days_binned"])
        assert sp["age"].between(0, 90).all() and sv["start_offset_days"].notna().all()


def test_code_columns_stratify_by_generated_codes(tmp_path):
    """QH-style: the KDE strata `triage_category` come from the visits' tri:<n> codes, real and synthetic."""
    visits = pd.DataFrame({"patient_id": ["a", "a", "b"], "visit_index": [0, 1, 0]})
    codes = pd.DataFrame({"patient_id": ["a", "a", "b", "b"], "visit_index": [0, 0, 0, 0],
                          "code": ["tri:3", "disp:1", "tri:2", "tri:5"]})
    out = add_code_columns(visits, codes, {"triage_category": "tri"})
    assert out["triage_category"].tolist()[0] == "3" and pd.isna(out["triage_category"].tolist()[1])
    assert out["triage_category"].tolist()[2] == "2"       # first in code order
    assert out[["patient_id", "visit_index"]].equals(visits)
    with pytest.raises(ConfigError, match="code_columns = .* must map a new visit column to a code namespace"):
        validate_kde_config({"code_columns": ["tri"], "variable_config": {}})

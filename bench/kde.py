"""Benchmark of the KDE stage: grid generation on a large QH-style table, and bin-restricted sampling speed.

Run: ``.venv/bin/python bench/kde.py [--n-visits 1000000] [--n-naive 20000]``. Prints one table.

* ``time_generate_grids``: ``generate_kde_grids`` with the bundled ``kde_qh`` config on a seeded QH-style visits table
  (``qh_like_tables`` below; used when ``synthehr_core.data.adapters.qh`` is not available).
* ``time_sample_*``: ``sample_from_kde_grid`` on N synthetic rows, vs ``naive_sample``: a per-row Python loop that
  restricts the stratum grid to the row's bin and calls ``rng.choice`` (timed on ``--n-naive`` rows and extrapolated
  linearly, since the loop is O(rows)).

Run as a script path (not ``-m bench.kde``) to keep ``bench/__init__.py``'s torch import out of the timing process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthehr_core.data.schema import bin_values, parse_bin
from synthehr_core.postprocess.draw import sample_from_kde_grid
from synthehr_core.postprocess.grids import KDEGrid, add_code_columns, fit_kde_grid, generate_kde_grids
from synthehr_core.postprocess.kde_config import load_kde_config, validate_kde_config

LOS_H_EDGES = [0, 1, 2, 4, 6, 8, 12, 24, 48, 72, 168, 336, 672, 1344, 4000]
TRI_H_EDGES = [0, 0.25, 0.5, 1, 2, 4, 8, 24]
AGE_EDGES = [0, 18, 30, 45, 60, 75, 90, 110]
MEDIAN_ED_MIN = {1: 293, 2: 506, 3: 323, 4: 185, 5: 122}      # KTAS anchors, docs data.md section 3
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def qh_like_tables(n_visits: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded QH-style (patients, visits): ED + inpatient rows with the issue's column names, ~3 visits per patient."""
    rng = np.random.default_rng(seed)
    n_pat = max(1, n_visits // 3)
    pids = np.array([f"{i}" for i in range(n_pat)], dtype=object)
    patients = pd.DataFrame({"patient_id": pids, "split": "train", "gender": rng.choice(["F", "M"], n_pat)})
    owner = np.sort(rng.integers(0, n_pat, n_visits))
    vidx = np.arange(n_visits) - np.searchsorted(owner, owner)
    ed = rng.random(n_visits) < 0.7
    tri = rng.choice([1, 2, 3, 4, 5], n_visits, p=[0.02, 0.17, 0.39, 0.36, 0.06])
    med_h = np.array([MEDIAN_ED_MIN[t] for t in range(1, 6)])[tri - 1] / 60.0
    z = rng.standard_normal((n_visits, 2))
    los_ed = med_h * np.exp(0.6 * z[:, 0])
    tri_h = np.clip(0.3 * np.exp(0.5 * (0.7 * z[:, 0] + 0.71 * z[:, 1])), 0, 23.9)
    los_in = np.minimum(24 * rng.gamma(1.5, 4.0, n_visits), 3999)
    visits = pd.DataFrame({
        "patient_id": pids[owner], "visit_index": vidx.astype("int32"), "start_offset_days": np.nan,
        "event_type": np.where(ed, "ED", "Inpatient"),
        "triage_category": np.where(ed, tri.astype(str), None),
        "los_hours": np.where(ed, los_ed, los_in),
        "los_triage_hours": np.where(ed, tri_h, np.nan),
        "age": np.clip(rng.normal(50, 20, n_visits), 0, 105).round(),
        "event_day": rng.choice(DAYS, n_visits, p=[0.16, 0.15, 0.15, 0.14, 0.14, 0.13, 0.13]),
        "gap_days": np.where(vidx == 0, np.nan, rng.gamma(1.2, 60.0, n_visits)),
    })
    for col, edges in (("los_hours", LOS_H_EDGES), ("los_triage_hours", TRI_H_EDGES), ("age", AGE_EDGES)):
        visits[f"{col}_binned"] = bin_values(visits[col], edges).labels
    visits["gap_days_binned"] = bin_values(visits["gap_days"], [0, 7, 30, 90, 365, 5000]).labels
    return patients, visits


def naive_sample(grid: KDEGrid, syn: pd.DataFrame, var: str, rng: np.random.Generator) -> np.ndarray:
    """Baseline: one Python iteration per row (stratum lookup, restrict to bin, rng.choice, uniform in cell)."""
    levels = grid.levels()
    strat = grid.spec["stratify_by"]
    out = np.empty(len(syn))
    keys = [syn[c].astype("string").to_numpy(dtype=object) for c in strat]
    bins = syn[f"{var}_binned"].to_numpy(dtype=object)
    for i in range(len(syn)):
        lo, hi = parse_bin(bins[i])
        st = tuple(k[i] for k in keys)
        for lvl in range(len(strat), -1, -1):
            cell = levels[lvl].get(st[:lvl])
            if cell is None:
                continue
            s, e, p = cell[0][:, 0], cell[1][:, 0], cell[2]
            m = (s >= lo) & (e <= hi)
            if m.any():
                break
        pm = p[m] / p[m].sum()
        j = rng.choice(len(pm), p=pm)
        out[i] = s[m][j] + rng.random() * (e[m][j] - s[m][j])
    return out


def time_generate_grids(patients, visits, cfg) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = generate_kde_grids(cfg, patients, visits, tmp)
        return time.perf_counter() - t, summary


def qh_simulator_tables(n_patients: int, seed: int):
    """The QH-style simulator at ``n_patients``, preprocessed with the bundled ``qh`` config (canonical tables,
    train split only, triage category joined from the tri: codes as the KDE stage does)."""
    from synthehr_core.data.fixtures import qh as qh_fixture
    from synthehr_core.data.preprocess import preprocess
    from synthehr_core.data.schema import read_tables

    with tempfile.TemporaryDirectory(prefix="bench-kde-") as tmp:
        t = time.perf_counter()
        qh_fixture.write_encounters(qh_fixture.simulate(n_patients, seed=seed), f"{tmp}/raw/encounters.csv")
        preprocess("qh", f"{tmp}/tables", raw=f"{tmp}/raw")
        patients, visits, codes = read_tables(f"{tmp}/tables")
        print(f"simulated + preprocessed {n_patients:,} QH patients in {time.perf_counter() - t:.1f} s", flush=True)
    train = patients[patients["split"] == "train"]
    visits = visits[visits["patient_id"].isin(set(train["patient_id"]))]
    cfg = load_kde_config("kde_qh")
    visits = add_code_columns(visits, codes, cfg.code_columns)
    return train, visits, f"synthehr_core.data.fixtures.qh_fixture.simulate({n_patients:,}) -> preprocess(qh), train split"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-visits", type=int, default=1_000_000, help="rows sampled in the speed test")
    ap.add_argument("--n-patients", type=int, default=1_000_000,
                    help="QH simulator size for grid generation (0 = a synthetic stand-in table of --n-visits rows)")
    ap.add_argument("--n-naive", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5, help="sampling timings are the median of this many runs")
    args = ap.parse_args()

    patients, visits, source = qh_simulator_tables(args.n_patients, args.seed) if args.n_patients else (None, None, "")
    if visits is None:
        patients, visits = qh_like_tables(args.n_visits, args.seed)
        source = "bench/kde.py qh_like_tables (stand-in table)"
    cfg = load_kde_config("kde_qh")
    load0 = os.getloadavg()
    rows = []
    for cores in (1, -1):
        gen_s, summary = time_generate_grids(patients, visits, cfg.model_copy(update={"num_cores": cores}))
        rows.append((f"time_generate_grids (kde_qh, num_cores={cores})", f"{len(visits):,} visits", f"{gen_s:.2f} s",
                     f"{len(visits) / gen_s / 1e6:.2f} M rows/s", f"machine cores={os.cpu_count()}"))

    # sampling: the inpatient-style univariate grid and the ED joint grid, on N synthetic rows drawn from the real
    syn_rng = np.random.default_rng(args.seed + 1)
    real_ed = visits.loc[visits["event_type"] == "ED"]
    grid_1d = fit_kde_grid("los_hours_ed", validate_kde_config({"variable_config": {"los_hours_ed": {
        "method": "kde_range", "data_source": "visits", "column": "los_hours", "stratify_by": ["triage_category"],
        "filter": {"event_type": "ED"}, "grid_params": {"method": "fine_bins", "step": 0.25,
                                                         "filter": {"threshold": 72, "modulo": 24}}}}}
    ).variable_config["los_hours_ed"], patients, visits)
    grid_2d = fit_kde_grid("ed_los", cfg.variable_config["ed_los"], patients, visits)
    n = args.n_visits
    syn = real_ed.iloc[syn_rng.integers(0, len(real_ed), n)].reset_index(drop=True)
    syn[["los_hours", "los_triage_hours"]] = np.nan
    syn = pa.Table.from_pandas(syn, preserve_index=False).to_pandas()   # column layout as read from parquet
    for label, grid in (("kde_range", grid_1d), ("kde_joint", grid_2d)):
        sample_from_kde_grid(grid, syn.iloc[:1000], None, 0)        # warm-up (levels cache)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            _, rep = sample_from_kde_grid(grid, syn, None, np.random.default_rng(args.seed))
            times.append(time.perf_counter() - t)
        dt = float(np.median(times))
        n_vals = n * len(grid.spec["variables"])
        rows.append((f"time_sample_{label} (vectorised)", f"{n:,} rows", f"{dt:.3f} s",
                     f"{n_vals / dt / 1e6:.2f} M values/s",
                     f"median of {args.repeat}, backoff={rep['n_backoff']}"))
        if label == "kde_range":
            sub = syn.iloc[:args.n_naive]
            t = time.perf_counter()
            naive_sample(grid, sub, "los_hours", np.random.default_rng(args.seed))
            dn = (time.perf_counter() - t) * n / len(sub)
            rows.append((f"time_sample_{label} (naive per-row loop)", f"{n:,} rows",
                         f"{dn:.1f} s (extrapolated from {len(sub):,})", f"{n / dn / 1e6:.3f} M values/s",
                         f"speed-up {dn / dt:.0f}x"))
    print(f"data: {source}; numpy {np.__version__}, pandas {pd.__version__}; "
          f"load average before/after: {load0[0]:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'benchmark':<46} {'size':>16} {'time':>32} {'throughput':>20}  note")
    for r in rows:
        print(f"{r[0]:<46} {r[1]:>16} {r[2]:>32} {r[3]:>20}  {r[4]}")
    print("grids:", {k: v['rows'] for k, v in summary.items()})


if __name__ == "__main__":
    main()

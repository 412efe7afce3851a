"""Temporal realism, (a) published approach vs (b) calendar tokens + calendar-consistent time reconstruction.

    .venv/bin/python bench/temporal.py                                   # QH simulator 20k + MIMIC-III demo
    .venv/bin/python bench/temporal.py --datasets qh --n-patients 5000 --epochs 2     # quicker

All arms run the real stages: preprocess -> ``train_to_dir`` (HALO, ``--preset``) -> ``sample_to_dir`` ->
KDE grids -> ``sample_kde_to_dir``; they differ in the calendar, the head and the dating:

(a) the dataset config without calendar tokens; KDE ``time.anchor_date`` = one uniform anchor per patient in
    the real date window, dates = anchor + cumulative KDE gaps, and ``event_day`` (day of week) drawn from its
    marginal ``value_counts`` grid by event type, independent of the date (the published pipeline);
(b) calendar tokens (QH: year, month, weekday, hour; MIMIC-III: month, weekday, hour) learnt by the model with one
    categorical head per single-valued variable, sampled one value per variable, then
    ``sample_kde_to_dir`` with the calendar tables in the grids dir (``synthehr_core.postprocess.dating``);
(c) = (b) with HI's Bernoulli head instead of categorical heads (``train_to_dir(group_heads=False)``), sampled
    with the token-group constraints (each variable drawn from the restricted Bernoulli chain): isolates the heads.
(a) trains HI's head and samples it unconstrained, as the published pipeline did.

Metrics (``temporal_metrics``) compare the synthetic visit dates with the real *training* visits. Prints one table
per dataset and the token-agreement report of (b).
"""
from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthehr_core import storage
from synthehr_core.data.fixtures import qh as qh_fixture
from synthehr_core.data.config import bundled_config_path
from synthehr_core.data.preprocess import preprocess
from synthehr_core.data.schema import WEEKDAYS, calendar_parts, read_tables
from synthehr_core.model.sampling import sample_to_dir
from synthehr_core.model.train import train_to_dir
from synthehr_core.evaluation.temporal import temporal_metrics
from synthehr_core.postprocess.calendar_tables import build_calendar_tables, write_calendar_tables
from synthehr_core.postprocess.grids import generate_kde_grids
from synthehr_core.postprocess.kde_config import CONFIG_FILE, load_kde_config
from synthehr_core.postprocess.stage import sample_kde_to_dir

QH_KDE = {   # the QH adapter's columns (kde_qh.yml still names a stand-in table's triage_category / event_day)
    "num_cores": 1, "min_count": 10,
    "variable_config": {
        "los_hours": {"method": "kde_range", "data_source": "visits", "stratify_by": ["event_type"],
                      "grid_params": {"method": "fine_bins", "step": 0.25, "filter": {"threshold": 48, "modulo": 24}}},
        "gap_days": {"method": "kde_range", "data_source": "visits", "filter": {"gap_days": {"notnull": True}},
                     "grid_params": {"method": "fine_bins", "step": 1, "filter": {"threshold": 90, "modulo": 7}}},
    },
    "time": {"gap": "gap_days", "gap_unit": "days", "los": "los_hours", "los_unit": "hours", "allow_overlap": True},
}
EVENT_DAY = {"method": "value_counts", "data_source": "visits", "stratify_by": ["event_type"]}
DATASETS = {   # calendar tokens of arm (b), hemisphere seasons (winter, summer)
    "qh": (["month", "weekday", "hour", "year"], (6, 7, 8), (12, 1, 2)),
    "mimic3": (["month", "weekday", "hour"], (12, 1, 2), (6, 7, 8)),
}
SHOW = [("monthly count r (all)", "temporal.monthly.all.r"), ("monthly nMAE (all)", "temporal.monthly.all.nmae"),
        ("weekly count r (all)", "temporal.weekly.all.r"), ("weekly nMAE (all)", "temporal.weekly.all.nmae")]


def _dataset_config(name: str, tokens: list[str] | None) -> dict:
    cfg = yaml.safe_load(bundled_config_path(name).read_text())
    cfg["calendar"] = {"enabled": bool(tokens), "tokens": tokens or []}
    return cfg


def _kde_config(name: str, real_span: tuple[int, int] | None) -> dict:
    cfg = copy.deepcopy(QH_KDE) if name == "qh" else load_kde_config("kde_mimic3").to_dict()
    cfg["variable_config"]["event_day"] = dict(EVENT_DAY)
    cfg["num_cores"] = 1
    if real_span is not None:
        lo, hi = (str(np.datetime64(int(d), "D")) for d in real_span)
        cfg["time"]["anchor_date"] = {"min": lo, "max": hi}
    return cfg


def _grids(tables: str, kcfg: dict, out: str, calendar: bool) -> None:
    """KDE grids on the train split (``event_day`` = weekday of ``start_day``), plus the calendar tables."""
    p, v, _ = read_tables(tables)
    tp = p[p["split"] == "train"]
    tv = v[v["patient_id"].isin(set(tp["patient_id"]))].copy()
    tv["event_day"] = np.asarray(WEEKDAYS, dtype=object)[calendar_parts(tv["start_day"].to_numpy(float))["weekday"]]
    Path(out).mkdir(parents=True, exist_ok=True)
    generate_kde_grids(kcfg, tp, tv, out)
    storage.write_json(storage.join(out, CONFIG_FILE), load_kde_config(kcfg).to_dict())
    if calendar:
        write_calendar_tables(*build_calendar_tables(tp, tv), out)


def run_dataset(name: str, work: Path, n_patients: int, epochs: int, preset: str, n_synth: int | None,
                seed: int, batch_size: int = 256, lr: float = 3e-3, device: str | None = None,
                reuse: bool = False, arms: tuple[str, ...] = ("a", "b", "c")) -> dict:
    tokens, winter, summer = DATASETS[name]
    raw = None
    if name == "qh" and not (reuse and (work / "raw" / "encounters.csv").exists()):
        raw = str(work / "raw")
        Path(raw).mkdir(parents=True, exist_ok=True)
        qh_fixture.write_encounters(qh_fixture.simulate(n_patients, seed=seed), Path(raw) / "encounters.csv")
    elif name == "qh":
        raw = str(work / "raw")
    out, times = {}, {}
    for arm, toks, heads, constrain in (("a", None, False, False), ("b", tokens, True, True),
                                        ("c", tokens, False, True)):
        if arm not in arms:
            continue
        t0 = time.perf_counter()
        d = work / arm
        src = work / "b" if arm == "c" else d          # (c) = (b)'s tables, its own model
        if arm != "c" and not (reuse and (d / "tables" / "meta.json").exists()):
            preprocess(_dataset_config(name, toks), d / "tables", raw=raw, overwrite=True)
        p, v, _ = read_tables(src / "tables")
        real_train = v[v["patient_id"].isin(set(p.loc[p["split"] == "train", "patient_id"]))]
        span = (int(np.floor(real_train["start_day"].min())), int(np.floor(real_train["start_day"].max())))
        n = n_synth or int((p["split"] == "train").sum())
        if not (reuse and (d / "sample" / "meta.json").exists()):
            if (d / "model").exists():
                shutil.rmtree(d / "model")
            train_to_dir(src / "tables", d / "model", model_type="halo", preset=preset, epochs=epochs,
                         batch_size=batch_size, lr=lr, seed=seed, eval_every=None, progress=False, device=device,
                         group_heads=heads)
            sample_to_dir(d / "model", d / "sample", seed=seed + 1, n_patients=n, batch_size=512, device=device,
                          overwrite=True, constrain=constrain)
        if (d / "grids").exists():
            shutil.rmtree(d / "grids")
        _grids(str(src / "tables"), _kde_config(name, span if arm == "a" else None), str(d / "grids"), arm != "a")
        kmeta = sample_kde_to_dir(str(d / "sample"), str(d / "grids"), str(d / "kde"), seed=seed + 2, overwrite=True)
        if arm == "a":
            _, sv, _ = read_tables(d / "kde")
            sv = sv.sort_values(["patient_id", "visit_index"])
            first = pd.to_datetime(sv.groupby("patient_id")["start_date"].transform("first")).to_numpy(
                "datetime64[D]").astype(np.int64)
            sv["start_day"] = first + sv["start_offset_days"].to_numpy(float)
            wd = calendar_parts(sv["start_day"].to_numpy(float))["weekday"]
            extra = {"event_day vs date weekday disagreement": float(np.mean(
                np.asarray(WEEKDAYS, dtype=object)[wd] != sv["event_day"].astype(str).to_numpy()))}
        else:
            extra = {}
            meta = kmeta                           # sample_kde_to_dir dated the visits (grids hold calendar tables)
            _, sv, _ = read_tables(d / "kde")
            ag = meta["calendar"]["agreement"]
            _, tok_v, _ = read_tables(d / "sample")
            for k in tokens:                       # the model's own token marginals (before any date is chosen)
                rp_ = real_train[f"cal_{k}"].astype(str).value_counts(normalize=True)
                sp_ = tok_v[f"cal_{k}"].dropna().astype(str).value_counts(normalize=True)
                extra[f"model token cal_{k} (where present): max abs diff pp vs real"] = float(
                    100 * rp_.sub(sp_, fill_value=0).abs().max())
                extra[f"model token cal_{k}: share of visits without one"] = float(tok_v[f"cal_{k}"].isna().mean())
            extra.update({"visits whose date disagrees with a token": ag["n_disagree_any"] / max(ag["n_visits_with_tokens"], 1),
                     **{f"  {k}": v for k, v in ag.items() if k.startswith("n_disagree_")},
                     "later visits placed exactly": meta["calendar"]["relaxed"]["exact"],
                     **{f"  relaxed: {k}": v for k, v in meta["calendar"]["relaxed"].items() if k != "exact"}})
        res = temporal_metrics(real_train, sv, winter=winter, summer=summer)
        times[arm] = time.perf_counter() - t0
        out[arm] = {"metrics": res["metrics"], "extra": extra, "n_visits": len(sv), "n_real": len(real_train)}
    out["times"] = times
    return out


TITLES = {"a": "(a) published: random anchor + event_day marginal", "b": "(b) calendar tokens + reconstruction",
          "c": "(c) = (b) with HI's Bernoulli head"}


def _print(name: str, res: dict) -> None:
    arms = [a for a in ("a", "b", "c") if a in res]
    ms = [res[a]["metrics"] for a in arms]
    seen = set().union(*ms)
    keys = [k for _, k in SHOW]
    keys += sorted(k for k in seen if k not in keys and not k.endswith(("real", "_real")))
    keys += sorted(k for k in seen if k.endswith(("real", "_real")))
    print(f"\n### {name}: real train visits {res[arms[0]]['n_real']}; "
          + ", ".join(f"({a}) {res[a]['n_visits']} synthetic visits, {res['times'][a]:.0f}s" for a in arms) + "\n")
    print("| metric | " + " | ".join(TITLES[a] for a in arms) + " |")
    print("|---|" + "---|" * len(arms))
    for k in keys:
        cell = [f"{d[k]:.4f}" if k in d and np.isfinite(d[k]) else "-" for d in ms]
        print(f"| {k} | " + " | ".join(cell) + " |")
    for arm in arms:
        for k, v in res[arm]["extra"].items():
            print(f"| ({arm}) {k} | {v:.4f} |" if isinstance(v, float) else f"| ({arm}) {k} | {v} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["qh", "mimic3"], choices=sorted(DATASETS))
    ap.add_argument("--n-patients", type=int, default=20_000, help="simulated QH patients")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mimic-epochs", type=int, default=30)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--mimic-synth", type=int, default=2000, help="synthetic MIMIC-III patients")
    ap.add_argument("--mimic-batch-size", type=int, default=16, help="the demo has 72 training patients")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3, help="arbitrary; higher than HALO's 1e-4 for few epochs")
    ap.add_argument("--device", default=None, help="torch device for train and sample (default: train picks "
                    "cuda when present, sample uses the CPU)")
    ap.add_argument("--work", default="/tmp/synthehr_bench_temporal")
    ap.add_argument("--arms", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"],
                    help="which arms to run ((c) needs (b)'s tables)")
    ap.add_argument("--reuse", action="store_true", help="keep the raw data, tables, models and samples already in "
                    "--work (re-run only the KDE stage, the dating and the metrics)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in a.datasets:
        res = run_dataset(name, Path(a.work) / name, a.n_patients, a.epochs if name == "qh" else a.mimic_epochs,
                          a.preset, None if name == "qh" else a.mimic_synth, a.seed,
                          a.batch_size if name == "qh" else a.mimic_batch_size, a.lr, a.device,
                          a.reuse, tuple(a.arms))
        _print(name, res)


if __name__ == "__main__":
    main()

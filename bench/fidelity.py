"""Fidelity at equal budget: synthehr's HALO (and ConSequence) against PyHealth 2.1.0's HALO, side by side.

    make pyhealth-env                                   # PyHealth in its own venv (.venv-pyhealth), once
    .venv/bin/python bench/fidelity.py --dataset sim    # 3,000 simulated patients (data/fixtures/longitudinal.py)
    .venv/bin/python bench/fidelity.py --dataset mimic3 --epochs 30 --lr 2e-3 --synthetic-factor 20 \
        --longitudinal-factor 1                         # the bundled 100-patient MIMIC-III demo (docs/fidelity.md)
    .venv/bin/python bench/fidelity.py --dataset sim --variants synthehr,no-groups,no-calendar,plain --no-pyhealth

One preprocess gives every tool the same patient-level split (72/8/20, seed 4) and the same visit code sets (the
``codes`` table); PyHealth gets each patient's code lists as JSON and runs in a subprocess of its own venv
(``bench/pyhealth_halo.py``), so nothing is pickled and nothing of synthehr is imported there. Same shape and budget
for all: ``--embed-dim 32 --n-layers 2 --n-heads 2``, ``--epochs 10 --batch-size 32 --lr 3e-3`` (the issue measured
at 3 epochs; ``--epochs 3`` gives that), n_ctx 48, one thread, validation at each epoch end, as many synthetic
patients as training patients (``--synthetic-factor``). How each tool trains within that budget is its own recipe:
PyHealth's ``train_model`` (constant lr, its best-val weights), synthehr's train stage (``--lr-schedule cosine``
with ``--lr`` its peak, ``--keep auto``: TrainArgs, docs/training.md).

Every cohort (real test = the ceiling, PyHealth HALO, each synthehr variant) is scored by the same code,
``synthehr_core.evaluation.fidelity`` against the real training split (HALO's evaluate_datasets.py protocol): per-visit
code prevalence R², within-visit pair R², visits per patient, codes per visit. Visits without clinical codes and
patients left without visits are dropped from every cohort first (PyHealth's decoder drops them). On the simulator
it also prints the planted longitudinal structure (``longitudinal_metrics``) and, for every cohort, the violations
of the rules mined on train (``synthehr_core.rules.mining``), the new families included.

Variants (``--variants``, comma-separated) are synthehr's ablations:

============== ==================================================================================================
``synthehr``   the train stage's defaults: event type, LOS/gap bins, calendar tokens, labels; categorical group heads
``no-groups``  same tokens, no group heads (HI's Bernoulli chain for single-valued variables)
``no-calendar`` no calendar and no LOS/gap bin tokens (event type and labels kept)
``plain``      codes only (one constant event type, no bins, calendar or labels): PyHealth's vocabulary + 1 token
``consequence`` ``synthehr`` + the rules mined on train (kept if they hold on val), enforced in training and sampling
``no-recurrence`` ``synthehr`` without the recurrence offsets (``halo.Recurrence``): history only through h
``no-direct``  ``synthehr`` without the group heads' direct terms (``HaloConfig.group_direct``)
``end-h``      ``synthehr`` with the <end> logit read from the history only (``HaloConfig.end_from_history``)
``cal-end``    ``synthehr`` calibrating only the <end> bias after training (``TrainConfig.calibration="end"``);
               ``cal-off`` not at all; ``consequence-cal-end`` / ``consequence-cal-off`` the same for ConSequence
``norm-ctx16`` ``synthehr`` with n_ctx 16: the loss normaliser B*(n_ctx-1)*V 3.1x smaller (no simulated patient
               has 15 visits), i.e. gradients 3.1x larger against Adam's eps
``recipe-*``   ``synthehr`` with a training recipe of ``RECIPES`` instead of ``--epochs``/``--lr`` (validation at each
               epoch end): the old local defaults (``recipe-const-3ep``, ``recipe-const-10ep``: constant 3e-3) and
               the sized cosine recipe at three peak lrs (``recipe-cosine-1e-3`` ...: auto epochs, auto validation
               period, patience 5) and at 10 epochs (``recipe-cosine-3e-3-10ep``); docs/training.md "Training recipe"
============== ==================================================================================================

Timings are CPU seconds of the process (train, sample) on a shared box; compare them only as ratios in one run.
synthehr samples ``--longitudinal-factor`` (5) x n patients: the fidelity and violation tables read the first n, the
longitudinal table also all of them (rows marked x5), and the sampling time is given per n patients.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from synthehr_core.model.schedule import KEEP, SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
# --variants recipe-NAME: TrainArgs options replacing --epochs/--lr/eval at epoch end (docs/training.md)
_OLD = dict(lr=3e-3, lr_schedule="constant", eval_every=None)          # LOCAL_OVERRIDES before the recipe
_NEW = dict(epochs="auto", lr_schedule="cosine", lr_warmup=0.05, lr_final=0.1, eval_every="auto", patience=5)
RECIPES = {"const-3ep": {**_OLD, "epochs": 3}, "const-10ep": {**_OLD, "epochs": 10},
           **{f"cosine-{lr}": {**_NEW, "lr": float(lr)} for lr in ("1e-3", "2e-3", "3e-3", "5e-3", "1e-2")},
           "cosine-3e-3-10ep": {**_NEW, "lr": 3e-3, "epochs": 10}}   # the recipe at the old 10 epochs' length
PYH_PYTHON = ROOT / ".venv-pyhealth" / "bin" / "python"
log = logging.getLogger("bench.fidelity")


# ---------------------------------------------------------------------------------------------- data
def dataset_config(name: str, work: Path, n_patients: int, seed: int) -> dict:
    from synthehr_core.data.config import load_config
    from synthehr_core.data.fixtures import longitudinal

    if name == "sim":
        raw = longitudinal.write_raw(work / "raw", n_patients, seed)
        return longitudinal.dataset_config(raw)
    cfg = load_config(name).model_dump(mode="json")
    cfg["profiles"] = {"local": {"raw": load_config(name).raw_path("local")}}
    return cfg


def variant_config(cfg: dict, variant: str) -> dict:
    cfg = json.loads(json.dumps(cfg))
    if variant in ("no-calendar", "plain"):
        cfg["calendar"] = {"enabled": False, "tokens": []}
        cfg["visit_bins"] = {}
    if variant == "plain":
        cfg["labels"], cfg["patient_bins"] = [], {}
        if cfg["adapter"] == "tables":
            cfg["adapter_options"]["visits"]["event_type"] = "visit"
    return cfg


def tables_for(cfg: dict, out: Path) -> Path:
    from synthehr_core.data.preprocess import preprocess

    if not (out / "meta.json").exists():
        preprocess(cfg, out, overwrite=True)
    return out


def read(tables: Path, split: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(patients, visits, codes) of one split, visits without codes and patients without visits left out."""
    from synthehr_core.data.schema import read_tables

    p, v, c = read_tables(tables)
    if split is not None:
        p = p[p["split"] == split]
    return coded_only(p, v, c)


def coded_only(p, v, c):
    key = lambda df: df["patient_id"].astype(str) + "#" + df["visit_index"].astype(str)  # noqa: E731
    c = c[c["patient_id"].isin(p["patient_id"])]
    v = v[key(v).isin(set(key(c)))]
    p = p[p["patient_id"].isin(set(v["patient_id"]))]
    return p.reset_index(drop=True), v.reset_index(drop=True), c.reset_index(drop=True)


def visit_lists(p, v, c) -> list[dict]:
    """Each patient's visits as code lists, in visit order (PyHealth's EHRGeneration sample format)."""
    c = c.sort_values(["patient_id", "visit_index", "code"], kind="stable")
    by = c.groupby(["patient_id", "visit_index"], sort=True)["code"].apply(list)
    out: dict[str, list] = {str(pid): [] for pid in p["patient_id"]}
    for (pid, _), codes in by.items():
        out[str(pid)].append([str(x) for x in codes])
    return [{"patient_id": k, "visits": vs} for k, vs in out.items() if vs]


def tables_from_lists(patients: list[dict], like_visits: pd.DataFrame) -> tuple:
    """PyHealth's ``generate`` output -> (patients, visits, codes); visit columns other than the keys are null."""
    prow, vrow, crow = [], [], []
    for i, pt in enumerate(patients):
        pid = f"pyh-{i}"
        vis = [v for v in pt["visits"] if v]
        if not vis:
            continue
        prow.append(pid)
        for vi, codes in enumerate(vis):
            vrow.append((pid, vi))
            crow += [(pid, vi, code) for code in dict.fromkeys(codes)]
    p = pd.DataFrame({"patient_id": prow, "split": "synthetic"})
    v = pd.DataFrame(vrow, columns=["patient_id", "visit_index"])
    for col in like_visits.columns:
        if col not in v.columns:
            v[col] = pd.Series([None] * len(v), dtype=like_visits[col].dtype if like_visits[col].dtype != object
                               else "string")
    c = pd.DataFrame(crow, columns=["patient_id", "visit_index", "code"])
    return p, v[like_visits.columns], c


# ---------------------------------------------------------------------------------------------- runs
def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_pyhealth(train, val, n_samples: int, a, work: Path, like_visits) -> tuple[tuple, dict]:
    inp, out = work / "pyhealth_in.json", work / "pyhealth_out.json"
    inp.write_text(json.dumps({"train": visit_lists(*train), "val": visit_lists(*val)}))
    cmd = [a.pyhealth_python, str(ROOT / "bench" / "pyhealth_halo.py"), str(inp), str(out),
           "--embed-dim", str(a.embed_dim), "--n-layers", str(a.n_layers), "--n-heads", str(a.n_heads),
           "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--lr", str(a.pyhealth_lr or a.lr),
           "--n-samples", str(n_samples), "--seed", str(a.seed), "--threads", "1"]
    key = work / "pyhealth_key.json"  # --reuse-pyhealth: the same input and arguments as the kept output
    ident = json.dumps({"args": cmd[4:], "input": hash_text(inp.read_text())})  # not the paths: work dirs may move
    if a.reuse_pyhealth and out.exists() and key.exists() and key.read_text() == ident:
        log.warning("PyHealth: reusing %s (same input and arguments)", out)
        d = json.loads(out.read_text())
        d["seconds"]["reused"] = True
        return tables_from_lists(d["patients"], like_visits), d
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HOME": str(work)}
    c0, t0 = child_cpu(), time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"PyHealth HALO failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    d = json.loads(out.read_text())
    d["seconds"]["cpu_total"] = child_cpu() - c0
    d["seconds"]["wall_total"] = time.perf_counter() - t0
    out.write_text(json.dumps(d))
    key.write_text(ident)
    return tables_from_lists(d["patients"], like_visits), d


def hash_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def mined_rules(tables: Path):
    """Rules mined on train and kept only where they hold on val (mining.mine_rules + validate_on)."""
    from synthehr_core.data.schema import read_tables
    from synthehr_core.data.vocab import Vocab
    from synthehr_core.rules import mining

    vocab = Vocab.load(tables / "vocab.json")
    p, v, c = read_tables(tables)
    return mining.mine_rules(p, v, c, vocab, mining.Thresholds(), split="train", val_split="val"), vocab


def run_synthehr(tables: Path, variant: str, n_samples: int, a, work: Path) -> tuple[tuple, dict]:
    import torch

    from synthehr_core.model.sampling import sample_to_dir
    from synthehr_core.model.train import train_to_dir
    from synthehr_core.rules.ruleset import save_rules

    torch.set_num_threads(1)
    opts = dict(model_type="halo", preset="tiny", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                lr_schedule=a.lr_schedule, keep=a.keep,
                n_ctx=16 if variant == "norm-ctx16" else 48, eval_every=None, progress=False,
                group_heads=variant != "no-groups", recurrence=variant != "no-recurrence",
                calibration=next((c for c in ("end", "off") if variant.endswith(f"cal-{c}")), "full"),
                n_embd=a.embed_dim, n_layer=a.n_layers, n_head=a.n_heads)
    overrides = {}
    if a.recurrence_gain is not None and variant != "no-recurrence":
        overrides["recurrence"] = a.recurrence_gain
    if variant == "no-direct":
        overrides["group_direct"] = False
    if variant in ("end-h", "consequence-end-h"):
        overrides["end_from_history"] = True
    if overrides:
        opts["model_overrides"] = overrides
    if variant.startswith("recipe-"):
        if variant[len("recipe-"):] not in RECIPES:
            raise SystemExit(f"--variants {variant}: no such recipe; the recipes are "
                             f"{[f'recipe-{k}' for k in RECIPES]}.")
        opts.update(RECIPES[variant[len("recipe-"):]])
    rules_dir = None
    if variant.startswith("consequence"):
        rules, _ = mined_rules(tables)
        rules_dir = work / f"rules-{variant}"
        rules_dir.mkdir(parents=True, exist_ok=True)
        save_rules(rules_dir / "rules.json", rules)
        opts["model_type"] = "consequence"
    model_dir, out_dir = work / f"model-{variant}", work / f"synth-{variant}"
    c0, t0 = time.process_time(), time.perf_counter()
    info = train_to_dir(tables, model_dir, rules_dir=rules_dir, device="cpu", **opts)
    c1, t1 = time.process_time(), time.perf_counter()
    sample_to_dir(model_dir, out_dir, seed=a.seed, n_patients=n_samples * a.longitudinal_factor, device="cpu",
                  overwrite=True)
    c2, t2 = time.process_time(), time.perf_counter()
    from synthehr_core.data.schema import read_tables

    f = a.longitudinal_factor  # sampling time is linear in the patients: report it per n, as PyHealth's
    sec = {"train": c1 - c0, "sample": (c2 - c1) / f, "wall_train": t1 - t0, "wall_sample": (t2 - t1) / f,
           "best_val": info.get("best_val_loss"), "steps": info.get("steps"),
           "stopped_early": info.get("stopped_early")}
    return coded_only(*read_tables(out_dir)), sec


def first_patients(cohort: tuple, n: int) -> tuple:
    """The first ``n`` patients of a cohort (in sampling order) and their visits and codes."""
    p, v, c = cohort
    keep = set(p["patient_id"].iloc[:n])
    return (p[p["patient_id"].isin(keep)].reset_index(drop=True), v[v["patient_id"].isin(keep)].reset_index(drop=True),
            c[c["patient_id"].isin(keep)].reset_index(drop=True))


# ---------------------------------------------------------------------------------------------- scoring
def score(real_train, cohorts: dict[str, tuple]) -> pd.DataFrame:
    from synthehr_core.evaluation.cohort import Cohort, make_space
    from synthehr_core.evaluation.fidelity import code_statistics, compare_codes

    space = make_space([real_train, *cohorts.values()], ())
    real = Cohort("real train", *real_train, space)
    rs = code_statistics(real)
    rows = {"real train": {"code R2": 1.0, "pair R2": 1.0, "visits/patient": real.n_visits_per_patient.mean(),
                           "codes/visit": np.diff(real.X.indptr).mean(), "patients": real.n_patients}}
    for name, t in cohorts.items():
        c = Cohort(name, *t, space)
        m = compare_codes(rs, code_statistics(c))
        rows[name] = {"code R2": m["fidelity.code_visit.r2"], "pair R2": m["fidelity.pair_visit.r2"],
                      "visits/patient": c.n_visits_per_patient.mean() if c.n_patients else float("nan"),
                      "codes/visit": np.diff(c.X.indptr).mean() if c.n_visits else float("nan"),
                      "patients": c.n_patients}
    return pd.DataFrame(rows).T


def longitudinal(cohorts: dict[str, tuple]) -> pd.DataFrame:
    from synthehr_core.data.fixtures.longitudinal import longitudinal_metrics

    keep = ("persistence", "stage_regressions_per_1000", "stage_multi_per_1000", "elective_weekend",
            "weekday_share.ELECTIVE.Mon", "weekday_share.ELECTIVE.Sat", "weekday_share.EMERGENCY.Sat")
    out, shares = {}, {}
    for name, (_, v, c) in cohorts.items():
        m = longitudinal_metrics(v, c)
        out[name] = {k: m.get(k, float("nan")) for k in keep}
        shares[name] = pd.Series({k: x for k, x in m.items() if k.startswith("weekday_share.")}, dtype=float)
    df = pd.DataFrame(out).T
    real = shares[next(iter(cohorts))]  # the first cohort is the real training split
    # event type x weekday: the largest gap over every (type, day) cell, percentage points (nan: no event types)
    df["weekday max |gap| pp"] = pd.Series({k: float((s.reindex(real.index) - real).abs().max()) if len(s) else
                                            float("nan") for k, s in shares.items()})
    df["persistence gap"] = df["persistence"] - df.loc[next(iter(cohorts)), "persistence"]
    return df


def violations(tables: Path, cohorts: dict[str, tuple]) -> pd.DataFrame:
    from synthehr_core.rules.mining import check_violations

    rules, vocab = mined_rules(tables)
    out = {}
    for name, (p, v, c) in cohorts.items():
        r = check_violations(rules, p, v, c, vocab)
        row = {f: n for f, n in r["violations_by_family"].items()}
        row["patients with any / 1000"] = 1000.0 * (1 - r["percent_valid"] / 100.0)
        out[name] = row
    df = pd.DataFrame(out).T
    df.loc["rules mined", :] = pd.Series({f: sum(r.family == f for r in rules) for f in df.columns})
    return df


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="sim", help="sim (the longitudinal simulator) or a bundled config (mimic3)")
    ap.add_argument("--n-patients", type=int, default=3000, help="simulated patients (--dataset sim)")
    ap.add_argument("--variants", default="synthehr,consequence")
    ap.add_argument("--no-pyhealth", action="store_true")
    ap.add_argument("--pyhealth-python", default=str(PYH_PYTHON), help="python of the PyHealth venv")
    ap.add_argument("--pyhealth-lr", type=float, default=None, help="PyHealth's Adam lr (default: --lr)")
    ap.add_argument("--reuse-pyhealth", action="store_true",
                    help="with --work of an earlier run: reuse its PyHealth cohort when the input and arguments are "
                         "the same (its times are then that run's, not comparable with this one's)")
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr-schedule", default="cosine", choices=SCHEDULES,
                    help="synthehr's schedule (TrainArgs.lr_schedule; --lr is its peak); PyHealth's trainer has none")
    ap.add_argument("--keep", default="auto", choices=KEEP,
                    help="synthehr's published weights (TrainArgs.keep); PyHealth keeps its best-val weights")
    ap.add_argument("--synthetic-factor", type=int, default=1,
                    help="every tool samples this many times the training patients for the fidelity table (1 = the "
                         "issue's protocol; on the 72-patient demo one cohort's visits/patient has a ~4 %% standard "
                         "error, so --synthetic-factor 20 measures the models rather than that noise)")
    ap.add_argument("--longitudinal-factor", type=int, default=5,
                    help="synthehr cohorts are sampled this many times the training patients; the longitudinal table "
                         "reads them all (its shares then carry the model's error, not the sampling noise of one "
                         "cohort), the fidelity and violation tables the first n")
    ap.add_argument("--recurrence-gain", type=float, default=None,
                    help="HaloConfig.recurrence for the variants that have it (default: the train stage's)")
    ap.add_argument("--work", default=None, help="keep tables and models here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the tables as JSON here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    base_cfg = dataset_config(a.dataset, work, a.n_patients, a.seed)
    full = tables_for(base_cfg, work / "tables-full")
    real_train, real_val, real_test = (read(full, s) for s in ("train", "val", "test"))
    n = len(real_train[0])
    n_synth = n * a.synthetic_factor
    print(f"# {a.dataset}: {n} train / {len(real_val[0])} val / {len(real_test[0])} test patients; "
          f"shape {a.embed_dim}-dim x {a.n_layers} layers x {a.n_heads} heads; {a.epochs} epochs, batch "
          f"{a.batch_size}, lr {a.lr}; one thread; {n_synth} synthetic patients per tool; load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    cohorts: dict[str, tuple] = {"real test (ceiling)": real_test}
    times: dict[str, dict] = {}
    large: dict[str, tuple] = {}  # the synthehr cohorts at --longitudinal-factor x n patients
    if not a.no_pyhealth:
        if not Path(a.pyhealth_python).exists():
            raise SystemExit(f"{a.pyhealth_python} is missing: run `make pyhealth-env` first (or pass --no-pyhealth).")
        cohorts["PyHealth HALO"], d = run_pyhealth(real_train, real_val, n_synth, a, work, real_train[1])
        times["PyHealth HALO"] = d["seconds"]
        print(f"PyHealth {d['versions']}: V={d['vocab_size']}, {d['n_params']} params, {d['seconds']}", flush=True)
    for variant in [x for x in a.variants.split(",") if x]:
        tables = tables_for(variant_config(base_cfg, variant), work / f"tables-{variant}") \
            if variant in ("no-calendar", "plain") else full  # only these two change the tokens
        big, times[f"synthehr {variant}"] = run_synthehr(tables, variant, n_synth, a, work)
        large[f"synthehr {variant}"] = big
        cohorts[f"synthehr {variant}"] = first_patients(big, n_synth)
        print(f"synthehr {variant}: {times[f'synthehr {variant}']}", flush=True)
    table = score(real_train, cohorts)
    real_vpp = table.loc["real train", "visits/patient"]
    table["vpp err %"] = 100.0 * (table["visits/patient"] - real_vpp) / real_vpp
    table["best val"] = pd.Series({k: v.get("best_val") for k, v in times.items()})
    table["steps"] = pd.Series({k: v.get("steps") for k, v in times.items()})
    table["train CPU s"] = pd.Series({k: v.get("train") for k, v in times.items()})
    table["sample CPU s"] = pd.Series({k: v.get("sample") for k, v in times.items()})
    pd.set_option("display.width", 200)
    print("\n## fidelity against the real training split\n")
    print(table.round(4).to_string())
    out = {"fidelity": table.round(6).to_dict(orient="index"), "times": times}
    if a.dataset == "sim":
        lon = longitudinal({"real train": real_train, **cohorts, **{f"{k} (x{a.longitudinal_factor})": x
                                                                    for k, x in large.items()}})
        print("\n## longitudinal structure (persistence share; per-1000 patients; weekend share / percent)\n")
        print(lon.round(4).to_string())
        out["longitudinal"] = lon.round(6).to_dict(orient="index")
    vio = violations(full, {"real test (ceiling)": real_test, **{k: v for k, v in cohorts.items()
                                                                if k != "real test (ceiling)"}})
    print("\n## violations of the rules mined on train (kept if they hold on val)\n")
    print(vio.fillna(0).astype(float).round(1).to_string())
    out["violations"] = vio.fillna(0).to_dict(orient="index")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()

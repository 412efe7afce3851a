"""Benchmark the evaluate stage: ``time_evaluate_to_dir`` on toy-style real and synthetic cohorts.

    .venv/bin/python bench/evaluate.py                  # 10k and 100k patients; 13 codes (toy) and 2000 (Zipf)
    .venv/bin/python bench/evaluate.py --sizes 100000 --codes 13

Inputs are made by a vectorised, seeded generator with the structure of ``synthehr_core.data.toy`` (a label, a binned
age, within-visit implication, persistent codes, a code excluded by a label; ``toy.make_toy_tables`` loops in
Python and is quadratic at this size) and written to parquet outside the timed region. Prints one row per
(size, vocabulary): total seconds and seconds per section.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthehr_core import storage
from synthehr_core.data.schema import bin_values, write_tables
from synthehr_core.data.toy import AGE_EDGES, GAP_EDGES, LOS_EDGES, toy_vocab

SECTIONS = ("read", "load", "fidelity", "values", "rules", "privacy", "utility", "report")


def make_cohort(n_patients: int, seed: int, n_codes: int = 13, max_codes: int = 4, synthetic: bool = False,
                max_visits: int = 6):
    """Toy-style canonical (patients, visits, codes), vectorised. ``n_codes`` > 13 draws codes Zipf-like."""
    rng = np.random.default_rng(seed)
    tag = "syn-" if synthetic else ""
    pids = np.char.add(tag, np.arange(10_000, 10_000 + n_patients).astype(str)).astype(object)
    sex = rng.choice(np.array(["F", "M"], dtype=object), n_patients)
    split = (np.full(n_patients, "synthetic", dtype=object) if synthetic
             else rng.choice(np.array(["train", "val", "test"], dtype=object), n_patients, p=[0.72, 0.08, 0.2]))
    patients = pd.DataFrame({"patient_id": pids, "split": split, "sex": sex,
                             "age": rng.uniform(18, 95, n_patients).round(1)})
    patients["age_binned"] = bin_values(patients["age"], AGE_EDGES).labels

    nv = np.minimum(rng.geometric(0.5, n_patients), max_visits)
    vp = np.repeat(np.arange(n_patients), nv)
    first = np.r_[0, np.cumsum(nv)[:-1]]
    vi = np.arange(len(vp)) - first[vp]
    gap = np.where(vi > 0, rng.gamma(2.0, 60.0, len(vp)), np.nan)
    offset = pd.Series(np.nan_to_num(gap)).groupby(vp).cumsum().to_numpy()
    visits = pd.DataFrame({"patient_id": pids[vp], "visit_index": vi.astype("int32"), "start_offset_days": offset,
                           "event_type": "inpatient", "los_days": rng.gamma(2.0, 3.0, len(vp)), "gap_days": gap})
    visits["los_days_binned"] = bin_values(visits["los_days"], LOS_EDGES).labels
    visits["gap_days_binned"] = bin_values(visits["gap_days"], GAP_EDGES).labels

    names = np.array([f"dx:{c}" for c in ("4019", "25000", "4280", "42731", "5849", "03819", "V4581", "2724",
                                          "51881", "5990")] + ["px:3893", "px:9604", "px:9671"]
                     + [f"dx:{9000 + i}" for i in range(max(0, n_codes - 13))], dtype=object)
    weight = 1.0 / np.arange(1, len(names) + 1) if n_codes > 13 else np.ones(len(names))
    k = rng.integers(1, max_codes + 1, len(vp))
    drawn = rng.choice(len(names), size=(len(vp), max_codes), p=weight / weight.sum())   # with replacement
    rows = np.repeat(np.arange(len(vp)), max_codes)
    take = (np.arange(max_codes)[None, :] < k[:, None]).ravel()
    r, c = rows[take], drawn.ravel()[take]
    M = np.zeros((len(vp), 13), bool)                                    # the toy's structured codes, dense
    M[r[c < 13], c[c < 13]] = True
    M[:, 1] |= M[:, 0]                                                   # 4019 -> 25000 within a visit
    chronic = rng.random(n_patients) < 0.3
    seen = pd.DataFrame(M[:, [2]]).groupby(vp).cummax().to_numpy().ravel()
    M[:, 2] |= chronic[vp] | seen                                        # 4280 persists once seen
    M[sex[vp] == "M", 6] = False                                         # V4581 never with sex=M
    r13, c13 = np.nonzero(M)
    key = np.unique(np.r_[r13 * len(names) + c13, (r * len(names) + c)[c >= 13]])
    r, c = key // len(names), key % len(names)
    codes = pd.DataFrame({"patient_id": pids[vp[r]], "visit_index": vi[r].astype("int32"), "code": names[c]})
    return patients, visits, codes


def write_cohort(out_dir: Path, tables) -> None:
    with storage.atomic_dir(out_dir, overwrite=True) as tmp:
        write_tables(tmp, *tables)
        toy_vocab(tables[2], tables[0]).save(storage.join(tmp, "vocab.json"))


def time_evaluate_to_dir(n_patients: int, n_codes: int, work: Path, privacy_sample: int = 2000) -> dict:
    from synthehr_core.evaluation.stage import evaluate_to_dir

    max_codes = 4 if n_codes <= 13 else 14
    real, synth = work / f"real-{n_patients}-{n_codes}", work / f"syn-{n_patients}-{n_codes}"
    write_cohort(real, make_cohort(n_patients, 0, n_codes, max_codes))
    write_cohort(synth, make_cohort(n_patients, 1, n_codes, max_codes, synthetic=True))
    rules = None
    try:  # rules mined on the real train split (H2's miner), so the rules section is timed too
        from synthehr_core.rules.mining import mine_rules_to_dir

        mine_rules_to_dir(real, work / f"rules-{n_patients}-{n_codes}")
        rules = work / f"rules-{n_patients}-{n_codes}" / "rules.json"
    except ImportError:
        pass
    t = time.perf_counter()
    out = evaluate_to_dir(real, synth, work / f"eval-{n_patients}-{n_codes}", rules_path=rules, seed=0,
                          privacy_sample=privacy_sample)
    wall = time.perf_counter() - t
    return {"wall": wall, **out["timings_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--codes", type=int, nargs="+", default=[13, 2000])
    ap.add_argument("--privacy-sample", type=int, default=2000)
    args = ap.parse_args()
    cols = ("wall", *SECTIONS)
    print(f"{'patients':>9} {'codes':>6} " + " ".join(f"{c:>9}" for c in cols) + "   (seconds)")
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        for n_codes in args.codes:
            for n in args.sizes:
                r = time_evaluate_to_dir(n, n_codes, Path(tmp), args.privacy_sample)
                print(f"{n:>9} {n_codes:>6} " + " ".join(f"{r[c]:>9.2f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()

"""A tiny, seeded, canonical-schema cohort for tests and benchmarks (no raw data needed).

It has structure worth learning: a label (``sex``), a patient-level binned ``age``, visit-level binned
``los_days`` and ``gap_days``, an always-together code pair, a persistent chronic code and a code that never
occurs with one label value, so rule mining, fidelity metrics and KDE all have something to find.
"""
from __future__ import annotations

import pandas as pd

from .. import storage
from ..randomness import numpy_rng
from .schema import bin_values, write_tables
from .vocab import Vocab, build_vocab

AGE_EDGES = [18.0, 40.0, 60.0, 80.0, 100.0]
LOS_EDGES = [0.0, 2.0, 5.0, 10.0, 30.0, 200.0]
GAP_EDGES = [0.0, 30.0, 90.0, 365.0, 5000.0]
CODES = [f"dx:{c}" for c in ("4019", "25000", "4280", "42731", "5849", "03819", "V4581", "2724", "51881", "5990")] \
    + [f"px:{c}" for c in ("3893", "9604", "9671")]


def make_toy_tables(n_patients: int = 200, seed: int = 0, max_visits: int = 6):
    """Return (patients, visits, codes) DataFrames in canonical form."""
    rng = numpy_rng(seed)
    pids = [f"{10000 + i}" for i in range(n_patients)]
    sex = rng.choice(["F", "M"], n_patients)
    age = rng.uniform(18, 95, n_patients).round(1)
    split = rng.choice(["train", "val", "test"], n_patients, p=[0.72, 0.08, 0.2])
    patients = pd.DataFrame({"patient_id": pids, "split": split, "sex": sex, "age": age})
    patients["age_binned"] = bin_values(patients["age"], AGE_EDGES).labels

    vrows, crows = [], []
    for pid, s in zip(pids, sex):
        n = int(min(max_visits, 1 + rng.geometric(0.5) - 1))
        offset = 0.0
        chronic = rng.random() < 0.3
        seen: set[str] = set()
        for v in range(n):
            gap = None if v == 0 else float(rng.gamma(2.0, 60.0))
            if gap is not None:
                offset += gap
            los = float(rng.gamma(2.0, 3.0))
            vrows.append((pid, v, offset, "inpatient", los, gap))
            k = rng.integers(1, 5)
            chosen = set(rng.choice(len(CODES), k, replace=False).tolist())
            codes = {CODES[i] for i in chosen}
            if "dx:4019" in codes:
                codes.add("dx:25000")        # within-visit implication 4019 -> 25000
            if chronic or "dx:4280" in seen:
                codes.add("dx:4280")         # persistence once seen
            if s == "M":
                codes.discard("dx:V4581")    # never with sex=M
            seen |= codes
            crows += [(pid, v, c) for c in sorted(codes)]
    visits = pd.DataFrame(vrows, columns=["patient_id", "visit_index", "start_offset_days", "event_type",
                                          "los_days", "gap_days"])
    visits["visit_index"] = visits["visit_index"].astype("int32")
    visits["los_days_binned"] = bin_values(visits["los_days"], LOS_EDGES).labels
    visits["gap_days_binned"] = bin_values(visits["gap_days"], GAP_EDGES).labels
    codes = pd.DataFrame(crows, columns=["patient_id", "visit_index", "code"])
    codes["visit_index"] = codes["visit_index"].astype("int32")
    return patients, visits, codes


def toy_vocab(codes: pd.DataFrame, patients: pd.DataFrame) -> Vocab:
    return build_vocab(["inpatient"], {"los_days": LOS_EDGES, "gap_days": GAP_EDGES}, [], codes["code"].unique(),
                       {"sex": sorted(patients["sex"].unique())}, {"age": AGE_EDGES}, ["dx", "px"])


def write_toy_tables(out_dir, n_patients: int = 200, seed: int = 0) -> Vocab:
    """Write a complete tables directory (tables, vocab.json, meta.json) for tests."""
    patients, visits, codes = make_toy_tables(n_patients, seed)
    vocab = toy_vocab(codes, patients)
    with storage.atomic_dir(out_dir, overwrite=True) as tmp:
        write_tables(tmp, patients, visits, codes)
        vocab.save(storage.join(tmp, "vocab.json"))
        storage.write_json(storage.join(tmp, "meta.json"),
                           {"dataset": "toy", "seed": seed, "n_patients": len(patients), "n_visits": len(visits),
                            "n_codes": len(codes), "labels": ["sex", "age"],
                            "visit_binned": ["los_days", "gap_days"], "patient_binned": ["age"]})
    return vocab

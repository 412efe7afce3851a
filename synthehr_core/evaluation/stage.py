"""The evaluate stage: real tables (train + held-out test) vs a synthetic cohort -> metrics, report, summary.

``evaluate`` returns everything in memory; ``evaluate_to_dir`` writes ``metrics.json`` (a flat
``{name: float}`` for KFP ``Metrics``), ``report.html`` (self-contained, plots as base64 PNG) and ``summary.md``.
Metric definitions: docs/evaluation.md.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import storage
from ..data.schema import SEASONS, SYNTHETIC_SPLIT, read_tables
from ..data.vocab import Vocab
from ..errors import ConfigError, DataError
from ..rules.mining import check_violations
from ..rules.ruleset import load_rules
from .attacks import privacy
from .cohort import Cohort, label_columns, make_space
from .fidelity import code_statistics, fidelity
from .mixing import category_mixing
from .temporal import temporal_section
from .utility import utility
from .values import values

MIA_ALARM = 0.6        # membership-inference accuracy above this is flagged (0.5 = no leakage)
R2_ALARM = 0.5         # unigram R² below this is flagged

Tables = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"evaluate: {name} must be an int, got {value!r} ({type(value).__name__}). "
                        f"Pass e.g. {name}={max(lo, 0)}.")
    if value < lo:
        raise ConfigError(f"evaluate: {name} must be >= {lo}, got {value}.")
    return int(value)


def _load_vocab(tables_dir) -> Vocab | None:
    path = storage.join(tables_dir, "vocab.json")
    return Vocab.load(path) if storage.exists(path) else None


def rules_metrics(rules_path, synth: Tables, vocab: Vocab | None, baseline: Tables | None = None) -> tuple[dict, list[str], dict]:
    """Rule violations of the synthetic cohort (and of the held-out real cohort as a reference) with
    ``rules.mining.check_violations``; a note instead when the real tables have no vocabulary to resolve tokens."""
    if vocab is None:
        return {}, ["rules: not checked: the real tables directory has no vocab.json to resolve rule tokens."], {}
    rules = load_rules(rules_path)
    res = check_violations(rules, *synth, vocab)
    m = {"rules.n_rules": float(res["n_rules"]), "rules.total_violations": float(res["total_violations"]),
         "rules.static_violations": float(res["static_violations"]),
         "rules.temporal_violations": float(res["temporal_violations"]),
         "rules.percent_valid": float(res["percent_valid"])}
    m.update({f"rules.violations.{f}": float(v) for f, v in res["violations_by_family"].items()})
    if baseline is not None and len(baseline[0]):
        base = check_violations(rules, *baseline, vocab)
        m["rules.baseline_test.total_violations"] = float(base["total_violations"])
        m["rules.baseline_test.percent_valid"] = float(base["percent_valid"])
    return m, [], res


def _flags(m: dict[str, float]) -> list[str]:
    flags = []
    if m.get("privacy.exact_copies", 0) > 0:
        flags.append(f"{int(m['privacy.exact_copies'])} synthetic records ({100 * m['privacy.exact_copy_rate']:.2f}%) "
                     "are exact copies of training records (labels and every visit's code set). For reference, "
                     f"{int(m.get('privacy.exact_copies_of_test', 0))} equal a held-out test record and "
                     f"{100 * m.get('privacy.test_in_train_rate', 0):.2f}% of test records equal a training record "
                     "(short, common records recur by chance).")
    if m.get("privacy.mia.accuracy", 0.5) > MIA_ALARM:
        flags.append(f"membership-inference accuracy {m['privacy.mia.accuracy']:.3f} > {MIA_ALARM} "
                     "(0.5 = no leakage): training records sit closer to synthetic ones than held-out records do.")
    for f in ("code_record", "code_visit"):
        r2 = m.get(f"fidelity.{f}.r2")
        if r2 is not None and r2 < R2_ALARM:
            flags.append(f"{f} unigram R² {r2:.3f} < {R2_ALARM}: code frequencies do not match the training data.")
    if m.get("rules.total_violations", 0) > 0:
        flags.append(f"{int(m['rules.total_violations'])} rule violations; {m['rules.percent_valid']:.2f}% of "
                     "synthetic patients are valid.")
    return flags


def evaluate_tables(real: Tables, synthetic: Tables, vocab: Vocab | None = None, rules_path=None, seed: int = 0,
                    privacy_sample: int = 2000, utility_sample: int = 5000, hemisphere: str = "north") -> dict:
    """``evaluate`` on in-memory canonical tables (real with a ``split`` column, train and test); ``hemisphere``
    (the dataset config's ``calendar.hemisphere``) picks the winter and summer months of the temporal metrics."""
    seed = _check_int("seed", seed, 0)
    if hemisphere not in SEASONS:
        raise ConfigError(f"evaluate: hemisphere must be one of {sorted(SEASONS)}, got {hemisphere!r} "
                          "(calendar.hemisphere in the dataset config).")
    privacy_sample = _check_int("privacy_sample", privacy_sample, 2)
    utility_sample = _check_int("utility_sample", utility_sample, 10)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    notes: list[str] = []
    rp, rv, rc = real
    sp_, sv, sc = synthetic
    splits = rp["split"].value_counts().to_dict()
    if not splits.get("train"):
        raise DataError(f"real tables: no patients with split='train' (splits found: {splits}). Evaluate against "
                        "the preprocess output, whose patients carry train/val/test splits.")
    if not len(sp_):
        raise DataError("synthetic tables: no patients. Point --synthetic at a sampled cohort.")
    other = set(sp_["split"].dropna().unique()) - {SYNTHETIC_SPLIT}
    if other:
        notes.append(f"synthetic tables carry split values {sorted(other)} besides 'synthetic'; all rows are used.")
    if not splits.get("test"):
        notes.append("real tables have no 'test' split: held-out baselines, privacy attacks and utility are skipped.")
    cols = label_columns(rp, sp_, vocab)
    space = make_space([real, synthetic], cols)
    train = Cohort("real train", rp[rp["split"] == "train"], rv, rc, space)
    test = Cohort("real test", rp[rp["split"] == "test"], rv, rc, space)
    synth = Cohort("synthetic", sp_, sv, sc, space)
    empty = int((synth.n_visits_per_patient == 0).sum())
    if empty:
        notes.append(f"{empty} synthetic patients have no visits (HALO drops them before evaluation; kept here).")
    timings["load"] = time.perf_counter() - t0

    metrics: dict[str, float] = {"n.real_train": float(train.n_patients), "n.real_test": float(test.n_patients),
                                 "n.synthetic": float(synth.n_patients)}
    t = time.perf_counter()
    fid = fidelity(train, synth, code_statistics(train), baseline=test)
    timings["fidelity"] = time.perf_counter() - t
    t = time.perf_counter()
    val = values(train, synth)
    timings["values"] = time.perf_counter() - t
    t = time.perf_counter()
    winter, summer = SEASONS[hemisphere]
    tem = temporal_section(train.visits, synth.visits, winter, summer)      # aggregate series (docs/temporal.md)
    timings["temporal"] = time.perf_counter() - t
    t = time.perf_counter()
    rules_res: dict = {}
    if rules_path is not None:
        tp = rp[rp["split"] == "test"]
        test_tables = (tp, rv[rv["patient_id"].isin(tp["patient_id"])], rc[rc["patient_id"].isin(tp["patient_id"])])
        rm, rn, rules_res = rules_metrics(rules_path, synthetic, vocab, test_tables)
        metrics.update(rm)
        notes += rn
    timings["rules"] = time.perf_counter() - t
    t = time.perf_counter()
    priv = privacy(train, test, synth, privacy_sample, seed)
    timings["privacy"] = time.perf_counter() - t
    t = time.perf_counter()
    util = utility(train, test, synth, utility_sample, seed)
    timings["utility"] = time.perf_counter() - t
    mix = category_mixing(rc[rc["patient_id"].isin(rp.loc[rp["split"] == "train", "patient_id"])], sc)  # {} unless versioned
    for part in (fid, val, tem, priv, util, mix):
        metrics.update(part["metrics"])
        notes += part.get("notes", [])
    dropped = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if math.isfinite(v)}
    if dropped:
        notes.append(f"undefined (not finite) and left out of metrics.json: {dropped}.")
    timings["total"] = time.perf_counter() - t0
    return {"metrics": metrics, "flags": _flags(metrics), "notes": notes, "timings_s": timings,
            "params": {"seed": seed, "privacy_sample": privacy_sample, "utility_sample": utility_sample,
                       "hemisphere": hemisphere,
                       "rules_path": None if rules_path is None else str(rules_path), "label_columns": list(cols)},
            "details": {"fidelity": fid, "values": val, "privacy": priv, "utility": util, "rules": rules_res,
                        "temporal": tem}}


def evaluate(real_dir: str | Path, synthetic_dir: str | Path, rules_path: str | Path | None = None, seed: int = 0,
             privacy_sample: int = 2000, utility_sample: int = 5000) -> dict:
    """Evaluate a synthetic tables directory against the real one (train split as reference, test as held out).

    Returns ``{"metrics": {name: float}, "flags": [...], "notes": [...], "timings_s": {...}, "params": {...},
    "details": {...}}``; ``details`` holds the tables and samples the report draws.
    """
    t = time.perf_counter()
    real = read_tables(real_dir)
    synthetic = read_tables(synthetic_dir)
    vocab = _load_vocab(real_dir) or _load_vocab(synthetic_dir)
    meta_path = storage.join(real_dir, "meta.json")
    calendar = (storage.read_json(meta_path).get("calendar") or {}) if storage.exists(meta_path) else {}
    read_s = time.perf_counter() - t
    res = evaluate_tables(real, synthetic, vocab, rules_path, seed, privacy_sample, utility_sample,
                          hemisphere=calendar.get("hemisphere", "north"))
    res["params"].update(real_dir=str(real_dir), synthetic_dir=str(synthetic_dir))
    res["timings_s"] = {"read": read_s, **res["timings_s"], "total": res["timings_s"]["total"] + read_s}
    return res


def evaluate_to_dir(real_dir: str | Path, synthetic_dir: str | Path, out_dir: str | Path,
                    rules_path: str | Path | None = None, seed: int = 0, privacy_sample: int = 2000,
                    utility_sample: int = 5000, overwrite: bool = False) -> dict:
    """``evaluate`` and write ``metrics.json``, ``report.html`` and ``summary.md`` into ``out_dir``.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``. All arguments are plain strings/ints, so the
    CLI (``synthehr evaluate --real DIR --synthetic DIR --out DIR``) can pass them straight through.

    Returns a small JSON-able dict: the flat metrics, the flags and the section timings.
    """
    from .report import render_html, render_markdown

    res = evaluate(real_dir, synthetic_dir, rules_path, seed, privacy_sample, utility_sample)
    t = time.perf_counter()
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        storage.write_json(storage.join(tmp, "metrics.json"), res["metrics"])
        storage.write_text(storage.join(tmp, "report.html"), render_html(res))
        storage.write_text(storage.join(tmp, "summary.md"), render_markdown(res))
    res["timings_s"]["report"] = time.perf_counter() - t
    res["timings_s"]["total"] += res["timings_s"]["report"]
    return {"metrics": res["metrics"], "flags": res["flags"], "timings_s": res["timings_s"],
            "out_dir": str(out_dir)}

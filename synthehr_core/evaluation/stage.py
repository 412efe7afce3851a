"""The evaluate stage: real tables (train + held-out test) vs a synthetic cohort -> metrics, report, summary.

``evaluate`` returns everything in memory; ``evaluate_to_dir`` writes ``metrics.json`` (a flat
``{name: float}`` for KFP ``Metrics``), ``verdicts.json`` (the release decision under the policy, policy.py),
``provenance.json``, ``report.html`` (self-contained, plots as base64 PNG) and ``summary.md``.
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
from ..randomness import numpy_rng
from .attacks import privacy
from .cohort import Cohort, label_columns, make_space
from .fidelity import code_statistics, fidelity, headline_intervals
from .longitudinal import longitudinal
from .mixing import category_mixing
from .peers import peers as peer_metrics
from .policy import Policy, check_fail_on, load_policy, verdicts
from .provenance import provenance as provenance_block
from .smallcells import small_cell_section
from .temporal import temporal_section
from .utility import utility
from .values import values

PRIVACY_LIMIT = 5000   # records per group the attacks use at most (HALO attacks 7,500 train + 7,500 test)
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


def rules_metrics(rules_path, synth: Tables, vocab: Vocab | None, baseline: Tables | None = None,
                  held_out: Tables | None = None) -> tuple[dict, list[str], dict]:
    """Rule violations of the synthetic cohort (and of the held-out real cohort as a reference) with
    ``rules.mining.check_violations``; a note instead when the real tables have no vocabulary to resolve tokens.

    ``held_out`` (the real val split) judges the rules: those that fire there and are never violated *hold out*;
    those violated there are spurious (mined from chance patterns of the training split); those that never fire are
    untested. ``rules.heldout.*`` counts the synthetic violations of the rules that hold out: the headline."""
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
    notes = []
    if held_out is not None and len(held_out[0]) and rules:
        from ..rules.mining import _rule_outcomes, build_rows   # per-rule counts (check_violations sums them)

        fired, viol, _ = _rule_outcomes(rules, build_rows(*held_out, vocab), vocab)
        hold = [r for r, f, v in zip(rules, fired, viol) if f > 0 and v == 0]
        m["rules.heldout.n_rules"] = float(len(hold))
        m["rules.heldout.n_spurious"] = float(int((viol > 0).sum()))
        m["rules.heldout.n_untested"] = float(int((fired == 0).sum()))
        if hold:
            h = check_violations(hold, *synth, vocab)
            m["rules.heldout.total_violations"] = float(h["total_violations"])
            m["rules.heldout.percent_valid"] = float(h["percent_valid"])
            res["heldout_top_violated"] = [{**t, "rule": rules.index(hold[t["rule"]])} for t in h["top_violated"]]
            if baseline is not None and len(baseline[0]):
                m["rules.heldout.baseline_test.percent_valid"] = float(
                    check_violations(hold, *baseline, vocab)["percent_valid"])
        else:
            notes.append("rules: no mined rule both fires and holds on the held-out val split; the held-out "
                         "headline is not computed.")
    elif rules:
        notes.append("rules: the real tables have no 'val' split; rules are not judged on held-out data.")
    return m, notes, res


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


def _sub(tables: Tables, split: str) -> Tables:
    p, v, c = tables
    ps = p[p["split"] == split]
    return ps, v[v["patient_id"].isin(ps["patient_id"])], c[c["patient_id"].isin(ps["patient_id"])]


def evaluate_tables(real: Tables, synthetic: Tables, vocab: Vocab | None = None, rules_path=None, seed: int = 0,
                    privacy_sample: int = PRIVACY_LIMIT, utility_sample: int = 5000, hemisphere: str = "north",
                    policy: Policy | str | Path | None = None, fail_on: list[str] | None = None,
                    ordinal: list[dict] | None = None, peers: bool = False, provenance: dict | None = None) -> dict:
    """``evaluate`` on in-memory canonical tables (real with a ``split`` column, train and test); ``hemisphere``
    (the dataset config's ``calendar.hemisphere``) picks the winter and summer months of the temporal metrics.

    ``policy`` (a ``Policy``, a YAML path, or None = the bundled ``release_policy.yml``) turns the metrics into
    verdicts and a release decision; ``fail_on`` (check ids or properties) replaces the policy's gated checks;
    ``ordinal`` = the dataset config's ``longitudinal.ordinal`` families; ``peers`` adds SDMetrics / anonymeter.
    """
    seed = _check_int("seed", seed, 0)
    if hemisphere not in SEASONS:
        raise ConfigError(f"evaluate: hemisphere must be one of {sorted(SEASONS)}, got {hemisphere!r} "
                          "(calendar.hemisphere in the dataset config).")
    privacy_sample = _check_int("privacy_sample", privacy_sample, 2)
    utility_sample = _check_int("utility_sample", utility_sample, 10)
    policy = policy if isinstance(policy, Policy) else load_policy(policy)
    if fail_on is not None:
        check_fail_on(policy, list(fail_on))
    k = policy.small_cell_k
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
    intervals: dict[str, dict] = {}
    t = time.perf_counter()
    fid = fidelity(train, synth, code_statistics(train), baseline=test)
    intervals.update(headline_intervals(train, synth, numpy_rng(seed, "fidelity")))
    timings["fidelity"] = time.perf_counter() - t
    t = time.perf_counter()
    val = values(train, synth)
    timings["values"] = time.perf_counter() - t
    t = time.perf_counter()
    winter, summer = SEASONS[hemisphere]
    tem = temporal_section(train.visits, synth.visits, winter, summer)      # aggregate series (docs/temporal.md)
    timings["temporal"] = time.perf_counter() - t
    t = time.perf_counter()
    lon = longitudinal(train, synth, ordinal, k)
    small = small_cell_section(train, synth, sc, rc, k)
    timings["longitudinal"] = time.perf_counter() - t
    t = time.perf_counter()
    rules_res: dict = {}
    if rules_path is not None:
        rm, rn, rules_res = rules_metrics(rules_path, synthetic, vocab, _sub(real, "test"), _sub(real, "val"))
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
    parts = [fid, val, tem, lon, small, priv, util, mix]
    if peers:
        t = time.perf_counter()
        parts.append(peer_metrics(train, test, synth))
        timings["peers"] = time.perf_counter() - t
    for part in parts:
        metrics.update(part["metrics"])
        intervals.update(part.get("intervals", {}))
        notes += part.get("notes", [])
    dropped = sorted(k_ for k_, v in metrics.items() if not math.isfinite(v))
    metrics = {k_: float(v) for k_, v in sorted(metrics.items()) if math.isfinite(v)}
    intervals = {k_: v for k_, v in sorted(intervals.items())
                 if k_ in metrics and math.isfinite(v["lo"]) and math.isfinite(v["hi"])}
    for k_, v in intervals.items():        # metrics.json carries the intervals too
        metrics[f"{k_}.ci_lo"], metrics[f"{k_}.ci_hi"] = v["lo"], v["hi"]
    metrics = dict(sorted(metrics.items()))
    if dropped:
        notes.append(f"undefined (not finite) and left out of metrics.json: {dropped}.")
    verdict = verdicts(metrics, intervals, policy, fail_on)
    timings["total"] = time.perf_counter() - t0
    return {"metrics": metrics, "intervals": intervals, "verdicts": verdict, "flags": _flags(metrics), "notes": notes,
            "timings_s": timings, "provenance": provenance or {},
            "params": {"seed": seed, "privacy_sample": privacy_sample, "utility_sample": utility_sample,
                       "hemisphere": hemisphere, "small_cell_k": k,
                       "rules_path": None if rules_path is None else str(rules_path), "label_columns": list(cols)},
            "details": {"fidelity": fid, "values": val, "privacy": priv, "utility": util, "rules": rules_res,
                        "temporal": tem, "longitudinal": lon, "smallcells": small}}


def _ordinal_families(dataset_config, real_meta: dict) -> tuple[list[dict], str | None]:
    """The dataset config's ``longitudinal.ordinal`` (given, or the bundled config named in the real meta.json)."""
    from ..data.config import bundled_configs, load_config

    name = dataset_config or (real_meta.get("dataset") if real_meta.get("dataset") in bundled_configs() else None)
    if not name:
        return [], None
    cfg = load_config(name)
    fams = [f.model_dump() for f in cfg.longitudinal.ordinal] if cfg.longitudinal else []
    return fams, cfg.calendar.hemisphere


def evaluate(real_dir: str | Path, synthetic_dir: str | Path, rules_path: str | Path | None = None, seed: int = 0,
             privacy_sample: int = PRIVACY_LIMIT, utility_sample: int = 5000, policy: str | Path | None = None,
             fail_on: list[str] | None = None, dataset_config: str | None = None, model_dir: str | Path | None = None,
             run_id: str = "", peers: bool = False) -> dict:
    """Evaluate a synthetic tables directory against the real one (train split as reference, test as held out).

    Returns ``{"metrics": {name: float}, "intervals", "verdicts", "provenance", "flags": [...], "notes": [...],
    "timings_s": {...}, "params": {...}, "details": {...}}``; ``details`` holds the tables and samples the report
    draws. ``dataset_config`` (bundled name or path; default: the bundled config named in the real meta.json)
    supplies the declared ordinal families; ``model_dir`` the training provenance (default: found through the
    cohort's shards when readable).
    """
    t = time.perf_counter()
    pol = load_policy(policy)
    real = read_tables(real_dir)
    synthetic = read_tables(synthetic_dir)
    vocab = _load_vocab(real_dir) or _load_vocab(synthetic_dir)
    meta_path = storage.join(real_dir, "meta.json")
    real_meta = storage.read_json(meta_path) if storage.exists(meta_path) else {}
    families, hemi = _ordinal_families(dataset_config, real_meta)
    calendar = real_meta.get("calendar") or {}
    read_s = time.perf_counter() - t
    prov = provenance_block(real_dir, synthetic_dir, model_dir, run_id, pol.licences,
                            {"sha256_16": pol.digest})
    res = evaluate_tables(real, synthetic, vocab, rules_path, seed, privacy_sample, utility_sample,
                          hemisphere=calendar.get("hemisphere", hemi or "north"), policy=pol, fail_on=fail_on,
                          ordinal=families, peers=peers, provenance=prov)
    res["params"].update(real_dir=str(real_dir), synthetic_dir=str(synthetic_dir))
    res["timings_s"] = {"read": read_s, **res["timings_s"], "total": res["timings_s"]["total"] + read_s}
    return res


def evaluate_to_dir(real_dir: str | Path, synthetic_dir: str | Path, out_dir: str | Path,
                    rules_path: str | Path | None = None, seed: int = 0, privacy_sample: int = PRIVACY_LIMIT,
                    utility_sample: int = 5000, overwrite: bool = False, policy: str | Path | None = None,
                    fail_on: list[str] | None = None, dataset_config: str | None = None,
                    model_dir: str | Path | None = None, run_id: str = "", peers: bool = False) -> dict:
    """``evaluate`` and write ``metrics.json``, ``verdicts.json`` (decision, reasons, every check),
    ``provenance.json``, ``roc.json`` (TSTR ROC curves), ``report.html`` and ``summary.md`` into ``out_dir``.

    An existing non-empty ``out_dir`` is an error unless ``overwrite``. All arguments are plain strings/ints, so the
    CLI (``synthehr evaluate --real DIR --synthetic DIR --out DIR``) can pass them straight through.

    Returns a small JSON-able dict: the flat metrics, the decision, the verdicts, the flags and the timings.
    """
    from .report import render_html, render_markdown

    storage.check_output(out_dir, overwrite)  # before the (minutes of) work, not after it
    res = evaluate(real_dir, synthetic_dir, rules_path, seed, privacy_sample, utility_sample, policy, fail_on,
                   dataset_config, model_dir, run_id, peers)
    t = time.perf_counter()
    with storage.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        storage.write_json(storage.join(tmp, "metrics.json"), res["metrics"])
        storage.write_json(storage.join(tmp, "verdicts.json"), res["verdicts"])
        storage.write_json(storage.join(tmp, "provenance.json"), res["provenance"])
        storage.write_json(storage.join(tmp, "roc.json"), res["details"]["utility"].get("roc", {}))
        storage.write_text(storage.join(tmp, "report.html"), render_html(res))
        storage.write_text(storage.join(tmp, "summary.md"), render_markdown(res))
    res["timings_s"]["report"] = time.perf_counter() - t
    res["timings_s"]["total"] += res["timings_s"]["report"]
    return {"metrics": res["metrics"], "decision": res["verdicts"]["decision"], "verdicts": res["verdicts"],
            "flags": res["flags"], "timings_s": res["timings_s"], "out_dir": str(out_dir)}

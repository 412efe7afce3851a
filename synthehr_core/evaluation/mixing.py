"""Category mixing: the share of synthetic visits that combine code categories never combined in a real visit.

A code keyed with its code-system version (``dx:9:250``, ``dx:10:E11``; the tables adapter's
``key: "dx:{version}:{code}"``) belongs to the category before its last colon (``dx:9``). Real visits of a
dataset that switched code systems never hold ``dx:9`` and ``dx:10`` codes together; a model that merged them, or
that learnt the codes but not the switch, makes visits that do. This metric counts them. Datasets whose codes have
a single colon (``dx:4019``) have no categories and get no metric.
"""
from __future__ import annotations

from itertools import combinations

import pandas as pd


def code_categories(codes: pd.Series) -> pd.Series:
    """``dx:9:250`` -> ``dx:9``; None for a code with fewer than two colons."""
    s = codes.astype(str)
    return s.str.rsplit(":", n=1).str[0].where(s.str.count(":") >= 2)


def _visit_sets(codes: pd.DataFrame) -> pd.Series:
    cats = code_categories(codes["code"])
    df = pd.DataFrame({"p": codes["patient_id"].astype(str), "v": codes["visit_index"], "cat": cats}).dropna()
    return df.drop_duplicates().groupby(["p", "v"])["cat"].agg(frozenset)


def category_mixing(real_codes: pd.DataFrame, synth_codes: pd.DataFrame) -> dict:
    """``{"metrics": {...}, "notes": [...]}``; empty when the real codes have no namespace with two categories."""
    real = _visit_sets(real_codes)
    cats = sorted(set().union(*real)) if len(real) else []
    by_ns: dict[str, list[str]] = {}
    for c in cats:
        by_ns.setdefault(c.split(":", 1)[0], []).append(c)
    candidates = [pair for group in by_ns.values() if len(group) > 1 for pair in combinations(group, 2)]
    if not candidates:
        return {"metrics": {}, "notes": []}
    seen = {pair for s in real for pair in combinations(sorted(s), 2)}
    never = [pair for pair in candidates if pair not in seen]
    synth = _visit_sets(synth_codes)
    n_synth_visits = int(synth_codes[["patient_id", "visit_index"]].drop_duplicates().shape[0])
    mixing = int(sum(any(a in s and b in s for a, b in never) for s in synth)) if never else 0
    notes = []
    if never and mixing:
        notes.append(f"{mixing} of {n_synth_visits} synthetic visits mix code categories that no real visit mixes "
                     f"({', '.join(f'{a}+{b}' for a, b in never[:5])}); declare the category in visit_categories "
                     "so the model draws one per visit.")
    return {"metrics": {"mixing.never_mixed_pairs": float(len(never)),
                        "mixing.synthetic_visits_mixing": float(mixing),
                        "mixing.synthetic_share": mixing / n_synth_visits if n_synth_visits else float("nan")},
            "notes": notes}

"""Privacy: exact copies, distance to closest record, NNAA risk, membership and attribute inference.

Distance (HALO's ``evaluate_privacy_membership.py``, made symmetric): records are visit-aligned multi-hots,
one column per (visit position, code) plus one per label value, and

    d(x, y) = 1[#visits differ] + |labels(x) △ labels(y)| + Σ_t |codes_t(x) △ codes_t(y)|,

a Hamming distance computed as ``|x| + |y| - 2 x·y`` from sparse (or, for small vocabularies, dense) matrix
products in chunks of query rows. HALO skips visits of the candidate beyond the query's length; here they count.
Attribute inference uses the patient-level multi-hot (codes anywhere in the record), as HALO's attack does.

Exact copies are counted over the **whole** cohorts with a 64-bit hash of (labels, ordered visit code sets); the
other attacks use every record of the smaller real group up to ``privacy_sample`` (the stated limit) per group,
as seeded samples, and report 95 % bootstrap intervals (``intervals.py``) with the records behind them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from ..randomness import numpy_rng
from .cohort import Cohort
from .intervals import interval, proportion_boots, weights
from .utility import weighted_auc

CHUNK_CELLS = 8_000_000        # query rows x reference rows per chunk (~32 MB of float32)
DENSE_LIMIT = 100_000_000      # reference cells (rows x columns) up to which the reference is densified
DENSE_MAX_COLUMNS = 1024       # ... and only when the vectors are this narrow
TOP_KNOWN = 100                # HALO: the attacker knows labels + the 100 most common codes

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _group_sum(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Sum of uint64 values per group id (wrapping), groups sorted ascending."""
    out = np.zeros(n, np.uint64)
    if len(values):
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        out[groups[starts]] = np.add.reduceat(values, starts)
    return out


def record_hashes(c: Cohort) -> np.ndarray:
    """(n_patients,) uint64 hash of labels + the ordered sequence of visit code sets."""
    code_h = _mix(pd.util.hash_array(c.space.codes.to_numpy(dtype=object)))
    X = c.X
    row_of = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    visit_h = _group_sum(code_h[X.indices], row_of, X.shape[0])            # set hash: order-free sum
    with np.errstate(over="ignore"):
        visit_h = _mix(visit_h + _mix(c.visit_position.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
        rec = _group_sum(visit_h, c.visit_patient, c.n_patients)
        rec = rec + _mix(c.n_visits_per_patient.astype(np.uint64) * np.uint64(0x632BE59BD9B4E019))
        for j, col in enumerate(c.space.label_columns):                        # a loop over columns
            h = pd.util.hash_array(c.label_strings[col].fillna("<NA>").to_numpy(dtype=object))
            rec = rec + _mix(h + np.uint64(j + 1))
    return _mix(rec)


def exact_copies(train: Cohort, test: Cohort, synth: Cohort, rng: np.random.Generator | None = None,
                 intervals: dict | None = None) -> dict[str, float]:
    h_tr, h_te, h_sy = record_hashes(train), record_hashes(test), record_hashes(synth)
    in_train = np.isin(h_sy, h_tr)
    m = {"privacy.exact_copies": float(in_train.sum()),
         "privacy.exact_copy_rate": float(in_train.mean()) if len(h_sy) else 0.0,
         "privacy.train_records_copied": float(np.isin(h_tr, h_sy).sum())}
    if len(h_te):
        # the natural rate of duplicates: short, common records occur in any two samples of real patients
        m["privacy.exact_copies_of_test"] = float(np.isin(h_sy, h_te).sum())
        chance = np.isin(h_te, h_tr)
        m["privacy.test_in_train_rate"] = float(chance.mean())
        # copies beyond chance: a cohort from the real distribution repeats training records as often as held-out
        # real records do (short common records); only the excess is memorisation
        m["privacy.exact_copy_excess"] = m["privacy.exact_copy_rate"] - m["privacy.test_in_train_rate"]
        if rng is not None and intervals is not None and len(h_sy):
            boots = proportion_boots(in_train, rng) - proportion_boots(chance, rng)
            intervals["privacy.exact_copy_excess"] = interval(
                boots, len(h_sy), f"{len(h_sy)} synthetic and {len(h_te)} held-out")
    return m


def aligned_matrix(c: Cohort, n_positions: int) -> sp.csr_matrix:
    """(n_patients, n_positions*n_codes + n_labels) visit-aligned multi-hot used by the distance."""
    C = c.space.n_codes
    X = c.X.tocoo()
    pos = c.visit_position[X.row]
    keep = pos < n_positions
    codes = sp.csr_matrix((np.ones(int(keep.sum()), np.float32),
                           (c.visit_patient[X.row][keep], pos[keep] * C + X.col[keep])),
                          shape=(c.n_patients, n_positions * C))
    return sp.hstack([codes, c.L], format="csr")


def nearest(A: sp.csr_matrix, B: sp.csr_matrix, nv_a: np.ndarray | None = None, nv_b: np.ndarray | None = None,
            exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Hamming distance from each row of A to its closest row of B (plus 1 where visit counts differ), and
    which row. ``exclude_self`` (A is B) skips the diagonal.

    Everything but ``|a|`` is folded into one product, so each chunk is one matmul and one argmax:
    with ``a' = [a, e(nv_a)/2, -1/2]`` and ``b' = [b, e(nv_b), |b|]`` (``e`` one-hot of the visit count),
    ``d(a, b) = |a| + 1 - 2 a'·b'``.
    """
    na = np.asarray(A.sum(axis=1), dtype=np.float32).ravel()
    nb = np.asarray(B.sum(axis=1), dtype=np.float32).ravel()
    extra_a, extra_b, const = [], [], 0.0
    if nv_a is not None:
        width = int(max(nv_a.max(initial=0), nv_b.max(initial=0))) + 1
        extra_a.append(sp.csr_matrix((np.full(len(nv_a), 0.5, np.float32), (np.arange(len(nv_a)), nv_a)),
                                     shape=(len(nv_a), width)))
        extra_b.append(sp.csr_matrix((np.ones(len(nv_b), np.float32), (np.arange(len(nv_b)), nv_b)),
                                     shape=(len(nv_b), width)))
        const = 1.0
    A = sp.hstack([A, *extra_a, sp.csr_matrix(np.full((A.shape[0], 1), -0.5, np.float32))], format="csr")
    B = sp.hstack([B, *extra_b, sp.csr_matrix(nb[:, None])], format="csr").astype(np.float32)
    # dense BLAS pays off only for narrow vectors (toy vocabularies); wide ones multiply mostly zeros
    dense = B.shape[1] <= DENSE_MAX_COLUMNS and B.shape[0] * B.shape[1] <= DENSE_LIMIT
    Bt = B.T.toarray() if dense else B.T.tocsr()
    step = max(1, CHUNK_CELLS // max(B.shape[0], 1))
    best = np.empty(A.shape[0], np.float32)
    arg = np.empty(A.shape[0], np.int64)
    for s in range(0, A.shape[0], step):
        e = min(s + step, A.shape[0])
        G = A[s:e].toarray() @ Bt if dense else (A[s:e] @ Bt).toarray()       # (chunk, n_B)
        if exclude_self:
            G[np.arange(e - s), np.arange(s, e)] = -np.inf
        arg[s:e] = G.argmax(axis=1)
        best[s:e] = G[np.arange(e - s), arg[s:e]]
    return np.maximum(na + const - 2 * best, 0), arg


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def _f1(y: sp.spmatrix, p: sp.spmatrix) -> float:
    tp = float(y.multiply(p).sum())
    denom = float(y.sum() + p.sum())
    return 2 * tp / denom if denom else float("nan")


def privacy(train: Cohort, test: Cohort, synth: Cohort, privacy_sample: int, seed: int) -> dict:
    """All privacy metrics plus the DCR samples the report draws."""
    rng = numpy_rng(seed, "privacy")   # not the utility stream
    iv: dict[str, dict] = {}
    m = exact_copies(train, test, synth, rng, iv)
    notes: list[str] = []
    out = {"metrics": m, "notes": notes, "dcr": None, "intervals": iv}
    if not test.n_patients or not synth.n_patients:
        notes.append("privacy: no held-out test records (or no synthetic records); DCR, MIA, NNAA and attribute "
                     "inference skipped. Give the real tables a 'test' split.")
        return out
    n = min(privacy_sample, train.n_patients, test.n_patients)
    tr = train.take(_sample(train.n_patients, n, rng))
    te = test.take(_sample(test.n_patients, n, rng))
    sy = synth.take(_sample(synth.n_patients, n, rng))
    T = int(max(tr.n_visits_per_patient.max(initial=1), te.n_visits_per_patient.max(initial=1),
                synth.n_visits_per_patient.max(initial=1)))
    A_tr, A_te, A_sy_all = aligned_matrix(tr, T), aligned_matrix(te, T), aligned_matrix(synth, T)
    nv = {"tr": tr.n_visits_per_patient, "te": te.n_visits_per_patient, "sy": sy.n_visits_per_patient}
    m["privacy.sample_size"] = float(n)            # records per group actually attacked
    m["privacy.limit"] = float(privacy_sample)
    if n < privacy_sample:
        notes.append(f"privacy: the attacks used {n} members and {n} non-members (all records of the smaller real "
                     f"split; limit {privacy_sample}).")

    # distance to closest record: each sampled real record against every synthetic record
    d_tr, _ = nearest(A_tr, A_sy_all, nv["tr"], synth.n_visits_per_patient)
    d_te, _ = nearest(A_te, A_sy_all, nv["te"], synth.n_visits_per_patient)
    out["dcr"] = (d_tr, d_te)
    for k, d in (("train", d_tr), ("test", d_te)):
        m[f"privacy.dcr_{k}.mean"], m[f"privacy.dcr_{k}.median"] = float(d.mean()), float(np.median(d))
        m[f"privacy.dcr_{k}.zero_frac"] = float((d == 0).mean())

    # membership inference (distance attack): member if DCR below the median of all DCRs. Distances are small
    # integers, so many tie at the median; ties are split at random (seeded) so exactly half are guessed members
    # (HALO's strict "< median" guesses nobody when over half the distances are 0, e.g. for a copied cohort).
    d = np.r_[d_tr, d_te]
    y = np.r_[np.ones(len(d_tr)), np.zeros(len(d_te))]
    guess = np.zeros(len(d), bool)
    guess[np.lexsort((rng.random(len(d)), d))[: len(d) // 2]] = True
    tp = float((guess & (y == 1)).sum())
    m["privacy.mia.accuracy"] = float((guess == (y == 1)).mean())
    m["privacy.mia.n_records"] = float(len(d))      # members + non-members attacked: the accuracy's precision
    m["privacy.mia.precision"] = tp / guess.sum() if guess.sum() else 0.0
    m["privacy.mia.recall"] = tp / len(d_tr)
    pr, rc = m["privacy.mia.precision"], m["privacy.mia.recall"]
    m["privacy.mia.f1"] = 2 * pr * rc / (pr + rc) if pr + rc else 0.0
    m["privacy.mia.auc"] = float(roc_auc_score(y, -d))
    # intervals over the attacked records, the attack's guesses held fixed
    who = f"{len(d_tr)} members + {len(d_te)} non-members"
    iv["privacy.mia.accuracy"] = interval(proportion_boots(guess == (y == 1), rng), len(d), who)
    iv["privacy.mia.auc"] = interval(weighted_auc(y, -d, weights(len(d), rng)), len(d), who)

    # NNAA (Yale et al. 2020; HALO's evaluate_privacy_nearest.py), on the samples
    A_sy = aligned_matrix(sy, T)

    def aa(A_r, nv_r):
        d_rs, _ = nearest(A_r, A_sy, nv_r, nv["sy"])
        d_sr, _ = nearest(A_sy, A_r, nv["sy"], nv_r)
        d_rr, _ = nearest(A_r, A_r, nv_r, nv_r, exclude_self=True)
        d_ss, _ = nearest(A_sy, A_sy, nv["sy"], nv["sy"], exclude_self=True)
        a, b = d_rs > d_rr, d_sr > d_ss
        return 0.5 * (float(a.mean()) + float(b.mean())), 0.5 * (proportion_boots(a, rng) + proportion_boots(b, rng))

    if n >= 2 and sy.n_patients >= 2:
        (m["privacy.nnaa.train"], b_tr), (m["privacy.nnaa.test"], b_te) = aa(A_tr, nv["tr"]), aa(A_te, nv["te"])
        m["privacy.nnaar"] = m["privacy.nnaa.test"] - m["privacy.nnaa.train"]
        iv["privacy.nnaar"] = interval(b_te - b_tr, n, f"{n} train, {n} test and {sy.n_patients} synthetic")

    # attribute inference: know labels + top codes, predict the rest from the 1-NN reference record
    rec_prev = np.asarray(train.P.sum(axis=0)).ravel()
    k = min(TOP_KNOWN, train.space.n_codes // 2)
    order = np.argsort(-rec_prev, kind="stable")
    known, hidden = order[:k], order[k:]
    m["privacy.attribute.n_known_codes"] = float(k)
    hid_tr = tr.P[:, hidden]
    if hid_tr.nnz:
        def attack(ref: Cohort) -> tuple[float, np.ndarray]:
            K_ref = sp.hstack([ref.L, ref.P[:, known]], format="csr")
            K_tr = sp.hstack([tr.L, tr.P[:, known]], format="csr")
            _, nn = nearest(K_tr, K_ref)
            pred = ref.P[:, hidden][nn]
            per = np.c_[np.asarray(hid_tr.multiply(pred).sum(axis=1)).ravel(),      # (targets, 2): tp, |y| + |p|
                        np.asarray(hid_tr.sum(axis=1)).ravel() + np.asarray(pred.sum(axis=1)).ravel()]
            return _f1(hid_tr, pred), per

        m["privacy.attribute.f1"], per_sy = attack(sy)
        m["privacy.attribute.f1_baseline"], per_te = attack(te)    # same-size held-out real reference
        m["privacy.attribute.f1_gap"] = m["privacy.attribute.f1"] - m["privacy.attribute.f1_baseline"]
        W = weights(tr.n_patients, rng)                              # targets resampled, both attacks alike
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = [2 * (W @ p[:, 0]) / (W @ p[:, 1]) for p in (per_sy, per_te)]
        iv["privacy.attribute.f1_gap"] = interval(f1[0] - f1[1], tr.n_patients, f"{tr.n_patients} targets")
    else:
        notes.append("privacy.attribute: the sampled training records have no codes outside the known set; skipped.")
    return out

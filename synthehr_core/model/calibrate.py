"""Output biases and direct group terms, fitted exactly after training (``TrainConfig.calibration``).

With every other weight fixed, each of these parameters has a convex log-likelihood on the teacher-forced training
rows, and its maximum is where a converged run would have put it:

* a BCE token's bias (``fine_2``): the expected count of the token over the training rows equals the observed one.
  Its gradient is that gap, and Adam normalises it by its minibatch noise, so a systematic gap of a few percent is
  still there when the lr has decayed. For ``<end>`` that gap *is* the visits/patient error: on simulator seed 1 the
  teacher-forced p(<end>) after visit 1 ended at 0.666 (HALO) and 0.612 (ConSequence), real 0.640 (visits/patient
  −6.8 % and +4.8 %; docs/fidelity.md).
* a categorical group head's bias and its direct terms (``HaloConfig.group_direct``) on the columns of the earlier
  single-valued variables: one multinomial regression per group, offset by the trained logits. "Electives fall on
  weekdays" is the direct weight from ``evt:ELECTIVE`` to each weekday; 680 steps left its worst cell 2-4 pp off.
* last, the <end> bias once more, on the model's own samples (``_fit_end_sampled``): sampled rows are not the real
  rows the teacher-forced fit reads (exposure bias; ConSequence's rule-fixed entries), which left ConSequence's
  visits/patient +2.5 % on simulator seed 0.

Each token's bias only moves its own logit and a group head's parameters only its own categorical, so the problems
separate: the BCE biases by Newton's method on all of them at once (diagonal; a few streamed passes over the train
split), each group by L-BFGS on its logits, cached in one more pass. All have the same Gaussian prior: sd 1 logit on every
shift (``RIDGE``), which keeps a token never seen in training finite. ``"end"`` fits only the <end> bias.

Rule-fixed entries of ConSequence are left out, as in its loss (``loss_weights``). It reads the training data outside DP-SGD's
accounting, so the train stage skips it for DP runs (and says so).
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F

from ..data.vocab import Vocab
from ..randomness import torch_seed
from .tensors import EHRParquetDataset, collate_halo

log = logging.getLogger(__name__)

MAX_ITER, TOL = 12, 1e-4  # diagonal Newton, 1-D convex problems: 1e-4 in 3-5 passes (simulator), 8 (ADNI, 4-logit shifts)
RIDGE = 1.0              # Gaussian prior precision on every fitted shift (sd 1 logit)
LBFGS_ITER = 200
END_SAMPLED_SE, END_SAMPLED_PER_TRAIN, END_SAMPLED_MIN, END_SAMPLED_MAX, END_SAMPLED_ROUNDS = 0.005, 64, 1024, 32768, 2
SAMPLE_BATCH = 256       # the sample stage's default (SampleConfig.batch_size)


def _batches(model, ds: EHRParquetDataset, vocab: Vocab, batch_size: int, device):
    """Per batch, teacher-forced: (targets (B, T-1, V), the training loss's weights, hidden, logits, prior)."""
    for b0 in range(0, len(ds), batch_size):
        X, mask = collate_halo([ds[i] for i in range(b0, min(b0 + batch_size, len(ds)))], vocab,
                               model.config.n_ctx, trim=True)
        X, mask = X.to(device), mask.to(device)
        hidden, logits, prior = model.teacher_forced(X)
        yield X[:, 1:].float(), model.loss_weights(X, mask), hidden, logits.float(), prior


def _bce_columns(model, vocab: Vocab, what: str) -> torch.Tensor:
    """The token columns scored by BCE whose bias is fitted: every one outside a group ("full"), or <end>."""
    if what == "end":
        return torch.tensor([vocab.end_index])
    in_group = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    for a, b in model.config.groups or ():
        in_group[a:b] = True
    return torch.nonzero(~in_group).flatten()


@torch.no_grad()
def bce_moments(model, ds: EHRParquetDataset, vocab: Vocab, cols: torch.Tensor, batch_size: int, device,
                shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expected counts, observed counts, curvature) of the tokens ``cols`` over the weighted training rows,
    teacher-forced, float64, with ``shift`` added to their logits (positives weighted by ``pos_loss_weight``)."""
    model.eval()
    pw = 1.0 if model.config.pos_loss_weight is None else float(model.config.pos_loss_weight)
    cols_d = cols.to(device)
    ep = torch.zeros(len(cols), dtype=torch.float64, device=device)
    ob, cu = torch.zeros_like(ep), torch.zeros_like(ep)
    for tgt, w, _, logits, _ in _batches(model, ds, vocab, batch_size, device):
        z = logits[..., cols_d].double()
        if shift is not None:
            z = z + shift.to(device)
        p, y, ww = torch.sigmoid(z), tgt[..., cols_d].double(), w[..., cols_d].double()
        # d loss / d bias = (1 - y) p - pw y (1 - p): its root matches expected and observed (pw = 1)
        ep += (ww * ((1 - y) * p + pw * y * p)).sum((0, 1))
        ob += (ww * pw * y).sum((0, 1))
        cu += (ww * p * (1 - p) * ((1 - y) + pw * y)).sum((0, 1))
    return ep.cpu(), ob.cpu(), cu.cpu()


def _fit_bce(model, ds, vocab, cols, batch_size, device) -> tuple[dict, torch.Tensor]:
    """Newton on every bias of ``cols`` at once (the problems are separate); moves them in place."""
    ep, ob, cu = bce_moments(model, ds, vocab, cols, batch_size, device)
    ep0, shift, it, last = ep.clone(), torch.zeros(len(cols), dtype=torch.float64), 0, math.inf
    while it < MAX_ITER:
        it += 1
        step = -(ep - ob + RIDGE * shift) / (cu + RIDGE)
        shift += step
        last = float(step.abs().max())
        if last < TOL:
            break
        ep, ob, cu = bce_moments(model, ds, vocab, cols, batch_size, device, shift)
    with torch.no_grad():
        bias = model.output_bias()
        bias[cols.to(bias.device)] += shift.to(bias)
    if last >= TOL:
        log.warning("calibration: the token biases moved by up to %.2g in the last of %d Newton passes (not converged "
                    "to %g; far from their optimum after training, e.g. a short run): the fit is kept", last, it, TOL)
    return {"tokens": len(cols), "iterations": it, "converged": last < TOL, "last_step": round(last, 8),
            "max_abs_shift": round(float(shift.abs().max()), 6),
            "mean_abs_shift": round(float(shift.abs().mean()), 6),
            "max_abs_gap_before": round(float((ep0 - ob).abs().max()), 3)}, shift


@torch.no_grad()
def group_data(model, ds: EHRParquetDataset, vocab: Vocab, batch_size: int, device
               ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]]:
    """Per group, its weighted training rows, teacher-forced, in one pass: (logits (N, K+1), features (N, F), class
    (N,), weight (N,), feature columns). The features are the row's tokens of the earlier single-valued variables
    the group's direct term reads (none without ``group_direct``)."""
    model.eval()
    groups = model.config.groups or ()
    direct = getattr(model, "group_direct", {}) if model.config.group_direct else {}
    feats = [[j for a2, b2 in groups if b2 <= a for j in range(a2, b2)] if str(k) in direct else []
             for k, (a, _) in enumerate(groups)]
    parts = [([], [], [], []) for _ in groups]
    for tgt, w, hidden, _, prior in _batches(model, ds, vocab, batch_size, device):
        for k, (a, b) in enumerate(groups):
            cls = model.group_target(tgt, k)
            rw = w[..., a:b].amax(-1)  # the row's weight in the loss (HALO.forward)
            keep = rw > 0
            zs, xs, ys, ws = parts[k]
            zs.append(model.group_logits(hidden, k, prior, tgt)[keep].double().cpu())
            xs.append(tgt[..., feats[k]][keep].double().cpu())
            ys.append(cls[keep].cpu())
            ws.append(rw[keep].double().cpu())
    return [(*(torch.cat(x) for x in parts[k]), feats[k]) for k in range(len(groups))]


def fit_group(z: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The MAP shifts (bias (K+1,), direct weights (K+1, F)) of a multinomial regression offset by ``z``: weighted
    cross-entropy plus ``RIDGE`` / 2 times their squared norm; L-BFGS, deterministic on CPU."""
    K1, Fd = z.size(1), x.size(1)
    theta = torch.zeros(K1 * (1 + Fd), dtype=torch.float64, requires_grad=True)
    total = float(w.sum())
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=LBFGS_ITER, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")
    calls = 0

    def closure():
        nonlocal calls
        calls += 1
        opt.zero_grad()
        d, D = theta[:K1], theta[K1:].view(K1, Fd)
        nll = (w * F.cross_entropy(z + d + x @ D.T, y, reduction="none")).sum()
        loss = (nll + RIDGE / 2 * (theta ** 2).sum()) / total
        loss.backward()
        return loss

    opt.step(closure)
    theta = theta.detach()
    return theta[:K1], theta[K1:].view(K1, Fd), calls


def _share_gap(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """Largest |expected - observed| class share over the rows, percentage points."""
    p = torch.softmax(z, -1)
    obs = F.one_hot(y, z.size(1)).double()
    return float(100 * ((w[:, None] * (p - obs)).sum(0) / w.sum()).abs().max())


def _fit_groups(model, ds, vocab, batch_size, device) -> list[dict]:
    out = []
    for k, (z, x, y, w, cols) in enumerate(group_data(model, ds, vocab, batch_size, device)):
        a, b = model.config.groups[k]
        if len(y) == 0:
            continue
        d, D, calls = fit_group(z, x, y, w)
        with torch.no_grad():
            head = model.group_heads[k]
            head.bias += d.to(head.bias)
            if cols:
                lin = model.group_direct[str(k)]
                lin.weight[:, torch.tensor(cols, device=lin.weight.device)] += D.to(lin.weight)
        after = z + d + x @ D.T
        out.append({"tokens": f"{vocab.tokens[a].token}..{vocab.tokens[b - 1].token}", "rows": int(len(y)),
                    "direct_columns": len(cols), "evaluations": calls,
                    "max_share_gap_pp_before": round(_share_gap(z, y, w), 4),
                    "max_share_gap_pp_after": round(_share_gap(after, y, w), 4),
                    "max_abs_bias_shift": round(float(d.abs().max()), 6),
                    "max_abs_direct_shift": round(float(D.abs().max()), 6) if cols else 0.0})
    return out


def sampled_visits(model, vocab: Vocab, n: int, seed: int, groups, device, batch_size: int = SAMPLE_BATCH
                   ) -> float:
    """Mean visits per patient of ``n`` patients the model samples (rules and token groups as the sample stage)."""
    from .sampling import sample

    rows = sample(model, vocab, n, seed, batch_size, rules=getattr(model, "rules", None), device=device,
                  progress=False, groups=groups)
    return sum(len(r) - (vocab.first_visit_row - 1) for r in rows) / max(n, 1)


def _fit_end_sampled(model, ds, vocab, groups, seed: int, device) -> dict:
    """Move the <end> bias until the model's own samples have the training visits per patient.

    The teacher-forced fit matches the ends over *real* rows; a sampled row differs from the real one before it
    (exposure bias; ConSequence's rule-fixed entries), so the sampled visits per patient can still be off (ConSequence
    +2.5 % on 32,768 patients, simulator seed 0). It samples enough patients for a ``END_SAMPLED_SE`` relative
    standard error of the mean (from the training visits' sd), or for an eighth of the training mean's own (64x the
    training patients) where that is larger, 1,024 to 32,768 patients; while the gap is over two s.e., it adds
    log((m - 1) / (m* - 1)) to the bias (exact for 1 + Geometric(p) visits, where log(m - 1) = -logit p), at most
    ``END_SAMPLED_ROUNDS`` times, with the same seed each round."""
    n_vis = torch.tensor([ds.n_visits(i) for i in range(len(ds))], dtype=torch.float64)
    target, sd = float(n_vis.mean()), float(n_vis.std()) if len(n_vis) > 1 else 0.0
    n = math.ceil(min((sd / (END_SAMPLED_SE * target)) ** 2, END_SAMPLED_PER_TRAIN * len(ds)))
    n = int(min(max(n, END_SAMPLED_MIN), END_SAMPLED_MAX))
    se = sd / (target * math.sqrt(n))  # relative s.e. of the sampled mean
    sampled, shift = [], 0.0
    for r in range(END_SAMPLED_ROUNDS + 1):
        m = sampled_visits(model, vocab, n, seed, groups, device)
        sampled.append(round(m, 5))
        if r == END_SAMPLED_ROUNDS or abs(m / target - 1) < 2 * se or m <= 1 or target <= 1:
            break
        step = math.log((m - 1) / (target - 1))
        with torch.no_grad():
            model.output_bias()[vocab.end_index] += step
        shift += step
    log.info("calibration: <end> on %d sampled patients: visits/patient %.4f -> %.4f (train %.4f), bias %+.4f",
             n, sampled[0], sampled[-1], target, shift)
    return {"target": round(target, 5), "sampled": sampled, "shift": round(shift, 6), "n": n, "se": round(se, 6)}


def calibrate(model, ds: EHRParquetDataset, vocab: Vocab, what: str = "full", batch_size: int = 256,
              device="cpu", groups=(), seed: int = 0) -> dict:
    """Fit the biases (and with "full" the group heads' bias and direct terms, then <end> on the model's own samples)
    in place; returns what it did, for meta.json. ``what`` is one of ``config.CALIBRATIONS`` other than "off"; ``groups``
    the token groups the sampler constrains (``vocab.token_groups``), ``seed`` the run's."""
    assert what in ("full", "end"), what
    t0 = time.perf_counter()
    cols = _bce_columns(model, vocab, what)
    bce, shift = _fit_bce(model, ds, vocab, cols, batch_size, device)
    end = int(torch.nonzero(cols == vocab.end_index).flatten()[0])
    out = {"what": what, "bce": bce, "end_shift": round(float(shift[end]), 6)}
    log.info("calibration: %d token biases in %d Newton passes (largest shift %+.3f, <end> %+.4f)", bce["tokens"],
             bce["iterations"], bce["max_abs_shift"], out["end_shift"])
    if what == "full" and model.config.groups:
        out["groups"] = _fit_groups(model, ds, vocab, batch_size, device)
        for g in out["groups"]:
            log.info("calibration: group %s (%d rows, %d direct columns): largest class-share gap %.2f -> %.2f pp",
                     g["tokens"], g["rows"], g["direct_columns"], g["max_share_gap_pp_before"],
                     g["max_share_gap_pp_after"])
    if what == "full":
        out["end_sampled"] = _fit_end_sampled(model, ds, vocab, list(groups), torch_seed(seed, "calibrate"), device)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def end_counts(model, ds: EHRParquetDataset, vocab: Vocab, batch_size: int, device) -> tuple[float, float]:
    """(expected <end>s, observed <end>s) over the weighted training rows, teacher-forced."""
    ep, ob, _ = bce_moments(model, ds, vocab, torch.tensor([vocab.end_index]), batch_size, device)
    return float(ep[0]), float(ob[0])

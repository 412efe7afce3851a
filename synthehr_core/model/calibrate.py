"""The <end> token's bias, fitted exactly after training: the expected number of <end>s over the training visits
equals the number of training patients.

Visits per patient are set by one probability, p(<end> | history, row), and the loss gradient of its bias is the
gap between the expected and the observed number of ends over the training rows. Adam normalises that gradient by
its minibatch noise, so a systematic gap of a few percent is still there when the lr has decayed: on simulator
seed 1 the teacher-forced p(<end>) after visit 1 ended at 0.666 (HALO) and 0.612 (ConSequence), real 0.640
(visits/patient −6.8 % and +4.8 %; docs/fidelity.md). With the other weights fixed the
bias has a one-dimensional, convex likelihood; Newton's method on it (a few teacher-forced passes over the train
split) gives its maximum-likelihood value, which is where a converged run would have put it.

It reads the training data outside DP-SGD's accounting, so the train stage skips it for DP runs (and says so).
"""
from __future__ import annotations

import logging

import torch

from ..data.vocab import Vocab
from .tensors import EHRParquetDataset, collate_halo

log = logging.getLogger(__name__)

MAX_ITER, TOL = 8, 1e-4  # Newton on a 1-D convex log-likelihood: 2-3 iterations reach 1e-4 (docs/fidelity.md)


@torch.no_grad()
def end_counts(model, ds: EHRParquetDataset, vocab: Vocab, batch_size: int, device) -> tuple[float, float, float]:
    """(expected <end>s, observed <end>s, sum of p (1 - p)) over the visit rows of ``ds``, teacher-forced."""
    model.eval()
    n_ctx, fvr, end = model.config.n_ctx, vocab.first_visit_row, vocab.end_index
    sp = sy = sw = 0.0
    for b0 in range(0, len(ds), batch_size):
        X, mask = collate_halo([ds[i] for i in range(b0, min(b0 + batch_size, len(ds)))], vocab, n_ctx, trim=True)
        X, mask = X.to(device), mask.to(device)
        logits, _ = model(X)
        rows = torch.arange(1, X.size(1), device=device) >= fvr          # target rows that are visits
        w = mask[:, 1:, 0] * rows[None, :]
        p = torch.sigmoid(logits[..., end].float())
        sp += float((p * w).sum())
        sy += float((X[:, 1:, end] * w).sum())
        sw += float((p * (1 - p) * w).sum())
    return sp, sy, sw


def calibrate_end(model, ds: EHRParquetDataset, vocab: Vocab, batch_size: int = 256, device="cpu") -> dict:
    """Fit the <end> logit's bias by Newton's method, in place; returns what it did (for meta.json)."""
    E = model.config.n_embd
    bias = model.fine_2.bias
    j = E - 1 + vocab.end_index                                           # HALO._fine: logit j is unit E-1+j
    sp, sy, sw = end_counts(model, ds, vocab, batch_size, device)
    sp0, shift, it = sp, 0.0, 0
    while it < MAX_ITER:
        it += 1
        step = (sy - sp) / sw if sw > 0 else 0.0
        with torch.no_grad():
            bias[j] += step
        shift += step
        if abs(step) < TOL:
            break
        sp, sy, sw = end_counts(model, ds, vocab, batch_size, device)
    out = {"shift": round(shift, 6), "iterations": it, "expected_ends_before": round(sp0, 3), "ends": sy}
    log.info("<end> calibration: expected %.1f ends over %d training patients' visits, observed %.0f; bias moved "
             "%+.4f in %d Newton steps", sp0, len(ds), sy, shift, it)
    return out

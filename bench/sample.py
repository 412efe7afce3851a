"""Sampling speed: the fast exact sampler vs HI's reference algorithm, same model, same seeds.

    PYTHONPATH=. .venv/bin/python -m bench.sample                # ~3 min on 2 idle CPU cores (10x that at load 10)
    PYTHONPATH=. .venv/bin/python -m bench.sample --cases 0:64 0:256 3:64
    PYTHONPATH=. python3 -m bench.sample --synthetic --preset paper --device cuda --batch-sizes 256 --end-shifts 0

The model is a ``small`` HALO briefly fitted to the bundled MIMIC-III demo (780 tokens, ~23 tokens per visit).
The demo has 1.3 visits per patient, so ``--end-shifts`` also lowers the <end> logit by a constant to give
realistic multi-visit patients (shift 3 -> ~2.5-3 visits). Both samplers draw from the same distribution
(tests/test_sampling.py); only the time differs. Head passes = total calls of the code-level head. On a shared
machine the load drifts: the fast sampler is timed before and after the reference and the slower time is kept.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from bench import briefly_trained_halo, mimic_demo_tables, synthetic_halo
from synthehr_core.model import sampling
from synthehr_core.model.sampling import sample, sample_reference


class _CountHead:
    """Count head passes: calls of ``model.head`` (reference) and of the fast sampler's incremental head."""

    def __init__(self, model):
        self.model, self.real, self.calls = model, model.head, 0
        self.real_inc = sampling._IncrementalHead.logits

    def __enter__(self):
        def head(h, row):
            self.calls += 1
            return self.real(h, row)

        def inc_logits(inc, pre):
            self.calls += 1
            return self.real_inc(inc, pre)
        self.model.head = head
        sampling._IncrementalHead.logits = inc_logits
        return self

    def __exit__(self, *exc):
        del self.model.head
        sampling._IncrementalHead.logits = self.real_inc


def time_sampler(fn, model, vocab, n_patients: int, batch_size: int, seed: int) -> dict:
    with _CountHead(model) as counter:
        t0 = time.perf_counter()
        rows = fn(model, vocab, n_patients, seed=seed, batch_size=batch_size)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    n_rows = sum(len(r) for r in rows)  # label + visit rows actually kept
    return {"seconds": seconds, "patients_per_s": n_patients / seconds, "head_calls": counter.calls,
            "visits": sum(len(r) - (vocab.first_visit_row - 1) for r in rows) / n_patients, "rows": n_rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--n-patients", type=int, default=256)
    ap.add_argument("--end-shifts", type=float, nargs="+", default=[0.0, 3.0])
    ap.add_argument("--cases", nargs="+", help="explicit SHIFT:BATCH pairs instead of the product, e.g. 0:64 3:64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic", action="store_true",
                    help="untrained model over a HALO-inpatient-sized made-up vocabulary (no data, no training)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-group-heads", action="store_true",
                    help="train HI's Bernoulli head only (the default model has a categorical head per single-valued "
                         "variable, which both samplers draw through)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.synthetic:
        model, vocab = synthetic_halo(preset=args.preset, seed=args.seed)
        what = "untrained, made-up HALO-inpatient vocabulary, biases set for ~14 codes/visit and p(end)=0.35"
    else:
        tables = mimic_demo_tables()
        model, vocab, loss = briefly_trained_halo(tables, preset=args.preset, steps=args.train_steps, seed=args.seed,
                                                  group_heads=not args.no_group_heads)
        what = (f"{args.train_steps} Adam steps on MIMIC-III demo train (loss {loss:.4f}), "
                f"{len(model.config.groups or ())} categorical heads")
    model = model.to(args.device)
    cfg = model.config
    dev = torch.cuda.get_device_name() if model.fine_2.bias.is_cuda else \
        f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    print(f"model: {args.preset} (E={cfg.n_embd}, L={cfg.n_layer}, H={cfg.n_head}, n_ctx={cfg.n_ctx}, "
          f"V={cfg.vocab_size}), {what}; torch {torch.__version__}, {dev}", flush=True)
    end_col = cfg.n_embd - 1 + vocab.end_index  # fine-head output unit of the <end> logit
    base = model.fine_2.bias[end_col].item()
    hdr = (f"{'end shift':>9} {'batch':>5} {'patients':>8} {'visits/pt':>9} {'fast s':>8} {'ref s':>8} "
           f"{'fast pt/s':>10} {'ref pt/s':>9} {'speedup':>8} {'fast heads':>10} {'ref heads':>9}")
    print(hdr)
    print("-" * len(hdr))
    cases = [tuple(c.split(":")) for c in args.cases] if args.cases else \
        [(s, b) for s in args.end_shifts for b in args.batch_sizes]
    for shift, bs in ((float(s), int(b)) for s, b in cases):
        with torch.no_grad():
            model.fine_2.bias[end_col] = base - shift
        fast_fn = lambda *a, **k: sample(*a, progress=False, **k)  # noqa: E731
        before = time_sampler(fast_fn, model, vocab, args.n_patients, bs, args.seed)
        ref = time_sampler(sample_reference, model, vocab, args.n_patients, bs, args.seed)
        after = time_sampler(fast_fn, model, vocab, args.n_patients, bs, args.seed)
        fast = max(before, after, key=lambda r: r["seconds"])  # fast timed on both sides of ref; the slower kept
        print(f"{shift:9.1f} {bs:5d} {args.n_patients:8d} {fast['visits']:9.2f} {fast['seconds']:8.2f} "
              f"{ref['seconds']:8.2f} {fast['patients_per_s']:10.1f} {ref['patients_per_s']:9.1f} "
              f"{ref['seconds'] / fast['seconds']:7.1f}x {fast['head_calls']:10d} {ref['head_calls']:9d}",
              flush=True)


if __name__ == "__main__":
    main()

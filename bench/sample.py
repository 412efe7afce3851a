"""Sampling speed: the fast exact sampler vs HI's reference algorithm, same model, same seeds.

    PYTHONPATH=. .venv/bin/python -m bench.sample                # ~2-3 min on 2 CPU cores
    PYTHONPATH=. .venv/bin/python -m bench.sample --batch-sizes 64 --end-shifts 3

The model is a ``small`` HALO briefly fitted to the bundled MIMIC-III demo (780 tokens, ~23 tokens per visit).
The demo has 1.3 visits per patient, so ``--end-shifts`` also lowers the <end> logit by a constant to give
realistic multi-visit patients (shift 3 -> ~2.5-3 visits). Both samplers draw from the same distribution
(tests/test_sampling.py); only the time differs. Head passes = calls of the code-level head per sampled row.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from bench import briefly_trained_halo, mimic_demo_tables
from synthehr_core.sampling import sample, sample_reference


class _CountHead:
    """Count head calls on an instance (the samplers call ``model.head``)."""

    def __init__(self, model):
        self.model, self.real, self.calls = model, model.head, 0

    def __enter__(self):
        def head(h, row):
            self.calls += 1
            return self.real(h, row)
        self.model.head = head
        return self

    def __exit__(self, *exc):
        del self.model.head


def time_sampler(fn, model, vocab, n_patients: int, batch_size: int, seed: int) -> dict:
    with _CountHead(model) as counter:
        t0 = time.perf_counter()
        rows = fn(model, vocab, n_patients, seed=seed, batch_size=batch_size)
        seconds = time.perf_counter() - t0
    n_rows = sum(len(r) for r in rows)  # label + visit rows actually kept
    return {"seconds": seconds, "patients_per_s": n_patients / seconds, "head_calls": counter.calls,
            "visits": sum(len(r) - (vocab.first_visit_row - 1) for r in rows) / n_patients, "rows": n_rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--n-patients", type=int, default=256)
    ap.add_argument("--end-shifts", type=float, nargs="+", default=[0.0, 3.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    tables = mimic_demo_tables()
    model, vocab, loss = briefly_trained_halo(tables, preset=args.preset, steps=args.train_steps, seed=args.seed)
    cfg = model.config
    print(f"model: {args.preset} (E={cfg.n_embd}, L={cfg.n_layer}, H={cfg.n_head}, n_ctx={cfg.n_ctx}, "
          f"V={cfg.vocab_size}), {args.train_steps} Adam steps on MIMIC-III demo train (loss {loss:.4f}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    end_col = cfg.n_embd - 1 + vocab.end_index  # fine-head output unit of the <end> logit
    base = model.fine_2.bias[end_col].item()
    hdr = (f"{'end shift':>9} {'batch':>5} {'patients':>8} {'visits/pt':>9} {'fast s':>8} {'ref s':>8} "
           f"{'fast pt/s':>10} {'ref pt/s':>9} {'speedup':>8} {'fast heads':>10} {'ref heads':>9}")
    print(hdr)
    print("-" * len(hdr))
    for shift in args.end_shifts:
        with torch.no_grad():
            model.fine_2.bias[end_col] = base - shift
        for bs in args.batch_sizes:
            fast = time_sampler(lambda *a, **k: sample(*a, progress=False, **k), model, vocab, args.n_patients, bs,
                                args.seed)
            ref = time_sampler(sample_reference, model, vocab, args.n_patients, bs, args.seed)
            print(f"{shift:9.1f} {bs:5d} {args.n_patients:8d} {fast['visits']:9.2f} {fast['seconds']:8.2f} "
                  f"{ref['seconds']:8.2f} {fast['patients_per_s']:10.1f} {ref['patients_per_s']:9.1f} "
                  f"{ref['seconds'] / fast['seconds']:7.1f}x {fast['head_calls']:10d} {ref['head_calls']:9d}",
                  flush=True)


if __name__ == "__main__":
    main()

"""Sampling speed: the block-lazy head against the full-row head it replaced and against HI's reference algorithm,
same model, same seeds, in one process; executed FLOPs per sampled row next to the floor.

    PYTHONPATH=. .venv/bin/python -m bench.sample                 # small preset, MIMIC-III demo: ~10 min on 2 cores
    PYTHONPATH=. .venv/bin/python -m bench.sample --cases 0:64 3:256 --no-reference
    PYTHONPATH=. .venv/bin/python -m bench.sample --synthetic --preset paper --n-patients 32 --cases 0:32 --no-reference
    PYTHONPATH=. python3 -m bench.sample --synthetic --preset paper --device cuda --cases 0:256

Samplers: ``block`` = ``sample()`` as the sample stage runs it (block-lazy head, ``HEAD_BLOCK`` columns per block);
``full-row`` = ``sample(head_block=None)``, the sampler before the block head (all V logits over all D units per
commit, head weights transposed every row), kept callable for this comparison; ``reference`` = HI's algorithm
(``sample_reference``). Within a repeat the three run back to back on the same model and seed, and each speed-up is
the ratio of that repeat's times, so load drift on a shared machine hits both sides; the table gives the median
and [min-max] over repeats of CPU time (process time; wall time on a GPU).

The model is a ``small`` HALO briefly fitted to the bundled MIMIC-III demo (categorical heads on), or with
``--synthetic`` an untrained one over a HALO-inpatient-sized vocabulary. The demo has 1.3 visits per patient, so
each case is ``SHIFT:BATCH``: the <end> logit lowered by SHIFT (3 -> ~3.7 visits per patient) and the batch size.
FLOPs are counted by ``torch.utils.flop_counter`` (matrix products) in one extra untimed run of one batch per
sampler and divided by the sampled rows (label and visit rows kept). The floor follows issue 18: per row one transformer row (its
linear layers, 24 E^2 L), the head's start (2 D E) and every logit once over the non-zero half of the masked
weight (2 (V E + V (V - 1) / 2)), D = E + V.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/sample.py` (make bench) finds `bench`

from bench import briefly_trained_halo, mimic_demo_tables, synthetic_halo
from synthehr_core.model.sampling import HEAD_BLOCK, sample, sample_reference

SAMPLERS = {
    "block": lambda m, v, n, seed, bs: sample(m, v, n, seed=seed, batch_size=bs, progress=False),
    "full-row": lambda m, v, n, seed, bs: sample(m, v, n, seed=seed, batch_size=bs, progress=False, head_block=None),
    "reference": lambda m, v, n, seed, bs: sample_reference(m, v, n, seed=seed, batch_size=bs),
}


def floor_flops(cfg) -> dict[str, float]:
    """Issue 18's floor per sampled row: a transformer row, the head's start, every logit once (non-zero half)."""
    E, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    D = E + V
    parts = {"transformer": 24 * E * E * L, "head start": 2 * D * E, "logits": 2 * (V * E + V * (V - 1) / 2)}
    return {**parts, "total": sum(parts.values())}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def time_once(name: str, model, vocab, n: int, bs: int, seed: int, device: torch.device) -> tuple[float, int]:
    t0 = _clock(device)
    rows = SAMPLERS[name](model, vocab, n, seed, bs)
    return _clock(device) - t0, sum(len(r) for r in rows)


def flops_per_row(name: str, model, vocab, n: int, bs: int, seed: int) -> dict[str, float]:
    """Executed matrix-product FLOPs per sampled row, split into the transformer (its blocks and the visit
    embedding, counted by module) and the rest (the head)."""
    counter = FlopCounterMode(display=False)
    with counter:
        rows = SAMPLERS[name](model, vocab, n, seed, bs)
    n_rows = sum(len(r) for r in rows)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    transformer = sum(sum(c.values()) for k, c in counts.items() if k == "Block")
    transformer += 2 * vocab.size * model.config.n_embd * _history_rows(name, model, vocab, n, bs, seed)
    return {"total": total / n_rows, "transformer": transformer / n_rows, "head": (total - transformer) / n_rows}


def _history_rows(name: str, model, vocab, n: int, bs: int, seed: int) -> int:
    """Rows the transformer ran (each costs the visit embedding's 2 V E, which the module count leaves out)."""
    real, seen = model.history, [0]

    def history(x, past_key_values=None):
        seen[0] += x.size(0) * x.size(1)
        return real(x, past_key_values)

    model.history = history
    try:
        SAMPLERS[name](model, vocab, n, seed, bs)
    finally:
        del model.history
    return seen[0]


def _spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def run_case(model, vocab, shift: float, bs: int, args, names: list[str]) -> dict:
    cfg = model.config
    end_col = cfg.n_embd - 1 + vocab.end_index  # fine-head output unit of the <end> logit
    with torch.no_grad():
        model.fine_2.bias[end_col] = args.end_bias - shift
    times: dict[str, list[float]] = {k: [] for k in names}
    rows: dict[str, int] = {}
    for rep in range(args.repeats):
        for name in names:
            if name == "reference" and rep >= args.reference_repeats:
                continue
            seconds, rows[name] = time_once(name, model, vocab, args.n_patients, bs, args.seed + rep, args.device)
            times[name].append(seconds)
    out = {"shift": shift, "batch": bs, "times": times, "rows": rows}
    if not args.no_flops:  # one batch (at most --flop-patients) under the FLOP counter, untimed
        n = min(args.n_patients, bs, args.flop_patients)
        out["flops"] = {name: flops_per_row(name, model, vocab, n, bs, args.seed) for name in names}
    return out


def print_tables(results: list[dict], names: list[str], floor: dict[str, float], header: str) -> None:
    print(f"\n## time_sample  {header}")
    cols = " | ".join(f"{k} s" for k in names)
    vs = [k for k in names if k != "block"]
    print(f"| end shift | batch | rows/patient | {cols} | " + " | ".join(f"block vs {k}" for k in vs) + " |")
    print("|---:|---:|---:|" + "---:|" * (len(names) + len(vs)))
    for r in results:
        t = r["times"]
        ratios = []
        for k in vs:  # the ratio within each repeat that timed both
            rr = [b / a for a, b in zip(t["block"], t[k])]
            ratios.append(f"{_spread(rr, '{:.2f}')}x")
        per_pt = r["rows"]["block"] / r["n_patients"]
        print(f"| {r['shift']:.0f} | {r['batch']} | {per_pt:.2f} | " + " | ".join(_spread(t[k]) for k in names)
              + " | " + " | ".join(ratios) + " |")
    if "flops" not in results[0]:
        return
    print(f"\nexecuted MFLOP per sampled row (matrix products) next to the floor: transformer {floor['transformer'] / 1e6:.2f}"
          f" + head start {floor['head start'] / 1e6:.2f} + logits {floor['logits'] / 1e6:.2f} = "
          f"{floor['total'] / 1e6:.2f} MFLOP")
    print("| end shift | batch | " + " | ".join(f"{k}: total (transformer + head)" for k in names)
          + " | block / floor |")
    print("|---:|---:|" + "---:|" * (len(names) + 1))
    for r in results:
        f = r["flops"]
        cells = [f"{f[k]['total'] / 1e6:.2f} ({f[k]['transformer'] / 1e6:.2f} + {f[k]['head'] / 1e6:.2f})" for k in names]
        print(f"| {r['shift']:.0f} | {r['batch']} | " + " | ".join(cells) + f" | {f['block']['total'] / floor['total']:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--cases", nargs="+", default=["0:64", "0:256", "3:64", "3:256"], help="SHIFT:BATCH pairs")
    ap.add_argument("--n-patients", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-repeats", type=int, default=1, help="the reference is ~100x slower: time it less")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--flop-patients", type=int, default=256, help="at most this many patients (one batch) in the "
                    "FLOP-counting run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = steady on a shared box)")
    ap.add_argument("--synthetic", action="store_true",
                    help="untrained model over a HALO-inpatient-sized made-up vocabulary (no data, no training)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-group-heads", action="store_true",
                    help="train HI's Bernoulli head only (the default model has a categorical head per single-valued "
                         "variable, which every sampler draws through)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    if args.synthetic:
        model, vocab = synthetic_halo(preset=args.preset, seed=args.seed)
        what = "untrained, made-up HALO-inpatient vocabulary, biases set for ~14 codes/visit and p(end)=0.35"
    else:
        model, vocab, loss = briefly_trained_halo(mimic_demo_tables(), preset=args.preset, steps=args.train_steps,
                                                  seed=args.seed, group_heads=not args.no_group_heads)
        what = (f"{args.train_steps} Adam steps on MIMIC-III demo train (loss {loss:.4f}), "
                f"{len(model.config.groups or ())} categorical heads")
    model = model.to(args.device).eval()
    cfg = model.config
    args.end_bias = model.fine_2.bias[cfg.n_embd - 1 + vocab.end_index].item()
    dev = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    load = os.getloadavg()
    header = (f"{args.preset} (E={cfg.n_embd}, L={cfg.n_layer}, V={cfg.vocab_size}, n_ctx={cfg.n_ctx}), {what}; "
              f"{args.n_patients} patients, block = {HEAD_BLOCK} columns; torch {torch.__version__}, {dev}, "
              f"{torch.get_num_threads()} thread(s); load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(header, flush=True)
    names = [k for k in SAMPLERS if not (args.no_reference and k == "reference")]
    results = []
    for shift, bs in (c.split(":") for c in args.cases):
        r = run_case(model, vocab, float(shift), int(bs), args, names)
        r["n_patients"] = args.n_patients
        results.append(r)
        print(f"  done {shift}:{bs}: " + ", ".join(f"{k} {_spread(v)} s" for k, v in r["times"].items()), flush=True)
    load = os.getloadavg()
    print_tables(results, names, floor_flops(cfg),
                 header + f"; load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

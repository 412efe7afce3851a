"""What the recurrence offsets and the direct group terms cost: sampling and a training step, on vs off, same law.

One ``small`` HALO briefly fitted to the bundled MIMIC-III demo with both features, then the same weights twice:
``on`` (HaloConfig.recurrence and group_direct, their parameters set to 0) and ``off`` (the plain model without
them). With those parameters at 0 both define the same distribution, so the two samplers draw the same amount of
work and the ratio is the features' own overhead. Repeats alternate on/off back to back on one thread; the table
gives the median and [min-max] of the per-repeat ratios of process CPU time.

    PYTHONPATH=. .venv/bin/python -m bench.features [--repeats 5] [--n-patients 512]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import briefly_trained_halo, mimic_demo_tables
from synthehr_core.data.vocab import token_groups
from synthehr_core.model.halo import HALO
from synthehr_core.model.sampling import sample
from synthehr_core.model.tensors import EHRParquetDataset, collate_halo


def on_off(model) -> tuple:
    """(on, off): the model with its feature parameters zeroed, and the plain model with the same other weights."""
    on = copy.deepcopy(model)
    with torch.no_grad():
        on.recurrence.last.zero_()
        on.recurrence.ever.zero_()
        for lin in on.group_direct.values():
            lin.weight.zero_()
    off = HALO(replace(model.config, recurrence=0.0, group_direct=False))
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and all(k.startswith(("recurrence.", "group_direct.")) for k in unexpected), unexpected
    return on.eval(), off.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-patients", type=int, default=512)
    ap.add_argument("--preset", default="small")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    tables = mimic_demo_tables()
    model, vocab, _ = briefly_trained_halo(tables, preset=a.preset, steps=60)
    on, off = on_off(model)
    groups = token_groups(vocab)
    ds = EHRParquetDataset(tables, "train", model.config.n_ctx, vocab=vocab)
    X, mask = collate_halo([ds[i] for i in range(min(32, len(ds)))], vocab, model.config.n_ctx, trim=True)
    ratios: dict[str, list[float]] = {"sample": [], "train step": []}
    times: dict[str, list[float]] = {k: [] for k in ("sample on", "sample off", "step on", "step off")}
    for r in range(a.repeats):
        for name, m in (("on", on), ("off", off)) if r % 2 == 0 else (("off", off), ("on", on)):
            t0 = time.process_time()
            rows = sample(m, vocab, a.n_patients, seed=r, batch_size=256, progress=False, groups=groups)
            times[f"sample {name}"].append(time.process_time() - t0)
            m.train()
            t0 = time.process_time()
            for _ in range(5):
                m.zero_grad()
                m(X, mask, n_ctx=m.config.n_ctx)[1].backward()
            times[f"step {name}"].append((time.process_time() - t0) / 5)
            m.eval()
        ratios["sample"].append(times["sample on"][-1] / times["sample off"][-1])
        ratios["train step"].append(times["step on"][-1] / times["step off"][-1])
        print(f"repeat {r}: sample {times['sample on'][-1]:.2f} / {times['sample off'][-1]:.2f} s, "
              f"step {times['step on'][-1]:.3f} / {times['step off'][-1]:.3f} s ({len(rows)} patients)", flush=True)
    print(f"\n{a.preset} HALO on the MIMIC-III demo vocabulary (V={model.config.vocab_size}), {a.n_patients} patients, "
          f"batch 32 for the step; CPU seconds, one thread\n")
    print("| | on / off, median [min-max] |\n|---|---|")
    for k, xs in ratios.items():
        print(f"| {k} | {statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}] |")


if __name__ == "__main__":
    main()

"""Benchmark the train stage and ConSequence's generation overhead.

    .venv/bin/python bench/train.py                       # CPU, ~5-8 minutes on a shared 2-core box
    .venv/bin/python bench/train.py --only trim           # trimmed vs padded batches only
    .venv/bin/python bench/train.py --preset small --vocab 800 --batch 16 --steps 20 --n-patients 300

0. ``time_trimmed_step``: CPU seconds per training step (collate + forward/backward + Adam) on MIMIC-shaped
   batches (the bundled demo's train split, and ``bench.simulated_cohort``): the step before issue 18 (padded to
   n_ctx as HI does, for-loop Adam: ``train(legacy_step=True)``), the batch trimmed to its longest patient with
   the loss normaliser kept at n_ctx, and trimmed with the fused Adam (the train stage's step now). All start
   from the same weights and take the same batches, interleaved within each repeat, so each repeat's ratio is
   measured side by side; the loss and gradient differences of the first batch are printed with them.
   ``time_buckets``: rows computed and time per epoch, trimmed, with and without length-bucketed batches
   (``train(length_buckets=W)``). docs/speed.md has the tables.
1. ``time_train_step``: optimiser steps/s of our HALO (head mask = ``tril(weight)`` in forward, logits +
   BCEWithLogits) against a reference-style HALO (HI:model.py: a D x D int32 mask *buffer* multiplied into the
   head weight every forward, sigmoid probabilities + BCELoss on masked probabilities). Same weights, same batch.
2. ``time_sample``: seconds to sample the same N patients from the same checkpoint with and without its mined
   ConSequence rules (``synthehr_core.model.sampling.sample``), on the bundled MIMIC-III demo. Anchor: the ConSequence
   paper reports generation < 13% slower than the unconstrained model (arXiv 2312.05964, abstract).
Inputs are built outside the timed regions; each timing is the median of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthehr_core.model.halo import HALO, HaloConfig
from synthehr_core.model.tensors import collate_halo
from synthehr_core.model.train import bucket_order, epoch_order, make_optimizer, train_step


# ---------------------------------------------------------------------------------------------- reference style
class RefMaskedLinear(nn.Module):
    """HI's masked head layer: the lower-triangular mask is an int32 buffer, multiplied into the weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.register_buffer("mask", torch.tril(torch.ones_like(weight, dtype=torch.int32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class RefHALO(HALO):
    """Reference-style HALO: buffered head masks and BCELoss on sigmoid probabilities (HI:model.py)."""

    def __init__(self, config: HaloConfig, like: HALO):
        super().__init__(config)
        self.load_state_dict(like.state_dict())
        self.fine_1 = RefMaskedLinear(like.fine_1.weight, like.fine_1.bias)
        self.fine_2 = RefMaskedLinear(like.fine_2.weight, like.fine_2.bias)

    def forward(self, x, mask=None, loss_weight=None):
        h, _ = self.history(x[:, :-1])
        targets = x[:, 1:]
        probs = torch.sigmoid(self.head(h, targets))
        m = mask[:, 1:]
        return probs, F.binary_cross_entropy(probs * m, targets * m)


# ---------------------------------------------------------------------------------------------- data makers
def random_batch(B: int, T: int, n_visit: int, n_labels: int, seed: int, p_code: float = 0.02):
    """A HALO-layout batch: start row, one label per patient, 1..T-2 visits of Bernoulli codes, <end>, <pad>."""
    g = torch.Generator().manual_seed(seed)
    V = n_visit + n_labels + 3
    start, end, pad = n_visit + n_labels, n_visit + n_labels + 1, n_visit + n_labels + 2
    X = torch.zeros(B, T, V)
    mask = torch.zeros(B, T, 1)
    X[:, 0, start] = 1.0
    n_vis = torch.randint(1, T - 1, (B,), generator=g)
    for b in range(B):
        X[b, 1, n_visit + int(torch.randint(0, n_labels, (1,), generator=g))] = 1.0
        last = 1 + int(n_vis[b])
        X[b, 2:last + 1, :n_visit] = (torch.rand(last - 1, n_visit, generator=g) < p_code).float()
        X[b, last, end] = 1.0
        X[b, last + 1:, pad] = 1.0
        mask[b, 1:last + 1] = 1.0
    return X, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats: int, device: torch.device | None = None) -> float:
    device = device or torch.device("cpu")
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- trimmed batches
def demo_batches(batch: int, epochs: int, n_ctx: int, seed: int = 0):
    """The bundled MIMIC-III demo's train split in the train stage's epoch order: ``(batches of items, vocab)``."""
    from bench import mimic_demo_tables
    from synthehr_core.model.tensors import EHRParquetDataset

    ds = EHRParquetDataset(mimic_demo_tables(), "train", n_ctx)
    out = []
    for e in range(epochs):
        order = epoch_order(len(ds), seed, e)
        out += [[ds[int(i)] for i in order[a:a + batch]] for a in range(0, len(ds), batch)]
    return out, ds.vocab


def simulated_batches(batch: int, n_batches: int, n_ctx: int, seed: int = 0):
    from bench import simulated_cohort

    items, vocab = simulated_cohort(n_patients=batch * n_batches, n_ctx=n_ctx, seed=seed)
    return [items[a:a + batch] for a in range(0, len(items), batch)], vocab


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.4f} [{min(xs):.4f}-{max(xs):.4f}]"


def _grads(model, X, mask, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = model(X, mask, **kw)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


STEPS = {"padded": (False, False), "trimmed": (True, False), "trimmed + fused Adam": (True, True)}  # (trim, fused)


def time_trimmed_step(batches, vocab, preset: str, n_ctx: int, repeats: int, device: torch.device, seed: int = 0
                      ) -> dict:
    """Per-step CPU seconds of the step before (padded, for-loop Adam), trimmed, and trimmed with the fused Adam
    (the train stage's default) over the same batches from the same weights, interleaved; ratios per repeat."""
    cfg = HaloConfig.preset(preset, vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        first = HALO(cfg).to(device)
    models = {name: first if i == 0 else HALO(cfg).to(device) for i, name in enumerate(STEPS)}
    for m in models.values():
        m.load_state_dict(first.state_dict())
    # same weights, first batch: the trimmed loss and gradients against the padded ones
    Xp, mp = collate_halo(batches[0], vocab, n_ctx)
    Xt, mt = collate_halo(batches[0], vocab, n_ctx, trim=True)
    lp, gp = _grads(models["padded"], Xp.to(device), mp.to(device))
    lt, gt = _grads(models["trimmed"], Xt.to(device), mt.to(device), n_ctx=n_ctx)
    grad_err = max(float((gt[k] - gp[k]).abs().max() / gp[k].abs().max().clamp_min(1e-30)) for k in gp)
    runs = {name: (models[name], trim) for name, (trim, _) in STEPS.items()}
    opts = {name: make_optimizer(models[name], 1e-4, fused=fused) for name, (_, fused) in STEPS.items()}

    def epoch(name: str) -> None:
        model, trim = runs[name]
        for items in batches:
            X, mask = collate_halo(items, vocab, n_ctx, trim=trim)
            train_step(model, opts[name], X.to(device), mask.to(device), n_ctx=n_ctx if trim else None)
        _sync(device)

    for name in runs:
        epoch(name)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name in runs:
            t0 = time.process_time() if device.type == "cpu" else time.perf_counter()
            epoch(name)
            t1 = time.process_time() if device.type == "cpu" else time.perf_counter()
            times[name].append((t1 - t0) / len(batches))
    rows = [collate_halo(items, vocab, n_ctx, trim=True)[0].size(1) for items in batches]
    return {"preset": preset, "V": vocab.size, "batch": len(batches[0]), "steps": len(batches),
            "rows": statistics.mean(rows), "rows_max": max(rows), "times": times,
            "loss_diff": abs(lt - lp) / abs(lp), "grad_err": grad_err}


def time_buckets(items_batches, vocab, preset: str, n_ctx: int, window: int, repeats: int, device: torch.device,
                 seed: int = 0) -> dict:
    """One epoch, trimmed, in the stage's order and length-bucketed: rows computed (B x T summed) and CPU s."""
    items = [it for b in items_batches for it in b]
    bs = len(items_batches[0])
    fvr = vocab.first_visit_row
    rows = torch.tensor([fvr + min(len(v), n_ctx - fvr) for _, v in items])
    order = epoch_order(len(items), seed, 0)
    orders = {"epoch order": order, f"length buckets (W={window})": bucket_order(order, rows, bs, seed, 0, window)}
    cfg = HaloConfig.preset(preset, vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx)
    out = {}
    for name, o in orders.items():
        batches = [[items[int(i)] for i in o[a:a + bs]] for a in range(0, len(o), bs)]
        out[name] = {"rows": sum(len(b) * collate_halo(b, vocab, n_ctx, trim=True)[0].size(1) for b in batches),
                     "batches": batches, "times": []}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HALO(cfg).to(device)
    opt = make_optimizer(model, 1e-4)
    for _ in range(repeats):
        for r in out.values():
            t0 = time.process_time()
            for b in r["batches"]:
                X, mask = collate_halo(b, vocab, n_ctx, trim=True)
                train_step(model, opt, X.to(device), mask.to(device), n_ctx=n_ctx)
            _sync(device)
            r["times"].append(time.process_time() - t0)
    return out


def print_trimmed(results: list[tuple[str, dict]], load: tuple, n_ctx: int) -> None:
    print("\n## time_trimmed_step: CPU s per step (collate + forward/backward + Adam), median [min-max] over repeats")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| batches | preset | V | batch x steps | rows: mean / max of n_ctx | " + " | ".join(STEPS)
          + " | trimmed: speed-up | + fused Adam: speed-up | rel. loss diff | max rel. grad diff |")
    print("|---|---|---:|---:|---:|" + "---:|" * (len(STEPS) + 4))
    for what, r in results:
        t = r["times"]
        ratios = [[a / b for a, b in zip(t["padded"], t[name])] for name in list(STEPS)[1:]]
        print(f"| {what} | {r['preset']} | {r['V']} | {r['batch']} x {r['steps']} | {r['rows']:.1f} / {r['rows_max']} "
              f"of {n_ctx} | " + " | ".join(_spread(t[name]) for name in STEPS) + " | "
              + " | ".join(f"{statistics.median(x):.2f}x [{min(x):.2f}-{max(x):.2f}]" for x in ratios)
              + f" | {r['loss_diff']:.1e} | {r['grad_err']:.1e} |")



# ---------------------------------------------------------------------------------------------- benchmarks
def time_train_step(preset: str, n_visit: int, n_labels: int, n_ctx: int, batch: int, steps: int, repeats: int,
                    device: torch.device, seed: int = 0) -> list[dict]:
    """Both models get ``repeats`` timed chunks of ``steps`` steps, interleaved (ours, ref, ours, ...) so load drift
    on a shared machine hits both; reports the median and the best chunk."""
    cfg = HaloConfig.preset(preset, n_visit, n_labels, n_ctx=n_ctx)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ours = HALO(cfg)
    ref = RefHALO(cfg, ours)
    ours.to(device), ref.to(device)
    X, mask = random_batch(batch, n_ctx, n_visit, n_labels, seed)
    X, mask = X.to(device), mask.to(device)
    with torch.no_grad():  # same weights, same batch: the two losses agree up to BCELoss's log clamp
        losses = [float(ours(X, mask)[1]), float(ref(X, mask)[1])]
    models = [ours, ref]
    opts = [make_optimizer(m, 1e-4) for m in models]
    for m, o in zip(models, opts):
        train_step(m, o, X, mask)  # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, (m, o) in enumerate(zip(models, opts)):
            times[i].append(_median_time(lambda m=m, o=o: [train_step(m, o, X, mask) for _ in range(steps)], 1, device))
    rows = []
    for i, name in enumerate(("ours (tril in forward, BCEWithLogits)", "reference (int mask buffer, BCELoss)")):
        rows.append({"model": name, "steps/s": steps / statistics.median(times[i]), "best": steps / min(times[i]),
                     "loss": losses[i],
                     "buffers MB": sum(b.numel() * b.element_size() for b in models[i].buffers()) / 2**20})
    rows[0]["ratio"] = rows[0]["steps/s"] / rows[1]["steps/s"]
    rows[0]["ratio best"] = rows[0]["best"] / rows[1]["best"]
    return rows


def time_sample(n_patients: int, batch: int, preset: str, train_steps: int, repeats: int, device: torch.device,
                seed: int = 0) -> dict:
    from synthehr_core.data.preprocess import preprocess
    from synthehr_core.model.checkpoint import load_model
    from synthehr_core.model.consequence import load_row_rules
    from synthehr_core.model.sampling import sample
    from synthehr_core.model.train import train_to_dir
    from synthehr_core.rules.mining import mine_rules_to_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    preprocess("mimic3", tmp / "tables", overwrite=True)
    # the demo has 100 patients: KI's thresholds (500, 10, >5) find nothing, so scale them down
    info = mine_rules_to_dir(tmp / "tables", tmp / "rules", label_min_prevalence=20, pair_min_prevalence=3,
                             persistence_min_prevalence=3, persistence_min_repeats=1, prerequisite_min_prevalence=3)
    train_to_dir(tmp / "tables", tmp / "model", model_type="consequence", rules_dir=tmp / "rules", preset=preset,
                 max_steps=train_steps, epochs=10_000, batch_size=16, lr=1e-3, eval_every=None, seed=seed,
                 device=device, progress=False)
    model, vocab, _ = load_model(tmp / "model", device)
    rules = load_row_rules(tmp / "model", vocab)
    out = {"n_rules": info["n_rules"], "by_family": info["by_family"], "groups": len(rules.groups),
           "vocab": vocab.size}
    timed = TimedRules(rules)
    times: dict[str, list[float]] = {"halo": [], "consequence": []}
    for _ in range(repeats):  # interleaved, so load drift on a shared machine hits both
        for name, rr in (("halo", None), ("consequence", timed)):
            res = []
            times[name].append(_median_time(lambda res=res, rr=rr: res.append(sample(
                model, vocab, n_patients, seed=seed, batch_size=batch, rules=rr, device=device, progress=False)),
                1, device))
            out[name + " rows"] = sum(len(p) for p in res[-1])
            out[name + " tokens"] = sum(len(r) for p in res[-1] for r in p)
    for name, ts in times.items():
        out[name] = statistics.median(ts)
        out[name + " best"] = min(ts)
    out["overhead best %"] = 100.0 * (out["consequence best"] / out["halo best"] - 1.0)
    out["apply_row"] = timed.seconds / repeats
    out["rows"] = timed.calls / repeats
    out["overhead %"] = 100.0 * (out["consequence"] / out["halo"] - 1.0)
    out["apply_row %"] = 100.0 * out["apply_row"] / out["halo"]
    return out


class TimedRules:
    """Wraps compiled rules and accumulates the time spent inside ``apply_row``."""

    def __init__(self, rules):
        self.rules, self.seconds, self.calls = rules, 0.0, 0

    def apply_row(self, past, row, row_index):
        t0 = time.perf_counter()
        out = self.rules.apply_row(past, row, row_index)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=800, help="visit tokens of the training-step benchmark")
    ap.add_argument("--labels", type=int, default=7)
    ap.add_argument("--n-ctx", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-patients", type=int, default=200)
    ap.add_argument("--sample-batch", type=int, default=100)
    ap.add_argument("--sample-preset", default="tiny")
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = steady on a shared box)")
    ap.add_argument("--skip", choices=["train", "sample"], default=None)
    ap.add_argument("--only", choices=["trim", "train", "sample"], default=None, help="run one benchmark only")
    ap.add_argument("--trim-presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--trim-batch", type=int, default=48, help="48 = the train stage default (HI)")
    ap.add_argument("--demo-epochs", type=int, default=3, help="epochs of demo batches timed per repeat")
    ap.add_argument("--sim-batches", type=int, default=6, help="simulated-cohort batches timed per repeat")
    ap.add_argument("--bucket-window", type=int, default=4)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), {where}")
    if a.only in (None, "trim"):
        load = os.getloadavg()
        demo, demo_vocab = demo_batches(a.trim_batch, a.demo_epochs, a.n_ctx)
        sim, sim_vocab = simulated_batches(a.trim_batch, a.sim_batches, a.n_ctx)
        results = []
        for preset in a.trim_presets:
            results.append(("MIMIC-III demo train split", time_trimmed_step(demo, demo_vocab, preset, a.n_ctx,
                                                                             a.repeats, device)))
            results.append(("simulated cohort", time_trimmed_step(sim, sim_vocab, preset, a.n_ctx, a.repeats,
                                                                  device)))
        print_trimmed(results, load, a.n_ctx)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"\n## time_buckets: one epoch, trimmed, preset {a.trim_presets[0]}, batch {a.trim_batch}")
        print("| cohort | order | rows computed (sum of B x T) | CPU s per epoch, median [min-max] |")
        print("|---|---|---:|---:|")
        for what, (b, v) in (("MIMIC-III demo train split", (demo[:len(demo) // a.demo_epochs], demo_vocab)),
                             ("simulated cohort", (sim, sim_vocab))):
            res = time_buckets(b, v, a.trim_presets[0], a.n_ctx, a.bucket_window, a.repeats, device)
            for name, r in res.items():
                print(f"| {what} | {name} | {r['rows']} | {_spread(r['times'])} |")
    if a.skip != "train" and a.only in (None, "train"):
        rows = time_train_step(a.preset, a.vocab, a.labels, a.n_ctx, a.batch, a.steps, a.repeats, device)
        print(f"\n## time_train_step  preset={a.preset} V={a.vocab + a.labels + 3} n_ctx={a.n_ctx} batch={a.batch}")
        print(f"| {'model':<40} | steps/s (median) | steps/s (best) | head mask buffers MB | loss at init |")
        print(f"|{'-' * 42}|-----------------:|---------------:|---------------------:|-------------:|")
        for r in rows:
            print(f"| {r['model']:<40} | {r['steps/s']:16.2f} | {r['best']:14.2f} | {r['buffers MB']:20.1f} "
                  f"| {r['loss']:12.6f} |")
        print(f"\nspeed ratio ours / reference: {rows[0]['ratio']:.2f}x (median), {rows[0]['ratio best']:.2f}x (best)")
    if a.skip != "sample" and a.only in (None, "sample"):
        s = time_sample(a.n_patients, a.sample_batch, a.sample_preset, a.train_steps, a.repeats, device)
        print(f"\n## time_sample  MIMIC-III demo, V={s['vocab']}, preset={a.sample_preset}, {a.n_patients} patients, "
              f"batch {a.sample_batch}, {s['n_rules']} rules in {s['groups']} groups {s['by_family']}")
        print("| sampler | seconds | rows sampled | tokens sampled |")
        print("|---|---:|---:|---:|")
        print(f"| HALO (no rules) | {s['halo']:.3f} | {s['halo rows']} | {s['halo tokens']} |")
        print(f"| ConSequence (rules applied every row) | {s['consequence']:.3f} | {s['consequence rows']} "
              f"| {s['consequence tokens']} |")
        print(f"| of which inside apply_row ({s['rows']:.0f} calls) | {s['apply_row']:.3f} | | |")
        print(f"| best run: HALO / ConSequence | {s['halo best']:.3f} / {s['consequence best']:.3f} | | |")
        print(f"\nConSequence generation overhead: {s['overhead %']:+.1f}% end to end, median "
              f"({s['overhead best %']:+.1f}% best runs; paper: < 13% slower); "
              f"rule application alone = {s['apply_row %']:.1f}% of the HALO time (end to end also moves because "
              "overwritten rows change what is sampled next: see rows / tokens)")


if __name__ == "__main__":
    main()

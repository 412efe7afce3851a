"""GPU check: train a MIMIC-sized HALO for a fixed number of steps in fp32, bf16 and fp16, then sample a fixed cohort.

    .venv/bin/python bench/gpu_check.py                 # paper HALO (E=768, 12 layers, V=6869) on cuda
    .venv/bin/python bench/gpu_check.py --dp            # plus DP-SGD rows (Opacus; physical batch 8)
    .venv/bin/python bench/gpu_check.py --tiny          # CPU smoke run in seconds (what CI runs)
    .venv/bin/python bench/gpu_check.py --size demo --precisions fp32 --dp   # CPU cost of DP-SGD per step

Prints one row per configuration: training steps/s and patients/s, peak memory while training, sampling
patients/s and peak memory while sampling (``synthehr_core.model.sampling.sample``, in fp32 as the sample stage does,
from that configuration's trained weights; ``--sample-autocast`` samples under its precision), final loss and
sampled rows per patient. Peak memory is ``torch.cuda.max_memory_allocated`` per phase on CUDA, and the process's peak RSS on the
CPU (monotone over the run, so only the first row is meaningful there).

Data are synthetic and seeded, shaped like HALO's MIMIC-III inpatient set (HI:config.py: 6841 ICD-9 codes + 25
phenotype labels + 3 specials = 6869 columns, n_ctx 48, batch 48); visits per patient ~ 1 + Geometric(0.6) and
codes per visit ~ 1 + Poisson(12.7) (mean 13.7, as MIMIC-III's diagnoses per admission), codes drawn from a Zipf
law. Every configuration starts from the same seeded weights, with the head's output bias set to each column's
log-odds in the batches (a unigram prior): a model after 20 Adam steps at lr 1e-4 otherwise still gives p ~ 0.5 to
every code and would sample thousands of codes per row, which would time nothing a trained model does. It is a
throughput check, not a quality check.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthehr_core.data.vocab import build_vocab
from synthehr_core.errors import ConfigError
from synthehr_core.model.halo import HALO, HaloConfig
from synthehr_core.model.precision import autocast, grad_scaler, validate_precision
from synthehr_core.model.sampling import sample
from synthehr_core.model.tensors import collate_halo


@dataclass(frozen=True)
class Size:
    n_codes: int
    n_labels: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ctx: int
    batch_size: int
    steps: int
    n_patients: int
    sample_batch: int


PAPER = Size(n_codes=6841, n_labels=25, n_embd=768, n_layer=12, n_head=12, n_ctx=48, batch_size=48, steps=20,
             n_patients=512, sample_batch=256)  # HI:config.py, HI:train_model.py (batch 48), generation batch 256
DEMO = Size(n_codes=750, n_labels=27, n_embd=32, n_layer=2, n_head=2, n_ctx=16, batch_size=8, steps=20,
            n_patients=32, sample_batch=32)  # MIMIC-III demo vocabulary (~780 columns), the "tiny" preset
TINY = Size(n_codes=40, n_labels=4, n_embd=16, n_layer=2, n_head=2, n_ctx=8, batch_size=8, steps=3,
            n_patients=8, sample_batch=8)


def make_vocab(size: Size):
    codes = [f"dx:{i:05d}" for i in range(size.n_codes)]
    return build_vocab(["inpatient"], {}, [], codes, {"phenotype": [f"{i:02d}" for i in range(size.n_labels)]}, {},
                       ["dx"])


def make_batches(size: Size, vocab, n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded MIMIC-like patients collated into dense HALO batches (built before any timing)."""
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, size.n_codes + 1, dtype=torch.float64)
    out = []
    for _ in range(n_batches):
        patients = []
        for _ in range(size.batch_size):
            n_vis = min(int(torch.empty(1).geometric_(0.6, generator=g).item()), size.n_ctx - 2)  # trials >= 1
            visits = []
            for _ in range(n_vis):
                k = min(1 + int(torch.poisson(torch.tensor([12.7]), generator=g).item()), size.n_codes)
                visits.append(sorted(torch.multinomial(zipf, k, replacement=False, generator=g).tolist()))
            labels = sorted((vocab.n_visit_tokens + torch.nonzero(
                torch.rand(size.n_labels, generator=g) < 0.15).flatten()).tolist())
            patients.append((labels, visits))
        out.append(collate_halo(patients, vocab, size.n_ctx))
    return out


def init_output_prior(model: HALO, batches) -> None:
    """Set the logit bias of column j to log-odds of j on the unmasked target rows of ``batches``."""
    pos = sum((X[:, 1:] * m[:, 1:]).sum((0, 1)) for X, m in batches)  # (V,)
    rows = sum(m[:, 1:].sum() for _, m in batches)
    p = ((pos + 0.5) / (rows + 1.0)).clamp(1e-6, 1 - 1e-6)
    E, V = model.config.n_embd, model.config.vocab_size
    with torch.no_grad():
        model.fine_2.bias[E - 1:E - 1 + V] = torch.log(p / (1 - p))


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(size: Size, vocab, batches, precision: str, device: torch.device, dp: bool, seed: int,
            warmup: int = 2, sample_autocast: bool = False) -> dict:
    cfg = HaloConfig(vocab.n_visit_tokens, vocab.n_labels, n_ctx=size.n_ctx, n_embd=size.n_embd,
                     n_layer=size.n_layer, n_head=size.n_head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HALO(cfg)
    init_output_prior(model, batches)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # HI:train_model.py
    amp = lambda: autocast(precision, device)
    scaler = grad_scaler(precision, device)
    private = None
    if dp:
        from synthehr_core.model.dp import DPConfig, PrivateTraining

        n_train = 100 * size.batch_size  # nominal: only the sample rate matters for the speed
        private = PrivateTraining(model, optimizer, n_train=n_train, batch_size=size.batch_size,
                                  steps=warmup + size.steps, seed=seed, device=device, precision=precision,
                                  config=DPConfig(noise_multiplier=1.0, delta=1e-6,
                                                  physical_batch_size=min(8, size.batch_size)))
        flat = [(X[i], m[i]) for X, m in batches for i in range(len(X))]
        idx = torch.arange(size.batch_size)  # fixed logical batch: equal work in every configuration

        def collate(items):
            return torch.stack([a for a, _ in items]), torch.stack([m for _, m in items])

    def step(i: int) -> float:
        if private is not None:
            total, n = private.step(i, idx, flat, collate, amp)
            return total / max(n, 1)
        X, mask = batches[i % len(batches)]
        X, mask = X.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with amp():
            _, loss = model(X, mask)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    for i in range(warmup):
        step(i)
    _peak_reset(device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + size.steps):
        loss = step(i)
    _sync(device)
    train_s = time.perf_counter() - t0
    train_peak = _peak_gib(device)
    loss = float(loss)
    if private is not None:
        private.close()

    model.eval()
    _peak_reset(device)
    t0 = time.perf_counter()
    # the sample stage samples in fp32; --sample-autocast tries the row's precision (the incremental head then
    # accumulates its pre-activations in low precision: a speed experiment, not what the pipeline does)
    with amp() if sample_autocast else contextlib.nullcontext():
        rows = sample(model, vocab, size.n_patients, seed=seed, batch_size=size.sample_batch, device=device,
                      progress=False)
    _sync(device)
    sample_s = time.perf_counter() - t0
    return {"precision": precision + ("+dp" if dp else ""), "train_steps_per_s": size.steps / train_s,
            "train_patients_per_s": size.steps * size.batch_size / train_s, "train_peak_gib": train_peak,
            "sample_patients_per_s": size.n_patients / sample_s, "sample_peak_gib": _peak_gib(device),
            "final_loss": loss, "rows_per_patient": sum(len(r) for r in rows) / max(len(rows), 1)}


def format_table(rows: list[dict]) -> str:
    cols = [("precision", "config", "{}"), ("train_steps_per_s", "train steps/s", "{:.3f}"),
            ("train_patients_per_s", "train patients/s", "{:.1f}"), ("train_peak_gib", "train peak GiB", "{:.2f}"),
            ("sample_patients_per_s", "sample patients/s", "{:.2f}"), ("sample_peak_gib", "sample peak GiB", "{:.2f}"),
            ("final_loss", "final loss", "{:.6f}"), ("rows_per_patient", "rows/patient", "{:.1f}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        if "error" in r:
            cells.append([r["precision"], "error: " + r["error"]] + [""] * (len(cols) - 2))
        else:
            cells.append([f.format(r[k]) for k, _, f in cols])
    width = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(c[i].ljust(width[i]) for i in range(len(cols))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (CI smoke run); = --size tiny")
    p.add_argument("--size", choices=["paper", "demo", "tiny"], default="paper",
                   help="paper: HALO inpatient (default); demo: MIMIC-III demo vocabulary, tiny preset (CPU DP cost)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--n-patients", type=int, default=None, help="sampled cohort size")
    p.add_argument("--dp", action="store_true", help="also time DP-SGD (Opacus) rows for each precision but fp16")
    p.add_argument("--sample-autocast", action="store_true",
                   help="sample under the row's autocast too (default: fp32 sampling, as the sample stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    size = TINY if a.tiny else {"paper": PAPER, "demo": DEMO, "tiny": TINY}[a.size]
    if a.steps is not None or a.n_patients is not None:
        size = Size(**{**size.__dict__, "steps": a.steps or size.steps, "n_patients": a.n_patients or size.n_patients})
    on_gpu = torch.cuda.is_available() and size is not TINY
    device = torch.device(a.device or ("cuda" if on_gpu else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would blur the fp32 row)
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    vocab = make_vocab(size)
    batches = make_batches(size, vocab, n_batches=4, seed=a.seed)
    print(f"HALO E={size.n_embd} L={size.n_layer} V={vocab.size} n_ctx={size.n_ctx} batch={size.batch_size}; "
          f"{size.steps} timed steps, cohort of {size.n_patients} (sample batch {size.sample_batch})", flush=True)
    rows = []
    configs = [(pr, False) for pr in a.precisions.split(",")]
    if a.dp:
        configs += [(pr, True) for pr in a.precisions.split(",") if pr != "fp16"]
    for precision, dp in configs:
        name = precision + ("+dp" if dp else "")
        try:
            validate_precision(precision, device)
            rows.append(run_one(size, vocab, batches, precision, device, dp, a.seed,
                                sample_autocast=a.sample_autocast))
        except ConfigError as exc:
            rows.append({"precision": name, "error": str(exc).split(";")[0]})
        except torch.OutOfMemoryError:
            rows.append({"precision": name, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(f"  {name}: done", flush=True)
    print(format_table(rows), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""PyHealth 2.1.0's HALO on a JSON cohort: run by ``bench/fidelity.py`` inside ``.venv-pyhealth`` (``make pyhealth-env``).

Reads ``{"train": [{"patient_id", "visits": [[code, ...], ...]}], "val": [...]}``, trains
``pyhealth.models.generators.HALO`` with PyHealth's own loop (``train_model``: Adam, per-epoch validation, best
checkpoint saved), reloads the best checkpoint as a PyHealth user would, generates ``--n-samples`` patients with
``generate`` and writes ``{"patients": [...], "seconds": {...}, "versions": {...}}`` as JSON. It imports nothing
from synthehr (its own venv, Python 3.11 with ``--ignore-requires-python``).

    .venv-pyhealth/bin/python bench/pyhealth_halo.py IN.json OUT.json --embed-dim 32 --n-layers 2 --n-heads 2
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-samples", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    t0 = time.perf_counter()
    import pyhealth
    from pyhealth.datasets import create_sample_dataset
    from pyhealth.models.generators.halo import HALO
    from pyhealth.processors import NestedMultiHotProcessor
    t_import = time.perf_counter() - t0

    with open(a.inp) as f:
        data = json.load(f)
    schema = {"visits": NestedMultiHotProcessor}
    train = create_sample_dataset(samples=data["train"], input_schema=schema, output_schema={})
    val = create_sample_dataset(samples=data["val"], input_schema=schema, output_schema={},
                                input_processors=train.input_processors)
    save = tempfile.mkdtemp(prefix="pyhealth-halo-")
    model = HALO(train, embed_dim=a.embed_dim, n_heads=a.n_heads, n_layers=a.n_layers, n_ctx=a.n_ctx,
                 batch_size=a.batch_size, epochs=a.epochs, lr=a.lr, save_dir=save)
    n_params = sum(p.numel() for p in model.halo_model.parameters())
    t1 = time.perf_counter()
    model.train_model(train, val, device="cpu")
    t_train = time.perf_counter() - t1
    best = os.path.join(save, "halo_model")
    if os.path.exists(best):
        model.halo_model.load_state_dict(torch.load(best, map_location="cpu")["model"])
    t2 = time.perf_counter()
    synth = model.generate(a.n_samples, random_sampling=True, device="cpu")
    t_sample = time.perf_counter() - t2
    with open(a.out, "w") as f:
        json.dump({"patients": synth, "n_params": n_params, "vocab_size": model.config.total_vocab_size,
                   "seconds": {"import": t_import, "train": t_train, "sample": t_sample},
                   "versions": {"pyhealth": pyhealth.__version__, "torch": torch.__version__}}, f)


if __name__ == "__main__":
    main()

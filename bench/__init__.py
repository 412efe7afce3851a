"""Seeded data and model makers shared by the benchmarks (``python -m bench.<stage>``).

Inputs are built here, outside any timed region; every maker takes a seed and touches no global RNG state.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def mimic_demo_tables(out_dir: str | Path | None = None) -> Path:
    """Canonical tables of the bundled 100-patient MIMIC-III demo (vocabulary of 780 tokens)."""
    from synthehr_core.preprocess import preprocess

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="bench-mimic-")) / "tables"
    preprocess("mimic3", out, overwrite=True)
    return out


def briefly_trained_halo(tables_dir: str | Path, preset: str = "small", steps: int = 150, batch_size: int = 16,
                         n_ctx: int = 48, seed: int = 0, lr: float = 1e-3):
    """A HALO model fitted for a few Adam steps on the train split: realistic code and end-token rates.

    Not the train stage (synthehr_core.train); just enough fitting that sampled patients look like real ones.
    Returns (model in eval mode, vocab, final training loss).
    """
    from synthehr_core.models import HALO, HaloConfig
    from synthehr_core.tensors import EHRParquetDataset, HaloCollate

    ds = EHRParquetDataset(tables_dir, split="train", n_ctx=n_ctx)
    cfg = HaloConfig.preset(preset, ds.vocab.n_visit_tokens, ds.vocab.n_labels, n_ctx=n_ctx)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HALO(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, collate_fn=HaloCollate(ds.vocab, n_ctx))
    step, loss = 0, float("nan")
    model.train()
    while step < steps:
        for X, mask in dl:
            _, l = model(X, mask)
            opt.zero_grad(set_to_none=True)
            l.backward()
            opt.step()
            step, loss = step + 1, l.item()
            if step >= steps:
                break
    log.info("trained %s HALO for %d steps, loss %.5f", preset, steps, loss)
    return model.eval(), ds.vocab, loss

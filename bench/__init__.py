"""Seeded data and model makers shared by the benchmarks (``python -m bench.<stage>``).

Inputs are built here, outside any timed region; every maker takes a seed and touches no global RNG state.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def mimic_demo_tables(out_dir: str | Path | None = None) -> Path:
    """Canonical tables of the bundled 100-patient MIMIC-III demo (vocabulary of 780 tokens)."""
    from synthehr_core.data.preprocess import preprocess

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="bench-mimic-")) / "tables"
    preprocess("mimic3", out, overwrite=True)
    return out


def briefly_trained_halo(tables_dir: str | Path, preset: str = "small", steps: int = 150, batch_size: int = 16,
                         n_ctx: int = 48, seed: int = 0, lr: float = 1e-3, group_heads: bool = True):
    """A HALO model fitted for a few Adam steps on the train split: realistic code and end-token rates.

    Not the train stage (synthehr_core.model.train); just enough fitting that sampled patients look like real ones.
    Returns (model in eval mode, vocab, final training loss).
    """
    from synthehr_core.model.checkpoint import load_model
    from synthehr_core.model.train import train_to_dir

    out = Path(tempfile.mkdtemp(prefix="bench-halo-")) / "model"
    info = train_to_dir(tables_dir, out, model_type="halo", preset=preset, max_steps=steps, batch_size=batch_size,
                        lr=lr, seed=seed, n_ctx=n_ctx, eval_every=None, progress=False, group_heads=group_heads)
    model, vocab, _ = load_model(out, device="cpu")
    log.info("trained %s HALO for %d steps, loss %.5f", preset, steps, info["final_train_loss"])
    return model.eval(), vocab, info["final_train_loss"]


def synthetic_halo(n_codes: int = 6841, n_labels: int = 25, preset: str = "paper", n_ctx: int = 48,
                   codes_per_visit: float = 14.0, p_end: float = 0.35, seed: int = 0):
    """An untrained HALO over a made-up vocabulary of HALO-inpatient size (6841 codes + 25 labels by default),
    with output biases set so a visit has ~``codes_per_visit`` codes and ends the patient with ~``p_end``.

    Needs no data or preprocessing (so it runs where only torch is installed). Returns (model, vocab).
    """
    import math

    import torch

    from synthehr_core.data.vocab import build_vocab
    from synthehr_core.model.halo import HALO, HaloConfig

    vocab = build_vocab([], {}, [], [f"dx:{i:05d}" for i in range(n_codes)],
                        {"phenotype": [f"p{i:02d}" for i in range(n_labels)]} if n_labels else {}, {}, ["dx"])
    cfg = HaloConfig.preset(preset, vocab.n_visit_tokens, vocab.n_labels, n_ctx=n_ctx)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HALO(cfg)
    E = cfg.n_embd
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    with torch.no_grad():
        b = model.fine_2.bias[E - 1:E - 1 + cfg.vocab_size]
        b[:vocab.n_visit_tokens] = logit(codes_per_visit / vocab.n_visit_tokens)
        b[vocab.label_slice] = logit(1.5 / max(vocab.n_labels, 1))
        b[vocab.end_index] = logit(p_end)
        b[vocab.start_index] = b[vocab.pad_index] = -20.0
    return model.eval(), vocab

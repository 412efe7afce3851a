"""Seeded data and model makers shared by the benchmarks (``python -m bench.<stage>``).

Inputs are built here, outside any timed region; every maker takes a seed and touches no global RNG state.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def mimic_demo_tables(out_dir: str | Path | None = None) -> Path:
    """Canonical tables of the bundled 100-patient MIMIC-III demo (vocabulary of 803 tokens)."""
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


def simulated_cohort(n_patients: int = 480, n_codes: int = 1610, n_labels: int = 6, codes_per_visit: float = 13.7,
                     visits_exponent: float = 3.2, n_ctx: int = 48, seed: int = 0):
    """A MIMIC-shaped training cohort without data: ``(items, vocab)``, ``items[i] = (labels, visits)`` as
    ``EHRParquetDataset`` gives them (sorted token indices; ``collate_halo`` input).

    Visits per patient follow a Zipf law with ``visits_exponent`` (3.2: 86% one visit, mean ~1.3, a long tail up
    to ``n_ctx - 2``; MIMIC-III has 58,976 admissions of 46,520 patients, 1.27 per patient). Codes per visit are
    1 + Poisson(codes_per_visit - 1) (13.7 = the bundled demo's diagnoses per admission) drawn from a Zipf(1.1)
    popularity over ``n_codes`` (1610 = ConSequence's 3-character MIMIC-III vocabulary, KI:config.py); each patient
    has one label from the first four (age groups) and one from the rest (sex), as ConSequence's six labels.
    """
    import numpy as np

    from synthehr_core.data.vocab import build_vocab

    rng = np.random.default_rng(seed)
    n_cat = max(n_labels - 4, 0)
    labels = {"age": [f"a{i}" for i in range(min(n_labels, 4))]}
    if n_cat:
        labels["sex"] = [f"s{i}" for i in range(n_cat)]
    vocab = build_vocab([], {}, [], [f"dx:{i:04d}" for i in range(n_codes)], labels if n_labels else {}, {}, ["dx"])
    ranks = np.arange(1, vocab.n_visit_tokens + 1)
    popularity = ranks ** -1.1
    popularity /= popularity.sum()
    support = np.arange(1, n_ctx - 1)
    p_visits = support ** -visits_exponent
    n_visits = rng.choice(support, size=n_patients, p=p_visits / p_visits.sum())
    label_idx = [vocab.index(f"label:age={v}") for v in labels["age"]]
    sex_idx = [vocab.index(f"label:sex={v}") for v in labels.get("sex", [])]
    items = []
    for nv in n_visits:
        visits = []
        for _ in range(int(nv)):
            k = min(1 + int(rng.poisson(codes_per_visit - 1)), vocab.n_visit_tokens)
            visits.append(sorted(rng.choice(vocab.n_visit_tokens, size=k, replace=False, p=popularity).tolist()))
        lab = ([int(rng.choice(label_idx))] if label_idx else []) + ([int(rng.choice(sex_idx))] if sex_idx else [])
        items.append((sorted(lab), visits))
    return items, vocab

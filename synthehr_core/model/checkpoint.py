"""Models and the checkpoint directory format shared by the train and sample stages.

A checkpoint directory holds ``model.pt`` (a ``state_dict``, never a pickled module), ``config.json`` (the
``HaloConfig`` fields plus ``model_type``), ``vocab.json``, and optionally ``rules.json`` and
``label_probs.parquet``. ``write_checkpoint`` writes the first three; ``load_model`` reads them back.
"""
from __future__ import annotations

import importlib
import io
import pickle
import warnings

import torch

from .. import storage
from ..data.vocab import Vocab
from ..errors import ConfigError, DataError
from .halo import HALO, HaloConfig, MaskedLinear

# model_type -> "module:class"; each class is built as cls(HaloConfig) and loads model.pt strictly
MODEL_TYPES = {
    "halo": "synthehr_core.model.halo:HALO",
    "consequence": "synthehr_core.model.consequence:ConSequence",
}

__all__ = ["HALO", "HaloConfig", "MaskedLinear", "MODEL_TYPES", "model_class", "write_checkpoint", "load_model"]


def model_class(model_type: str) -> type[torch.nn.Module]:
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is unknown; choose one of {sorted(MODEL_TYPES)}.")
    module, name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def write_checkpoint(out_dir, model: torch.nn.Module, vocab: Vocab, model_type: str = "halo",
                     extra_config: dict | None = None) -> None:
    """Write ``model.pt``, ``config.json`` and ``vocab.json`` into ``out_dir`` (typically a ``storage.atomic_dir``)."""
    model_class(model_type)  # fail early on an unknown type
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(out_dir, "model.pt"), buf.getvalue())
    storage.write_json(storage.join(out_dir, "config.json"),
                       {**model.config.to_dict(), "model_type": model_type, **(extra_config or {})})
    vocab.save(storage.join(out_dir, "vocab.json"))


def load_model(model_dir, device: str | torch.device | None = None) -> tuple[torch.nn.Module, Vocab, dict]:
    """Load a checkpoint directory: ``(model in eval mode, vocab, config.json as a dict)``."""
    storage.require_complete(model_dir, "train")
    missing = [f for f in ("model.pt", "config.json", "vocab.json") if not storage.exists(storage.join(model_dir, f))]
    if missing:
        raise ConfigError(f"{model_dir}: not a model checkpoint directory, missing {missing}. "
                          "Point at the output of the train stage.")
    info = storage.read_json(storage.join(model_dir, "config.json"))
    vocab = Vocab.load(storage.join(model_dir, "vocab.json"))
    config = HaloConfig.from_dict(info, where=storage.join(model_dir, "config.json"))
    if (config.n_visit_tokens, config.n_labels) != (vocab.n_visit_tokens, vocab.n_labels):
        raise ConfigError(f"{model_dir}: config.json sizes (n_visit_tokens={config.n_visit_tokens}, n_labels="
                          f"{config.n_labels}) disagree with vocab.json ({vocab.n_visit_tokens}, {vocab.n_labels}). "
                          "The checkpoint was assembled from different runs; re-run the train stage.")
    model = model_class(info.get("model_type", "halo"))(config)
    weights = storage.join(model_dir, "model.pt")
    try:
        with warnings.catch_warnings():   # a foreign pickle's protocol warning would precede the one-line error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(io.BytesIO(storage.read_bytes(weights)), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:   # truncated zip, crafted pickle
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{weights}: not a readable weights file ({first}); it is truncated or was not written by "
                        "the train stage. Re-run train (or copy the checkpoint again).") from exc
    model.load_state_dict(state)
    return model.to(device or "cpu").eval(), vocab, info

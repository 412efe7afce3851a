"""Models and the checkpoint directory format shared by the train and sample stages.

A checkpoint directory holds ``model.pt`` (a ``state_dict``, never a pickled module), ``config.json`` (the
``HaloConfig`` fields plus ``model_type``), ``vocab.json``, and optionally ``rules.json`` and
``label_probs.parquet``. ``write_checkpoint`` writes the first three; ``load_model`` reads them back.

The step checkpoints that resume a run (model, optimiser, loop and RNG state) are not part of it: they live in a
folder of their own (``StepCheckpoints``), so the model directory holds only what sampling needs.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import pickle
import warnings
from collections.abc import Iterator

import torch

from .. import storage
from ..data.vocab import Vocab
from ..errors import ConfigError, DataError, StorageError
from ..storage.backends import backend
from .halo import HALO, HaloConfig, MaskedLinear

# model_type -> "module:class"; each class is built as cls(HaloConfig) and loads model.pt strictly
MODEL_TYPES = {
    "halo": "synthehr_core.model.halo:HALO",
    "consequence": "synthehr_core.model.consequence:ConSequence",
}

__all__ = ["HALO", "HaloConfig", "MaskedLinear", "MODEL_TYPES", "StepCheckpoints", "load_model", "load_step_file",
           "model_class", "write_checkpoint"]


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


# ---------------------------------------------------------------------------------------------- step checkpoints
STEP_PREFIX = "step_"


class StepCheckpoints:
    """The step checkpoints of one run: a folder (local, gs://) outside the model directory.

    Each checkpoint is two files, ``step_00000120.pt`` (torch.save of the loop state) and ``step_00000120.json``,
    its marker, written last: ``{"step", "bytes", "sha256", "done"}``. A checkpoint counts only with its marker and
    a ``.pt`` of the recorded size and digest, so a write cut short (a kill, a full disk, an upload that died) is
    *absent*, never half there. Older checkpoints are pruned only after a newer one is complete, marker first.
    One run writes a folder at a time (``lock``).
    """

    def __init__(self, folder):
        self.folder = str(folder)

    def path(self, step: int, ext: str = ".pt") -> str:
        return storage.join(self.folder, f"{STEP_PREFIX}{step:08d}{ext}")

    def steps(self) -> list[int]:
        """Steps that have a marker (complete unless the ``.pt`` was tampered with), oldest first."""
        if not storage.exists(self.folder):
            return []
        names = storage.listdir(self.folder)
        return sorted(int(n[len(STEP_PREFIX):-5]) for n in names
                      if n.startswith(STEP_PREFIX) and n.endswith(".json") and n[len(STEP_PREFIX):-5].isdigit())

    def marker(self, step: int) -> dict:
        return storage.read_json(self.path(step, ".json"))

    def latest(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict, done: bool) -> str:
        """Write the checkpoint, then its marker; returns the ``.pt`` path. A failed write raises an OSError
        naming the file and leaves the checkpoints that were complete before."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        path = self.path(step)
        try:
            storage.write_bytes(path, data)
            storage.write_json(self.path(step, ".json"), {"step": step, "bytes": len(data), "done": done,
                                                          "sha256": hashlib.sha256(data).hexdigest()})
        except (OSError, StorageError) as exc:
            _remove(self.path(step, ".json"))
            _remove(path)
            have = self.latest()
            raise StorageError(f"writing the step-{step} checkpoint failed: {exc} Free space there or pass another "
                               "checkpoint_uri (--checkpoint-uri); a rerun resumes from " +
                               (f"the last complete checkpoint, step {have}." if have is not None else
                                "the start (no complete checkpoint yet).")) from exc
        return path

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's advisory lock (``storage.publish.output_lock``: ``.<key>.lock`` beside it) while a run
        writes checkpoints there: a second process training the same config and data into the same root fails at
        once, naming the holder. A killed holder's lock is stale at once on its host, after
        ``SYNTHEHR_LOCK_STALE_S`` elsewhere."""
        with storage.output_lock(self.folder):
            yield

    def load(self, step: int) -> dict:
        """The checkpoint of ``step``, checked against its marker (a corrupt file is named, not unpickled)."""
        path, mark = self.path(step), self.marker(step)
        return load_step_file(path, mark)

    def prune(self, keep: int | None) -> None:
        """Keep the newest ``keep`` complete checkpoints (None: all); a marker goes before its ``.pt``."""
        if not keep:
            return
        for step in self.steps()[:-keep]:
            _remove(self.path(step, ".json"))
            _remove(self.path(step))


def load_step_file(path: str, mark: dict | None = None) -> dict:
    """torch.load of a step checkpoint (weights only: no code runs), checked against its marker when given."""
    data = storage.read_bytes(path)
    if mark is not None and (len(data) != mark.get("bytes") or hashlib.sha256(data).hexdigest() != mark.get("sha256")):
        raise DataError(f"{path}: {len(data)} bytes that do not match its marker ({mark.get('bytes')} bytes, sha256 "
                        f"{str(mark.get('sha256'))[:12]}...): the file was changed after it was written. Delete it "
                        "and its .json marker to resume from the checkpoint before it.")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises RuntimeError, UnpicklingError, EOFError, ...)
        raise DataError(f"{path}: not a readable step checkpoint ({type(exc).__name__}: {str(exc)[:80]}). "
                        "Resume from another step_*.pt, or start without resume_from.") from exc


def _remove(path: str) -> None:
    """Delete a file or object if it is there."""
    backend(path).delete(path)

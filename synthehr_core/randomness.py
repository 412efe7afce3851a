"""One door for randomness: every random stream in synthehr is ``(seed, stream name...)`` turned into a generator here.

A stage takes one ``seed`` and draws each independent purpose from its own named stream, so two purposes never
reuse the same random bits (the label draw and the row draws of a shard once did: both were ``manual_seed(seed)``).

* numpy: ``numpy_rng(seed, *stream)`` = ``Generator(PCG64(SeedSequence(seed, spawn_key=stream)))``. The root
  stream (no name) is exactly ``np.random.default_rng(seed)``, and ``numpy_rng(seed, i)`` is child ``i`` of
  ``SeedSequence(seed).spawn(n)``; a string name becomes a fixed 32-bit key (sha256), the same on every machine.
* torch: ``torch_seed(seed, *stream)`` is the integer for ``torch.Generator().manual_seed``: ``seed`` itself for the
  root stream, else 63 bits of ``sha256("seed:name:...")``. This module never imports torch; ``model/`` builds the
  generators.

The streams in use (docs/architecture.md): preprocess split = root; KDE variables = ``i`` (config order), times =
``n``, calendar = ``n + 1``; shard decode = ``("decode", start)``; sampling rows = root, label rows = ``"labels"``;
model init = root, epoch order = ``("epoch", e)``, length buckets = ``("buckets", e)``, DP-SGD = ``("poisson", step)`` / ``("noise", step)``;
evaluation privacy attacks = ``"privacy"``, utility = ``"utility"``.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .errors import ConfigError

Stream = int | str
_MASK63 = 2 ** 63 - 1


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}. Pass e.g. seed=0.")
    return int(seed)


def _key(part: Stream) -> int:
    if isinstance(part, str):
        return int.from_bytes(hashlib.sha256(part.encode()).digest()[:4], "little")
    if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or part < 0:
        raise ConfigError(f"a random stream is named by strings and non-negative ints, got {part!r}.")
    return int(part)


def seed_sequence(seed: int, *stream: Stream) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``stream`` under ``seed`` (root stream: ``SeedSequence(seed)``)."""
    return np.random.SeedSequence(_seed(seed), spawn_key=tuple(_key(p) for p in stream))


def numpy_rng(seed: int, *stream: Stream) -> np.random.Generator:
    """A numpy generator for ``stream`` of ``seed``; independent of every other stream of the same seed."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, *stream)))


def torch_seed(seed: int, *stream: Stream) -> int:
    """The ``manual_seed`` of a torch generator for ``stream`` of ``seed`` (the seed itself for the root stream)."""
    seed = _seed(seed)
    if not stream:
        return seed
    text = ":".join(str(p) for p in (seed, *(_key(p) if not isinstance(p, str) else p for p in stream)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & _MASK63

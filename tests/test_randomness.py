"""The one door for randomness (synthehr_core/randomness.py)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from synthehr_core.errors import ConfigError
from synthehr_core.randomness import numpy_rng, seed_sequence, torch_seed


def test_root_stream_is_default_rng_and_int_streams_are_spawned_children():
    assert np.array_equal(numpy_rng(7).random(5), np.random.default_rng(7).random(5))
    children = np.random.SeedSequence(7).spawn(3)
    for i, child in enumerate(children):
        assert np.array_equal(numpy_rng(7, i).random(5), np.random.default_rng(child).random(5))


def test_named_streams_are_independent_and_stable():
    a, b = numpy_rng(3, "privacy").random(1000), numpy_rng(3, "utility").random(1000)
    assert not np.array_equal(a, b) and abs(np.corrcoef(a, b)[0, 1]) < 0.1
    assert np.array_equal(a, numpy_rng(3, "privacy").random(1000))      # same name, same bits
    assert seed_sequence(3, "privacy").spawn_key == (int.from_bytes(hashlib.sha256(b"privacy").digest()[:4], "little"),)


def test_torch_seeds():
    assert torch_seed(5) == 5                                           # root stream: the seed itself
    assert torch_seed(5, "labels") != torch_seed(5) != torch_seed(6, "labels")
    # DP-SGD's per-step draws keep the derivation they had before the door existed
    d = hashlib.sha256(b"5:poisson:12").digest()
    assert torch_seed(5, "poisson", 12) == int.from_bytes(d[:8], "little") & (2 ** 63 - 1)
    assert 0 <= torch_seed(2 ** 40, "epoch", 3) < 2 ** 63


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_bad_seed_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match=r"seed must be a non-negative int, got"):
        numpy_rng(bad)


def test_bad_stream_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="strings and non-negative ints"):
        torch_seed(1, -2)

"""Shared fixtures. Keep this file small and additive: each fixture is used by more than one test module."""
from __future__ import annotations

import json

import pytest

from synthehr_core.data.toy import write_toy_tables

# A KDE config for the toy cohort (synthehr_core.data.toy): age per patient, los/gap per visit, times rebuilt.
TOY_KDE_CONFIG = {
    "num_cores": 1,
    "variable_config": {
        "age": {"method": "kde_range", "data_source": "patients", "stratify_by": ["sex"],
                "grid_params": {"method": "range", "min": 18, "max": 99, "offset": 1}, "bandwidth": [2.0]},
        "los_days": {"method": "kde_range", "data_source": "visits",
                     "grid_params": {"method": "fine_bins", "step": 0.1, "filter": {"threshold": 30, "modulo": 1}}},
        "gap_days": {"method": "kde_range", "data_source": "visits", "filter": {"gap_days": {"notnull": True}},
                     "grid_params": {"method": "fine_bins", "step": 1, "filter": {"threshold": 90, "modulo": 7}}},
    },
    "time": {"gap": "gap_days", "los": "los_days", "anchor_age": "age"},
}


@pytest.fixture(scope="session")
def toy_tables(tmp_path_factory):
    """A canonical tables directory of 80 toy patients (train/val/test split), written once per session."""
    out = tmp_path_factory.mktemp("toy") / "tables"
    write_toy_tables(out, n_patients=80, seed=0)
    return out


@pytest.fixture(scope="session")
def toy_kde_config(tmp_path_factory):
    """Path of a KDE config file (JSON is valid YAML) matching ``toy_tables``."""
    path = tmp_path_factory.mktemp("toy-kde") / "kde_toy.yml"
    path.write_text(json.dumps(TOY_KDE_CONFIG))
    return path


@pytest.fixture(scope="module")
def gcs():
    """``gs://BUCKET`` on a real GCS API emulator (tests/emulators.py), started once per module that asks for it;
    the environment points the clients (and subprocesses started meanwhile) at it."""
    from emulators import BUCKET, gcs_emulator, patched_env

    with gcs_emulator() as env, patched_env(env):
        yield f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def s3():
    """``s3://BUCKET`` on moto's S3 server, like ``gcs``."""
    from emulators import BUCKET, patched_env, s3_emulator

    with s3_emulator() as env, patched_env(env):
        yield f"s3://{BUCKET}"


@pytest.fixture
def kfp_local_runner(tmp_path):
    """kfp.local with the SubprocessRunner in this venv (the components import synthehr_core from it).

    Yields the pipeline root. Local settings are process-global, so they are reset afterwards.
    """
    from kfp import local
    from kfp.local import config as local_config

    root = tmp_path / "runs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    yield root
    local_config.LocalExecutionConfig.instance = None


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and two test workers share two cores (measured: 80 tiny steps
    took 16.9 s with 2 threads on a busy box, 0.5 s with 1)."""
    try:
        import torch
    except ImportError:  # the light stage images run some tests without torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

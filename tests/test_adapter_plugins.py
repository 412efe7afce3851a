"""Adapters from outside the package: a ``module:function`` reference and the ``synthehr.adapters`` entry points.

The external adapter lives in a temporary package that is not part of synthehr (put on ``sys.path`` here, as an
installed package or ``PYTHONPATH`` would be in an image).
"""
from __future__ import annotations

import importlib
import sys
import textwrap

import pandas as pd
import pytest
import yaml

from synthehr_core.data.adapters import registry
from synthehr_core.data.config import bundled_config_path, load_config
from synthehr_core.data.preprocess import preprocess
from synthehr_core.errors import ConfigError

ADAPTER = '''
import pandas as pd
from synthehr_core.data.adapters.base import RawCohort, read_csv_checked

def check_options(options):
    from synthehr_core.errors import ConfigError
    if set(options) - {"prefix"}:
        raise ConfigError(f"adapter_options: unknown key(s) {sorted(set(options) - {'prefix'})} for ext_adapter")
    return {"prefix": "dx", **options}

def load(raw, options, report):
    opts = check_options(options)
    df = read_csv_checked(raw + "/stays.csv", "stays", {"pid": "str", "stay": "str", "day": "float", "code": "str"})
    patients = pd.DataFrame({"patient_id": sorted(set(df["pid"]))})
    patients["sex"] = ["F", "M"] * (len(patients) // 2) + ["F"] * (len(patients) % 2)
    visits = pd.DataFrame({"patient_id": df["pid"], "visit_id": df["stay"], "start": df["day"],
                           "event_type": "stay"}).drop_duplicates("visit_id")
    codes = pd.DataFrame({"visit_id": df["stay"], "code": opts["prefix"] + ":" + df["code"]})
    return RawCohort(patients, visits, codes, {"stays": len(df)})
'''


@pytest.fixture
def ext_package(tmp_path, monkeypatch):
    """``ext_synthehr_plugin/adapter.py`` on sys.path, plus a distribution declaring it as an entry point."""
    pkg = tmp_path / "site" / "ext_synthehr_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "adapter.py").write_text(textwrap.dedent(ADAPTER))
    dist = tmp_path / "site" / "ext_synthehr_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-synthehr-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[synthehr.adapters]\nextstays = ext_synthehr_plugin.adapter:load\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = ["pid,stay,day,code"] + [f"p{i % 20},s{i},{18000 + 40 * i},{c}" for i in range(60) for c in ("A", "B")[: 1 + i % 2]]
    (raw / "stays.csv").write_text("\n".join(rows) + "\n")
    yield raw
    for m in [m for m in sys.modules if m.startswith("ext_synthehr_plugin")]:
        del sys.modules[m]


def _config(adapter: str, raw) -> dict:
    return {"name": "ext", "adapter": adapter, "profiles": {"local": {"raw": str(raw)}}, "labels": ["sex"],
            "split": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 1}}


@pytest.mark.parametrize("adapter", ["ext_synthehr_plugin.adapter:load", "extstays"])
def test_an_adapter_outside_the_package_runs_preprocess(ext_package, tmp_path, adapter):
    meta = preprocess(_config(adapter, ext_package), tmp_path / "tables")
    assert meta["adapter"] == adapter and meta["n_patients"] == 20 and meta["n_visits"] == 60
    codes = pd.read_parquet(tmp_path / "tables" / "codes.parquet")
    assert set(codes["code"]) == {"dx:A", "dx:B"}


def test_entry_point_and_reference_resolve_to_the_same_function(ext_package):
    by_ep = registry.resolve_adapter("extstays")
    by_ref = registry.resolve_adapter("ext_synthehr_plugin.adapter:load")
    assert by_ep.load is by_ref.load and by_ep.check_options is not None
    assert "entry point" in by_ep.origin and by_ref.origin == "module"


def test_unknown_adapter_says_where_adapters_are_found():
    with pytest.raises(ConfigError) as err:
        load_config({**yaml.safe_load(bundled_config_path("mimic3").read_text()), "adapter": "not_an_adapter"})
    msg = str(err.value)
    assert "unknown adapter 'not_an_adapter'" in msg and "'synthehr.adapters'" in msg
    assert "package.module:function" in msg and "adapter: tables" in msg and "mimic3" in msg


def test_unimportable_reference_names_the_module(tmp_path):
    cfg = load_config(_config("no_such_pkg_xyz.adapter:load", tmp_path))   # syntax is enough for the config
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_pkg_xyz.adapter'.*PYTHONPATH"):
        registry.resolve_adapter(cfg.adapter)


def test_reference_to_a_missing_function_lists_the_module_functions(ext_package):
    with pytest.raises(ConfigError, match=r"has no function 'loader'; its functions: \[.*'load'"):
        registry.resolve_adapter("ext_synthehr_plugin.adapter:loader")

"""Stage images without torch must be able to import their modules: no torch (or kfp) in light modules."""
from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT = ["synthehr_core.data.preprocess", "synthehr_core.data.config", "synthehr_core.data.schema", "synthehr_core.storage",
         "synthehr_core.data.adapters.mimic3", "synthehr_core.data.adapters.adni", "synthehr_core.data.adapters.qh",
         "synthehr_core.postprocess.kde", "synthehr_core.data.merge", "synthehr_core.evaluation", "synthehr_core.rules"]
ALL = LIGHT + ["synthehr_core.model.tensors", "synthehr_core.model.halo", "synthehr_core.model.sampling", "synthehr_core.model.train"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_module_does_not_import_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'kfp') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"{module} pulls in {r.stdout.strip()} {r.stderr[-500:]}"


@pytest.mark.parametrize("module", ALL)
def test_library_never_imports_kfp(module):
    code = f"import sys, {module}; sys.exit(1 if 'kfp' in sys.modules else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"{module} imports kfp (synthehr_core must not): {r.stderr[-500:]}"

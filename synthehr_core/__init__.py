"""synthehr_core: the shared library behind every synthehr pipeline stage.

Raw EHR extracts -> canonical parquet tables -> HALO / ConSequence models -> sampled cohorts -> KDE
restoration of continuous values and timestamps -> evaluation. No Kubeflow import anywhere in here.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("synthehr")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.1.0"


def versions(*extra: str) -> dict[str, str]:
    """Versions recorded in every artifact's metadata: synthehr, Python, the data stack, plus ``extra`` packages."""
    import importlib
    import platform

    out = {"synthehr": __version__, "python": platform.python_version()}
    for name in ("numpy", "pandas", "pyarrow", *extra):
        out[name] = importlib.import_module(name).__version__
    return out

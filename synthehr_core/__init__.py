"""synthehr_core: the shared library behind every synthehr pipeline stage.

Raw EHR extracts -> canonical parquet tables -> HALO / ConSequence models -> sampled cohorts -> KDE
restoration of continuous values and timestamps -> evaluation. No Kubeflow import anywhere in here.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("synthehr")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.1.0"

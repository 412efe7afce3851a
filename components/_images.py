"""Stage image names, one constant per stage: ``{REGISTRY}/synthehr-{stage}:{TAG}``.

``SYNTHEHR_IMAGE_REGISTRY`` overrides the registry and ``SYNTHEHR_IMAGE_TAG`` the tag; the tag defaults to the
installed ``synthehr`` package version, so an image is never ``:latest``. images/ builds exactly these names.
Read at import time: set the variables before compiling (``SYNTHEHR_IMAGE_TAG=0.2.0 synthehr compile``).
"""
import os
from importlib.metadata import PackageNotFoundError, version

DEFAULT_REGISTRY = "ghcr.io/synthehr"
STAGES = ("preprocess", "rules", "train", "kde-grids", "sample", "kde-sample", "merge", "evaluate")


def _package_version() -> str:
    try:
        return version("synthehr")   # no synthehr_core import: that would pull torch into every compile
    except PackageNotFoundError:
        return "0.1.0"               # a source tree that was never pip-installed; same fallback as synthehr_core


REGISTRY = os.environ.get("SYNTHEHR_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
TAG = os.environ.get("SYNTHEHR_IMAGE_TAG", _package_version())
if TAG == "latest" or not TAG:
    raise ValueError(f"SYNTHEHR_IMAGE_TAG={TAG!r}: stage images must be pinned; set a version such as "
                     f"{_package_version()!r} or unset the variable to use the package version.")


def image(stage: str) -> str:
    """The pinned image of one stage, e.g. ``image("kde-grids") == "ghcr.io/synthehr/synthehr-kde-grids:0.1.0"``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages with an image: {list(STAGES)}.")
    return f"{REGISTRY}/synthehr-{stage}:{TAG}"


PREPROCESS_IMAGE = image("preprocess")
RULES_IMAGE = image("rules")
TRAIN_IMAGE = image("train")
KDE_GRIDS_IMAGE = image("kde-grids")
SAMPLE_IMAGE = image("sample")
KDE_SAMPLE_IMAGE = image("kde-sample")
MERGE_IMAGE = image("merge")
EVALUATE_IMAGE = image("evaluate")
# The exit handler only records the final status: it reuses the smallest (light) image.
NOTIFY_IMAGE = MERGE_IMAGE

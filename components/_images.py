"""Stage image names, one constant per stage: ``{REGISTRY}/synthehr-{stage}:{TAG}``, and the pinned references a
compile uses (``refs``).

``SYNTHEHR_IMAGE_REGISTRY`` overrides the registry and ``SYNTHEHR_IMAGE_TAG`` the tag; the tag defaults to the
installed ``synthehr`` package version (the release tag, pushed once), so an image is never ``:latest``. The
constants are read at import time and name the images in the component decorators and the committed YAML.

A build record (``build/images.json``, written by ``python -m synthehr_build.images build``; ``push`` adds each
image's registry digest) pins every stage by content instead: ``refs(lock)`` (or ``SYNTHEHR_IMAGES_LOCK=path``)
gives ``registry/synthehr-<stage>@sha256:...`` for pushed images and the content tag for images only built here.
``synthehr compile --images build/images.json`` and ``synthehr submit`` compile with those references.
"""
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DEFAULT_REGISTRY = "ghcr.io/synthehr"
STAGES = ("preprocess", "rules", "train", "kde-grids", "sample", "kde-sample", "merge", "evaluate")
LOCK_ENV = "SYNTHEHR_IMAGES_LOCK"


def _package_version() -> str:
    try:
        return version("synthehr")   # no synthehr_core import: that would pull torch into every compile
    except PackageNotFoundError:
        return "0.1.0"               # a source tree that was never pip-installed; same fallback as synthehr_core


def _registry() -> str:
    return os.environ.get("SYNTHEHR_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def _tag() -> str:
    tag = os.environ.get("SYNTHEHR_IMAGE_TAG", _package_version())
    if tag == "latest" or not tag:
        raise ValueError(f"SYNTHEHR_IMAGE_TAG={tag!r}: stage images must be pinned; set a version such as "
                         f"{_package_version()!r} or unset the variable to use the package version.")
    return tag


REGISTRY = _registry()
TAG = _tag()


def image(stage: str) -> str:
    """The pinned image of one stage, e.g. ``image("kde-grids") == "ghcr.io/synthehr/synthehr-kde-grids:0.1.0"``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages with an image: {list(STAGES)}.")
    return f"{REGISTRY}/synthehr-{stage}:{TAG}"


def refs(lock: str | os.PathLike | None = None) -> dict[str, str]:
    """``{stage: reference}`` to compile with: from a build record (``lock``, else ``$SYNTHEHR_IMAGES_LOCK``), each
    stage's registry digest when it was pushed, else its content tag; without a record, ``image(stage)``."""
    path = lock or os.environ.get(LOCK_ENV)
    if not path:
        return {s: image(s) for s in STAGES}
    try:
        record = json.loads(Path(path).read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"image record {path}: cannot read it ({exc}); it is the build/images.json that "
                         "`python -m synthehr_build.images build` writes (make images / make images-push).") from exc
    missing = [s for s in STAGES if s not in record]
    if missing:
        raise ValueError(f"image record {path} has no image for {missing}; build every stage "
                         "(make images-push) or drop the record to use the release tags.")
    return {s: record[s].get("digest") or record[s]["ref"] for s in STAGES}


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

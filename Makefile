# synthehr: `make demo` and `make test` work from a fresh clone (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST ?= $(PY) -m pytest
PYTEST_ARGS ?= -q
SYNTHEHR := $(VENV)/bin/synthehr
BASE_IMAGE ?= python:3.11-slim-bookworm
STAMP := $(VENV)/.installed
PYH_VENV ?= .venv-pyhealth
PYH_STAMP := $(PYH_VENV)/.installed

.PHONY: install demo test test-fast test-images compile check-compiled wheelhouse images images-push images-plan images-lock lint-docker lint format bench pyhealth-env bench-fidelity clean help

## help: list the targets
help:
	@grep -E '^## ' Makefile | sed 's/^## /  /'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[pipelines,dev]'
	touch $(STAMP)

## install: create .venv with torch 2.13.0 (CPU) and synthehr in editable mode
install: $(STAMP)

## demo: run the whole MIMIC-III pipeline locally on the bundled demo data (no GPU, no Docker)
demo: $(STAMP)
	$(SYNTHEHR) run --local --dataset mimic3

## test: install if needed and run the whole test suite
test: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS)

## test-fast: skip the slow end-to-end and image tests
test-fast: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS) -m "not slow and not images"

## compile: compile every pipeline to pipelines/compiled/*.yaml (commit the result; release tags, not the build record)
compile: $(STAMP)
	$(SYNTHEHR) compile --out pipelines/compiled

## check-compiled: fail if the committed pipeline YAML is stale
check-compiled: compile
	@git diff --exit-code -- pipelines/compiled || (echo "compiled pipelines are stale: run \`make compile\` and commit" && exit 1)

## images: build every stage image (CPU torch; content tag) and record them in build/images.json (BASE_IMAGE=...)
images: $(STAMP)
	$(PY) -m synthehr_build.images build --base-image $(BASE_IMAGE)

## images-push: build the registry images (CUDA torch in train/sample), push them to SYNTHEHR_IMAGE_REGISTRY, record digests
images-push: $(STAMP)
	$(PY) -m synthehr_build.images build --base-image $(BASE_IMAGE) --push

## images-plan: show every image reference, build target and torch variant (cpu here, cuda for a push)
images-plan: $(STAMP)
	$(PY) -m synthehr_build.images plan && $(PY) -m synthehr_build.images plan --push

## wheelhouse: every locked wheel + the synthehr wheel into build/wheelhouse (offline image builds)
wheelhouse: $(STAMP)
	$(PY) -m synthehr_build.images wheelhouse

## images-lock: re-pin images/requirements/*.lock from *.in
images-lock: $(STAMP)
	$(PY) -m synthehr_build.images lock

## test-images: only the image tests (needs an engine and `make images`)
test-images: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS) -m images

## lint-docker: hadolint images/Dockerfile (every stage image is a target of it)
lint-docker: $(STAMP)
	$(VENV)/bin/hadolint --config images/.hadolint.yaml images/Dockerfile

## lint: ruff check (format fixes)
lint: $(STAMP)
	$(VENV)/bin/ruff check synthehr_core synthehr_build components pipelines tests bench

## format: ruff autofix (lint checks)
format: $(STAMP)
	$(VENV)/bin/ruff check --fix synthehr_core synthehr_build components pipelines tests bench

## bench: run every benchmark (prints tables; minutes)
bench: $(STAMP)
	for b in bench/preprocess.py bench/sample.py bench/train.py bench/kde.py bench/evaluate.py; do $(PY) $$b || exit 1; done

## pyhealth-env: PyHealth 2.1.0 in its own venv (.venv-pyhealth) for bench/fidelity.py (its HALO import path only)
$(PYH_STAMP): bench/pyhealth-requirements.txt
	test -x $(PYH_VENV)/bin/python || $(PYTHON) -m venv $(PYH_VENV)
	# torchvision (imported by pyhealth.processors) exists only as PyPI's CUDA build, whose _C.so links
	# libtorch_cuda: the CPU torch of .venv does not load it, so this venv takes PyPI's torch 2.13.0 build
	# (same version, run on the CPU here; no pip config and no find-links skip the local +cpu wheel)
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(PYH_VENV)/bin/python -m pip install -q torch==2.13.0 torchvision==0.28.0
	# PyHealth declares Python >= 3.12: install it without its dependency list, then only what its HALO
	# import path needs (bench/pyhealth-requirements.txt)
	$(PYH_VENV)/bin/python -m pip install -q --ignore-requires-python --no-deps pyhealth==2.1.0
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(PYH_VENV)/bin/python -m pip install -q -r bench/pyhealth-requirements.txt
	$(PYH_VENV)/bin/python -c "import pyhealth.models.generators.halo"
	touch $(PYH_STAMP)

pyhealth-env: $(PYH_STAMP)

## bench-fidelity: synthehr HALO/ConSequence vs PyHealth's HALO at equal budget (simulated cohort + MIMIC-III demo)
bench-fidelity: $(STAMP) $(PYH_STAMP)
	$(PY) bench/fidelity.py --dataset sim
	$(PY) bench/fidelity.py --dataset mimic3 --epochs 30 --lr 2e-3 --synthetic-factor 20 --longitudinal-factor 1

## clean: remove run outputs and caches (keeps .venv)
clean:
	rm -rf runs local_outputs .pytest_cache build dist *.egg-info

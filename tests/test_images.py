"""The built stage images, run for real on the Docker engine (`-m images`).

Every container runs offline (`network_mode="none"`). Needs an engine and the images of `make images`, found by
their content tags in its build record (build/images.json); without an engine the tests skip, unless
SYNTHEHR_REQUIRE_DOCKER=1 (CI), where a missing engine is a failure.
Start an engine here with `SYNTHEHR_DOCKER_KEEP=1 source scripts/ci-docker.sh`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from components import _images
from synthehr_build.images import RECORD, STAGES, plan, push

pytestmark = pytest.mark.images

REPO = Path(__file__).resolve().parents[1]
TORCH_STAGES = {"train", "sample"}
STAGE_UID = 10001  # the non-root user of images/Dockerfile
REFS: dict[str, str] = {}  # stage -> the image `make images` built (its record), filled by the client fixture


@pytest.fixture(scope="session")
def client():
    """A pinged engine, and REFS from the build record (release tags when there is no record)."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:  # no engine answers (requests errors are OSErrors)
        msg = (f"no Docker engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')} ({exc}); "
               "start one with `SYNTHEHR_DOCKER_KEEP=1 source scripts/ci-docker.sh` and build with `make images`")
        if os.environ.get("SYNTHEHR_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SYNTHEHR_REQUIRE_DOCKER=1 but {msg}")
        pytest.skip(msg)
    built = json.loads(RECORD.read_text())["images"] if RECORD.exists() else {}   # a partial build: those stages
    REFS.update({s: built[s]["ref"] if s in built else _images.image(s) for s in STAGES})
    return client


@pytest.fixture(scope="session")
def engine(client):
    missing = [REFS[s] for s in STAGES if not client.images.list(name=REFS[s])]
    if missing:
        pytest.fail(f"stage images {missing} are not built: run `make images` "
                    "(CI: `make images BASE_IMAGE=local/python:3.11-bookworm`)")
    return client


def run(client, stage: str, command=None, mounts: dict[str, str] | None = None, timeout: int = 300) -> str:
    """Run one stage image offline to completion; return its output, or fail with the output and exit code."""
    container = client.containers.run(REFS[stage], command, detach=True, network_mode="none",
                                      volumes={h: {"bind": c, "mode": "rw"} for h, c in (mounts or {}).items()})
    try:
        code = container.wait(timeout=timeout)["StatusCode"]
        out = container.logs().decode()
    finally:
        container.remove(force=True)
    assert code == 0, f"{stage}: {command} exited {code}:\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_image_is_labelled_and_pinned(engine, stage):
    image = engine.images.get(REFS[stage])
    cfg = image.attrs["Config"]
    assert cfg["Labels"]["io.synthehr.stage"] == stage
    assert cfg["Labels"]["io.synthehr.flavor"] == ("torch" if stage in TORCH_STAGES else "light")
    assert f"SYNTHEHR_STAGE={stage}" in cfg["Env"]
    assert cfg["User"] == f"{STAGE_UID}:{STAGE_UID}"
    assert not any(t.endswith(":latest") for t in image.tags), image.tags


PROBE = r"""
import importlib.util, json, os, sys
import kfp, synthehr_core
import components._images
print(json.dumps({"uid": os.getuid(), "python": sys.version.split()[0], "kfp": kfp.__version__,
                  "synthehr": synthehr_core.__version__,
                  "torch": importlib.util.find_spec("torch") is not None,
                  "wheelhouse": os.path.exists("/wheels") or os.path.exists("/tmp/dist"),
                  "credentials": [p for p in ("/root/.docker", "/root/.config/gcloud", "/home/synthehr/.config/gcloud")
                                  if os.path.exists(p)] + [k for k in os.environ if "TOKEN" in k or "SECRET" in k]}))
"""


@pytest.mark.parametrize("stage", STAGES)
def test_stage_image_contents(engine, stage):
    """Non-root, Python 3.11, kfp 2.17.3 and synthehr inside; torch only in train/sample; no wheelhouse or credentials."""
    info = json.loads(run(engine, stage, ["python", "-c", PROBE]).strip().splitlines()[-1])
    assert info["uid"] == STAGE_UID
    assert info["python"].startswith("3.11.")
    assert info["kfp"] == "2.17.3"
    assert info["synthehr"] == _images._package_version()
    assert info["torch"] is (stage in TORCH_STAGES)
    assert not info["wheelhouse"] and not info["credentials"], info


def test_torch_images_carry_the_cpu_torch_and_it_computes(engine):
    code = ("import torch, opacus; x = torch.ones(2, 3) @ torch.ones(3, 1);"
            "print(torch.__version__, opacus.__version__, float(x.sum()))")
    out = run(engine, "train", ["python", "-c", code])
    assert out.split() == ["2.13.0+cpu", "1.6.0", "6.0"]


@pytest.mark.parametrize("stage", STAGES)
def test_help_entrypoint(engine, stage):
    """`docker run IMAGE --help` documents the stage (the entrypoint hands options to the stage CLI)."""
    out = run(engine, stage, ["--help"])
    assert "usage" in out.lower() and stage in out, out[-2000:]


# --- every stage's component, in its own image, offline, on tiny fixtures --------------------------------------------
# The driver calls the KFP component's python_func with kfp.dsl artifacts on /data paths (what the KFP executor does,
# minus executor_input), so it checks that each image holds everything its component imports.
DRIVER = r"""
import importlib, json, os, sys
from kfp import dsl
spec = json.loads(sys.argv[1])
fn = getattr(importlib.import_module("components." + spec["module"]), spec["module"]).python_func
kwargs = dict(spec.get("params", {}))
for name, (cls, uri) in spec.get("inputs", {}).items():
    if uri == "@mimic3_demo":
        import synthehr_core
        uri = os.path.join(os.path.dirname(synthehr_core.__file__), "sample_data", "mimic3_demo")
    make = lambda u: getattr(dsl, cls)(name=name, uri=u, metadata={})
    kwargs[name] = [make(u) for u in uri] if isinstance(uri, list) else make(uri)
outputs = {}
for name, (cls, uri) in spec.get("outputs", {}).items():
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    kwargs[name] = outputs[name] = getattr(dsl, cls)(name=name, uri=uri, metadata={})
ret = fn(**kwargs)
print("DRIVER " + json.dumps({"return": ret, "metadata": {k: a.metadata for k, a in outputs.items()}}, default=str))
"""

D = "/data"
CHAIN = [  # (stage, module, spec); each stage reads what the ones before it wrote under /data
    ("preprocess", "preprocess", {"inputs": {"raw": ["Dataset", "@mimic3_demo"]},
                                  "params": {"dataset_config": "mimic3", "split_seed": 0},
                                  "outputs": {"tables": ["Dataset", f"{D}/tables"]}}),
    ("rules", "rules", {"inputs": {"tables": ["Dataset", f"{D}/tables"]},
                        "params": {"label_min_prevalence": 5, "pair_min_prevalence": 3,
                                   "persistence_min_prevalence": 3, "prerequisite_min_prevalence": 3},
                        "outputs": {"ruleset": ["Artifact", f"{D}/rules"]}}),
    ("train", "train", {"inputs": {"tables": ["Dataset", f"{D}/tables"], "ruleset": ["Artifact", f"{D}/rules"]},
                        "params": {"model_type": "halo", "preset": "tiny", "epochs": 2, "batch_size": 16, "lr": 1e-3,
                                   "seed": 0, "dp_target_epsilon": 0.0},
                        "outputs": {"model": ["Model", f"{D}/model"], "metrics": ["Metrics", f"{D}/train/metrics"],
                                    "loss_curve": ["HTML", f"{D}/train/loss.html"]}}),
    ("kde-grids", "kde_grids", {"inputs": {"tables": ["Dataset", f"{D}/tables"]},
                                "params": {"kde_config": "kde_mimic3.yml"},
                                "outputs": {"grids": ["Artifact", f"{D}/grids"]}}),
    ("sample", "sample", {"inputs": {"model": ["Model", f"{D}/model"]},
                          "params": {"seed": 3, "n_patients_per_seed": 20, "batch_size": 20, "temperature": 1.0,
                                     "condition": "", "device": "cpu"},
                          "outputs": {"shard": ["Dataset", f"{D}/shard3"]}}),
    ("kde-sample", "kde_sample", {"inputs": {"shard": ["Dataset", f"{D}/shard3"], "grids": ["Artifact", f"{D}/grids"]},
                                  "params": {"seed": 3},
                                  "outputs": {"restored": ["Dataset", f"{D}/restored3"]}}),
    ("merge", "merge", {"inputs": {"shards": ["Dataset", [f"{D}/restored3"]], "tables": ["Dataset", f"{D}/tables"]},
                        "params": {"small_cell_k": 0},
                        "outputs": {"cohort": ["Dataset", f"{D}/cohort"]}}),
    ("evaluate", "evaluate", {"inputs": {"real": ["Dataset", f"{D}/tables"], "cohort": ["Dataset", f"{D}/cohort"],
                                         "ruleset": ["Artifact", f"{D}/rules"], "model": ["Model", f"{D}/model"]},
                              "params": {"seed": 0, "dataset_config": "mimic3", "policy": "", "release_gate": False,
                                         "run_id": "image-chain"},
                              "outputs": {"metrics": ["Metrics", f"{D}/eval/metrics"],
                                          "roc": ["ClassificationMetrics", f"{D}/eval/roc"],
                                          "report": ["HTML", f"{D}/eval/report.html"],
                                          "summary": ["Markdown", f"{D}/eval/summary.md"],
                                          "details": ["Artifact", f"{D}/eval/details"]}}),
]


class Chain:
    """Runs the stages of CHAIN in order, once per module, whatever order (or subset) the tests ask for."""

    def __init__(self, engine, data: Path):
        self.engine, self.data, self.results = engine, data, {}

    def _run(self, stage: str, module: str, spec: dict) -> dict:
        t0 = time.monotonic()
        out = run(self.engine, stage, ["python", f"{D}/driver.py", json.dumps({"module": module, **spec})],
                  mounts={str(self.data): D})
        print(f"{stage}: {time.monotonic() - t0:.1f} s")
        return json.loads(out.split("DRIVER ", 1)[1])

    def result(self, stage: str) -> dict:
        for name, module, spec in CHAIN:
            if name not in self.results:
                failed = [n for n, r in self.results.items() if isinstance(r, str)]
                try:
                    self.results[name] = (f"not run: upstream stage {failed[0]} failed" if failed
                                          else self._run(name, module, spec))
                except AssertionError as exc:
                    self.results[name] = str(exc)
            if name == stage:
                break
        if isinstance(self.results[stage], str):
            pytest.fail(self.results[stage])
        return self.results[stage]


@pytest.fixture(scope="module")
def chain(engine, tmp_path_factory):
    data = tmp_path_factory.mktemp("stage-chain")
    data.chmod(0o777)  # the stage user (uid 10001) writes here
    (data / "driver.py").write_text(DRIVER)
    return Chain(engine, data)


@pytest.mark.parametrize("stage,spec", [(c[0], c[2]) for c in CHAIN], ids=[c[0] for c in CHAIN])
def test_stage_component_runs_in_its_image(chain, stage, spec):
    """The chain preprocess (bundled MIMIC-III demo) -> rules -> train (tiny) -> kde-grids -> sample -> kde-sample
    -> merge -> evaluate, each stage's component in its own image, each on the outputs of the stages before it."""
    result, chain_dir = chain.result(stage), chain.data
    for name, (_, uri) in spec["outputs"].items():
        host = chain_dir / uri[len(D) + 1:]
        assert host.exists() or result["metadata"][name], f"{stage}: output {name} ({uri}) was not written"
    if stage == "preprocess":
        assert result["metadata"]["tables"]["n_patients"] > 0
        assert (chain_dir / "tables" / "vocab.json").is_file()
    if stage == "sample":
        assert result["return"] == result["metadata"]["shard"]["n_patients"] > 0
    if stage == "merge":
        assert result["return"] > 0 and result["metadata"]["cohort"]["seeds"] == [3]
    if stage == "evaluate":
        assert result["metadata"]["metrics"] and (chain_dir / "eval" / "summary.md").stat().st_size > 0
        assert "Decision:" in (chain_dir / "eval" / "report.html").read_text()


# --- the whole pipeline, every task in its own stage image ---------------------------------------------------------

@pytest.mark.slow
def test_whole_pipeline_in_stage_images_with_docker_runner(engine, tmp_path):
    """pipelines.builder's mimic3 pipeline under kfp.local.DockerRunner, offline: every task (notify included) runs in
    the image components/_images names, on the bundled demo, with the local tiny-model settings."""
    from kfp import local

    from pipelines.builder import LOCAL_OVERRIDES, build_pipeline

    root = tmp_path / "pipeline_root"
    raw = root / "raw" / "mimic3_demo"  # under the pipeline root: DockerRunner mounts only that
    shutil.copytree(REPO / "synthehr_core" / "sample_data" / "mimic3_demo", raw)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)  # the stage user (uid 10001) reads and writes here

    local.init(runner=local.DockerRunner(network_mode="none"), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline("mimic3", images=dict(REFS))    # the images of this build, as submit pins them
    since, t0 = int(time.time()) - 1, time.monotonic()
    pipeline(raw_uri=str(raw), **{**LOCAL_OVERRIDES, "epochs": 1, "n_patients_per_seed": 20, "n_shards": 2})
    seconds = time.monotonic() - t0
    # The engine's own record of which images the tasks' containers started from.
    events = engine.events(since=since, until=int(time.time()) + 1, decode=True,
                           filters={"type": "container", "event": "start"})
    started = [e["Actor"]["Attributes"]["image"] for e in events]
    assert set(started) == set(REFS.values()), f"task containers started from {started}"
    assert started.count(REFS["sample"]) == 2 and started.count(REFS["kde-sample"]) == 2
    print(f"DockerRunner pipeline: {seconds:.1f} s, {len(started)} task containers")

    runs = [p for p in root.iterdir() if p.name.startswith("synthehr-mimic3")]
    assert len(runs) == 1, list(root.iterdir())
    run_dir = runs[0]
    tasks = {p.name for p in run_dir.rglob("*") if p.is_dir()}
    for task in ("preprocess", "rules", "train", "kde-grids", "merge", "evaluate"):
        assert task in tasks, f"no output dir for task {task} under {run_dir}: {sorted(tasks)[:40]}"
    summaries = list(run_dir.rglob("summary"))
    assert summaries and summaries[0].stat().st_size > 0


# --- push to a local registry -----------------------------------------------------------------------------------------

@pytest.fixture
def local_registry(tmp_path):
    """Debian's docker-registry on a free 127.0.0.1 port (the engine trusts loopback registries over plain HTTP)."""
    exe = shutil.which("docker-registry")
    if exe is None:
        msg = "docker-registry is not installed: apt-get install docker-registry (scripts/ci-docker.sh does)"
        if os.environ.get("SYNTHEHR_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SYNTHEHR_REQUIRE_DOCKER=1 but {msg}")
        pytest.skip(msg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "registry.yml"
    cfg.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n")
    with open(tmp_path / "registry.log", "w") as log:
        proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"docker-registry did not answer on 127.0.0.1:{port}: {(tmp_path / 'registry.log').read_text()}")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _local(client, stage: str, registry: str, tag: str):
    """A plan step for `stage` in `registry` under `tag`, with the built image tagged to its reference."""
    if not client.images.list(name=REFS[stage]):
        pytest.skip(f"{REFS[stage]} is not built (make images)")
    step = plan(registry, tag, stages=[stage])[0]
    repo, _, t = step.ref.rpartition(":")
    client.images.get(REFS[stage]).tag(repo, t)
    return step


def test_push_records_the_digest_and_never_moves_a_tag(client, local_registry, tmp_path):
    tag = "0.0.1-gtest"
    step = _local(client, "merge", local_registry, tag)
    record = tmp_path / "images.json"
    record.write_text(json.dumps({"images": {"merge": {"ref": step.ref, "digest": None}}}))
    try:
        digest = push([step], client=client, record=record)["merge"]
        assert digest.startswith(f"{local_registry}/synthehr-merge@sha256:")
        assert json.loads(record.read_text())["images"]["merge"]["digest"] == digest
        assert push([step], client=client, record=None) == {"merge": digest}      # same image: nothing moves
        if not client.images.list(name=REFS["preprocess"]):
            pytest.skip(f"{REFS['preprocess']} is not built (make images)")
        client.images.get(REFS["preprocess"]).tag(*step.ref.rsplit(":", 1))      # other content, same tag
        with pytest.raises(RuntimeError, match=r"already exists in the registry .* tags are immutable"):
            push([step], client=client, record=None)
    finally:
        client.images.remove(step.ref, force=True)
    with urllib.request.urlopen(f"http://{local_registry}/v2/synthehr-merge/tags/list", timeout=10) as r:
        assert json.load(r) == {"name": "synthehr-merge", "tags": [tag]}


def test_push_refuses_cpu_torch_train_images(client, local_registry):
    step = _local(client, "train", local_registry, "0.0.1-gcpu")
    try:
        with pytest.raises(RuntimeError, match=r"holds CPU-only torch .* CUDA variant"):
            push([step], client=client, record=None)
    finally:
        client.images.remove(step.ref, force=True)


def _run_container_keeping_its_status(client, image, command, volumes, **run_args) -> int:
    """kfp 2.17.3's DockerRunner starts containers with auto_remove=True and reads a container that was removed
    before ``wait()`` as exit status 0: a task that fails within a second (check-options here) is then recorded as
    SUCCESS, depending on timing (seen in CI: the run went on to train and its 7 minutes of retry backoff). The
    same run, with the container removed only after its status is read."""
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, **run_args)
    try:
        for line in container.logs(stream=True):
            print(line.decode(), end="")
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)


def test_a_bad_option_fails_the_first_task_in_its_container(client, tmp_path, capfd, monkeypatch):
    """DockerRunner, offline: model_type=hallo stops the run in check-options (the preprocess image) within
    seconds; no stage image beyond preprocess and merge (notify) is needed."""
    from kfp import local
    from kfp.local import config as local_config
    from kfp.local import docker_task_handler

    monkeypatch.setattr(docker_task_handler, "run_docker_container", _run_container_keeping_its_status)

    from pipelines.builder import build_pipeline

    for stage in ("preprocess", "merge"):
        if not client.images.list(name=REFS[stage]):
            pytest.skip(f"{REFS[stage]} is not built (make images)")
    root = tmp_path / "root"
    raw = root / "raw"
    shutil.copytree(REPO / "synthehr_core" / "sample_data" / "mimic3_demo", raw)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    local.init(runner=local.DockerRunner(network_mode="none"), pipeline_root=str(root), raise_on_error=True)
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"Inner task failed: \S*'check-options'"):
            build_pipeline("mimic3", images=dict(REFS))(raw_uri=str(raw), model_type="hallo")
    finally:
        local_config.LocalExecutionConfig.instance = None
    assert time.monotonic() - t0 < 60
    out = capfd.readouterr()
    assert "model_type must be one of ['halo', 'consequence']; got 'hallo'" in out.out + out.err   # the check, not a pull error

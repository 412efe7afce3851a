"""Build the synthehr stage images with the Docker SDK: plan -> wheelhouse -> build (-> push).

Every image comes from the one `images/Dockerfile`, one build target per stage (`docker build --target merge`). The
targets of the light stages sit on its `light` stage (a venv without torch), those of train and sample on `torch`
(the same venv layer plus torch and opacus); all of them share the venv layer through Docker's build cache.
Builds are offline: every wheel is downloaded on the host into a wheelhouse first, and the engine builds with
`network_mode="none"`, so no image ever needs a registry, a proxy or a CA bundle.

Torch variants of train and sample: "cpu" (the CPU wheel, for CI and local runs; the default of `build`) and "cuda"
(PyPI's default Linux torch==2.13.0, the CUDA build, with its nvidia-* wheels: requirements/torch-cuda.lock; the
default of `build --push` and `push`, i.e. whenever the images go to a registry).

    python -m synthehr_build.images build --base-image local/python:3.11-bookworm     # CI (debootstrap base), cpu
    python -m synthehr_build.images build --push                                      # registry: cuda variant
    python -m synthehr_build.images plan [--push | --variant cuda]                    # tags, targets, variants
    python -m synthehr_build.images lock [--variant cuda]                             # re-pin requirements/*.lock

Names: `components._images` (registry from SYNTHEHR_IMAGE_REGISTRY). Tags are immutable: by default a content
tag, `<version>-g<git sha>` plus `-dirty.<hash of the uncommitted changes>` (`content_tag`); `--tag` or
SYNTHEHR_IMAGE_TAG (a release) must be a new tag, since `push` refuses to move a tag that the registry already holds
with other content. Every build records the images in build/images.json (ids; `push` adds the registry digests),
from which `synthehr compile --images` and `synthehr submit` pin `image@sha256:...`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO / "images"
DOCKERFILE = IMAGES_DIR / "Dockerfile"
REQUIREMENTS_DIR = IMAGES_DIR / "requirements"
DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"  # the official image; CI passes its debootstrap stand-in

# Stage (= Dockerfile target) -> the Dockerfile stage it is FROM. Only the model stages carry torch (synthehr_core
# imports torch only in its model modules).
STAGES: dict[str, str] = {
    "preprocess": "light",
    "rules": "light",
    "train": "torch",
    "kde-grids": "light",
    "sample": "torch",
    "kde-sample": "light",
    "merge": "light",
    "evaluate": "light",
}
FLAVORS = ("light", "torch")
VARIANTS = ("cpu", "cuda")          # torch builds of train and sample (a --torch-base-image brings its own: "base")
RECORD = REPO / "build" / "images.json"
# Wheel platforms of the CUDA lock and wheelhouse (linux x86_64, CPython 3.11; PyPI's nvidia wheels use several tags)
CUDA_PLATFORMS = [*(f"manylinux_2_{v}_x86_64" for v in range(28, 16, -1)), "manylinux2014_x86_64", "linux_x86_64"]


@dataclass(frozen=True)
class BuildStep:
    """One `docker build --target <stage> images/`: the image reference it produces, its build args and the wheel
    sets its context needs."""

    name: str                      # the stage, also the Dockerfile target
    ref: str                       # registry/synthehr-<stage>:<tag>
    buildargs: dict[str, str] = field(default_factory=dict)
    wheels: dict[str, str] = field(default_factory=dict)  # context dir under wheels/ -> pin set (see lock_pins)
    variant: str = "-"             # torch build: "cpu", "cuda" or "base"; "-" for the light stages

    @property
    def target(self) -> str:
        return self.name

    @property
    def flavor(self) -> str:
        return STAGES[self.name]


def default_registry() -> str:
    from components import _images  # the single source of image names (reads SYNTHEHR_IMAGE_REGISTRY)
    return _images.REGISTRY


def default_tag(version: str) -> str:
    """SYNTHEHR_IMAGE_TAG if set (a release), else the content tag of this checkout."""
    return os.environ.get("SYNTHEHR_IMAGE_TAG") or content_tag(version)


# Paths whose content goes into an image (the synthehr wheel and the build context).
IMAGE_INPUTS = ("synthehr_core", "components", "images", "pyproject.toml")


def content_tag(version: str, repo: Path = REPO) -> str:
    """`<version>-g<12 hex of HEAD>`, plus `-dirty.<10 hex>` hashing the uncommitted changes (tracked diff and
    untracked files) under IMAGE_INPUTS: equal tags mean equal image inputs, and a rebuild after an edit never
    reuses a tag."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True).stdout

    try:
        sha = git("rev-parse", "HEAD").decode().strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"{repo}: no git checkout to derive the image tag from ({exc}); pass --tag "
                           "(a new, never-pushed version) instead.") from exc
    h = hashlib.sha256(git("diff", "HEAD", "--binary", "--", *IMAGE_INPUTS))
    untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *IMAGE_INPUTS).split(b"\0")
    for rel in sorted(p for p in untracked if p):
        h.update(rel + b"\0" + (repo / rel.decode()).read_bytes())
    dirty = bool(git("status", "--porcelain", "--", *IMAGE_INPUTS).strip())
    return f"{version}-g{sha[:12]}" + (f"-dirty.{h.hexdigest()[:10]}" if dirty else "")


def image_ref(name: str, registry: str, tag: str) -> str:
    """`{registry}/synthehr-{name}:{tag}`, the same rule as components._images (checked by a test)."""
    return f"{registry}/synthehr-{name}:{tag}"


def _check_tag(tag: str) -> str:
    # Docker's tag grammar: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag or ""):
        raise ValueError(f"image tag {tag!r} is not a valid Docker tag: use letters, digits, '_', '.', '-' "
                         "(for example the package version, 0.1.0).")
    if tag == "latest":
        raise ValueError("image tag 'latest' is not allowed: images are pinned. Pass --tag (or SYNTHEHR_IMAGE_TAG) "
                         "with a version, for example 0.1.0 or a git sha.")
    return tag


def _check_registry(registry: str) -> str:
    # host[:port] then lower-case path components; no scheme, no trailing '/', no tag
    if not re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*", registry or ""):
        raise ValueError(f"image registry {registry!r} must look like 'host[:port][/path]' in lower case, with no "
                         "scheme, trailing '/' or tag: for example localhost:5000 or europe-docker.pkg.dev/proj/repo.")
    return registry


def plan(registry: str, tag: str, base_image: str = DEFAULT_BASE_IMAGE, torch_base_image: str | None = None,
         stages: list[str] | None = None, version: str = "0.0.0", variant: str = "cpu") -> list[BuildStep]:
    """One build step per requested stage, in the canonical order. Pure: touches no engine or file.

    Args:
        registry: Image registry prefix (`host[:port]/path`).
        tag: Tag of every image; never `latest`.
        base_image: Python 3.11 image under the light stages (and the torch ones unless torch_base_image is set).
        torch_base_image: Image under train and sample. None = base_image plus the CPU torch wheel from the
            wheelhouse; a CUDA PyTorch image (Python 3.11, torch 2.13.0 preinstalled) on real clusters.
        stages: Subset of STAGES to build, in any order; None = all.
        version: Package version recorded in the image labels.
        variant: Torch of train and sample without torch_base_image: "cpu" (the CPU wheel, CI and local runs) or
            "cuda" (PyPI's CUDA build with its nvidia-* wheels, for GPU nodes).
    """
    _check_registry(registry)
    _check_tag(tag)
    if variant not in VARIANTS:
        raise ValueError(f"torch variant {variant!r} is not one of {list(VARIANTS)}: 'cpu' for CI and local runs, "
                         "'cuda' for GPU nodes.")
    wanted = list(STAGES) if stages is None else list(dict.fromkeys(stages))
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}.")
    # The same args for every target on one base image, so all of them share the cached venv layers.
    torch_variant = "base" if torch_base_image else variant
    args = {"BASE_IMAGE": base_image, "VERSION": version, "SYSTEM_SITE_PACKAGES": "0", "TORCH_VARIANT": torch_variant}
    by_flavor = {"light": (args, {"light": "light"}, "-")}
    if torch_base_image:  # venv on a CUDA PyTorch image that brings its own torch
        by_flavor["torch"] = ({**args, "BASE_IMAGE": torch_base_image, "SYSTEM_SITE_PACKAGES": "1"},
                              {"light": "light", "extras": "torch-extras-without-torch"}, "base")
    elif variant == "cuda":  # CUDA torch + nvidia-* wheels from the CUDA wheelhouse, on the light venv
        by_flavor["torch"] = (args, {"light": "light", "extras": "torch-cuda-extras"}, "cuda")
    else:  # CPU torch from the wheelhouse, on the light venv
        by_flavor["torch"] = (args, {"light": "light", "extras": "torch-extras"}, "cpu")
    return [BuildStep(stage, image_ref(stage, registry, tag), *by_flavor[STAGES[stage]])
            for stage in STAGES if stage in wanted]  # the canonical order, whatever order was asked for


# --- locks and wheelhouse ---------------------------------------------------------------------------------------

def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """`name==version` lines of a lock file -> {normalized name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, ver = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: line {line!r} is not pinned as name==version; regenerate with "
                                 "`python -m synthehr_build.images lock`.")
            pins[_normalize(name)] = ver.strip()
    return pins


def _pypi_only_env() -> dict[str, str]:
    """pip's environment for the CUDA set: PyPI itself, without this host's find-links and local indexes (which
    hold the CPU torch wheel) or constraints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def _cuda_pip_args() -> list[str]:
    return ["--index-url", "https://pypi.org/simple", "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--abi", "cp311", *(a for p in CUDA_PLATFORMS for a in ("--platform", p))]


def write_cuda_lock(requirements_dir: Path = REQUIREMENTS_DIR, python: str = sys.executable) -> Path:
    """Resolve `torch-cuda.in` for linux x86_64 / CPython 3.11 against PyPI (metadata only) into `torch-cuda.lock`;
    refuses a resolution whose shared packages differ from light.lock."""
    src = requirements_dir / "torch-cuda.in"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                        str(report), "--target", str(Path(tmp) / "t"), *_cuda_pip_args(), "-r", str(src)],
                       check=True, cwd=requirements_dir, env=_pypi_only_env())
        items = json.loads(report.read_text())["install"]
    pins = sorted((it["metadata"]["name"], it["metadata"]["version"]) for it in items)
    light = read_lock(requirements_dir / "light.lock")
    clash = {n: (v, light[_normalize(n)]) for n, v in pins if light.get(_normalize(n), v) != v}
    if clash:
        raise RuntimeError(f"{src}: the CUDA set pins {clash} (cuda, light) differently from light.lock; align the "
                           "top-level pins of light.in and torch-cuda.in, then lock again.")
    out = requirements_dir / "torch-cuda.lock"
    lines = [f"# Generated from {src.name} by `python -m synthehr_build.images lock --variant cuda`; do not edit by hand."]
    out.write_text("\n".join(lines + [f"{n}=={v}" for n, v in pins]) + "\n")
    return out


def write_locks(requirements_dir: Path = REQUIREMENTS_DIR, python: str = sys.executable) -> dict[str, Path]:
    """Resolve every `<flavor>.in` (preferring wheels) and write the full pinned set to `<flavor>.lock`."""
    out = {}
    for flavor in FLAVORS:
        src = requirements_dir / f"{flavor}.in"
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            subprocess.run([python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                            "--prefer-binary", "--report", str(report), "-r", str(src)],
                           check=True, cwd=requirements_dir)
            items = json.loads(report.read_text())["install"]
        pins = sorted((it["metadata"]["name"], it["metadata"]["version"]) for it in items)
        lines = [f"# Generated from {src.name} by `python -m synthehr_build.images lock`; do not edit by hand."]
        # The local label (+cpu) is dropped: the CI wheelhouse has only the CPU wheel, a CUDA base has its own build.
        lines += [f"{name}=={ver.split('+')[0] if name.lower() == 'torch' else ver}" for name, ver in pins]
        out[flavor] = requirements_dir / f"{flavor}.lock"
        out[flavor].write_text("\n".join(lines) + "\n")
    return out


def make_cuda_wheelhouse(dest: Path, requirements_dir: Path = REQUIREMENTS_DIR, python: str = sys.executable) -> Path:
    """Download the CUDA extras (torch-cuda.lock minus light.lock: torch 2.13.0 CUDA build, nvidia-*, triton, ...;
    several GB) from PyPI into `dest/wheels-cuda`, apart from the CPU wheels. Already present wheels are kept."""
    wheels = dest / "wheels-cuda"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = lock_pins("torch-cuda-extras", requirements_dir)
    missing = [f"{n}=={v}" for n, v in pins.items() if not _wheel_files(wheels, {n: v}, strict=False)]
    if missing:
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                        *_cuda_pip_args(), *missing], check=True, env=_pypi_only_env())
    cpu = [p.name for p in wheels.glob("torch-*+cpu*.whl")]
    if cpu:
        raise RuntimeError(f"{wheels}: holds a CPU torch wheel {cpu}; the CUDA images need PyPI's CUDA build. "
                           "Delete it and run the wheelhouse step again.")
    return dest


def make_wheelhouse(dest: Path, requirements_dir: Path = REQUIREMENTS_DIR, python: str = sys.executable) -> Path:
    """Put a wheel of every locked requirement (both flavours) into `dest/wheels`, the synthehr wheel into `dest/dist`.

    `pip wheel` downloads the published wheels and builds the few sdist-only ones (kfp-server-api), with the host's
    pip configuration (indexes, find-links, CA); the image builds then need no network. Wheels already in
    `dest/wheels` are reused, so a second call is quick.
    """
    wheels, dist = dest / "wheels", dest / "dist"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = {}
    for flavor in FLAVORS:
        pins.update(read_lock(requirements_dir / f"{flavor}.lock"))
    missing = [f"{n}=={v}" for n, v in pins.items() if not _wheel_files(wheels, {n: v}, strict=False)]
    if missing:
        req = wheels / "missing.txt"
        req.write_text("\n".join(missing) + "\n")
        subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--prefer-binary",
                        "-w", str(wheels), "-r", str(req)], check=True)
        req.unlink()
    torch_wheels = [p.name for p in wheels.glob("torch-*.whl")]
    if any("+cpu" not in n for n in torch_wheels):
        raise RuntimeError(f"{wheels}: the wheelhouse holds a non-CPU torch wheel {torch_wheels}; CI images must use "
                           "the CPU wheel (/opt/wheels/torch-2.13.0+cpu-...whl). Delete it and check pip's find-links.")
    shutil.rmtree(dist, ignore_errors=True)
    # setuptools builds in-tree and never cleans build/lib: a module deleted since the last build would ship.
    for stale in [REPO / "build" / "lib", *(REPO / "build").glob("bdist.*")]:
        shutil.rmtree(stale, ignore_errors=True)
    subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True)
    return dest


def _wheel_files(wheels: Path, pins: dict[str, str], strict: bool = True) -> list[Path]:
    """The wheels in `wheels` that the pins name, one per pin; raises listing every missing pin (if strict)."""
    found, missing = [], []
    by_name: dict[str, list[Path]] = {}
    for whl in wheels.glob("*.whl"):
        by_name.setdefault(_normalize(whl.name.split("-")[0]), []).append(whl)
    for name, ver in pins.items():
        hits = [w for w in by_name.get(name, []) if re.match(rf"{re.escape(ver)}([+-]|$)", w.name.split("-")[1])]
        (found if hits else missing).append(hits[0] if hits else f"{name}=={ver}")
    if missing and strict:
        raise FileNotFoundError(f"{wheels}: no wheel for {missing}; run `python -m synthehr_build.images wheelhouse`.")
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def lock_pins(pin_set: str, requirements_dir: Path = REQUIREMENTS_DIR) -> dict[str, str]:
    """Pins of a wheel set: "light", "torch", "torch-cuda", "torch-extras" (the torch lock minus the light lock),
    "torch-cuda-extras" (the CUDA lock minus the light lock) or "torch-extras-without-torch" (torch-extras
    without torch itself, for a base image that brings its own)."""
    if pin_set.startswith(("torch-extras", "torch-cuda-extras")):
        light = read_lock(requirements_dir / "light.lock")
        lock = "torch-cuda.lock" if pin_set == "torch-cuda-extras" else "torch.lock"
        pins = {n: v for n, v in read_lock(requirements_dir / lock).items() if light.get(n) != v}
        if pin_set == "torch-extras-without-torch":
            pins.pop("torch")
        return pins
    return read_lock(requirements_dir / f"{pin_set}.lock")


def assemble_context(step: BuildStep, wheelhouse: Path, dest: Path) -> Path:
    """Build context of a step: images/Dockerfile and entrypoint.sh, wheels/<dir>/ with only the wheels each pin set
    names, requirements-<dir>.lock, and dist/ with the synthehr wheel. Wheels are hard-linked when possible."""
    dest.mkdir(parents=True)
    for name in (DOCKERFILE.name, "entrypoint.sh"):
        shutil.copy2(IMAGES_DIR / name, dest / name)
    for sub, pin_set in step.wheels.items():
        pins = lock_pins(pin_set)
        (dest / "wheels" / sub).mkdir(parents=True)
        (dest / f"requirements-{sub}.lock").write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        for whl in _wheel_files(wheelhouse / ("wheels-cuda" if "cuda" in pin_set else "wheels"), pins):
            _link_or_copy(whl, dest / "wheels" / sub / whl.name)
    libs = sorted((wheelhouse / "dist").glob("synthehr-*.whl"))
    if len(libs) != 1:
        raise FileNotFoundError(f"{wheelhouse / 'dist'}: expected one synthehr wheel, found {[p.name for p in libs]}; "
                                "run `python -m synthehr_build.images wheelhouse`.")
    (dest / "dist").mkdir()
    _link_or_copy(libs[0], dest / "dist" / libs[0].name)
    return dest


# --- engine -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Built:
    ref: str
    seconds: float
    size_bytes: int
    image_id: str = ""


def docker_client():
    """A pinged docker client, or a RuntimeError that says how to start an engine."""
    import docker
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:  # no engine answers (requests errors are OSErrors)
        raise RuntimeError(f"no Docker engine answers at DOCKER_HOST={os.environ.get('DOCKER_HOST', '(unset)')}: "
                           f"{exc}. Start one with `SYNTHEHR_DOCKER_KEEP=1 source scripts/ci-docker.sh`.") from exc
    return client


def build(steps: list[BuildStep], wheelhouse: Path, client=None, log=print) -> list[Built]:
    """Build every step in order, offline (`network_mode="none"`), from contexts assembled out of the wheelhouse."""
    client = client or docker_client()
    results = []
    with tempfile.TemporaryDirectory(prefix="synthehr-images-", dir=wheelhouse) as tmp:
        contexts: dict[tuple, Path] = {}  # steps with the same wheel sets (all light ones, all torch ones) share one
        for step in steps:
            key = tuple(sorted(step.wheels.items()))
            if key not in contexts:
                contexts[key] = assemble_context(step, wheelhouse, Path(tmp) / f"ctx-{len(contexts)}")
            results.append(_build_step(client, step, contexts[key]))
            log(f"built {results[-1].ref} in {results[-1].seconds:.1f} s ({results[-1].size_bytes / 1e6:.0f} MB)")
    return results


def _build_step(client, step: BuildStep, ctx: Path) -> Built:
    import docker
    t0 = time.monotonic()
    try:
        image, _ = client.images.build(path=str(ctx), dockerfile=DOCKERFILE.name, target=step.target, tag=step.ref,
                                       buildargs=step.buildargs, rm=True, forcerm=True, pull=False,
                                       network_mode="none")
    except docker.errors.BuildError as exc:
        tail = "".join(c.get("stream", "") or c.get("error", "") for c in exc.build_log)[-3000:]
        raise RuntimeError(f"building {step.ref} (target {step.target} of {DOCKERFILE.relative_to(REPO)}) failed: "
                           f"{exc.msg}\n{tail}") from exc
    return Built(step.ref, time.monotonic() - t0, image.attrs["Size"], image.id)


def write_record(steps: list[BuildStep], built: list[Built], path: Path = RECORD) -> Path:
    """build/images.json: every built image's tag reference, image id and torch variant (push adds digests)."""
    by_ref = {b.ref: b for b in built}
    record = {"images": {s.name: {"ref": s.ref, "id": by_ref[s.ref].image_id, "variant": s.variant, "digest": None}
                         for s in steps if s.ref in by_ref}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def _remote_digest(client, ref: str) -> str | None:
    """The registry's manifest digest of `ref`, or None when the registry has no such tag."""
    import docker
    try:
        return client.images.get_registry_data(ref).id
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as exc:   # registries answer a missing tag with 404 or "manifest unknown"
        if "manifest unknown" in str(exc) or "not found" in str(exc).lower():
            return None
        raise


def push(steps: list[BuildStep], client=None, log=print, record: Path | None = RECORD,
         allow_cpu_torch: bool = False) -> dict[str, str]:
    """Push every image of the plan and return {stage: repo@sha256:digest} (also written into `record`).

    Tags never move: a tag the registry already holds is pushed only if it is this very image (same digest),
    else the push stops and says to rebuild (a new commit or edit gives a new content tag). Torch images of the
    CPU variant are refused unless allow_cpu_torch (GPU nodes would run them on the CPU)."""
    client = client or docker_client()
    digests = {}
    for step in steps:
        image = client.images.get(step.ref)
        variant = (image.labels or {}).get("io.synthehr.torch", "-")
        if step.flavor == "torch" and variant == "cpu" and not allow_cpu_torch:
            raise RuntimeError(f"{step.ref} holds CPU-only torch (label io.synthehr.torch=cpu): GPU nodes would train "
                               "on the CPU. Build the registry images with the CUDA variant (`make images-push`, "
                               "or build --variant cuda), or pass --allow-cpu-torch on purpose.")
        repo, _, tag = step.ref.rpartition(":")
        local = {d.partition("@")[2] for d in image.attrs.get("RepoDigests", []) if d.startswith(repo + "@")}
        remote = _remote_digest(client, step.ref)
        if remote is not None and remote not in local:
            raise RuntimeError(f"{step.ref} already exists in the registry as {remote} with other content; image tags "
                               "are immutable here. Rebuild (the content tag changes with every commit or edit) or "
                               "choose a new --tag.")
        if remote is None:
            errors = [c["error"] for c in client.images.push(repo, tag=tag, stream=True, decode=True) if "error" in c]
            if errors:
                raise RuntimeError(f"pushing {step.ref} failed: {errors[-1]}")
            image.reload()
        pinned = [d for d in image.attrs.get("RepoDigests", []) if d.startswith(repo + "@")]
        digests[step.name] = pinned[0] if pinned else f"{repo}@{_remote_digest(client, step.ref)}"
        log(f"{'pushed' if remote is None else 'already in the registry:'} {step.ref} = {digests[step.name]}")
    if record is not None and record.exists():
        data = json.loads(record.read_text())
        for name, digest in digests.items():
            data["images"].setdefault(name, {"ref": next(s.ref for s in steps if s.name == name)})["digest"] = digest
        record.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return digests


# --- GPU smoke ----------------------------------------------------------------------------------------------------

# Run inside a torch stage image on a GPU machine: the torch build, the device pick_device("auto") makes, a bf16 matmul
# and a few steps of the tiny HALO on the GPU. Fails (exit 1) on a CPU-only torch or an unusable GPU.
GPU_SMOKE = """
import json, os, torch
from synthehr_core.model.train import pick_device
info = {"image": os.environ.get("SYNTHEHR_IMAGE"), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "devices": torch.cuda.device_count()}
print(json.dumps(info), flush=True)
assert torch.version.cuda, "CPU-only torch build: rebuild with the cuda variant"
dev = pick_device("auto")
assert dev.type == "cuda", dev
x = torch.randn(2048, 2048, device=dev)
with torch.autocast("cuda", dtype=torch.bfloat16):
    y = (x @ x).float().sum().item()
from synthehr_core.model.halo import HALO, HaloConfig
model = HALO(HaloConfig(n_visit_tokens=60, n_labels=4, n_ctx=8, n_embd=32, n_layer=2, n_head=2)).to(dev)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
g = torch.Generator(device=dev).manual_seed(0)
batch = (torch.rand(8, 8, model.config.vocab_size, device=dev, generator=g) < 0.05).float()
for _ in range(3):
    _, loss = model(batch, torch.ones(8, 8, 1, device=dev))
    opt.zero_grad(); loss.backward(); opt.step()
print(json.dumps({"ok": True, "device": torch.cuda.get_device_name(dev), "bf16_matmul": y, "loss": loss.item()}))
"""


def gpu_smoke_command(ref: str, runtime: str = "docker") -> list[str]:
    """The `docker run` of GPU_SMOKE in one image, with every GPU and no network."""
    return [runtime, "run", "--rm", "--gpus", "all", "--network", "none", "-e", f"SYNTHEHR_IMAGE={ref}",
            "--entrypoint", "python", ref, "-c", GPU_SMOKE]


# --- CLI --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synthehr_build.images", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("plan", "build", "push"):
        s = sub.add_parser(cmd)
        s.add_argument("--registry", default=None, help="default: components._images (SYNTHEHR_IMAGE_REGISTRY)")
        s.add_argument("--tag", default=None, help="default: SYNTHEHR_IMAGE_TAG, else the content tag of this checkout")
        s.add_argument("--base-image", default=DEFAULT_BASE_IMAGE, help="Python 3.11 base (CI: local/python:3.11-bookworm)")
        s.add_argument("--torch-base-image", default=None, help="a PyTorch base image for the torch stages instead")
        s.add_argument("--variant", choices=VARIANTS, default=None,
                       help="torch of train/sample; default: cuda when pushing (build --push, push), else cpu")
        s.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
        if cmd in ("plan", "build"):
            s.add_argument("--push", action="store_true", help="push after building (plan: show what a push builds)")
        if cmd == "build":
            s.add_argument("--wheelhouse", type=Path, default=REPO / "build" / "wheelhouse")
        if cmd in ("build", "push"):
            s.add_argument("--record", type=Path, default=RECORD, help="build record (image ids, digests)")
            s.add_argument("--allow-cpu-torch", action="store_true", help="push CPU-torch train/sample images anyway")
    lk = sub.add_parser("lock", help="re-resolve images/requirements/*.in into *.lock")
    lk.add_argument("--variant", choices=VARIANTS, default="cpu", help="cuda: torch-cuda.lock from PyPI")
    g = sub.add_parser("gpu-smoke", help="on a GPU machine: run a torch image's GPU check (docker run --gpus all)")
    g.add_argument("image", help="train or sample image reference (a tag or image@sha256:...)")
    g.add_argument("--print", action="store_true", help="print the docker command instead of running it")
    w = sub.add_parser("wheelhouse", help="download the locked wheels and build the synthehr wheel")
    w.add_argument("--dest", type=Path, default=REPO / "build" / "wheelhouse")
    w.add_argument("--variant", choices=VARIANTS, default="cpu", help="cuda: also the CUDA wheels (several GB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "lock":
        paths = {"torch-cuda": write_cuda_lock()} if args.variant == "cuda" else write_locks()
        for flavor, path in paths.items():
            print(f"{flavor}: {path}")
        return 0
    if args.cmd == "gpu-smoke":
        cmd = gpu_smoke_command(args.image)
        if args.print:
            print(" ".join(cmd[:-1]) + " \"$GPU_SMOKE\"")
            return 0
        return subprocess.run(cmd, check=False).returncode
    if args.cmd == "wheelhouse":
        print(make_wheelhouse(args.dest))
        if args.variant == "cuda":
            print(make_cuda_wheelhouse(args.dest))
        return 0
    import synthehr_core
    pushing = args.cmd == "push" or args.push
    variant = args.variant or ("cuda" if pushing else "cpu")
    steps = plan(args.registry or default_registry(), args.tag or default_tag(synthehr_core.__version__),
                 args.base_image, args.torch_base_image, args.stages.split(",") if args.stages else None,
                 synthehr_core.__version__, variant)
    if args.cmd == "plan":
        for s in steps:
            print(f"{s.ref}  torch={s.variant}  <- {DOCKERFILE.relative_to(REPO)} --target {s.target}  "
                  f"{json.dumps(s.buildargs)}")
        return 0
    if args.cmd == "build":
        t0 = time.monotonic()
        make_wheelhouse(args.wheelhouse)
        if any(s.variant == "cuda" for s in steps):
            make_cuda_wheelhouse(args.wheelhouse)
        print(f"wheelhouse ready in {time.monotonic() - t0:.1f} s")
        built = build(steps, args.wheelhouse)
        print(f"all images built in {time.monotonic() - t0:.1f} s; recorded in {write_record(steps, built, args.record)}")
        if not args.push:
            return 0
    push(steps, record=args.record, allow_cpu_torch=args.allow_cpu_torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

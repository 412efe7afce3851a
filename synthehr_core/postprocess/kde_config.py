"""The KDE config: which columns the KDE stage fills, how their grids are fitted, how visit times are rebuilt.

A YAML file or a dict (bundled per dataset: ``synthehr_core/configs/kde_<dataset>.yml``), validated once into a
frozen ``KDEConfig`` (pydantic); every problem is listed in one ConfigError naming the key path, showing the value
and saying the fix. Reference: docs/kde.md.

    num_cores: -1            # -1 = all cores
    min_count: 10            # privacy guard: strata with fewer real rows are merged into their back-off stratum
    bandwidth_floor: 1.0     # bandwidth >= this x median width of the cells holding real values
    code_columns: {triage_category: tri}
    variable_config:
      los_days: {method: kde_range, data_source: visits, grid_params: {method: fine_bins, step: 0.25}}
    time: {gap: gap_days, los: los_days, anchor_age: age}

``KDEConfig.to_dict()`` is the normalised config (every optional key filled in): what ``kde_config.json`` holds
and what ``config_hash`` hashes into the grids' and shards' metadata. Grid methods live in ``axes.py``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

import pandas as pd
from pydantic import BeforeValidator, Field, PlainValidator, ValidationError, field_validator

from .. import storage
from ..errors import ConfigError, bullet_list
from .axes import GridMethod, GridParams
from .validation import Section, bad, bad_section, inside, is_int, is_num, problems, show

METHODS = ("kde_range", "kde_joint", "value_counts")
DATA_SOURCES = ("patients", "visits")
UNIT_DAYS = {"days": 1.0, "hours": 1.0 / 24.0, "months": 365.25 / 12.0, "years": 365.25}
DEFAULT_MIN_COUNT = 10          # privacy guard; arbitrary, tune per data-use agreement
DEFAULT_BANDWIDTH_FLOOR = 1.0   # bandwidth >= this x median width of cells holding data; arbitrary, tune
MONTH_TOKEN_DECAY = 0.25        # weight factor per month away from a given-up month token; arbitrary, tune
GRID_FILE = "grid_{}_kde.parquet"
CONFIG_FILE = "kde_config.json"
CONFIGS_DIR = Path(__file__).parents[1] / "configs"


# ============================================================================================ field checks
def _checked(ok, msg: str):
    """A before-validator: ``ok(value)`` or the problem ``key = value msg``."""
    def check(v: Any) -> Any:
        if not ok(v):
            raise bad(msg)
        return v
    return BeforeValidator(check)


def _count(msg: str):
    return _checked(lambda v: is_int(v) and v >= 1, msg)


def _columns(v: Any) -> list[str]:
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v) or len(set(v)) != len(v):
        raise bad("must be a list of distinct column names.")
    return list(v)


def _condition(cond: Any) -> dict | str:
    """A filter condition normalised, or the problem with it (a message)."""
    if isinstance(cond, Mapping):
        keys = set(cond)
        if keys == {"notnull"} and cond["notnull"] is True:
            return {"notnull": True}
        if keys == {"equals"}:
            return {"equals": cond["equals"]}
        if keys == {"in"} and isinstance(cond["in"], list) and cond["in"]:
            return {"in": list(cond["in"])}
        return "is not a filter; use exactly one of {notnull: true}, {equals: VALUE} or {in: [V1, V2]}."
    if isinstance(cond, list):
        return {"in": list(cond)} if cond else "keeps no rows; list at least one value or remove the filter."
    return {"equals": cond}


def _filter(flt: Any) -> dict:
    """``{col: scalar}`` equality, ``{col: [..]}`` membership, ``{col: {notnull: true}}``, ``{col: {equals|in: ..}}``
    -> ``{col: {"equals": v} | {"in": [..]} | {"notnull": True}}``."""
    if flt is None:
        return {}
    if not isinstance(flt, Mapping):
        raise bad("must be a mapping column -> condition, e.g. {event_type: ED}.")
    out, wrong = {}, []
    for col, cond in flt.items():
        norm = _condition(cond)
        if isinstance(norm, str):
            wrong.append(((col,), cond, bad(norm)))
        else:
            out[col] = norm
    if wrong:
        raise inside("filter", wrong)
    return out


def _bandwidth(n: int):
    def check(v: Any) -> Any:
        if v is not None and (not isinstance(v, list) or len(v) != n or not all(is_num(b) and b > 0 for b in v)):
            raise bad(f"must be a list of {n} positive number(s) (one per variable), or left out for Silverman's "
                      "rule per stratum.")
        return v
    return BeforeValidator(check)


# ============================================================================================ variables
class Variable(Section):
    """One ``variable_config`` entry; the subclass is picked by its ``method``."""

    implicit_keys: ClassVar[tuple[str, ...]] = ("method",)
    method: ClassVar[str]
    data_source: Annotated[str, _checked(lambda v: v in DATA_SOURCES, f"is not one of {list(DATA_SOURCES)}.")]
    stratify_by: Annotated[list[str], BeforeValidator(_columns)] = Field(default_factory=list)
    filter: Annotated[dict, BeforeValidator(_filter)] = Field(default_factory=dict)
    min_count: Annotated[int, _count("must be an integer >= 1.")] = DEFAULT_MIN_COUNT

    @property
    def columns(self) -> list[str]:
        """The column(s) this variable fills."""
        return [self.column]

    def grids(self) -> dict[str, GridMethod]:
        """Grid method per filled column (none for value_counts)."""
        return {}

    def to_dict(self) -> dict:
        """The normalised entry: every key filled in, grids as their normalised dicts."""
        out = {"method": self.method, **{k: getattr(self, k) for k in type(self).model_fields}}
        if isinstance(out.get("grid_params"), GridMethod):
            out["grid_params"] = out["grid_params"].to_dict()
        elif "grid_params" in out:
            out["grid_params"] = {c: g.to_dict() for c, g in out["grid_params"].items()}
        return out


_COLUMN = _checked(lambda v: isinstance(v, str), "must be a column name (default: the variable name).")


class KDERange(Variable):
    """A Gaussian KDE of one column on a grid (``grid_params``)."""

    what: ClassVar[str] = "method 'kde_range'"
    method: ClassVar[str] = "kde_range"
    column: Annotated[str, _COLUMN]
    grid_params: GridParams
    bandwidth: Annotated[list[float] | None, _bandwidth(1)] = None

    def grids(self) -> dict[str, GridMethod]:
        return {self.column: self.grid_params}


class KDEJoint(Variable):
    """A product-Gaussian KDE of two columns on the product of their grids, sampled jointly."""

    what: ClassVar[str] = "method 'kde_joint'"
    method: ClassVar[str] = "kde_joint"
    variables: Annotated[list[str], _checked(
        lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(c, str) for c in v) and v[0] != v[1],
        "must list two distinct column names, e.g. [los_hours, los_triage_hours].")]
    grid_params: dict[str, GridParams]
    bandwidth: Annotated[list[float] | None, _bandwidth(2)] = None

    @field_validator("grid_params", mode="before")
    @classmethod
    def _one_per_variable(cls, v: Any, info) -> Any:
        cols = info.data.get("variables")
        if cols is not None and (not isinstance(v, Mapping) or set(v) != set(cols)):
            raise bad(f"must map each of {cols} to a grid, e.g. "
                      "{los_hours: {method: cells, min: 0, max: 48, step: 0.5}, ...}.")
        return {c: v[c] for c in cols} if cols is not None else v    # in the order of `variables`

    @property
    def columns(self) -> list[str]:
        return list(self.variables)

    def grids(self) -> dict[str, GridMethod]:
        return dict(self.grid_params)


class ValueCounts(Variable):
    """Exact frequencies of a categorical column (no kernel, no grid)."""

    what: ClassVar[str] = "method 'value_counts'"
    method: ClassVar[str] = "value_counts"
    column: Annotated[str, _COLUMN]


VARIABLE_METHODS: dict[str, type[Variable]] = {c.method: c for c in (KDERange, KDEJoint, ValueCounts)}


def _variable(data: Any) -> Variable:
    if isinstance(data, Variable):
        return data
    if not isinstance(data, Mapping):
        raise bad("must be a mapping with at least 'method' and 'data_source'.")
    method = data.get("method")
    if not isinstance(method, str) or method not in VARIABLE_METHODS:
        raise inside("variable", [(("method",), method, bad(f"is not one of {list(METHODS)}."))])
    return VARIABLE_METHODS[method].model_validate({k: v for k, v in data.items() if k != "method"})


VariableSpec = Annotated[Variable, PlainValidator(_variable)]


# ============================================================================================ time
def _anchor_date(ad: Any) -> Any:
    if ad is None:
        return ad
    try:
        lo, hi = pd.Timestamp(ad["min"]), pd.Timestamp(ad["max"])
        if hi < lo or set(ad) != {"min", "max"}:
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise bad("must be {min: YYYY-MM-DD, max: YYYY-MM-DD} with min <= max.") from None
    return ad


_UNIT = _checked(lambda v: isinstance(v, str) and v in UNIT_DAYS, f"is not one of {list(UNIT_DAYS)}.")
_FLAG = _checked(lambda v: isinstance(v, bool), "must be true or false.")


class TimeSpec(Section):
    """The ``time`` section: how ``start_offset_days`` is rebuilt (docs/kde.md, time reconstruction)."""

    what: ClassVar[str] = "the time section"
    gap: str | None = None                     # column of gaps from the previous visit's start
    gap_unit: Annotated[str, _UNIT] = "days"
    offset: str | None = None                  # or: column of time since the first visit
    offset_unit: Annotated[str, _UNIT] = "days"
    los: str | None = None
    los_unit: Annotated[str, _UNIT] = "days"
    allow_overlap: Annotated[bool, _FLAG] = False
    anchor_age: str | None = None
    anchor_date: Annotated[Any, BeforeValidator(_anchor_date)] = None
    monotone: Annotated[list[str], _checked(
        lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
        "must be a list of visit columns that never decrease within a patient (e.g. [age] for a visit-level age).")
    ] = Field(default_factory=list)
    month_token_decay: Annotated[int | float, _checked(
        lambda v: is_num(v) and 0 < v <= 1,
        "must be a number in (0, 1]: the weight factor per month between a later visit's candidate day and its "
        "given-up month token (1 = ignore it).")] = MONTH_TOKEN_DECAY

    def mode_problem(self) -> str | None:
        """Why offsets cannot be rebuilt from this section (they need exactly one of gap and offset; dating the
        first visits alone needs neither), or None."""
        if (self.gap is None) == (self.offset is None):
            return ("give exactly one of gap (column of gaps from the previous visit start) or offset (column of "
                    f"time since the first visit); got gap={show(self.gap)}, offset={show(self.offset)}.")
        return None

    def to_dict(self) -> dict:
        return self.model_dump()


def validate_time(time: TimeSpec | Mapping, where: str = "time") -> TimeSpec:
    """A ``time`` section on its own (e.g. ``{gap: gap_days, allow_overlap: true}``), validated."""
    if isinstance(time, TimeSpec):
        return time
    try:
        return TimeSpec.model_validate(time)
    except ValidationError as exc:
        lines = problems(exc, root=("time",))
        raise ConfigError(f"{where}: invalid time section ({len(lines)} problem(s)):\n" + bullet_list(lines)) from None


# ============================================================================================ the config
class KDEConfig(Section):
    """A validated KDE config. ``variable_config`` keeps the config's order (it orders the random streams)."""

    what: ClassVar[str] = "the KDE config"
    num_cores: Annotated[int, _checked(lambda v: is_int(v) and (v == -1 or v >= 1),
                                       "must be -1 (all cores) or an integer >= 1.")] = -1
    min_count: Annotated[int, _count("must be an integer >= 1 (strata with fewer real rows are merged).")] = \
        DEFAULT_MIN_COUNT
    bandwidth_floor: Annotated[float, _checked(
        lambda v: is_num(v) and v >= 0,
        "must be a number >= 0 (multiple of the median width of the cells holding real values).")] = \
        DEFAULT_BANDWIDTH_FLOOR
    code_columns: Annotated[dict[str, str], _checked(
        lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(c, str) for k, c in v.items()),
        "must map a new visit column to a code namespace, e.g. {triage_category: tri}.")] = \
        Field(default_factory=dict)
    variable_config: Annotated[dict[str, VariableSpec], _checked(
        lambda v: isinstance(v, Mapping) and bool(v), "must be a non-empty mapping NAME -> settings.")]
    time: TimeSpec | None = None

    @classmethod
    def unknown_keys(cls, unknown: list[str]):
        return bad_section(f"unknown top-level keys {show(unknown)}; allowed: {cls.allowed_keys()}.")

    @classmethod
    def prepare(cls, data: dict) -> dict:
        """Per-variable defaults that come from the top level or the variable's name: ``min_count`` and ``column``."""
        data = dict(data)
        if "code_columns" in data:
            data["code_columns"] = data["code_columns"] or {}
        vc, mc = data.get("variable_config"), data.get("min_count", DEFAULT_MIN_COUNT)
        if isinstance(vc, Mapping):
            data["variable_config"] = {str(name): _variable_defaults(str(name), spec, mc) for name, spec in vc.items()}
        return data

    def check(self) -> None:
        if self.time is not None and (problem := self.time.mode_problem()):
            raise bad_section(f"time: {problem}")

    @field_validator("time", mode="before")
    @classmethod
    def _time_mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (Mapping, TimeSpec)):
            raise bad("must be a mapping (gap or offset, los, anchor_age, ...).")
        return v

    def to_dict(self) -> dict:
        """The normalised config (what kde_config.json holds and config_hash hashes); a copy, free to change."""
        return copy.deepcopy({"code_columns": dict(self.code_columns), "num_cores": self.num_cores, "min_count": self.min_count,
                "bandwidth_floor": self.bandwidth_floor,
                "variable_config": {n: v.to_dict() for n, v in self.variable_config.items()},
                "time": self.time.to_dict() if self.time is not None else None})

    def config_hash(self) -> str:
        """sha256 of the normalised config (independent of YAML formatting, key order and method spellings)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _variable_defaults(name: str, spec: Any, min_count: Any) -> Any:
    if not isinstance(spec, Mapping):
        return spec
    cls = VARIABLE_METHODS.get(spec.get("method")) if isinstance(spec.get("method"), str) else None
    spec = dict(spec)
    if is_int(min_count) and min_count >= 1:
        spec.setdefault("min_count", min_count)
    if cls is not None and "column" in cls.model_fields:
        spec.setdefault("column", name)
    return spec


def validate_kde_config(config: Mapping | KDEConfig, where: str = "KDE_CONFIG") -> KDEConfig:
    """Check a KDE config and return it normalised; one ConfigError lists every problem found."""
    if isinstance(config, KDEConfig):
        return config
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: a KDE config must be a mapping with 'variable_config'; got "
                          f"{type(config).__name__}.")
    try:
        return KDEConfig.model_validate(dict(config))
    except ValidationError as exc:
        lines = problems(exc)
        raise ConfigError(f"{where}: invalid KDE config ({len(lines)} problem(s)):\n" + bullet_list(lines)) from None


def load_kde_config(config: KDEConfig | Mapping | str | os.PathLike, where: str | None = None) -> KDEConfig:
    """Read and validate a KDE config: a ``KDEConfig``, a dict, a YAML/JSON path, or a bundled name (``kde_qh``)."""
    if isinstance(config, (KDEConfig, Mapping)):
        return validate_kde_config(config, where or "KDE_CONFIG")
    text_path = str(config)
    if not storage.exists(text_path):             # a bundled name: "kde_qh" or "kde_qh.yml"
        name = Path(text_path).name
        bundled = CONFIGS_DIR / (name if name.endswith((".yml", ".yaml")) else f"{name}.yml")
        if not bundled.exists():
            known = sorted(p.stem for p in CONFIGS_DIR.glob("kde_*.yml"))
            raise ConfigError(f"KDE config {show(text_path)}: no such file and no bundled config of that name; "
                              f"bundled: {known}. Pass a path, a bundled name or a dict.")
        text_path = str(bundled)
    from ..yamlio import load_yaml_file

    raw = load_yaml_file(text_path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{text_path}: a KDE config must be a mapping with 'variable_config'; got {type(raw).__name__}.")
    return validate_kde_config(raw, where or text_path)

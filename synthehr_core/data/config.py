"""Dataset configuration: one YAML file per dataset, validated before any work starts.

A dataset differs from another only by this file and its small adapter (``synthehr_core/data/adapters/<adapter>.py``).
Bundled configs live in ``synthehr_core/configs/<name>.yml`` and are addressed by name (``mimic3``, ``adni``,
``qh``); any other value is read as a path (local or ``gs://``).

```yaml
name: mimic3
adapter: mimic3
profiles:                       # where the raw extract lives, per execution environment
  local: {raw: "bundled:mimic3_demo"}          # bundled:<dir> = synthehr_core/sample_data/<dir>
  kubeflow: {raw: "gs://my-bucket/mimiciii/1.4"}
split: {train: 0.72, val: 0.08, test: 0.20, seed: 4}
n_ctx: 48
code_namespaces: [adm, dx, px]  # vocabulary order of code namespaces
labels: [gender]                # categorical patient columns -> label tokens
patient_bins: {age: {edges: [0, 30, 50, 70, 91]}}
visit_bins: {los_days: {edges: [0, 2, 7, 30, 200]}, gap_days: {quantiles: 8}}
kde: kde_mimic3.yml
```
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import storage
from ..errors import ConfigError, bullet_list, show
from ..yamlio import load_yaml_file

BUNDLED_PREFIX = "bundled:"
HASHED_WHEN_SET = ("visit_categories", "longitudinal", "plausible")   # keys added later: hashed only when not the default


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BinSpec(_Strict):
    """Either explicit ``edges`` (strictly increasing) or a number of ``quantiles`` fitted on the train split."""

    edges: list[float] | None = None
    quantiles: int | None = Field(default=None, ge=2, le=100)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.edges is None) == (self.quantiles is None):
            raise ValueError("give exactly one of `edges` (a list of numbers) or `quantiles` (an int >= 2)")
        if self.edges is not None:
            if len(self.edges) < 2:
                raise ValueError(f"`edges` needs at least 2 numbers, got {self.edges}")
            bad = [(a, b) for a, b in zip(self.edges, self.edges[1:]) if not b > a]
            if bad:
                raise ValueError(f"`edges` must be strictly increasing, got {self.edges} (check {bad[0][0]} -> {bad[0][1]})")
        return self


class SplitSpec(_Strict):
    train: float = Field(0.72, gt=0, lt=1)  # HALO: 20% test, then 10% of the rest for validation
    val: float = Field(0.08, ge=0, lt=1)
    test: float = Field(0.20, ge=0, lt=1)
    seed: int = 4                           # HALO's random_state

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train} + {self.val} + {self.test} = {total:g}")
        return self


class Profile(_Strict):
    raw: str


class CalendarSpec(_Strict):
    """Calendar tokens per visit (temporal realism). Off unless a dataset's dates carry real calendar meaning."""

    enabled: bool = False
    tokens: list[str] = Field(default_factory=lambda: ["month", "weekday"])
    hemisphere: Literal["north", "south"] = "north"   # which months are winter / summer in the evaluate stage

    @field_validator("tokens")
    @classmethod
    def _known(cls, v):
        allowed = {"month", "weekday", "year", "hour"}
        bad = [t for t in v if t not in allowed]
        if bad:
            raise ValueError(f"unknown calendar token kind(s) {bad}; allowed: {sorted(allowed)}")
        return v


class PlausibleSpec(_Strict):
    """Values no real record has. ``action: error`` (the default) stops preprocess naming the rows;
    ``action: clip`` clips ages below ``min_age`` (above ``max_age``) to the bound and drops visits whose start
    year is outside ``visit_years``, each counted in meta.json (``implausible``, ``dropped``)."""

    age_column: str = "age"                      # the patient column checked (skipped when the data has none)
    min_age: float = 0.0
    max_age: float | None = None
    visit_years: tuple[int, int] = (1900, 2250)  # MIMIC shifts dates into 2100-2200; wide on purpose, tune
    action: Literal["error", "clip"] = "error"

    @model_validator(mode="after")
    def _ordered(self):
        if self.visit_years[0] > self.visit_years[1]:
            raise ValueError(f"visit_years must be [first, last] with first <= last, got {list(self.visit_years)}")
        if self.max_age is not None and self.max_age < self.min_age:
            raise ValueError(f"max_age {self.max_age} is below min_age {self.min_age}")
        return self


class OrdinalSpec(_Strict):
    """A code family whose members are ordered stages (e.g. cancer stage 1 < 2 < 3): a patient should not go
    back down. The evaluate stage counts patients whose stage decreases between visits."""
    name: str
    codes: list[str] = Field(min_length=2)


class LongitudinalSpec(_Strict):
    ordinal: list[OrdinalSpec] = Field(default_factory=list)


class DatasetConfig(_Strict):
    name: str
    adapter: str
    description: str = ""
    profiles: dict[str, Profile]
    adapter_options: dict[str, Any] = Field(default_factory=dict)
    split: SplitSpec = SplitSpec()
    n_ctx: int = Field(48, ge=3, le=4096)  # HALO inpatient: 48 visit rows incl. start and label rows
    code_namespaces: list[str] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    patient_bins: dict[str, BinSpec] = Field(default_factory=dict)
    visit_bins: dict[str, BinSpec] = Field(default_factory=dict)
    calendar: CalendarSpec = CalendarSpec()
    # single-valued string visit columns (e.g. the code-system version of a visit) -> one token group each:
    # the model draws exactly one ``cat:<column>=<value>`` per visit
    visit_categories: list[str] = Field(default_factory=list)
    plausible: PlausibleSpec = PlausibleSpec()
    kde: str | None = None
    # declared structure the evaluate stage checks (e.g. longitudinal: {ordinal: [{name, codes: [s1, s2, ...]}]})
    longitudinal: LongitudinalSpec | None = None
    source: str = Field(default="", exclude=True)

    @field_validator("adapter")
    @classmethod
    def _adapter_exists(cls, v):
        from .adapters.registry import is_known, unknown_adapter_message

        if not is_known(v):
            raise ValueError(unknown_adapter_message(v))
        return v

    def config_hash(self) -> str:
        """sha256 of the normalised config (independent of YAML formatting and key order)."""
        data = self.model_dump(mode="json")
        defaults = DatasetConfig.model_fields
        for key in HASHED_WHEN_SET:   # keys added later: a config that leaves them unset keeps its old hash
            default = defaults[key].get_default(call_default_factory=True)
            if not data[key] or data[key] == (default.model_dump(mode="json") if isinstance(default, BaseModel)
                                              else default):
                del data[key]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def raw_path(self, profile: str = "local") -> str:
        """The raw-data location of a profile, with ``bundled:`` resolved; checks that it exists."""
        if profile not in self.profiles:
            raise ConfigError(f"{self.source or self.name}: profile {profile!r} is not defined; "
                              f"defined profiles: {sorted(self.profiles)}. Add it under `profiles:` or pick one of those.")
        raw = self.profiles[profile].raw
        if raw.startswith(BUNDLED_PREFIX):
            raw = str(bundled_data_dir(raw[len(BUNDLED_PREFIX):]))
        if not storage.exists(raw):
            raise ConfigError(f"{self.source or self.name}: profiles.{profile}.raw = {raw!r} does not exist. "
                              "Fix the path in the config, or pass --raw to point at the extract.")
        return raw


def bundled_data_dir(name: str) -> Path:
    return Path(str(resources.files("synthehr_core") / "sample_data" / name))


def bundled_config_path(name: str) -> Path:
    return Path(str(resources.files("synthehr_core") / "configs" / f"{name}.yml"))


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in Path(str(resources.files("synthehr_core") / "configs")).glob("*.yml")
                  if not p.stem.startswith("kde_"))


def _key(loc: tuple) -> str:
    return ".".join(str(p) if len(str(p)) <= 40 else str(p)[:37] + "..." for p in loc) or "(top level)"


def _format_pydantic(exc: ValidationError, where: str) -> str:
    """One line per problem; values cut to ~80 characters, and never a value of an unknown key (a kubeconfig's
    token, say): only its name."""
    lines, unknown = [], []
    for err in exc.errors():
        key = _key(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.append(key)
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing.")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            msg = msg if len(msg) <= 300 else msg[:297] + "..."
            lines.append(f"{key}: {msg} (got {show(err['input'])}).")
    more = [f"... and {len(unknown) - 20} more unknown keys."] if len(unknown) > 20 else []
    lines[:0] = [f"{key}: unknown key (its value is not shown). Remove it or check its spelling." for key in unknown[:20]] + more
    return f"{where}: invalid dataset config:\n" + bullet_list(lines)


def validate_config(data: Any, where: str = "config") -> DatasetConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a dataset config must be a mapping of keys, got {type(data).__name__}.")
    try:
        return DatasetConfig(**data, source=where)
    except ValidationError as exc:
        raise ConfigError(_format_pydantic(exc, where)) from None


def load_config(config: str | Path | dict | DatasetConfig) -> DatasetConfig:
    """Load and validate a dataset config: a bundled name (``mimic3``), a YAML path, a dict, or a DatasetConfig."""
    if isinstance(config, DatasetConfig):
        return config
    if isinstance(config, dict):
        return validate_config(config)
    text_path = str(config)
    if text_path in bundled_configs():
        path = str(bundled_config_path(text_path))
    elif storage.exists(text_path):
        path = text_path
    else:
        raise ConfigError(f"dataset config {text_path!r} is neither a bundled config ({bundled_configs()}) "
                          "nor an existing file. Pass a bundled name or a path to a YAML file.")
    return validate_config(load_yaml_file(path), where=path)

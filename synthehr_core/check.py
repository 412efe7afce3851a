"""``synthehr check``: everything about a dataset checked before any work starts, every problem at once.

Checked, in order (a later check needs the earlier ones): the dataset config; the KDE config (the config's
``kde:`` resolved beside the config file, or the one given) and the columns it names; the adapter (resolvable,
its options valid); the raw location; a sample of every declared file read and parsed by the adapter (the
tables adapter reads ``sample_rows`` rows per file; an adapter without ``max_rows`` reads everything); the
config's labels, bins and visit categories against the columns the adapter returned. The pipeline's first task
runs the same function, so a wrong name fails a cluster run within seconds.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
from .errors import ConfigError, DataError, SchemaError, bullet_list

DERIVED_VISIT_COLUMNS = ("visit_index", "start_offset_days", "gap_days", "start_day")


@dataclass
class CheckResult:
    problems: list[str] = field(default_factory=list)
    kde_config: str = ""           # the KDE config the run will use (a bundled name or a path)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self, where: str) -> str:
        return f"{where}: {len(self.problems)} problem(s) found before any work started:\n" + bullet_list(self.problems)


def kde_config_ref(cfg) -> str | None:
    """The dataset config's ``kde:``, resolved beside the config file when it names a file there."""
    from .data.config import bundled_config_path

    if cfg.kde is None:
        return None
    source = str(cfg.source or "")
    if not source or Path(cfg.kde).is_absolute() or "://" in cfg.kde:
        return cfg.kde
    parent = source.rsplit("/", 1)[0] if "/" in source else "."
    if Path(parent).resolve() == bundled_config_path(cfg.name).parent.resolve():
        return cfg.kde          # a bundled config names a bundled KDE config
    beside = storage.join(parent, cfg.kde)
    return beside if storage.exists(beside) else cfg.kde


def _kde_columns(kde) -> dict[str, set[str]]:
    cols: dict[str, set[str]] = {"patients": set(), "visits": set()}
    for var in kde.variable_config.values():
        cols.setdefault(var.data_source, set()).update(list(var.columns) + list(var.stratify_by))
    if kde.time is not None:
        cols["visits"].update(c for c in (kde.time.gap, kde.time.offset, kde.time.los) if c)
        if kde.time.anchor_age:
            cols["patients"].add(kde.time.anchor_age)
    return cols


def _read_sample(adapter, raw: str, cfg, sample_rows: int):
    from .data.adapters.base import DropReport

    kwargs = {"max_rows": sample_rows} if "max_rows" in inspect.signature(adapter.load).parameters else {}
    return adapter.load(raw, dict(cfg.adapter_options), DropReport(), **kwargs)


def _column_problems(cfg, kde, cohort) -> list[str]:
    visit_cols = set(cohort.visits.columns) | set(DERIVED_VISIT_COLUMNS) | {f"{c}_binned" for c in cfg.visit_bins}
    visit_cols |= {f"cal_{k}" for k in cfg.calendar.tokens} if cfg.calendar.enabled else set()
    patient_cols = set(cohort.patients.columns) | {f"{c}_binned" for c in cfg.patient_bins}
    out = []
    for what, cols, have in (("labels", cfg.labels, patient_cols), ("patient_bins", cfg.patient_bins, patient_cols),
                             ("visit_bins", cfg.visit_bins, visit_cols),
                             ("visit_categories", cfg.visit_categories, visit_cols)):
        out += [f"{what}: {c!r} is not a {'visit' if have is visit_cols else 'patient'} column the adapter returns; "
                f"it returns {sorted(have - set(DERIVED_VISIT_COLUMNS))}" for c in cols if c not in have]
    if kde is not None:
        for source, cols in _kde_columns(kde).items():
            # the KDE stage joins patient columns onto visits and adds its code_columns
            have = visit_cols | patient_cols | set(kde.code_columns) if source == "visits" else patient_cols
            out += [f"KDE config: column {c!r} ({source}) is not in the {source} table; it has {sorted(have)}"
                    for c in sorted(cols) if c not in have]
    return out


def check_dataset(config, raw: str | None = None, profile: str = "local", kde_config: str | None = None,
                  sample_rows: int = 2000) -> CheckResult:
    """Check a dataset before any work: returns every problem found (an empty list = ready to run)."""
    from .data.adapters.registry import resolve_adapter
    from .data.config import load_config
    from .postprocess.kde_config import load_kde_config

    res = CheckResult()
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        res.problems.append(str(exc))
        return res
    res.kde_config = kde_config or kde_config_ref(cfg) or ""
    kde = None
    if not res.kde_config:
        res.problems.append(f"{cfg.source or cfg.name}: no KDE config: add `kde: kde_<name>.yml` to the dataset "
                            "config (`synthehr init-dataset` drafts one) or pass --kde-config.")
    else:
        try:
            kde = load_kde_config(res.kde_config)
        except ConfigError as exc:
            res.problems.append(str(exc))
    adapter = None
    try:
        adapter = resolve_adapter(cfg.adapter)
        if adapter.check_options is not None:
            adapter.check_options(dict(cfg.adapter_options))
    except ConfigError as exc:
        res.problems.append(str(exc))
        adapter = None
    try:
        raw_dir = raw if raw is not None else cfg.raw_path(profile)
        if not storage.exists(raw_dir):
            raise ConfigError(f"raw data directory {raw_dir!r} does not exist. Check --raw / the importer URI.")
    except ConfigError as exc:
        res.problems.append(str(exc))
        return res
    if adapter is None:
        return res
    try:
        cohort = _read_sample(adapter, raw_dir, cfg, sample_rows)
    except (ConfigError, DataError, SchemaError, FileNotFoundError) as exc:
        res.problems.append(str(exc))
        return res
    res.problems += _column_problems(cfg, kde, cohort)
    res.summary = {"dataset": cfg.name, "adapter": f"{cfg.adapter} ({adapter.origin})", "raw": raw_dir,
                   "kde_config": res.kde_config, "sample": {"patients": len(cohort.patients),
                                                            "visits": len(cohort.visits), "codes": len(cohort.codes)}}
    return res


def require_ready(config, raw: str | None = None, profile: str = "local", kde_config: str | None = None) -> str:
    """``check_dataset`` that raises one ConfigError listing every problem; returns the KDE config to use."""
    res = check_dataset(config, raw=raw, profile=profile, kde_config=kde_config)
    if not res.ok:
        raise ConfigError(res.message(str(config)))
    return res.kde_config

"""The declarative adapter (``adapter: tables``): the dataset YAML says where each table is and what its columns mean.

```yaml
adapter: tables
adapter_options:
  patients:                               # optional: without it, patients come from their first visit's row
    file: "core/patients.csv.gz"          # path or glob under raw (subfolders; .csv, .csv.gz, .parquet)
    id: subject_id
    static: {gender: gender, ethnicity: {column: race, fill: unknown}}   # out name: raw column
    age: {dob: dob, cap: 90, cap_flag: age_capped}                       # or {anchor_age: .., anchor_year: ..}
  visits:
    file: "core/admissions*.csv"          # a glob matching several files reads them all, in name order
    id: hadm_id
    patient: subject_id                   # join visits -> patients
    start: admittime
    end: dischtime                        # with duration: (end - start) in `unit`, clipped at 0
    duration: {name: los_days, unit: days}
    formats: {admittime: "%Y-%m-%d %H:%M:%S"}    # optional strftime formats (default: parsed as mixed ISO)
    event_type: inpatient                 # a constant, or {column: encounter_type}
    continuous: {weight_kg: weight}       # float visit columns: out name: raw column
    clip: {los_hours: {max: 168, where: {kind: [ED]}}}   # bounds on a float visit column, on the rows `where` says
    calendar: {event_day: weekday}        # a string visit column from `start`: weekday (Mon..Sun), month, year
    categories: {}                        # string visit columns (declare them in the config's visit_categories)
  codes:                                  # one entry per code table; join codes -> visits by `visit`
    - {file: "hosp/diagnoses.csv", visit: hadm_id, key: "dx:{icd_version}:{icd_code}", version: icd_version,
       category: icd_version}
    - {from_visits: true, key: "adm:{admission_type}", fill: UNKNOWN}
    - {from_visits: true, key: "tri:{triage}", where: {kind: [ED]}}   # `where`: only rows with these values
  normalise_case: true                    # match headers case-insensitively (MIMIC exports differ)
```

Every declared column is read with the checked reader (``base.read_csv_checked``), so a missing column, a bad
date or a non-number is one message naming file, column and values. ``version`` names the code-system version
column of a code table: one code string under two versions is counted and logged (and merged silently unless the
version is part of ``key``). ``category`` makes the table's value of that column a visit column (one per visit),
which ``visit_categories`` in the config turns into a token group. ``where`` (in ``clip`` and code tables) keeps
the rows whose raw column value, as text, is one of those listed; the other rows are left alone (not dropped).
"""
from __future__ import annotations

import fnmatch
import logging
import string
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ... import storage
from ...errors import ConfigError, DataError, SchemaError, bullet_list, show
from ..schema import WEEKDAYS, calendar_parts
from .base import DropReport, RawCohort, convert_checked, read_csv_checked, require_not_null, require_unique

log = logging.getLogger(__name__)

EPOCH = pd.Timestamp("1970-01-01")
UNITS = {"days": 1.0, "hours": 24.0, "minutes": 1440.0}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    column: str
    kind: Literal["str", "float", "int"] = "str"
    fill: str | float | None = None       # value for empty cells (str columns default to "unknown")


class Age(_Strict):
    """Age at the first visit: from a date of birth, or an anchor age in an anchor year (MIMIC-IV)."""

    dob: str | None = None
    anchor_age: str | None = None
    anchor_year: str | None = None
    name: str = "age"
    cap: float | None = None              # ages above `cap_above` become `cap`
    cap_above: float = 89                 # MIMIC: > 89 is shifted to ~300 years
    cap_flag: str | None = None           # a yes/no patient column marking the capped ages

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dob is None) == (self.anchor_age is None) or (self.anchor_age is None) != (self.anchor_year is None):
            raise ValueError("give either `dob` or both `anchor_age` and `anchor_year`")
        return self


Where = dict[str, list[str | int]]        # raw column -> the values (compared as text) of the rows it applies to
CALENDAR_PARTS = ("weekday", "month", "year")


class Clip(_Strict):
    min: float | None = None
    max: float | None = None
    where: Where = Field(default_factory=dict)

    @model_validator(mode="after")
    def _a_bound(self):
        if self.min is None and self.max is None:
            raise ValueError("give `min`, `max` or both")
        return self


class Duration(_Strict):
    name: str
    unit: Literal["days", "hours", "minutes"] = "days"


class PatientsTable(_Strict):
    file: str
    id: str
    static: dict[str, str | Column] = Field(default_factory=dict)
    age: Age | None = None


class VisitsTable(_Strict):
    file: str
    id: str
    patient: str
    start: str
    end: str | None = None
    duration: str | Duration | None = None
    formats: dict[str, str] = Field(default_factory=dict)
    event_type: str | Column = "visit"
    continuous: dict[str, str] = Field(default_factory=dict)
    clip: dict[str, Clip] = Field(default_factory=dict)             # out name (continuous or duration) -> bounds
    calendar: dict[str, Literal["weekday", "month", "year"]] = Field(default_factory=dict)
    categories: dict[str, str] = Field(default_factory=dict)
    static: dict[str, str | Column] = Field(default_factory=dict)   # patient columns from the first visit's row

    @model_validator(mode="after")
    def _duration_needs_end(self):
        if (self.duration is None) != (self.end is None):
            raise ValueError("`duration` and `end` go together: the duration is end - start")
        floats = list(self.continuous) + ([self.duration if isinstance(self.duration, str) else self.duration.name]
                                          if self.duration is not None else [])
        unknown = [k for k in self.clip if k not in floats]
        if unknown:
            raise ValueError(f"`clip` names {unknown}, which are not continuous or duration columns ({floats})")
        return self


class CodesTable(_Strict):
    file: str | None = None               # None with from_visits: codes from the visits table's columns
    from_visits: bool = False
    visit: str | None = None              # the visit id column of this table
    key: str                              # e.g. "dx:{icd_code}" or "dx:{icd_version}:{icd_code}"
    fill: str | None = None               # value for empty key fields (default: the row is dropped, counted)
    version: str | None = None            # code-system version column
    category: str | None = None           # a column whose per-visit value becomes a visit column
    where: Where = Field(default_factory=dict)   # only the rows with these values (e.g. {kind: [ED]})

    @model_validator(mode="after")
    def _source(self):
        if self.from_visits == (self.file is not None):
            raise ValueError("give exactly one of `file` (a code table) or `from_visits: true`")
        if self.file is not None and self.visit is None:
            raise ValueError("a code table needs `visit`: its visit id column")
        fields = key_fields(self.key)
        if not fields or fields[0][0] == "" and len(fields) == 1:
            raise ValueError(f"`key` must name at least one column in braces, e.g. 'dx:{{icd_code}}'; got {self.key!r}")
        return self


class TablesOptions(_Strict):
    patients: PatientsTable | None = None
    visits: VisitsTable
    codes: list[CodesTable] = Field(default_factory=list)
    normalise_case: bool = True


def key_fields(key: str) -> list[tuple[str, str | None]]:
    """``"dx:{v}:{c}"`` -> ``[("dx:", "v"), (":", "c")]`` (literal text before each field; a last literal has None)."""
    try:
        return [(lit, name) for lit, name, _, _ in string.Formatter().parse(key)]
    except ValueError as exc:
        raise ValueError(f"`key` {key!r} is not a valid template ({exc})") from None


def check_options(options: dict) -> TablesOptions:
    try:
        opts = TablesOptions(**options)
    except ValidationError as exc:
        lines = [f"adapter_options.{'.'.join(str(p)[:40] for p in e['loc'])}: "
                 + ("unknown key; remove it or check its spelling." if e["type"] == "extra_forbidden" else
                    f"{e['msg'].removeprefix('Value error, ')[:300]} (got {show(e['input'])})") for e in exc.errors()]
        raise ConfigError("the tables adapter's options are invalid:\n" + bullet_list(lines)) from None
    return _lower(opts) if opts.normalise_case else opts


def _lower(opts: TablesOptions) -> TablesOptions:
    """Raw column names in lower case, as the headers will be (keys of `static`/`continuous` are output names)."""
    def low(v):
        if isinstance(v, str):
            return v.lower()
        if isinstance(v, Column):
            return v.model_copy(update={"column": v.column.lower()})
        return v

    def key(k: str) -> str:
        return "".join(lit + ("{" + n.lower() + "}" if n is not None else "") for lit, n in key_fields(k))

    data = opts.model_dump()
    p, v = data["patients"], data["visits"]
    if p:
        p.update(id=p["id"].lower(), static={k: low(c) for k, c in p["static"].items()})
        if p["age"]:
            p["age"].update({f: p["age"][f].lower() for f in ("dob", "anchor_age", "anchor_year") if p["age"][f]})
    for f in ("id", "patient", "start", "end"):
        v[f] = v[f].lower() if v[f] else v[f]
    v["formats"] = {c.lower(): fmt for c, fmt in v["formats"].items()}
    v["event_type"] = v["event_type"] if isinstance(v["event_type"], str) else {**v["event_type"],
                                                                                 "column": v["event_type"]["column"].lower()}
    v["continuous"] = {k: c.lower() for k, c in v["continuous"].items()}
    v["clip"] = {k: {**c, "where": {col.lower(): vals for col, vals in c["where"].items()}} for k, c in v["clip"].items()}
    v["categories"] = {k: c.lower() for k, c in v["categories"].items()}
    v["static"] = {k: low(c) for k, c in v["static"].items()}
    for c in data["codes"]:
        c.update(visit=c["visit"].lower() if c["visit"] else None, key=key(c["key"]),
                 version=c["version"].lower() if c["version"] else None,
                 category=c["category"].lower() if c["category"] else None,
                 where={col.lower(): vals for col, vals in c["where"].items()})
    return TablesOptions(**data)


# ------------------------------------------------------------------------------------------ files
def resolve_files(raw: str, pattern: str) -> list[str]:
    """Files under ``raw`` matching ``pattern`` (a path or a glob, subfolders allowed); case-insensitive fallback."""
    exact = storage.join(raw, pattern)
    if not any(ch in pattern for ch in "*?[") and storage.exists(exact):
        return [exact]
    if storage.is_gcs(raw):
        raise DataError(f"{raw}: no file {pattern!r}. Globs need a mounted path (e.g. /gcs/...); on gs:// give the "
                        "exact file name.")
    root = Path(raw)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    rel = [p.relative_to(root).as_posix() for p in files]
    hits = [str(p) for p, r in zip(files, rel) if fnmatch.fnmatchcase(r, pattern)] or \
        [str(p) for p, r in zip(files, rel) if fnmatch.fnmatchcase(r.lower(), pattern.lower())]
    if not hits:
        raise DataError(f"{raw}: no file matches {pattern!r}; files there: {rel[:20]}"
                        f"{' ...' if len(rel) > 20 else ''}. Fix the `file:` entry of the tables adapter.")
    return hits


def _read_parquet(local, path: str, table: str, required: dict[str, str], normalise_case: bool) -> pd.DataFrame:
    """A raw parquet table, its schema (the footer) checked before the rows are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(local).names
        have = [n.lower() for n in names] if normalise_case else names
        missing = [c for c in required if c not in have]
        if missing:
            raise SchemaError(f"{path}: {table} table lacks column(s) {missing}; found {sorted(names)[:30]}."
                              + (" Headers are matched case-insensitively." if normalise_case else ""))
        return pd.read_parquet(local)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc)[:200]}). Re-export it.") from exc


def read_table(raw: str, pattern: str, table: str, required: dict[str, str], normalise_case: bool,
               max_rows: int | None = None) -> tuple[pd.DataFrame, str]:
    """Every file matching ``pattern``, read and checked, concatenated; returns (frame, description of the files)."""
    frames = []
    paths = resolve_files(raw, pattern)
    for path in paths:
        if path.endswith(".parquet"):
            with storage.local_copy(path) as local:
                df = _read_parquet(local, path, table, required, normalise_case)
            df = df.head(max_rows) if max_rows else df
            df = df.astype("object").where(df.notna(), None).astype("string").astype(object)
            frames.append(convert_checked(df, path, table, required, normalise_case=normalise_case))
        else:
            frames.append(read_csv_checked(path, table, required, normalise_case=normalise_case, nrows=max_rows))
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return df, paths[0] if len(paths) == 1 else f"{raw}/{pattern} ({len(paths)} files)"


def _parse_formats(df: pd.DataFrame, formats: dict[str, str], where: str) -> None:
    problems = []
    for col, fmt in formats.items():
        conv = pd.to_datetime(df[col], format=fmt, errors="coerce")
        bad = df[col].notna() & conv.isna()
        if bad.any():
            problems.append(f"column {col!r} does not match format {fmt!r} in {int(bad.sum())} rows, "
                            f"e.g. {df.loc[bad, col].head(3).tolist()}")
        df[col] = conv
    if problems:
        raise DataError(f"{where}: dates that do not parse:\n{bullet_list(problems)}")


def _days(ts: pd.Series) -> pd.Series:
    return (ts - EPOCH) / pd.Timedelta(days=1)


# ------------------------------------------------------------------------------------------ tables
def _static(df: pd.DataFrame, specs: dict[str, str | Column]) -> dict[str, np.ndarray]:
    out = {}
    for name, spec in specs.items():
        spec = Column(column=spec) if isinstance(spec, str) else spec
        if spec.kind == "str":
            out[name] = df[spec.column].fillna("unknown" if spec.fill is None else spec.fill).astype(str).to_numpy()
        else:
            col = df[spec.column].astype(float)
            out[name] = (col if spec.fill is None else col.fillna(float(spec.fill))).to_numpy(dtype=float)
    return out


def _static_required(specs: dict[str, str | Column]) -> dict[str, str]:
    return {(s if isinstance(s, str) else s.column): ("str" if isinstance(s, str) else
                                                    ("float" if s.kind == "int" else s.kind)) for s in specs.values()}


def _visits(raw: str, opts: TablesOptions, max_rows) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(raw visit rows, RawCohort visits frame, path)."""
    v = opts.visits
    required = {v.id: "str", v.patient: "str", **_static_required(v.static)}
    for col in (v.start, v.end):
        if col is not None:
            required[col] = "str" if col in v.formats else "datetime"
    if isinstance(v.event_type, Column):
        required[v.event_type.column] = "str"
    required.update({c: "float" for c in v.continuous.values()})
    required.update({c: "str" for c in v.categories.values()})
    required.update({col: "str" for c in v.clip.values() for col in c.where})
    for c in opts.codes:
        if c.from_visits:
            required.update({f: "str" for _, f in key_fields(c.key) if f})
            required.update({col: "str" for col in c.where})
    df, path = read_table(raw, v.file, "visits", required, opts.normalise_case, max_rows)
    _parse_formats(df, {c: f for c, f in v.formats.items() if c in (v.start, v.end)}, path)
    require_not_null(df, [v.patient, v.id, v.start], path, "visits")
    require_unique(df, v.id, path, "visits")
    visits = pd.DataFrame({
        "patient_id": df[v.patient].str.strip(),
        "visit_id": df[v.id].str.strip(),
        "start": _days(df[v.start]).astype(float),
        "event_type": v.event_type if isinstance(v.event_type, str) else
        df[v.event_type.column].fillna(v.event_type.fill or "unknown").astype(str),
    })
    if v.duration is not None:
        dur = Duration(name=v.duration) if isinstance(v.duration, str) else v.duration
        length = (df[v.end] - df[v.start]) / pd.Timedelta(days=1) * UNITS[dur.unit]
        negative = length < 0
        if negative.any():
            log.warning("%s: %d visits end before they start; their %s is set to 0", path, int(negative.sum()), dur.name)
        visits[dur.name] = length.clip(lower=0).astype(float).to_numpy()
    for name, col in v.continuous.items():
        visits[name] = df[col].astype(float).to_numpy()
    for name, clip in v.clip.items():
        visits[name] = _clip(visits[name], clip, df, f"{path}: {name}")
    if v.calendar:
        parts = calendar_parts(visits["start"].to_numpy(float))
        for name, part in v.calendar.items():
            visits[name] = np.asarray(WEEKDAYS, dtype=object)[parts["weekday"]] if part == "weekday" else \
                parts[part].astype(str).astype(object)
    for name, col in v.categories.items():
        visits[name] = df[col].astype("object").to_numpy()
    return df, visits, path


def rows_where(df: pd.DataFrame, where: Where) -> pd.Series:
    """The rows whose value of every ``where`` column, as stripped text, is one of its listed values."""
    keep = pd.Series(True, index=df.index)
    for col, values in where.items():
        keep &= df[col].astype("object").map(lambda s: s.strip() if isinstance(s, str) else s).isin(
            [str(x) for x in values])
    return keep


def _clip(values: pd.Series, clip: Clip, df: pd.DataFrame, where: str) -> np.ndarray:
    """``values`` within [min, max] on the rows ``clip.where`` selects (all rows without it); counted in the log."""
    x = values.to_numpy(dtype=float)
    rows = rows_where(df, clip.where).to_numpy()
    lo = -np.inf if clip.min is None else clip.min
    hi = np.inf if clip.max is None else clip.max
    out = rows & ((x < lo) | (x > hi))
    if out.any():
        log.info("%s: clipped %d values outside [%g, %g]", where, int(out.sum()), lo, hi)
    return np.where(out, np.clip(x, lo, hi), x)


def _age(first: pd.Series, pat: pd.DataFrame, age: Age, path: str) -> dict[str, np.ndarray]:
    """Age at the first visit (``first``: its timestamp per patient, aligned to ``pat``)."""
    if age.dob is not None:
        dob = pat[age.dob]
        # birthday-aware year difference (works on shifted dates: only the difference is meaningful)
        years = (first.dt.year - dob.dt.year) - ((first.dt.month * 100 + first.dt.day)
                                                 < (dob.dt.month * 100 + dob.dt.day)).astype(int)
    else:
        years = pat[age.anchor_age].astype(float) + (first.dt.year - pat[age.anchor_year].astype(float))
    out = {}
    if age.cap is not None:
        capped = years > age.cap_above
        out[age.name] = np.where(capped, float(age.cap), years.astype(float)).astype(float)
        if capped.any():
            log.info("%s: %d patients older than %g capped at %g", path, int(capped.sum()), age.cap_above, age.cap)
        if age.cap_flag:
            out[age.cap_flag] = np.where(capped, "yes", "no")
    else:
        out[age.name] = years.astype(float).to_numpy()
    return out


def _patients(raw: str, opts: TablesOptions, vdf: pd.DataFrame, max_rows) -> tuple[pd.DataFrame, dict]:
    v, p = opts.visits, opts.patients
    first = vdf.assign(_pid=vdf[v.patient].str.strip()).groupby("_pid")[v.start].min()
    if p is None:    # patients from their first visit's row
        rows = vdf.assign(_pid=vdf[v.patient].str.strip()).sort_values([v.start], kind="stable").drop_duplicates("_pid")
        rows = rows.sort_values("_pid", kind="stable").set_index("_pid")
        return pd.DataFrame({"patient_id": rows.index.astype(str), **_static(rows, v.static)}), {}
    required = {p.id: "str", **_static_required(p.static)}
    if p.age is not None:
        required.update({c: ("datetime" if c == p.age.dob else "float")
                         for c in (p.age.dob, p.age.anchor_age, p.age.anchor_year) if c})
    pat, path = read_table(raw, p.file, "patients", required, opts.normalise_case, max_rows)
    require_not_null(pat, [p.id] + ([p.age.dob] if p.age and p.age.dob else []), path, "patients")
    require_unique(pat, p.id, path, "patients")
    pat = pat.assign(**{p.id: pat[p.id].str.strip()}).set_index(p.id)
    cols = _static(pat, p.static)
    if v.static:
        rows = vdf.assign(_pid=vdf[v.patient].str.strip()).sort_values([v.start], kind="stable").drop_duplicates("_pid")
        cols.update(_static(rows.set_index("_pid").reindex(pat.index), v.static))
    if p.age is not None:
        cols.update(_age(first.reindex(pat.index), pat, p.age, path))
    return pd.DataFrame({"patient_id": pat.index.astype(str), **cols}), {"patients": len(pat)}


def _render_key(df: pd.DataFrame, key: str, fill: str | None, table: str, report: DropReport) -> tuple[pd.Series, pd.Series]:
    """The code key of each row and the rows kept (a row with an empty key field is dropped and counted)."""
    out = pd.Series("", index=df.index, dtype=object)
    keep = pd.Series(True, index=df.index)
    for lit, name in key_fields(key):
        out = out + lit
        if name is None:
            continue
        col = df[name].astype("object").where(df[name].notna(), None)
        col = col.map(lambda s: s.strip() if isinstance(s, str) else s)
        empty = col.isna() | (col == "")
        if fill is not None:
            col = col.where(~empty, fill)
        else:
            report.drop(table, f"empty {name}", int((empty & keep).sum()))
            keep &= ~empty
        out = out + col.where(~(empty & (fill is None)), "").astype(str)
    return out, keep


def _version_note(df: pd.DataFrame, spec: CodesTable, where: str) -> dict:
    """How many code strings occur under two or more versions, and whether the key keeps them apart."""
    fields = [f for _, f in key_fields(spec.key) if f and f != spec.version]
    ok = df[fields + [spec.version]].dropna()
    if ok.empty:
        return {}
    code = ok[fields].astype(str).agg(":".join, axis=1) if len(fields) > 1 else ok[fields[0]].astype(str)
    n_versions = ok.groupby(code)[spec.version].nunique()
    shared = int((n_versions > 1).sum())
    in_key = spec.version in {f for _, f in key_fields(spec.key)}
    if shared:
        fix = "kept apart: the key includes it" if in_key else \
            f"MERGED into one token each: add {{{spec.version}}} to the key {spec.key!r} to keep them apart"
        log.warning("%s: %d code strings occur under two or more %s values (of %d distinct); %s", where, shared,
                    spec.version, len(n_versions), fix)
    return {"codes_under_several_versions": shared, "distinct_codes": int(len(n_versions)),
            "versions": sorted(map(str, ok[spec.version].unique())), "version_in_key": in_key}


def _codes(raw: str, opts: TablesOptions, vdf: pd.DataFrame, visits: pd.DataFrame, report: DropReport,
           max_rows) -> tuple[list[pd.DataFrame], dict, dict]:
    """Code frames in config order, source row counts, notes (versions); adds category columns to ``visits``."""
    frames, rows, notes = [], {}, {}
    for i, spec in enumerate(opts.codes):
        fields = [f for _, f in key_fields(spec.key) if f]
        extra = [c for c in (spec.version, spec.category) if c and c not in fields]
        if spec.from_visits:
            df, table, path, visit_ids = vdf, "visits", "visits", visits["visit_id"]
        else:
            table = Path(resolve_files(raw, spec.file)[0]).name.split(".")[0]   # "dx" for hosp/dx.csv.gz
            df, path = read_table(raw, spec.file, table, {spec.visit: "str", **{f: "str" for f in fields + extra},
                                                          **{c: "str" for c in spec.where}},
                                  opts.normalise_case, max_rows)
            require_not_null(df, [spec.visit], path, table)
            visit_ids = df[spec.visit].str.strip()
        if spec.where:
            selected = rows_where(df, spec.where)
            df, visit_ids = df[selected], visit_ids[selected]
        code, keep = _render_key(df, spec.key, spec.fill, table, report)
        frames.append(pd.DataFrame({"visit_id": visit_ids[keep].reset_index(drop=True),
                                    "code": code[keep].reset_index(drop=True)}))
        if not spec.from_visits:
            rows[table] = int(keep.sum())
        if spec.version:
            note = _version_note(df, spec, path)
            if note:
                notes[f"codes[{i}] {table}.{spec.version}"] = note
        if spec.category:
            notes.update(_category(df.assign(_vid=visit_ids), spec.category, visits, path))
    return frames, rows, notes


def _category(df: pd.DataFrame, col: str, visits: pd.DataFrame, where: str) -> dict:
    """``visits[col]`` = the code table's value of ``col`` per visit (the first, where a visit has several)."""
    vals = df.loc[df[col].notna(), ["_vid", col]]
    per_visit = vals.groupby("_vid", sort=False)[col].nunique()
    mixed = int((per_visit > 1).sum())
    if mixed:
        log.warning("%s: %d visits have codes of more than one %s; the visit category is the first one", where,
                    mixed, col)
    first = vals.drop_duplicates("_vid").set_index("_vid")[col].str.strip()
    visits[col] = visits["visit_id"].map(first).astype("object").to_numpy()
    return {f"visits with several {col} values": mixed} if mixed else {}


def load(raw: str, options: dict, report: DropReport, max_rows: int | None = None) -> RawCohort:
    """Read the tables the options declare into a RawCohort. ``max_rows`` (``synthehr check``) reads only the
    first rows of each file, to check columns and parsing quickly."""
    opts = check_options(options)
    vdf, visits, vpath = _visits(raw, opts, max_rows)
    patients, source_rows = _patients(raw, opts, vdf, max_rows)
    source_rows = {**source_rows, "visits": len(vdf)}
    frames, code_rows, notes = _codes(raw, opts, vdf, visits, report, max_rows)
    codes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"visit_id": [], "code": []}, dtype=object)
    return RawCohort(patients, visits, codes, {**source_rows, **code_rows}, notes)


def declared_columns(options: dict) -> dict[str, list[str]]:
    """The visit and patient columns this config's adapter will return (``synthehr check`` compares the config's
    labels, bins and KDE variables with them before any file is read)."""
    opts = check_options(options)
    v, p = opts.visits, opts.patients
    visit_cols = ["patient_id", "visit_id", "start", "event_type", *v.continuous, *v.calendar, *v.categories]
    if v.duration is not None:
        visit_cols.append(v.duration if isinstance(v.duration, str) else v.duration.name)
    visit_cols += [c.category for c in opts.codes if c.category]
    patient_cols = ["patient_id", *v.static]
    if p is not None:
        patient_cols += list(p.static)
        if p.age is not None:
            patient_cols += [p.age.name] + ([p.age.cap_flag] if p.age.cap and p.age.cap_flag else [])
    return {"visits": visit_cols, "patients": patient_cols}

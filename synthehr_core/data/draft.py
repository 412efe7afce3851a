"""``synthehr init-dataset``: look at a raw extract and write a draft dataset config (``adapter: tables``) and KDE
config, with TODO comments where a guess was made.

The guesses, on a sample of each file (``sample_rows`` rows of every .csv, .csv.gz and .parquet under the raw
folder, subfolders included):
- a column is an *id* when its name ends in ``id`` (``PersonID``, ``subject_id``); a *time* when most of its
  values parse as dates; a *code* when its name says code/icd/dx/diag/proc; a *version* when its name says
  version; a *category* when it is a string with few distinct values;
- joins from values: a column whose values lie (95 %) in another table's unique id column references that table;
- the visits table is the one with a unique id and a time column that others reference (or, with one table,
  the table with a time column), the patients table the one it references, code tables those referencing visits;
- bins are edges at the sample's quintiles (rounded), the duration unit hours when the median stay is < 2 days.
Everything is a draft: ``synthehr check`` says what is still wrong, and the TODO comments say what to look at.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError

SUFFIXES = (".csv", ".csv.gz", ".parquet")
ID_NAME = re.compile(r"(^|[^a-z])id$|[a-z]id$", re.IGNORECASE)
CODE_NAME = re.compile(r"code|icd|dx|diag|proc", re.IGNORECASE)
VERSION_NAME = re.compile(r"version|vers$|system", re.IGNORECASE)
PATIENT_NAME = re.compile(r"patient|person|subject|member|client", re.IGNORECASE)
START_NAME = re.compile(r"start|begin|admit|arriv|in_?time|from", re.IGNORECASE)
END_NAME = re.compile(r"end|finish|disch|depart|out_?time|to$", re.IGNORECASE)
DOB_NAME = re.compile(r"dob|birth", re.IGNORECASE)
EVENT_NAME = re.compile(r"type|kind|class|setting|category", re.IGNORECASE)
MAX_CATEGORY_VALUES = 20     # arbitrary: a string column with more distinct values is not a category
JOIN_SHARE = 0.95            # arbitrary: share of a column's values found in an id column to call it a join


@dataclass
class Table:
    file: str                                  # relative to the raw folder, posix
    frame: pd.DataFrame
    times: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    unique: list[str] = field(default_factory=list)
    refs: dict[str, tuple[str, str]] = field(default_factory=dict)   # column -> (table file, its id column)

    @property
    def stem(self) -> str:
        return Path(self.file).name.split(".")[0]


@dataclass
class Draft:
    """What init-dataset found: the roles it gave the tables, for the YAML writers and the summary."""

    visits: Table
    patient_col: str
    patients: Table | None
    codes: list[tuple[Table, str, str, str | None]]   # (table, visit column, code column, version column)
    tables: list[Table]


# ------------------------------------------------------------------------------------------ inspection
def raw_files(raw: Path) -> list[Path]:
    if not raw.is_dir():
        raise ConfigError(f"--raw {str(raw)!r} is not a directory. Point it at the folder holding the extract.")
    files = sorted(p for p in raw.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise DataError(f"{raw}: no .csv, .csv.gz or .parquet file under it (subfolders included).")
    return files


def read_sample(path: Path, sample_rows: int) -> pd.DataFrame:
    if path.name.lower().endswith(".parquet"):
        return pd.read_parquet(path).head(sample_rows)
    return pd.read_csv(path, nrows=sample_rows, low_memory=False)


def _is_time(col: pd.Series) -> bool:
    vals = col.dropna()
    if vals.empty or col.dtype.kind in "biuf":
        return col.dtype.kind == "M"
    text = vals.astype(str).head(500)
    if not text.str.contains(r"\d{1,4}[-/]\d{1,2}[-/]\d{1,4}").mean() > 0.9:
        return False
    return pd.to_datetime(text, errors="coerce", format="mixed").notna().mean() > 0.9


def inspect(raw: Path, sample_rows: int) -> list[Table]:
    tables = []
    for path in raw_files(raw):
        df = read_sample(path, sample_rows)
        t = Table(path.relative_to(raw).as_posix(), df)
        t.times = [c for c in df.columns if _is_time(df[c])]
        t.ids = [c for c in df.columns if ID_NAME.search(str(c)) and c not in t.times]
        t.unique = [c for c in df.columns if c not in t.times and df[c].notna().all() and df[c].is_unique
                    and df[c].dtype.kind not in "f"]
        tables.append(t)
    _find_joins(tables)
    return tables


def _find_joins(tables: list[Table]) -> None:
    """``t.refs[col] = (other table, its unique id)`` where col's values lie in that id column."""
    for t in tables:
        for col in t.frame.columns:
            if col in t.times or t.frame[col].dtype.kind == "f":
                continue
            vals = t.frame[col].dropna().astype(str)
            if vals.empty:
                continue
            for other in tables:
                for uid in (u for u in other.unique if not (other is t and u == col)):
                    if other is t:
                        continue
                    if vals.isin(set(other.frame[uid].astype(str))).mean() >= JOIN_SHARE:
                        t.refs.setdefault(col, (other.file, uid))


def assign_roles(tables: list[Table]) -> Draft:
    by_file = {t.file: t for t in tables}
    referenced = {f for t in tables for f, _ in t.refs.values()}
    timed = [t for t in tables if t.times and t.unique]
    if not timed:
        raise DataError("no table has both a unique id column and a date/time column, so none can be the visits "
                        f"table; tables seen: {[t.file for t in tables]}. Write the config by hand (README).")
    linked = [t for t in timed if t.file in referenced and t.refs]
    visits = max(linked or timed, key=lambda t: (len(t.times), len(t.frame.columns)))
    vid = _visit_id(visits, tables)
    patients, patient_col = None, None
    refs = sorted(((c, by_file[f]) for c, (f, _) in visits.refs.items() if c != vid),
                  key=lambda cf: not PATIENT_NAME.search(str(cf[0])))    # a patient-like name first
    if refs:
        patient_col, patients = refs[0]
    if patient_col is None:
        names = [c for c in visits.frame.columns if c != vid and PATIENT_NAME.search(str(c))]
        ids = [c for c in visits.ids if c != vid]
        patient_col = (names or ids or [None])[0]
    if patient_col is None:
        raise DataError(f"{visits.file}: no patient id column found (no column named like patient/person/subject "
                        "id, none referencing another table). Write the config by hand (README).")
    codes = []
    for t in tables:
        vcol = next((c for c, (f, u) in t.refs.items() if f == visits.file and u == vid), None)
        if t is visits or t is patients or vcol is None:
            continue
        code = _code_column(t, vcol)
        if code is not None:
            codes.append((t, vcol, code, _version_column(t, vcol, code)))
    return Draft(visits, patient_col, patients, codes, tables)


def _visit_id(visits: Table, tables: list[Table]) -> str:
    """The unique column of the visits table that other tables reference (else the first id-named one)."""
    used = [u for t in tables for f, u in t.refs.values() if f == visits.file]
    named = [c for c in visits.unique if c in visits.ids]
    return (used or named or visits.unique)[0]


def _strings(t: Table, skip: set) -> list[str]:
    return [c for c in t.frame.columns if c not in skip and c not in t.times and t.frame[c].dtype.kind not in "biuf"]


def _code_column(t: Table, vcol: str) -> str | None:
    named = [c for c in t.frame.columns if c != vcol and CODE_NAME.search(str(c)) and not VERSION_NAME.search(str(c))]
    if named:
        return named[0]
    rest = _strings(t, {vcol})
    return max(rest, key=lambda c: t.frame[c].nunique()) if rest else None


def _version_column(t: Table, vcol: str, code: str) -> str | None:
    named = [c for c in t.frame.columns if c not in (vcol, code) and VERSION_NAME.search(str(c))]
    return named[0] if named else None


def _categories(t: Table, skip: set, numbers: bool = False) -> list[str]:
    """String columns with few values (and, with ``numbers``, integer columns with few values, e.g. 1-5 scores)."""
    cols = _strings(t, skip) + ([c for c in t.frame.columns if c not in skip and c not in t.unique and
                                 t.frame[c].dtype.kind in "biuf" and _integral(t.frame[c])] if numbers else [])
    return [c for c in t.frame.columns if c in cols and 1 < t.frame[c].nunique() <= MAX_CATEGORY_VALUES]


def _integral(col: pd.Series) -> bool:
    vals = col.dropna()
    return not vals.empty and bool((vals == vals.round()).all()) and vals.nunique() <= 10


def _words(col) -> list[str]:
    """``AnchorAge`` / ``anchor_age`` -> ``["anchor", "age"]``."""
    return [w for w in re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(col)).lower().replace("-", "_").split("_") if w]


# ------------------------------------------------------------------------------------------ suggestions
def nice_edges(values: pd.Series, n: int = 5) -> list[float]:
    """Edges at the quantiles of ``values`` (0 and a top above the max included), rounded to 2 significant digits."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    v = v[v >= 0]
    if v.empty:
        return [0.0, 1.0]
    inner = [float(f"{q:.2g}") for q in np.quantile(v, np.linspace(0, 1, n + 1)[1:-1]) if q > 0]
    top = float(f"{v.max() * 1.01 + 1e-9:.2g}")
    top = top if top > v.max() else float(np.ceil(v.max() + 1))
    return sorted({0.0, *inner, top})


def _duration(d: Draft) -> tuple[str, str, str, str] | None:
    """(start, end, unit, out name) of the visits table, or None without an end column."""
    times = d.visits.times
    start = next((c for c in times if START_NAME.search(str(c))), times[0])
    ends = [c for c in times if c != start]
    if not ends:
        return None
    end = next((c for c in ends if END_NAME.search(str(c))), ends[0])
    f = d.visits.frame
    span = (pd.to_datetime(f[end], format="mixed") - pd.to_datetime(f[start], format="mixed")) / pd.Timedelta(days=1)
    unit = "hours" if span.median() < 2 else "days"
    return start, end, unit, f"los_{unit}"


# ------------------------------------------------------------------------------------------ YAML
def _flow(value) -> str:
    """A YAML flow value (JSON is YAML); plain words unquoted where YAML reads them back as the same string."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", value) and \
            value.lower() not in ("yes", "no", "true", "false", "null", "on", "off", "y", "n"):
        return value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(value)


def _line(indent: int, key: str, value, note: str = "") -> str:
    text = f"{' ' * indent}{key}: {_flow(value)}"
    return f"{text:<60} # {note}" if note else text


def _out_name(col: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(col).lower()).strip("_") or "column"


def _describe(t: Table) -> str:
    def kind(c):
        tags = (["id"] if c in t.ids else []) + (["unique"] if c in t.unique else []) + (["time"] if c in t.times else [])
        if c in t.refs:
            tags.append(f"-> {t.refs[c][0]}.{t.refs[c][1]}")
        if not tags:
            s = t.frame[c]
            tags.append("number" if s.dtype.kind in "biuf" else f"text, {s.nunique()} values")
        return f"{c} [{', '.join(tags)}]"
    return f"#   {t.file} ({len(t.frame)} rows read): " + "; ".join(kind(c) for c in t.frame.columns)


def _per_patient(d: Draft, col: str) -> bool:
    """The column never changes within a patient (in the sample): a patient column, not a visit column."""
    return bool((d.visits.frame.groupby(d.patient_col)[col].nunique(dropna=False) <= 1).all())


def _patient_block(d: Draft, lines: list[str], vid: str, notes: dict) -> tuple[list[str], str | None]:
    """patients: lines (or visits.static for one-table extracts); returns (labels, age column name or None)."""
    if d.patients is None:
        skip = {vid, d.patient_col}
        static = {_out_name(c): c for c in _categories(d.visits, skip) if _per_patient(d, c)}
        age = next((c for c in d.visits.frame.columns if "age" in _words(c) and d.visits.frame[c].dtype.kind in "biuf"),
                   None)
        if age is not None:
            static["age"] = {"column": age, "kind": "float"}
        notes["static"] = static
        return [k for k, v in static.items() if isinstance(v, str)], ("age" if age is not None else None)
    p = d.patients
    pid = next(u for c, (f, u) in d.visits.refs.items() if c == d.patient_col)
    lines += ["  patients:", _line(4, "file", p.file), _line(4, "id", pid, f"TODO check: visits.{d.patient_col} "
                                                               "references it")]
    static = {_out_name(c): c for c in _categories(p, {pid})}
    lines.append(_line(4, "static", static, "TODO: patient categories found; keep what the model should learn"))
    nums = [c for c in p.frame.columns if p.frame[c].dtype.kind in "biuf" and c != pid]
    dob = next((c for c in p.times if DOB_NAME.search(str(c))), None)
    anchor = next((c for c in nums if "age" in _words(c)), None)
    year = next((c for c in nums if "year" in _words(c)), None)
    if dob is not None:
        lines.append(_line(4, "age", {"dob": dob}, "TODO check; shifted ages? add cap: 90, cap_flag: age_capped"))
    elif anchor is not None and year is not None:
        lines.append(_line(4, "age", {"anchor_age": anchor, "anchor_year": year}, "TODO check: age in anchor year"))
    elif anchor is not None:
        static["age"] = {"column": anchor, "kind": "float"}
        lines[-1] = _line(4, "static", static, "TODO: patient columns found; keep what the model should learn")
    has_age = dob is not None or anchor is not None
    return [k for k, v in static.items() if isinstance(v, str)], ("age" if has_age else None)


def dataset_yaml(d: Draft, name: str, raw: Path, sample_rows: int) -> tuple[str, dict]:
    """The draft dataset config's text, and what the KDE draft needs (label, age, duration, continuous)."""
    v, vid, notes = d.visits, _visit_id(d.visits, d.tables), {}
    lines = [f"# Draft dataset config from `synthehr init-dataset {name} --raw {raw}` ({sample_rows} rows read per "
             "file).", "# TODO lines are guesses: check them, then run `synthehr check --config <this file>`.",
             "# Files and columns found:", *(_describe(t) for t in d.tables),
             f"name: {name}", "adapter: tables", f"description: {json.dumps(f'{name} (TODO: one line)')}",
             "profiles:", _line(2, "local", {"raw": str(raw)}),
             _line(2, "kubeflow", {"raw": f"gs://CHANGE-ME/{name}"}, "TODO: where the pods read the extract"),
             "adapter_options:"]
    labels, age = _patient_block(d, lines, vid, notes)
    lines += ["  visits:", _line(4, "file", v.file), _line(4, "id", vid, "unique"),
              _line(4, "patient", d.patient_col, "TODO check: the patient id")]
    dur = _duration(d)
    start = dur[0] if dur else next((c for c in v.times if START_NAME.search(str(c))), v.times[0])
    lines.append(_line(4, "start", start, "TODO check: the visit start; add formats: {col: '%d/%m/%Y'} if not ISO"))
    if dur:
        lines += [_line(4, "end", dur[1]), _line(4, "duration", {"name": dur[3], "unit": dur[2]},
                                                 f"median stay in the sample: {dur[2]}")]
    skip = {vid, d.patient_col, *(c if isinstance(c, str) else c["column"] for c in notes.get("static", {}).values())}
    cats = [c for c in _categories(v, skip, numbers=True) if not (d.patients is None and _per_patient(d, c))]
    event = next((c for c in cats if EVENT_NAME.search(str(c))), None)
    lines.append(_line(4, "event_type", {"column": event} if event else "visit",
                       "TODO check: the visit's kind" if event else "TODO: a constant, or {column: <kind column>}"))
    if d.patients is None:
        lines.append(_line(4, "static", notes["static"], "TODO: per-patient columns (constant within a patient)"))
    cont = {_out_name(c): c for c in v.frame.columns if v.frame[c].dtype.kind in "biuf" and c not in skip
            and c not in v.unique and c not in cats}      # flags and 1-5 scores are categories, not values
    if cont:
        lines.append(_line(4, "continuous", cont, "TODO: numeric visit columns found"))
    code_lines, namespaces, versions = _code_lines(d, [c for c in cats if c != event])
    entries = [c for c in code_lines if not c.startswith("#")]
    lines += (["  codes:", *entries] if entries else
              [_line(2, "codes", [], "TODO: no code table found; to use a suggestion below, drop [] and uncomment")])
    lines += [c for c in code_lines if c.startswith("#")]
    bins = {dur[3]: nice_edges(_span(d, dur))} if dur else {}
    bins.update({k: nice_edges(v.frame[c]) for k, c in cont.items()})
    lines += ["split: {train: 0.72, val: 0.08, test: 0.20, seed: 4}", "n_ctx: 48",
              _line(0, "code_namespaces", namespaces), _line(0, "labels", labels[:1], f"TODO: of {labels}"),
              *([_line(0, "visit_categories", versions, "one code-system version per visit: a token group")]
                if versions else []),
              *(["patient_bins:", _line(2, "age", {"edges": nice_edges(_age_sample(d))}, "sample quintiles")]
                if age else []),
              "visit_bins:", *(_line(2, k, {"edges": e}, "sample quintiles") for k, e in bins.items()),
              _line(2, "gap_days", {"quantiles": 8}),
              _line(0, "calendar", {"enabled": False}, "TODO: true when the dates are real (not shifted)"),
              f"kde: kde_{name}.yml"]
    return "\n".join(lines) + "\n", {"label": (labels or [None])[0], "age": age, "duration": dur,
                                     "continuous": list(cont)}


def _code_lines(d: Draft, visit_cats: list[str]) -> tuple[list[str], list[str], list[str]]:
    lines, namespaces, versions = [], [], []
    for t, vcol, code, version in d.codes:
        ns = _out_name(t.stem)
        key = f"{ns}:{{{version}}}:{{{code}}}" if version else f"{ns}:{{{code}}}"
        spec = {"file": t.file, "visit": vcol, "key": key}
        if version:
            spec.update(version=version, category=version)
            versions.append(version.lower())     # the adapter's visit column (headers are lower-cased)
        lines.append("    - " + _flow(spec) + ("   # TODO check: code and version columns" if version else
                                               "   # TODO check: the code column"))
        namespaces.append(ns)
    for c in visit_cats:
        ns = _out_name(c)
        lines.append("#   - " + _flow({"from_visits": True, "key": f"{ns}:{{{c}}}", "fill": "UNKNOWN"})
                     + f"   # TODO: {d.visits.frame[c].nunique()} values; uncomment (and add {ns} to code_namespaces)"
                     " to model them as codes")
    return lines, namespaces, versions


def _span(d: Draft, dur) -> pd.Series:
    f = d.visits.frame
    days = (pd.to_datetime(f[dur[1]], format="mixed") - pd.to_datetime(f[dur[0]], format="mixed")) / pd.Timedelta(days=1)
    return days * {"days": 1.0, "hours": 24.0}[dur[2]]


def _age_sample(d: Draft) -> pd.Series:
    t = d.patients if d.patients is not None else d.visits
    col = next((c for c in t.frame.columns if "age" in _words(c) and t.frame[c].dtype.kind in "biuf"), None)
    return t.frame[col] if col is not None else pd.Series([0, 100])


def kde_yaml(name: str, found: dict) -> str:
    """The draft KDE config: age by the first label, the duration and numeric visit columns, gaps, times."""
    label, age, dur = found["label"], found["age"], found["duration"]
    lines = [f"# Draft KDE config from `synthehr init-dataset {name}` (reference: docs/kde.md). Grids come from the",
             "# real training split and are outside any DP guarantee. TODO: check the bandwidths and grids.",
             "num_cores: -1", "min_count: 10                 # privacy guard: smaller strata are merged",
             "bandwidth_floor: 1.0", "variable_config:"]
    if age:
        lines += ["  age:", "    method: kde_range", "    data_source: patients",
                  *([_line(4, "stratify_by", [label])] if label else []),
                  _line(4, "grid_params", {"method": "points", "min": 0, "max": 110, "step": 1, "offset": 1},
                        "TODO: integer years 0..110"),
                  _line(4, "bandwidth", [2.0], "years; TODO tune")]
    for col in ([dur[3]] if dur else []) + found["continuous"]:
        lines += [f"  {col}:", "    method: kde_range", "    data_source: visits",
                  _line(4, "grid_params", {"method": "fine_bins", "points_per_bin": 10}, f"cells inside {col}_binned")]
    lines += ["  gap_days:", "    method: kde_range", "    data_source: visits",
              "    filter: {gap_days: {notnull: true}}",
              _line(4, "grid_params", {"method": "fine_bins", "step": 1, "filter": {"threshold": 90, "modulo": 30}},
                    "daily cells to 90 days, then 30-day cells"),
              "time:", "  gap: gap_days", "  gap_unit: days"]
    if dur:
        lines += [f"  los: {dur[3]}", f"  los_unit: {dur[2]}"]
    lines += ["  allow_overlap: false          # TODO: true if visits of a patient may overlap"]
    if age:
        lines.append("  anchor_age: age               # writes visits.age_at_visit")
    return "\n".join(lines) + "\n"


def init_dataset(name: str, raw: str | Path, out: str | Path | None = None, overwrite: bool = False,
                 sample_rows: int = 100_000) -> tuple[Path, Path, Draft]:
    """Write ``out`` (default ``<name>.yml``) and ``kde_<name>.yml`` beside it; returns their paths and the draft."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ConfigError(f"dataset name {name!r}: use letters, digits, '_' or '-', starting with a letter.")
    raw = Path(raw).resolve()
    out = Path(out) if out is not None else Path(f"{name}.yml")
    kde_out = out.parent / f"kde_{name}.yml"
    existing = [str(p) for p in (out, kde_out) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist(s); init-dataset never overwrites a file. Pass "
                          "--overwrite to replace it, or --out to write elsewhere.")
    draft = assign_roles(inspect(raw, sample_rows))
    text, found = dataset_yaml(draft, name, raw, sample_rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    kde_out.write_text(kde_yaml(name, found))
    return out, kde_out, draft

"""Queensland-Health-style ED presentations and inpatient admissions: the adapter.

Raw schema: one CSV ``encounters.csv`` (or ``.csv.gz``), one row per encounter:

| column | type | notes |
|---|---|---|
| ``patient_id`` | str | |
| ``encounter_id`` | str | unique |
| ``event_type`` | ``ED`` or ``Inpatient`` | |
| ``arrival`` | ISO datetime | ``2017-03-06 14:23:00`` |
| ``triage_category`` | int 1-5 | ATS (1 = most urgent); empty for Inpatient |
| ``los`` | float hours | length of stay |
| ``los_triage`` | float hours | triage duration, ED only |
| ``age`` | int years | at the encounter |
| ``gender`` | ``F`` or ``M`` | |
| ``disposition`` | str | ``discharged``, ``admitted_ward``, ``admitted_icu``, ``admitted_surgery``, ``left_against_advice``, ``transferred``, ``died`` |

:func:`load` is the adapter (vectorised: ~5M rows in seconds). The bundled sample and the scale-test simulator
that write files of this schema are in ``data/fixtures/qh.py``.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from ... import storage
from ...errors import ConfigError, DataError, SchemaError, bullet_list
from ..schema import WEEKDAYS, calendar_parts
from .base import DropReport, RawCohort, check_header, read_csv_checked, require_not_null, require_unique, resolve_file

log = logging.getLogger(__name__)

RAW_COLUMNS = ["patient_id", "encounter_id", "event_type", "arrival", "triage_category", "los", "los_triage", "age",
               "gender", "disposition"]
KINDS = {"patient_id": "str", "encounter_id": "str", "event_type": "str", "arrival": "datetime",
         "triage_category": "int", "los": "float", "los_triage": "float", "age": "float", "gender": "str",
         "disposition": "str"}
_CATEGORY = pa.dictionary(pa.int32(), pa.string())  # low-cardinality strings: read as categoricals (memory)
ARROW_TYPES = {"patient_id": pa.string(), "encounter_id": pa.string(), "event_type": _CATEGORY,
               "arrival": pa.timestamp("s"), "triage_category": pa.float64(), "los": pa.float64(),
               "los_triage": pa.float64(), "age": pa.float64(), "gender": _CATEGORY, "disposition": _CATEGORY}
EVENT_TYPES = ("ED", "Inpatient")
OPTIONS = {"ed_los_clip_hours": None, "include_disposition": True}
DISPOSITIONS = ("discharged", "admitted_ward", "admitted_icu", "admitted_surgery", "left_against_advice",
                "transferred", "died")
DISCHARGED, WARD, ICU, SURGERY, LEFT, TRANSFERRED, DIED = range(7)   # codes into DISPOSITIONS
# KTAS Disposition code 1-7 -> code into DISPOSITIONS (shared/docs/data.md §3; "admitted" = 2, 3, 7)
KTAS_DISPOSITION = np.array([-1, DISCHARGED, WARD, ICU, LEFT, TRANSFERRED, DIED, SURGERY])
EPOCH = np.datetime64("1970-01-01T00:00:00", "s")


# ------------------------------------------------------------------------------------------ adapter
def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"adapter_options: unknown key(s) {unknown} for the qh adapter; known keys: {sorted(OPTIONS)}.")
    opts = {**OPTIONS, **options}
    clip = opts["ed_los_clip_hours"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"adapter_options.ed_los_clip_hours must be a positive number of hours or null, got {clip!r}.")
    if not isinstance(opts["include_disposition"], bool):
        raise ConfigError(f"adapter_options.include_disposition must be true or false, got {opts['include_disposition']!r}.")
    return opts


def read_encounters(path: str) -> pd.DataFrame:
    """Read and check ``encounters.csv`` with pyarrow (multi-threaded, typed); errors name column and values."""
    check_header(path, "encounters", RAW_COLUMNS)
    with storage.local_copy(path) as local:
        try:
            table = pacsv.read_csv(str(local), convert_options=pacsv.ConvertOptions(
                column_types=ARROW_TYPES, strings_can_be_null=True, null_values=[""]))
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                raise DataError(f"{path}: the encounters table is empty (0 bytes of data). Check the export.") from exc
            # the slow reader names every bad column and shows bad values
            read_csv_checked(path, "encounters", KINDS)
            raise DataError(f"{path}: could not parse the encounters table: {exc}") from exc
    missing = [c for c in RAW_COLUMNS if c not in table.column_names]
    if missing:
        raise SchemaError(f"{path}: encounters table lacks column(s) {missing}; found {sorted(table.column_names)}.")
    if table.num_rows == 0:
        raise DataError(f"{path}: the encounters table has a header but no rows. Check the export.")
    return table.select(RAW_COLUMNS).to_pandas(split_blocks=True, self_destruct=True)


def load(raw: str, options: dict, report: DropReport) -> RawCohort:
    """Read ``<raw>/encounters.csv`` into a RawCohort of ED and Inpatient encounters."""
    opts = check_options(options)
    path = resolve_file(raw, "encounters")
    df = read_encounters(path)
    require_not_null(df, ["patient_id", "encounter_id", "event_type", "arrival"], path, "encounters")
    require_unique(df, "encounter_id", path, "encounters")
    problems = []
    bad = ~df["event_type"].isin(EVENT_TYPES)
    if bad.any():
        problems.append(f"column 'event_type' must be one of {list(EVENT_TYPES)}, got {sorted(set(df.loc[bad, 'event_type']))[:5]}")
    tri = df["triage_category"]
    bad = tri.notna() & ~tri.isin([1, 2, 3, 4, 5])
    if bad.any():
        problems.append(f"column 'triage_category' must be an integer 1-5, got {tri[bad].head(3).tolist()}")
    for col in ("los", "los_triage", "age"):
        bad = df[col] < 0
        if bad.any():
            problems.append(f"column {col!r} has {int(bad.sum())} negative values, e.g. {df.loc[bad, col].head(3).tolist()}")
    bad = df["gender"].notna() & ~df["gender"].isin(["F", "M"])
    if bad.any():
        problems.append(f"column 'gender' must be F or M (or empty), got {sorted(set(df.loc[bad, 'gender']))[:5]}")
    if problems:
        raise SchemaError(f"{path}: invalid values in the encounters table:\n{bullet_list(problems)}\n"
                          "Fix those rows in the export (see synthehr_core/data/adapters/qh.py for the schema).")

    # order once by (patient, arrival): the first encounter carries the patient's static columns
    pcode, pids = pd.factorize(df["patient_id"], sort=False)
    arrival = df["arrival"].to_numpy(dtype="datetime64[s]").astype(np.int64)
    order = np.lexsort((arrival, pcode))
    firsts = order[np.concatenate([[True], pcode[order][1:] != pcode[order][:-1]])]
    gender = pd.Categorical(df["gender"])
    gcode = gender.codes                                            # -1 = empty
    g_first = np.empty(len(pids), dtype=gcode.dtype)
    g_first[pcode[firsts]] = gcode[firsts]
    changed = np.unique(pcode[(gcode != g_first[pcode]) & (gcode >= 0)]).size
    if changed:
        log.warning("%s: %d patients have more than one gender across encounters; using the first", path, changed)
    g_names = np.append(np.asarray(gender.categories, dtype=object), "unknown")   # code -1 -> "unknown"
    patients = pd.DataFrame({
        "patient_id": pd.Series(pids).take(pcode[firsts]).reset_index(drop=True).astype(str),
        "gender": g_names[gcode[firsts]],
        "age": df["age"].to_numpy(dtype=float)[firsts],
    })

    los = df["los"].to_numpy(dtype=float)
    ed = (df["event_type"] == "ED").to_numpy()
    clip = opts["ed_los_clip_hours"]
    if clip is not None:
        over = ed & (los > clip)
        if over.any():
            log.info("%s: clipped %d ED stays longer than %g h (ed_los_clip_hours)", path, int(over.sum()), clip)
        los = np.where(over, float(clip), los)
    visit_id = df["encounter_id"].astype(str).reset_index(drop=True)
    visits = pd.DataFrame({
        "patient_id": df["patient_id"].astype(str),
        "visit_id": visit_id,
        "start": arrival / 86400.0,
        "event_type": df["event_type"].astype(str),
        "los_hours": los,
        "los_triage_hours": df["los_triage"].to_numpy(dtype=float),
        "age": df["age"].to_numpy(dtype=float),
    })
    # day of week of the arrival, as the seed pipeline's `event_day` (the KDE stage's value counts use it)
    visits["event_day"] = np.asarray(WEEKDAYS, dtype=object)[calendar_parts(visits["start"].to_numpy(float))["weekday"]]
    has_tri = ed & tri.notna().to_numpy()
    tri_code = tri.to_numpy(dtype=float)[has_tri].astype(np.int64) - 1
    codes = [pd.DataFrame({"visit_id": visit_id[has_tri].reset_index(drop=True),
                           "code": pd.Categorical.from_codes(tri_code, [f"tri:{i}" for i in range(1, 6)])})]
    if opts["include_disposition"]:
        disp = pd.Categorical(df["disposition"])
        has = disp.codes >= 0
        codes.append(pd.DataFrame({"visit_id": visit_id[has].reset_index(drop=True),
                                   "code": pd.Categorical.from_codes(disp.codes[has],
                                                                     ["disp:" + str(c) for c in disp.categories])}))
    return RawCohort(patients, visits, pd.concat(codes, ignore_index=True),
                     {"encounters": len(df), "ED": int(ed.sum()), "Inpatient": int((~ed).sum())})

"""MIMIC-III adapter: ADMISSIONS, PATIENTS, DIAGNOSES_ICD, PROCEDURES_ICD (``.csv`` or ``.csv.gz``).

Header case is normalised (the demo is lower-case, the credentialed release upper-case). Dates are shifted per
patient into 2100-2200, so only deltas are meaningful. Patients older than 89 are shifted to about 300 years:
their age is capped at ``age_cap`` and flagged in ``age_capped``.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ...errors import ConfigError
from .base import DropReport, RawCohort, read_csv_checked, require_not_null, require_unique, resolve_file

log = logging.getLogger(__name__)

OPTIONS = {"age_cap": 90.0, "include_procedures": True, "include_admission_type": True}
ADMISSIONS = {"subject_id": "int", "hadm_id": "int", "admittime": "datetime", "dischtime": "datetime",
              "admission_type": "str"}
PATIENTS = {"subject_id": "int", "gender": "str", "dob": "datetime"}
ICD = {"subject_id": "int", "hadm_id": "int", "icd9_code": "str"}
EPOCH = pd.Timestamp("1970-01-01")


def _days(ts: pd.Series) -> pd.Series:
    return (ts - EPOCH) / pd.Timedelta(days=1)


def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"adapter_options: unknown key(s) {unknown} for the mimic3 adapter; "
                          f"known keys: {sorted(OPTIONS)}.")
    opts = {**OPTIONS, **options}
    if not isinstance(opts["age_cap"], (int, float)) or not 18 <= opts["age_cap"] <= 120:
        raise ConfigError(f"adapter_options.age_cap must be a number in [18, 120], got {opts['age_cap']!r}.")
    return opts


def _icd_codes(path: str, table: str, prefix: str, report: DropReport) -> pd.DataFrame:
    df = read_csv_checked(path, table, ICD, normalise_case=True)
    require_not_null(df, ["hadm_id"], path, table)
    empty = df["icd9_code"].isna() | (df["icd9_code"].str.strip() == "")
    report.drop(table, "empty icd9_code", int(empty.sum()))
    df = df[~empty]
    return pd.DataFrame({"visit_id": df["hadm_id"].astype("int64").astype(str),
                         "code": prefix + ":" + df["icd9_code"].str.strip()})


def load(raw: str, options: dict, report: DropReport) -> RawCohort:
    opts = check_options(options)
    adm_path = resolve_file(raw, "ADMISSIONS")
    pat_path = resolve_file(raw, "PATIENTS")
    adm = read_csv_checked(adm_path, "ADMISSIONS", ADMISSIONS, normalise_case=True)
    pat = read_csv_checked(pat_path, "PATIENTS", PATIENTS, normalise_case=True)
    require_not_null(adm, ["subject_id", "hadm_id", "admittime"], adm_path, "ADMISSIONS")
    require_not_null(pat, ["subject_id", "dob"], pat_path, "PATIENTS")
    require_unique(adm, "hadm_id", adm_path, "ADMISSIONS")
    require_unique(pat, "subject_id", pat_path, "PATIENTS")
    source_rows = {"ADMISSIONS": len(adm), "PATIENTS": len(pat)}

    visits = pd.DataFrame({
        "patient_id": adm["subject_id"].astype("int64").astype(str),
        "visit_id": adm["hadm_id"].astype("int64").astype(str),
        "start": _days(adm["admittime"]).astype(float),
        "event_type": "inpatient",
    })
    los = (adm["dischtime"] - adm["admittime"]) / pd.Timedelta(days=1)
    negative = los < 0
    if negative.any():
        log.warning("%s: %d admissions end before they start; their LOS is set to 0", adm_path, int(negative.sum()))
    visits["los_days"] = los.clip(lower=0).astype(float).to_numpy()

    first_adm = adm.groupby("subject_id")["admittime"].min()
    pat = pat.set_index("subject_id")
    first = first_adm.reindex(pat.index)
    # year arithmetic on shifted dates: only the difference is meaningful
    age = (first.dt.year - pat["dob"].dt.year) - ((first.dt.month * 100 + first.dt.day)
                                                  < (pat["dob"].dt.month * 100 + pat["dob"].dt.day)).astype(int)
    capped = age > 89
    patients = pd.DataFrame({
        "patient_id": pat.index.astype("int64").astype(str),
        "gender": pat["gender"].fillna("unknown").astype(str).to_numpy(),
        "age": np.where(capped, float(opts["age_cap"]), age.astype(float)).astype(float),
        "age_capped": np.where(capped, "yes", "no"),
    })
    if capped.any():
        log.info("%s: %d patients older than 89 (shifted to ~300 y) capped at %g", pat_path, int(capped.sum()),
                 opts["age_cap"])

    codes = [_icd_codes(resolve_file(raw, "DIAGNOSES_ICD"), "DIAGNOSES_ICD", "dx", report)]
    source_rows["DIAGNOSES_ICD"] = len(codes[0])
    if opts["include_procedures"]:
        codes.append(_icd_codes(resolve_file(raw, "PROCEDURES_ICD"), "PROCEDURES_ICD", "px", report))
        source_rows["PROCEDURES_ICD"] = len(codes[1])
    if opts["include_admission_type"]:
        codes.append(pd.DataFrame({"visit_id": visits["visit_id"], "code": "adm:" + adm["admission_type"].fillna("UNKNOWN")}))
    return RawCohort(patients, visits, pd.concat(codes, ignore_index=True), source_rows)

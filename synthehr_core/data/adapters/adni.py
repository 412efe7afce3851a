"""ADNI adapter (ADNIMERGE.csv).

Real ADNI data needs the ADNI data-use agreement, which forbids redistribution, so the bundled sample
(``sample_data/adni_fixture``) is a schema-faithful, fully synthetic file from ``data/fixtures/adni.py``.

ADNIMERGE has one row per study visit (RID, VISCODE). The adapter keeps the rows that have an EXAMDATE and
returns: patients (``gender``, baseline ``age``, ``dx_bl``, ``apoe4``), visits (event type ``study_visit``,
``mmse``, ``adas13``, ``cdrsb``, ``months_since_baseline`` = the protocol month ``M``, ``abeta`` parsed from the
censored CSF strings) and codes ``dxg:<CN|MCI|Dementia>`` plus, optionally, ``prot:<COLPROT>``.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ...errors import ConfigError, DataError, SchemaError, bullet_list
from .base import DropReport, RawCohort, read_csv_checked, require_not_null, resolve_file

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ raw schema
# Full ordered column list of a 2020-ish ADNIMERGE export (shared/docs/data.md §4.1); note `LDELTOTAL_BL`.
ECOG = [f"Ecog{who}{dom}" for who in ("Pt", "SP")
        for dom in ("Mem", "Lang", "Visspat", "Plan", "Organ", "Divatt", "Total")]
COLUMNS = (
    ["RID", "PTID", "VISCODE", "SITE", "COLPROT", "ORIGPROT", "EXAMDATE", "DX_bl", "AGE", "PTGENDER", "PTEDUCAT",
     "PTETHCAT", "PTRACCAT", "PTMARRY", "APOE4", "FDG", "PIB", "AV45", "ABETA", "TAU", "PTAU", "CDRSB", "ADAS11",
     "ADAS13", "ADASQ4", "MMSE", "RAVLT_immediate", "RAVLT_learning", "RAVLT_forgetting", "RAVLT_perc_forgetting",
     "LDELTOTAL", "DIGITSCOR", "TRABSCOR", "FAQ", "MOCA"] + ECOG
    + ["FLDSTRENG", "FSVERSION", "IMAGEUID", "Ventricles", "Hippocampus", "WholeBrain", "Entorhinal", "Fusiform",
       "MidTemp", "ICV", "DX", "mPACCdigit", "mPACCtrailsB", "EXAMDATE_bl", "CDRSB_bl", "ADAS11_bl", "ADAS13_bl",
       "ADASQ4_bl", "MMSE_bl", "RAVLT_immediate_bl", "RAVLT_learning_bl", "RAVLT_forgetting_bl",
       "RAVLT_perc_forgetting_bl", "LDELTOTAL_BL", "DIGITSCOR_bl", "TRABSCOR_bl", "FAQ_bl", "mPACCdigit_bl",
       "mPACCtrailsB_bl", "FLDSTRENG_bl", "FSVERSION_bl", "Ventricles_bl", "Hippocampus_bl", "WholeBrain_bl",
       "Entorhinal_bl", "Fusiform_bl", "MidTemp_bl", "ICV_bl", "MOCA_bl"] + [f"{e}_bl" for e in ECOG]
    + ["ABETA_bl", "TAU_bl", "PTAU_bl", "FDG_bl", "PIB_bl", "AV45_bl", "Years_bl", "Month_bl", "Month", "M",
       "update_stamp"])
# the baseline copies: `<col>_bl` <- `<col>` (LDELTOTAL_BL keeps its odd upper-case spelling)
BL_SOURCE = {c: ("LDELTOTAL" if c == "LDELTOTAL_BL" else c[:-3]) for c in COLUMNS
             if c.lower().endswith("_bl") and c not in ("DX_bl", "EXAMDATE_bl", "Years_bl", "Month_bl")}
STRING_COLUMNS = ["COLPROT", "ORIGPROT", "PTID", "VISCODE", "DX_bl", "PTGENDER", "PTETHCAT", "PTRACCAT", "PTMARRY",
                  "ABETA", "TAU", "PTAU", "FLDSTRENG", "FSVERSION", "DX", "FLDSTRENG_bl", "FSVERSION_bl",
                  "ABETA_bl", "TAU_bl", "PTAU_bl"]
INT_COLUMNS = ["RID", "SITE", "PTEDUCAT", "APOE4", "ADASQ4", "MMSE", "RAVLT_immediate", "RAVLT_learning",
               "RAVLT_forgetting", "LDELTOTAL", "DIGITSCOR", "TRABSCOR", "FAQ",
               "MOCA", "IMAGEUID", "Ventricles", "Hippocampus", "WholeBrain", "Entorhinal", "Fusiform", "MidTemp",
               "ICV", "Month", "M"]
INT_COLUMNS += [c for c, src in BL_SOURCE.items() if src in INT_COLUMNS]

# what the adapter needs (read_csv_checked kinds)
REQUIRED = {"RID": "int", "VISCODE": "str", "EXAMDATE": "datetime", "COLPROT": "str", "DX_bl": "str",
            "AGE": "float", "PTGENDER": "str", "APOE4": "float", "DX": "str", "MMSE": "float", "ADAS13": "float",
            "CDRSB": "float", "ABETA": "str", "M": "int"}
DX_VALUES = ("CN", "MCI", "Dementia")
# older exports spell DX as a transition; the adapter maps them to the state at the visit
LEGACY_DX = {"NL": "CN", "NL to MCI": "MCI", "MCI to NL": "CN", "NL to Dementia": "Dementia",
             "MCI to Dementia": "Dementia", "Dementia to MCI": "MCI", "Dementia to NL": "CN", "MCI to MCI": "MCI",
             "NL to NL": "CN", "Dementia to Dementia": "Dementia"}
OPTIONS = {"include_protocol": True}
EPOCH = pd.Timestamp("1970-01-01")


# ------------------------------------------------------------------------------------------ adapter
def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"adapter_options: unknown key(s) {unknown} for the adni adapter; known keys: {sorted(OPTIONS)}.")
    opts = {**OPTIONS, **options}
    if not isinstance(opts["include_protocol"], bool):
        raise ConfigError(f"adapter_options.include_protocol must be true or false, got {opts['include_protocol']!r}.")
    return opts


def parse_censored(values: pd.Series, column: str, path: str) -> pd.Series:
    """``"741.5"`` -> 741.5, ``">1700"`` -> 1700.0, ``"<8"`` -> 8.0 (the detection limit); empty stays NaN."""
    s = values.astype("string").str.strip()
    num = pd.to_numeric(s.str.lstrip("<>"), errors="coerce")
    bad = s.notna() & num.isna()
    if bad.any():
        raise SchemaError(f"{path}: column {column!r} should hold numbers or censored numbers like '>1700' or '<8', "
                          f"but {int(bad.sum())} values are neither, e.g. {s[bad].head(3).tolist()}. "
                          "Fix or blank those cells.")
    return num.astype(float)


def _normalise_dx(dx: pd.Series, path: str) -> pd.Series:
    mapped = dx.map(lambda v: LEGACY_DX.get(v, v) if isinstance(v, str) else None)
    bad = mapped.notna() & ~mapped.isin(DX_VALUES)
    if bad.any():
        raise SchemaError(f"{path}: column 'DX' has unexpected values {sorted(set(dx[bad]))[:5]}; expected "
                          f"{list(DX_VALUES)} (or the legacy transition labels {sorted(LEGACY_DX)[:3]}...). "
                          "Check that this is an ADNIMERGE export.")
    return mapped


def load(raw: str, options: dict, report: DropReport) -> RawCohort:
    """Read ``<raw>/ADNIMERGE.csv`` (or ``.csv.gz``) into a RawCohort of study visits."""
    opts = check_options(options)
    path = resolve_file(raw, "ADNIMERGE")
    df = read_csv_checked(path, "ADNIMERGE", REQUIRED)
    require_not_null(df, ["RID", "VISCODE"], path, "ADNIMERGE")
    df["RID"] = df["RID"].astype("int64").astype(str)
    df["VISCODE"] = df["VISCODE"].str.strip()
    dup = df.duplicated(["RID", "VISCODE"], keep=False)
    if dup.any():
        ex = df.loc[dup, ["RID", "VISCODE"]].drop_duplicates().head(3).itertuples(index=False)
        raise DataError(f"{path}: (RID, VISCODE) must identify one visit, but {int(dup.sum())} rows share a pair, "
                        f"e.g. {[f'RID {r} {v}' for r, v in ex]}. Remove the duplicate rows (an export merged "
                        "twice?) before preprocessing.")
    source_rows = {"ADNIMERGE": len(df)}
    no_date = df["EXAMDATE"].isna()
    report.drop("ADNIMERGE", "no EXAMDATE (visit scheduled but not done)", int(no_date.sum()))
    df = df[~no_date].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{path}: no row has an EXAMDATE, so there are no visits. Check the export.")
    dx = _normalise_dx(df["DX"], path)

    # patients: the baseline row (or, without one, the earliest visit) carries the static columns
    order = df.assign(_bl=(df["VISCODE"] != "bl").astype(int)).sort_values(["RID", "_bl", "EXAMDATE"], kind="stable")
    first = order.drop_duplicates("RID")
    problems = [f"column {c!r} has values outside the expected range, e.g. {first.loc[bad, c].head(3).tolist()}"
                for c, bad in (("AGE", ~first["AGE"].between(18, 120) & first["AGE"].notna()),
                               ("APOE4", ~first["APOE4"].isin([0, 1, 2]) & first["APOE4"].notna()))
                if bad.any()]
    if problems:
        raise SchemaError(f"{path}: implausible values in the ADNIMERGE table:\n{bullet_list(problems)}\n"
                          "AGE is the baseline age in years and APOE4 the number of e4 alleles (0, 1 or 2).")
    patients = pd.DataFrame({
        "patient_id": first["RID"].to_numpy(),
        "gender": first["PTGENDER"].fillna("unknown").to_numpy(dtype=object),
        "age": first["AGE"].to_numpy(dtype=float),
        "dx_bl": first["DX_bl"].fillna("unknown").to_numpy(dtype=object),
        "apoe4": np.where(first["APOE4"].isna(), "unknown",
                          first["APOE4"].fillna(-1).astype(int).astype(str)).astype(object),
    })

    visit_id = df["RID"] + ":" + df["VISCODE"]
    visits = pd.DataFrame({
        "patient_id": df["RID"],
        "visit_id": visit_id,
        "start": ((df["EXAMDATE"] - EPOCH) / pd.Timedelta(days=1)).astype(float),
        "event_type": "study_visit",
        "mmse": df["MMSE"].astype(float),
        "adas13": df["ADAS13"].astype(float),
        "cdrsb": df["CDRSB"].astype(float),
        "months_since_baseline": df["M"].astype(float),
        "abeta": parse_censored(df["ABETA"], "ABETA", path),
    })
    codes = [pd.DataFrame({"visit_id": visit_id[dx.notna()], "code": "dxg:" + dx[dx.notna()]})]
    if opts["include_protocol"]:
        prot = df["COLPROT"].notna()
        codes.append(pd.DataFrame({"visit_id": visit_id[prot], "code": "prot:" + df.loc[prot, "COLPROT"].str.strip()}))
    return RawCohort(patients, visits, pd.concat(codes, ignore_index=True), source_rows)

"""Queensland-Health-style ED presentations and inpatient admissions: adapter, sample builder and simulator.

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

:func:`make_qh_sample` builds the bundled sample from the real KTAS ED records (Moon et al. 2019, CC BY 4.0) plus
generated patients, dates and inpatient follow-ons; :func:`simulate` generates any number of patients with
weekly and seasonal structure for scale tests; :func:`load` is the adapter (vectorised: ~5M rows in seconds).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from .. import storage
from ..errors import ConfigError, DataError, SchemaError, bullet_list
from ..schema import WEEKDAYS, calendar_parts
from .base import DropReport, RawCohort, read_csv_checked, require_not_null, require_unique, resolve_file

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

# ------------------------------------------------------------------------------------------ calendar structure
# Relative arrival intensity by weekday (Mon..Sun). ED: the Monday peak of Australian EDs; elective admissions
# happen on weekdays. Arbitrary but plausible; tests assert the shape, not the numbers.
ED_WEEKDAY = np.array([1.14, 1.03, 1.00, 0.98, 0.98, 0.93, 0.94])
ELECTIVE_WEEKDAY = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.03, 0.02])
WINTER_SURGE = 0.22            # southern-hemisphere winter (Jun-Aug) respiratory surge in ED arrivals, peak mid-July
ED_HOURS = np.array([2.2, 1.8, 1.5, 1.3, 1.2, 1.3, 1.8, 2.8, 4.2, 5.4, 5.9, 5.8, 5.5, 5.3, 5.2, 5.1, 5.1, 5.2,
                     5.3, 5.2, 4.8, 4.2, 3.5, 2.8])                 # ED arrivals by hour: late-morning peak
# KTAS anchors (data.md §3): median ED LOS by level (minutes) and admitted share by level
ED_LOS_MEDIAN_H = np.array([293, 506, 323, 185, 122]) / 60.0
ADMIT_SHARE = np.array([0.50, 0.53, 0.35, 0.17, 0.05])
TRIAGE_P = {"child": [0.01, 0.10, 0.33, 0.45, 0.11], "adult": [0.02, 0.17, 0.38, 0.36, 0.07],
            "older": [0.035, 0.24, 0.42, 0.26, 0.045]}            # KTAS level mix (26/220/487/459/75) by age
SIM_START = np.datetime64("2015-01-01", "D")
SIM_YEARS = 5                  # ED presentations fall in 2015-2019; follow-ons and electives may run a little past


def _day_weights(days: np.ndarray, kind: str) -> np.ndarray:
    """Arrival intensity of each calendar day (int days since 1970-01-01) for ``ED`` or ``elective`` arrivals."""
    weekday = (days + 3) % 7                                        # 1970-01-01 was a Thursday
    dates = days.astype("datetime64[D]")
    doy = (dates - dates.astype("datetime64[Y]")).astype(int)
    if kind == "ED":
        dist = np.minimum(np.abs(doy - 196), 365 - np.abs(doy - 196))   # days from mid-July
        return ED_WEEKDAY[weekday] * (1.0 + WINTER_SURGE * np.exp(-0.5 * (dist / 35.0) ** 2))
    holiday = (doy >= 355) | (doy <= 9)                             # elective lists close over Christmas/New Year
    return ELECTIVE_WEEKDAY[weekday] * np.where(holiday, 0.3, 1.0)


class _Clock:
    """Time warp between operational time (uniform intensity, in mean days) and calendar days.

    Events drawn uniformly (or with any gaps) in operational time land on calendar days in proportion to the
    day weights, so the weekly and seasonal structure is exact and everything stays vectorised (np.interp).
    """

    def __init__(self, first_day: int, n_days: int, kind: str):
        self.days = np.arange(first_day, first_day + n_days + 1)
        w = _day_weights(self.days[:-1], kind)
        w = w / w.mean()
        self.cum = np.concatenate([[0.0], np.cumsum(w)])

    def to_day(self, tau: np.ndarray) -> np.ndarray:
        return np.interp(tau, self.cum, self.days)

    def to_tau(self, day: np.ndarray) -> np.ndarray:
        return np.interp(day, self.days, self.cum)


def _hours(rng: np.random.Generator, n: int, weights: np.ndarray) -> np.ndarray:
    """Fractional hour of day drawn from 24 hourly weights."""
    cdf = np.cumsum(weights) / weights.sum()
    return np.searchsorted(cdf, rng.uniform(size=n), side="right") + rng.uniform(size=n)


def _to_datetime(day_float: np.ndarray) -> np.ndarray:
    """Days since 1970 (float) -> datetime64[s] rounded to the minute."""
    minutes = np.round(day_float * 1440.0).astype(np.int64)
    return EPOCH + (minutes * 60).astype("timedelta64[s]")


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) probability matrix -> index 0..k-1."""
    cdf = np.cumsum(probs, axis=1)
    return np.minimum((rng.uniform(size=(len(probs), 1)) > cdf / cdf[:, -1:]).sum(axis=1), probs.shape[1] - 1)


def _frame(patient, day, event, triage, los, los_triage, age, gender, disposition) -> pd.DataFrame:
    """Assemble the raw schema, ordered by patient then arrival (ED before its follow-on), with encounter ids.

    ``event``, ``gender`` and ``disposition`` are integer codes; they become categorical string columns.
    """
    arrival = _to_datetime(day)
    order = np.lexsort((event, arrival.astype(np.int64), patient))
    n = len(order)
    tri = triage[order]
    return pd.DataFrame({
        "patient_id": patient[order].astype(np.int64),
        "encounter_id": np.arange(1, n + 1, dtype=np.int64),
        "event_type": pd.Categorical.from_codes(event[order], EVENT_TYPES),
        "arrival": arrival[order],
        "triage_category": pd.arrays.IntegerArray(np.where(np.isnan(tri), 0, tri).astype(np.int64), np.isnan(tri)),
        "los": np.round(los[order], 2),
        "los_triage": np.round(los_triage[order], 3),
        "age": age[order].astype(np.int64),
        "gender": pd.Categorical.from_codes(gender[order], ["F", "M"]),
        "disposition": pd.Categorical.from_codes(disposition[order], DISPOSITIONS),
    })


def _follow_ons(rng: np.random.Generator, ed_day, ed_los_h, ed_disp, age):
    """Inpatient admissions that follow admitted ED presentations: arrival at ED departure, seeded LOS."""
    adm = (ed_disp == WARD) | (ed_disp == ICU) | (ed_disp == SURGERY)
    n = int(adm.sum())
    icu = ed_disp[adm] == ICU
    surg = ed_disp[adm] == SURGERY
    median_h = np.where(icu, 130.0, np.where(surg, 110.0, 62.0))   # arbitrary; ward ~2.5 days, ICU ~5.5 days
    los = median_h * rng.lognormal(0.0, 0.85, n)
    a = age[adm]
    p_died = np.clip(0.01 + 0.0012 * np.maximum(a - 60, 0) + 0.05 * icu, 0, 0.5)
    u = rng.uniform(size=n)
    disp = np.where(u < p_died, DIED, np.where(u < p_died + 0.05, TRANSFERRED, DISCHARGED))
    # timing uses the ED LOS capped at 48 h: longer KTAS stays are data-entry errors (data.md §7.5)
    day = ed_day[adm] + np.minimum(ed_los_h[adm], 48.0) / 24.0
    return adm, day, los, disp


# ------------------------------------------------------------------------------------------ simulator
def simulate(n_patients: int, seed: int = 0) -> pd.DataFrame:
    """Simulate ``n_patients`` patients' ED presentations and inpatient admissions in the raw QH schema.

    About 5 encounters per patient: 1 + Poisson ED presentations (rate scaled by a gamma frailty and age), an
    inpatient follow-on for each admitted presentation (admission probability by triage level, KTAS anchors,
    higher for older patients in winter) and a few elective admissions. ED arrivals carry a Monday peak, a
    Jun-Aug (southern-hemisphere winter) respiratory surge and a late-morning diurnal peak; elective admissions
    happen on weekday mornings. Gaps are heavy-tailed (lognormal, shorter for frequent attenders). Fully
    vectorised: 1M patients take seconds.
    """
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise ConfigError(f"simulate: n_patients must be a positive int, got {n_patients!r}.")
    rng = np.random.default_rng(seed)
    n = int(n_patients)
    start = int(SIM_START.astype(np.int64))

    # --- patients
    gender = (rng.uniform(size=n) < 0.49).astype(np.int64)          # 0 = F, 1 = M
    child = rng.uniform(size=n) < 0.18
    age0 = np.where(child, rng.uniform(0, 16, n), 16 + 80 * rng.beta(1.6, 1.5, n))
    frailty = rng.gamma(0.9, 1 / 0.9, n) * (0.7 + 0.008 * age0)
    n_ed = 1 + rng.poisson(2.3 * frailty)

    # --- ED presentations: heavy-tailed gaps in operational time, mapped onto the calendar
    pid = np.repeat(np.arange(n), n_ed)
    first = np.concatenate([[0], np.cumsum(n_ed)[:-1]])
    gaps = 75.0 / np.maximum(frailty[pid], 0.2) * rng.lognormal(0.0, 1.2, pid.size)
    t0 = rng.uniform(0, 3 * 365.25, n)                              # first arrival within the first three years
    gaps[first] = 0.0
    cs = np.cumsum(gaps)
    since_first = cs - np.repeat(cs[first], n_ed)
    # squeeze the rare very long histories so the last presentation falls inside the window
    span = since_first[first + n_ed - 1]
    room = (SIM_YEARS * 365.25 - t0) * rng.uniform(0.3, 1.0, n)     # random end: no pile-up on the last day
    squeeze = np.minimum(1.0, room / np.maximum(span, 1e-9))
    tau = np.repeat(t0, n_ed) + since_first * np.repeat(squeeze, n_ed)
    clock = _Clock(start, int(tau.max() * 1.05) + 400, "ED")
    day = np.floor(clock.to_day(tau)) + _hours(rng, pid.size, ED_HOURS) / 24.0
    first_day = np.repeat(day[first], n_ed)
    age = np.floor(age0[pid] + (day - first_day) / 365.25)
    older = age >= 65
    group = np.where(age < 16, 0, np.where(older, 2, 1))
    probs = np.asarray([TRIAGE_P["child"], TRIAGE_P["adult"], TRIAGE_P["older"]])[group]
    triage = _categorical(rng, probs) + 1
    month = (day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12) + 1
    winter = (month >= 6) & (month <= 8)
    p_admit = np.clip(ADMIT_SHARE[triage - 1] * (1 + 0.006 * (age - 50)) + 0.05 * (winter & older), 0, 0.95)
    u = rng.uniform(size=pid.size)
    admitted = u < p_admit
    p_icu = np.array([0.30, 0.08, 0.03, 0.01, 0.0])[triage - 1]
    v = rng.uniform(size=pid.size)
    disp = np.where(v < p_icu, ICU, np.where(v < p_icu + 0.06, SURGERY, WARD))
    w = rng.uniform(size=pid.size)
    p_died = np.where(triage == 1, 0.03, 0.0)
    other = np.where(w < p_died, DIED, np.where(w < p_died + 0.025, LEFT,
                                                 np.where(w < p_died + 0.055, TRANSFERRED, DISCHARGED)))
    ed_disp = np.where(admitted, disp, other)
    ed_los = ED_LOS_MEDIAN_H[triage - 1] * np.where(admitted, 1.3, 1.0) * rng.lognormal(0.0, 0.75, pid.size)
    ed_tri_h = (4.3 / 60.0) * rng.lognormal(0.0, 0.5, pid.size)

    # --- inpatient follow-ons of admitted presentations
    adm, f_day, f_los, f_disp = _follow_ons(rng, day, ed_los, ed_disp, age)
    f_pid = pid[adm]

    # --- elective admissions on weekday mornings, within each patient's active span
    n_el = rng.poisson(0.2 + 0.01 * np.maximum(age0 - 45, 0))
    e_pid = np.repeat(np.arange(n), n_el)
    last_day = day[first + n_ed - 1]
    eclock = _Clock(start, int(last_day.max()) - start + 400, "elective")
    lo_t, hi_t = eclock.to_tau(day[first][e_pid]), eclock.to_tau(last_day[e_pid] + 180.0)
    e_day = np.floor(eclock.to_day(lo_t + rng.uniform(size=e_pid.size) * (hi_t - lo_t)))
    e_day = np.maximum(e_day, np.ceil(day[first][e_pid])) + (7 + 3 * rng.uniform(size=e_pid.size)) / 24.0
    e_los = 28.0 * rng.lognormal(0.0, 0.9, e_pid.size)
    e_age = np.floor(age0[e_pid] + (e_day - day[first][e_pid]) / 365.25)
    x = rng.uniform(size=e_pid.size)
    e_disp = np.where(x < 0.005, DIED, np.where(x < 0.025, TRANSFERRED, DISCHARGED))

    n_f, n_e = f_pid.size, e_pid.size
    nan = np.full(n_f + n_e, np.nan)
    return _frame(
        patient=np.concatenate([pid, f_pid, e_pid]) + 1,
        day=np.concatenate([day, f_day, e_day]),
        event=np.concatenate([np.zeros(pid.size, np.int64), np.ones(n_f + n_e, np.int64)]),
        triage=np.concatenate([triage.astype(float), nan]),
        los=np.concatenate([ed_los, f_los, e_los]),
        los_triage=np.concatenate([ed_tri_h, nan]),
        age=np.concatenate([age, age[adm], e_age]),
        gender=np.concatenate([gender[pid], gender[f_pid], gender[e_pid]]),
        disposition=np.concatenate([ed_disp, f_disp, e_disp]),
    )


# ------------------------------------------------------------------------------------------ bundled sample
KTAS_WINDOW = (np.datetime64("2016-10-01", "D"), np.datetime64("2017-09-30", "D"))   # the KTAS collection year


def make_qh_sample(ktas_csv: str | Path | None = None, seed: int = 0) -> pd.DataFrame:
    """The bundled QH sample: every real KTAS ED record as one ED encounter, plus generated structure.

    Real (KTAS, Moon et al. 2019, CC BY 4.0): ``triage_category`` <- KTAS_expert, ``los`` <- Length of stay_min/60
    (not clipped: the adapter's ``ed_los_clip_hours`` does that), ``los_triage`` <- KTAS duration_min/60,
    ``age`` <- Age, ``gender`` <- Sex (1 F, 2 M), ``disposition`` <- Disposition (relabelled).
    Generated: patient grouping (records with the same sex and age are grouped into patients of ~2.5
    presentations, so ages stay consistent within the one-year window), arrival dates and times (the simulator's
    ED calendar over Oct 2016 - Sep 2017), encounter ids, and an Inpatient follow-on for each admitted
    presentation (disposition 2/3/7) with seeded LOS and disposition.
    """
    path = str(ktas_csv) if ktas_csv is not None else str(Path(__file__).parents[1] / "sample_data" / "ktas_ed"
                                                           / "ktas_triage_en.csv")
    cols = {"Sex": "int", "Age": "int", "Disposition": "int", "KTAS_expert": "int", "Length of stay_min": "float",
            "KTAS duration_min": "float"}
    k = read_csv_checked(path, "KTAS", cols)
    require_not_null(k, list(cols), path, "KTAS")
    rng = np.random.default_rng(seed)
    n = len(k)
    # --- group records into patients within (sex, age) cells
    order = np.lexsort((rng.uniform(size=n), k["Age"].to_numpy(), k["Sex"].to_numpy()))
    k = k.iloc[order].reset_index(drop=True)
    cell = k["Sex"].astype(np.int64).to_numpy() * 1000 + k["Age"].astype(np.int64).to_numpy()
    new_cell = np.concatenate([[True], cell[1:] != cell[:-1]])
    starts = new_cell | (rng.uniform(size=n) < 0.4)
    patient = np.cumsum(starts)
    # --- arrival dates: uniform in operational time over the KTAS year -> ED calendar structure
    lo, hi = (int(d.astype(np.int64)) for d in KTAS_WINDOW)
    clock = _Clock(lo, hi - lo + 1, "ED")
    day = np.floor(clock.to_day(rng.uniform(0, clock.cum[-1], n))) + _hours(rng, n, ED_HOURS) / 24.0
    ed_los = k["Length of stay_min"].to_numpy(dtype=float) / 60.0
    disp = k["Disposition"].astype(np.int64)
    if not disp.between(1, 7).all():
        raise DataError(f"{path}: Disposition has codes outside 1-7: {sorted(set(disp[~disp.between(1, 7)]))}. "
                        "Use the KTAS code book (1 discharge ... 7 surgery).")
    ed_disp = KTAS_DISPOSITION[disp.to_numpy()]
    age = k["Age"].to_numpy(dtype=float)
    gender = (k["Sex"].to_numpy() == 2).astype(np.int64)
    adm, f_day, f_los, f_disp = _follow_ons(rng, day, ed_los, ed_disp, age)
    nf = int(adm.sum())
    nan = np.full(nf, np.nan)
    return _frame(
        patient=np.concatenate([patient, patient[adm]]),
        day=np.concatenate([day, f_day]),
        event=np.concatenate([np.zeros(n, np.int64), np.ones(nf, np.int64)]),
        triage=np.concatenate([k["KTAS_expert"].to_numpy(dtype=float), nan]),
        los=np.concatenate([ed_los, f_los]),
        los_triage=np.concatenate([k["KTAS duration_min"].to_numpy(dtype=float) / 60.0, nan]),
        age=np.concatenate([age, age[adm]]),
        gender=np.concatenate([gender, gender[adm]]),
        disposition=np.concatenate([ed_disp, f_disp]),
    )


def write_encounters(df: pd.DataFrame, path: str | Path) -> str:
    """Write an encounters frame as CSV (pyarrow writer: fast, deterministic bytes), atomically."""
    table = pa.Table.from_pandas(df[RAW_COLUMNS], preserve_index=False)
    buf = pa.BufferOutputStream()
    pacsv.write_csv(table, buf, write_options=pacsv.WriteOptions(quoting_style="needed"))
    storage.write_bytes(str(path), buf.getvalue().to_pybytes())
    return str(path)


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
                          "Fix those rows in the export (see synthehr_core/datasets/qh.py for the schema).")

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m synthehr_core.datasets.qh",
                                 description="Write the bundled QH sample or a simulated extract as encounters.csv.")
    ap.add_argument("--write-sample", metavar="DIR", help="build the sample from the bundled KTAS data")
    ap.add_argument("--simulate", metavar="DIR", help="write a simulated extract")
    ap.add_argument("--n-patients", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not (a.write_sample or a.simulate):
        ap.error("give --write-sample DIR or --simulate DIR")
    if a.write_sample:
        print(write_encounters(make_qh_sample(seed=a.seed), storage.join(a.write_sample, "encounters.csv")))
    if a.simulate:
        print(write_encounters(simulate(a.n_patients, a.seed), storage.join(a.simulate, "encounters.csv")))


if __name__ == "__main__":
    main()

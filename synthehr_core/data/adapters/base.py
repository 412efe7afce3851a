"""What every dataset adapter returns, and the checked CSV reader they share.

An adapter is one function ``load(raw, options, report) -> RawCohort`` in ``synthehr_core/data/adapters/<name>.py``.
It reads the raw extract, validates it, and returns three tidy frames; everything else (visit order, offsets,
gaps, binning, split, vocabulary, parquet) is done once, for every dataset, by ``synthehr_core.data.preprocess``.
"""
from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from ... import storage
from ...errors import DataError, SchemaError, bullet_list

log = logging.getLogger(__name__)


@dataclass
class RawCohort:
    """Adapter output.

    patients: ``patient_id`` (str) plus static columns (categorical as str, continuous as float).
    visits:   ``patient_id`` (str), ``visit_id`` (str, unique), ``start`` (float days since 1970-01-01 in the
              dataset's own, possibly shifted, calendar), ``event_type`` (str), plus continuous columns (float).
    codes:    ``visit_id`` (str), ``code`` (str, namespaced like ``dx:4019``).
    """

    patients: pd.DataFrame
    visits: pd.DataFrame
    codes: pd.DataFrame
    source_rows: dict[str, int] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)   # counts worth a look (e.g. code strings under two versions); meta.json


@dataclass
class DropReport:
    """Counts of rows dropped on purpose, with a reason each; written to meta.json and logged."""

    counts: Counter = field(default_factory=Counter)

    def drop(self, table: str, reason: str, n: int) -> None:
        if n:
            self.counts[f"{table}: {reason}"] += int(n)
            log.warning("dropped %d %s rows: %s", n, table, reason)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def resolve_file(raw: str, stem: str, suffixes: Iterable[str] = (".csv", ".csv.gz")) -> str:
    """Find ``<raw>/<stem><suffix>`` for the first suffix that exists, trying upper and lower case stems."""
    tried = []
    for name in dict.fromkeys([stem, stem.upper(), stem.lower()]):
        for suf in suffixes:
            p = storage.join(raw, name + suf)
            tried.append(Path(p).name)
            if storage.exists(p):
                return p
    raise FileNotFoundError(f"{raw}: no {stem} table found (tried {', '.join(tried)}). "
                            "Point the config's `raw` path at the directory that holds the extract.")


HEADER_BYTES = 1 << 16     # the header line of a raw table must fit in the first 64 KiB


def _gzip_error(path: str, exc: BaseException) -> DataError:
    if isinstance(exc, EOFError):
        return DataError(f"{path}: the gzip file ends early ({exc}): a truncated copy or download. Copy the "
                         "file again (or pass the uncompressed .csv).")
    return DataError(f"{path}: not a valid gzip file ({exc}). Re-download it or pass the .csv.")


def _utf8_error(path: str, raw: bytes, exc: UnicodeDecodeError) -> DataError:
    line = raw[: exc.start].count(b"\n") + 1
    return DataError(f"{path}: byte {exc.start} (line {line}) is not valid UTF-8 "
                     f"({raw[exc.start:exc.start + 8]!r}). Re-export the file as UTF-8 "
                     "(e.g. `iconv -f latin1 -t utf-8`).")


def _names(columns: Iterable[str], limit: int = 30) -> str:
    cols = sorted(str(c)[:60] for c in columns)
    return f"{cols[:limit]}{f' and {len(cols) - limit} more' if len(cols) > limit else ''}"


def check_header(path: str, table: str, required: Iterable[str], *, sep: str = ",",
                 normalise_case: bool = False) -> list[str] | None:
    """Read only the first line of a local raw CSV (``.csv`` or ``.csv.gz``) and check its columns, so a wrong
    or garbage file fails in milliseconds, not after being parsed whole. Returns the header (None for a
    non-local path: an object-store file is checked after it is read)."""
    import csv
    import gzip

    if storage.is_gcs(path) or "://" in str(path) or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        try:
            head = gzip.GzipFile(fileobj=f).read(HEADER_BYTES) if str(path).endswith(".gz") else f.read(HEADER_BYTES)
        except (OSError, EOFError) as exc:
            raise _gzip_error(path, exc) from exc
    if not head.strip():
        raise DataError(f"{path}: the {table} table is empty (0 bytes of data). Check the export.")
    end = head.find(b"\n")
    if end < 0 and len(head) == HEADER_BYTES:
        raise DataError(f"{path}: the first {HEADER_BYTES // 1024} KiB hold no line break, so there is no header "
                        f"line: this is not a CSV {table} table. Check the file.")
    line = head if end < 0 else head[:end]
    try:
        text = line.decode("utf-8").removeprefix("\ufeff").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, head, exc) from exc
    header = next(csv.reader([text], delimiter=sep), [])
    names = [h.lower() for h in header] if normalise_case else header
    missing = [c for c in required if c not in names]
    if missing:
        raise SchemaError(f"{path}: {table} table lacks column(s) {missing}; found {_names(names)}."
                          + (" Headers are matched case-insensitively." if normalise_case else ""))
    return header


def read_csv_checked(path: str, table: str, required: dict[str, str], *, sep: str = ",",
                     normalise_case: bool = False, nrows: int | None = None) -> pd.DataFrame:
    """Read a CSV with clear errors for the usual raw-data problems.

    ``required`` maps column -> kind ('str', 'int', 'float', 'datetime'). The header line is checked first
    (:func:`check_header`), before the file is read whole. Columns are read as strings first so codes keep
    leading zeros; each required column is then converted, and a failed conversion names the column and shows
    bad values. Non-UTF-8 bytes, empty or truncated files, missing columns and NaN in id columns are errors.
    """
    check_header(path, table, required, sep=sep, normalise_case=normalise_case)
    raw = storage.read_bytes(path)
    if path.endswith(".gz"):
        import gzip

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise _gzip_error(path, exc) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, raw, exc) from exc
    if not text.strip():
        raise DataError(f"{path}: the {table} table is empty (0 bytes of data). Check the export.")
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[""], nrows=nrows)
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: could not parse the {table} table as CSV: {exc}") from exc
    return convert_checked(df, path, table, required, normalise_case=normalise_case)


def convert_checked(df: pd.DataFrame, path: str, table: str, required: dict[str, str], *,
                    normalise_case: bool = False) -> pd.DataFrame:
    """The checks of :func:`read_csv_checked` on a frame of strings (also used for parquet files)."""
    if normalise_case:
        lowered = {c: c.lower() for c in df.columns}
        if any(c != c.lower() for c in df.columns):
            log.info("%s: normalised %d upper-case headers to lower case", path, sum(c != c.lower() for c in df.columns))
        df = df.rename(columns=lowered)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SchemaError(f"{path}: {table} table lacks column(s) {missing}; found {_names(df.columns)}."
                          + (" Headers are matched case-insensitively." if normalise_case else ""))
    if df.empty:
        raise DataError(f"{path}: the {table} table has a header but no rows. Check the export.")
    problems = []
    for col, kind in required.items():
        s = df[col]
        if kind == "str":
            continue
        if kind == "datetime":
            conv = pd.to_datetime(s, errors="coerce", format="mixed")
        else:
            conv = pd.to_numeric(s, errors="coerce")
            if kind == "int":
                frac = conv.notna() & (conv % 1 != 0)
                conv = conv.where(~frac)
        bad = s.notna() & conv.isna()
        if bad.any():
            problems.append(f"column {col!r} should be {kind} but has {int(bad.sum())} values that are not, "
                            f"e.g. {s[bad].head(3).tolist()}")
        df[col] = conv
    if problems:
        raise SchemaError(f"{path}: wrong types in the {table} table:\n{bullet_list(problems)}")
    return df


def require_not_null(df: pd.DataFrame, cols: Iterable[str], path: str, table: str) -> None:
    problems = [f"column {c!r} has {int(df[c].isna().sum())} empty values (rows {df.index[df[c].isna()][:3].tolist()})"
                for c in cols if df[c].isna().any()]
    if problems:
        raise DataError(f"{path}: required fields are empty in the {table} table:\n{bullet_list(problems)}\n"
                        "Fill or remove those rows before preprocessing.")


def require_unique(df: pd.DataFrame, col: str, path: str, table: str) -> None:
    dup = df[col][df[col].duplicated()]
    if len(dup):
        raise DataError(f"{path}: {table}.{col} must be unique but {len(dup)} ids repeat, e.g. "
                        f"{dup.head(3).tolist()}. Remove the duplicate rows.")

"""Reading report files written by someone else: one-line errors, safe file names.

The report readers (``lmcompose report``, ``compare``, ``findings``) take
folders that may have been fetched from a shared bucket, edited by hand or
cut short.  Whatever is in them must either be read as what the writer meant
or be refused with **one line** that names the file and, where there is one,
the row and column -- never a traceback, never a silently coerced value
(``"abc"`` read as NaN, ``inf`` plotted, ``7`` taken as an accuracy), and
never a file written where the data says rather than under ``--out``.

* :class:`InputError` -- the one-line refusal (a ``ValueError``); the CLI
  prints it and exits with status 2.
* :func:`safe_name` / :func:`file_name` / :func:`output_path` -- a file name
  built from data (a criterion, a model label, a method, a pair) is used
  only if it is a plain name: letters, digits and ``_ . + = -``, starting
  with a letter or digit, at most :data:`MAX_NAME` characters -- so
  ``../../x``, ``/abs/path`` and a 300-character name are refused, and the
  joined path is checked to stay inside its output folder.
* :func:`read_csv` / :func:`read_json` -- a missing, empty, binary or
  unparsable file is one line naming it.
* :func:`check_numbers` / :func:`check_names` -- a column's cells are
  numbers in a range (finite unless told otherwise; empty cells allowed
  where the schema allows NaN) or safe names; the first bad cell is named
  by ``file: row N, column C`` where rows count as a spreadsheet shows them
  (the header is row 1, the first data row is row 2).
* :func:`output_folder` / :func:`output_file` -- ``--out`` checked before any
  work: a folder must not be an existing file, a file must not be a folder
  and its folder must exist.

No torch, no KFP: every reader imports it freely.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: longest name taken from data into a file name (three of them and the fixed parts stay under 255 bytes)
MAX_NAME = 64
#: longest file name any report writes (ext4, APFS, NTFS: 255)
MAX_FILE_NAME = 255

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")


class InputError(ValueError):
    """A malformed or hostile input (or an unusable ``--out``): one line naming the file, row and column."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever was interpolated


def show(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters with its length noted -- for messages quoting data."""
    text = repr(value)
    if len(text) <= limit:
        return text
    n = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}... ({n} characters)"


def where(path: str | Path, row: int | None = None, column: str | None = None) -> str:
    """``results.csv: row 5, column edit_success``; ``row`` is a 0-based data-row index, shown as a spreadsheet row."""
    loc = ([f"row {row + 2}"] if row is not None else []) + ([f"column {column}"] if column is not None else [])
    return str(path) + (": " + ", ".join(loc) if loc else "")


# --------------------------------------------------------------------------- names


def is_safe_name(text: Any) -> bool:
    return isinstance(text, str) and len(text) <= MAX_NAME and _NAME.fullmatch(text) is not None


def safe_name(text: Any, what: str) -> str:
    """``text`` if it can be (part of) a file name as it is; else :class:`InputError` naming ``what``."""
    if is_safe_name(text):
        return text
    if not isinstance(text, str) or not text:
        raise InputError(f"{what}: {show(text)} is not a name")
    if not _NAME.fullmatch(text):
        raise InputError(f"{what}: {show(text)} cannot be part of a file name (letters, digits and _ . + = - only, "
                         "starting with a letter or digit)")
    raise InputError(f"{what}: name {show(text)} is longer than {MAX_NAME} characters")


def file_name(*parts: str, suffix: str = "", what: str = "file name") -> str:
    """``parts`` (each a :func:`safe_name`) joined by ``__``, plus a fixed ``suffix`` such as ``.png``."""
    name = "__".join(safe_name(part, what) for part in parts) + suffix
    if len(name.encode()) > MAX_FILE_NAME:
        raise InputError(f"{what}: {show(name)} is longer than {MAX_FILE_NAME} bytes")
    return name


def output_path(folder: str | Path, name: str, what: str = "file name") -> Path:
    """``folder / name`` after checking that the result (symbolic links resolved) stays inside ``folder``."""
    folder = Path(folder)
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise InputError(f"{what}: {show(name)} would be written outside {folder}")
    return path


# --------------------------------------------------------------------------- outputs


def output_folder(path: str | Path, what: str = "--out") -> Path:
    """``path`` checked as an output folder (not created): it, or the nearest part of it that exists, is a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path}: exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {path}: {parent} is a file, not a folder")
            break
    return path


def output_file(path: str | Path, what: str = "--out") -> Path:
    """``path`` as an output file: not a folder, and its folder must exist."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path}: is a folder, not a file")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: folder {parent} does not exist")
    return path


@contextmanager
def writing(what: str):
    """Turn an ``OSError`` while writing outputs into one line (disk full, permission, name too long)."""
    try:
        yield
    except OSError as exc:
        target = f" {exc.filename}" if exc.filename else ""
        raise InputError(f"{what}: cannot write{target}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- reading


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} {path}: no such file")
    if not path.is_file():
        raise InputError(f"{what} {path}: not a file")


def read_csv(path: str | Path, what: str = "table", **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv(path, **kwargs)`` with a missing, empty, binary or unparsable file as one :class:`InputError`."""
    path = Path(path)
    _check_readable(path, what)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if not head.strip():
        raise InputError(f"{what} {path}: empty file (no header row)")
    if b"\x00" in head:
        raise InputError(f"{what} {path}: binary content, not a CSV table")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise InputError(f"{what} {path}: not UTF-8 text (byte {exc.start}), not a CSV table") from None
    if head.startswith(b"\xef\xbb\xbf"):  # saved by a spreadsheet: the byte-order mark is not part of a column name
        kwargs.setdefault("encoding", "utf-8-sig")
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{what} {path}: not a CSV table ({first})") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """The JSON document in ``path``; a missing, binary or invalid file as one :class:`InputError`."""
    path = Path(path)
    _check_readable(path, what)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {exc.start}), not JSON") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise InputError(f"{what} {path}: JSON nested too deeply") from None


def require_columns(df: pd.DataFrame, path: str | Path, columns: Iterable[str], what: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}" + (f" ({what})" if what else ""))


def _is_empty(value: Any) -> bool:
    """None or a blank string (an empty CSV cell, which pandas reads as NaN, is handled as NaN)."""
    return value is None or (isinstance(value, str) and not value.strip())


def to_number(value: Any) -> float | None:
    """``value`` as a float, ``None`` where it is not a number (booleans are not numbers; an overflow is inf)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, float, np.number)):
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def check_number(value: Any, at: str, *, lo: float | None = None, hi: float | None = None, allow_nan: bool = True,
                 integer: bool = False, lo_open: bool = False, text: bool = True) -> float:
    """One value: a number (or empty / NaN, where allowed) in ``lo..hi``; else :class:`InputError` at ``at``.

    ``lo_open`` excludes ``lo`` itself; ``text=False`` (JSON) refuses a
    number written as a string.
    """
    if not text and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise InputError(f"{at}: {show(value)} is not a number")
    if _is_empty(value):
        if allow_nan:
            return math.nan
        raise InputError(f"{at}: empty, a number is needed")
    f = to_number(value)
    if f is None:
        raise InputError(f"{at}: {show(value)} is not a number")
    if math.isnan(f):
        if allow_nan:
            return f
        raise InputError(f"{at}: NaN, a finite number is needed")
    if math.isinf(f):
        raise InputError(f"{at}: {show(value)} is not a finite number")
    if integer and f != int(f):
        raise InputError(f"{at}: {show(value)} is not a whole number")
    if (lo is not None and (f < lo or (lo_open and f == lo))) or (hi is not None and f > hi):
        if lo is not None and hi is not None:
            span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo is not None:
            span = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            span = f"<= {hi:g}"
        raise InputError(f"{at}: {show(value)} is out of range (must be {span})")
    return f


def check_numbers(df: pd.DataFrame, path: str | Path, column: str, **kw: Any) -> None:
    """Every cell of ``column`` passes :func:`check_number`; the first that does not is named by row and column."""
    if column not in df.columns:
        return
    for i, value in enumerate(df[column].tolist()):
        check_number(value, where(path, i, column), **kw)


def check_names(df: pd.DataFrame, path: str | Path, column: str, allow_empty: bool = True) -> None:
    """Every non-empty cell of ``column`` is a :func:`safe_name` (it may become part of a file name)."""
    if column not in df.columns:
        return
    for i, value in enumerate(df[column].tolist()):
        if allow_empty and (_is_empty(value) or (isinstance(value, float) and math.isnan(value))):
            continue
        safe_name(value, where(path, i, column))


__all__ = [
    "InputError",
    "MAX_NAME",
    "check_names",
    "check_number",
    "check_numbers",
    "file_name",
    "is_safe_name",
    "output_file",
    "output_folder",
    "output_path",
    "read_csv",
    "read_json",
    "require_columns",
    "safe_name",
    "show",
    "where",
    "writing",
]

"""Load preference rows from files, saved datasets or the Hugging Face Hub.

:func:`load_rows` accepts

* ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are ignored;
* ``.json``: a list of objects, or an object holding the list under the split name, ``"data"`` or
  ``"train"`` (a ``.json`` file that is really JSON Lines is read as such);
* ``.parquet`` / ``.pq``, ``.csv`` and ``.tsv`` (CSV cells are strings; a header row is required);
* a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then
  ``split`` picks the split);
* anything else that is not an existing path is taken as a Hub dataset name and passed to
  ``datasets.load_dataset(name, split=split)``.

Each row keeps where it came from: :attr:`Row.index` is the line number for JSON Lines
(``unit="line"``) and the 1-based record number otherwise (for CSV the header does not count).

A row needs ``chosen`` and ``rejected`` columns; ``prompt`` is optional (without it the prompt is
implicit, see :mod:`poise.data.formats`). ``columns`` maps these names to the file's own, e.g.
``columns={"prompt": "question", "chosen": "good", "rejected": "bad"}``.

Every problem (missing file, non-UTF-8 bytes, a broken line, an empty file, a missing column) is a
:class:`~poise.errors.DataError` that names the file, the line or row, and what to do.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.errors import ConfigError, DataError

#: Our column names; ``columns`` maps them to a file's column names.
COLUMNS = ("prompt", "chosen", "rejected")
REQUIRED_COLUMNS = ("chosen", "rejected")

_JSONL = (".jsonl", ".ndjson")
_SUFFIXES = {
    **dict.fromkeys(_JSONL, "jsonl"),
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}

Records = list[tuple[int, dict[str, Any]]]


@dataclass(frozen=True)
class Row:
    """One preference record and where it came from.

    Attributes:
        source: the file path or dataset name as given to :func:`load_rows`.
        index: 1-based position in the source (the line number for JSON Lines).
        data: the record, with columns renamed to ``prompt``/``chosen``/``rejected``.
        unit: ``"line"`` or ``"row"``: what ``index`` counts.
    """

    source: str
    index: int
    data: dict = field(hash=False)
    unit: str = "row"

    @property
    def where(self) -> str:
        """``"prefs.jsonl, line 7"``: the location used in error messages."""
        return f"{self.source}, {self.unit} {self.index}"


def load_rows(
    source: str | os.PathLike,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
    required: Iterable[str] = REQUIRED_COLUMNS,
) -> list[Row]:
    """Read preference rows from a file, a saved dataset folder or a Hub dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet``/``.csv``/``.tsv`` file, a ``save_to_disk``
            folder, or a Hub dataset name.
        split: the split to take from a ``DatasetDict`` folder, a Hub dataset, or a JSON object
            keyed by split.
        columns: maps ``prompt``/``chosen``/``rejected`` to the source's column names.
        required: the columns every source must have (``()`` for prompt/response files).

    Raises:
        DataError: the source is missing, unreadable, empty, or lacks a needed column.
        ConfigError: ``columns`` names something other than prompt/chosen/rejected.
    """
    mapping = _check_mapping(columns)
    name = os.fspath(source)
    path = Path(name).expanduser()
    unit = "row"
    if path.is_dir():
        records = _read_saved_dataset(path, name, split)
    elif path.is_file():
        records, unit = _read_file(path, name, split)
    elif _looks_like_path(name):
        raise _missing_file(path, name)
    else:
        records = _read_hub(name, split)
    if not records:
        raise DataError(
            f"{name}: the source holds no rows. Point the data path at a file with preference rows."
        )
    rows = [Row(name, index, data, unit) for index, data in records]
    return _apply_columns(rows, mapping, name, tuple(required))


def _check_mapping(columns: dict[str, str] | None) -> dict[str, str]:
    mapping = dict(columns or {})
    for ours, theirs in mapping.items():
        if ours not in COLUMNS:
            raise ConfigError(
                f"columns: unknown name '{ours}'. Map only {', '.join(COLUMNS)} to your file's column "
                f"names, e.g. columns: {{prompt: question, chosen: good, rejected: bad}}."
            )
        if not isinstance(theirs, str):
            raise ConfigError(f"columns: '{ours}' must map to a column name (a string), got {theirs!r}.")
    return mapping


def _looks_like_path(name: str) -> bool:
    """Whether a non-existent ``name`` was meant as a local path rather than a Hub dataset."""
    path = Path(name).expanduser()
    if path.suffix.lower() in _SUFFIXES or name.startswith((".", "~", "/")) or os.path.isabs(name):
        return True
    return ("/" in name or os.sep in name) and path.parent.is_dir() and str(path.parent) != "."


def _missing_file(path: Path, name: str) -> DataError:
    hint = ""
    if path.parent.is_dir():
        close = difflib.get_close_matches(path.name, os.listdir(path.parent), n=1)
        if close:
            hint = f" Did you mean '{path.parent / close[0]}'?"
    return DataError(
        f"{name}: no such file or folder (looked in {path.resolve().parent}).{hint} "
        f"Check the data path; relative paths start from the working directory {os.getcwd()}."
    )


def _read_file(path: Path, name: str, split: str) -> tuple[Records, str]:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{name}: unknown file type '{path.suffix}'. Use .jsonl, .json, .parquet, .csv or .tsv, "
            f"or a folder written by datasets' save_to_disk."
        )
    if path.stat().st_size == 0:
        raise DataError(f"{name}: the file is empty. Point the data path at a file with preference rows.")
    if kind == "jsonl":
        return _read_jsonl(path, name), "line"
    if kind == "parquet":
        return _read_parquet(path, name), "row"
    text = _read_text(path, name)
    if not text.strip():
        raise DataError(f"{name}: the file is empty. Point the data path at a file with preference rows.")
    if kind == "json":
        return _read_json(path, name, text, split)
    return _read_csv(name, text, "\t" if kind == "tsv" else ","), "row"


def _read_text(path: Path, name: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise _not_utf8(name, line, raw[err.start], err.start) from None


def _not_utf8(name: str, line: int, byte: int, offset: int) -> DataError:
    return DataError(
        f"{name}, line {line}: not valid UTF-8 (byte 0x{byte:02x} at offset {offset}). "
        f"Re-save the file as UTF-8 (for example with iconv -f latin1 -t utf-8)."
    )


def _read_jsonl(path: Path, name: str) -> Records:
    records: Records = []
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(name, number, raw[err.start], offset + err.start) from None
            offset += len(raw)
            if line.strip():
                records.append((number, _parse_jsonl_line(line, name, number)))
    if not records:
        raise DataError(
            f"{name}: the file has only blank lines. Point the data path at a file with preference rows."
        )
    return records


def _parse_jsonl_line(line: str, name: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{name}, line {number}: not valid JSON ({err.msg}, column {err.colno}). Fix or delete the line."
        ) from None
    if not isinstance(value, dict):
        raise DataError(
            f'{name}, line {number}: expected a JSON object ({{"prompt": ..., "chosen": ..., '
            f'"rejected": ...}}), got {_json_type(value)}. Fix or delete the line.'
        )
    return value


def _read_json(path: Path, name: str, text: str, split: str) -> tuple[Records, str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, name), "line"  # JSON Lines under a .json name
        raise DataError(
            f"{name}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno}). Fix the file."
        ) from None
    items = _json_items(value, name, split)
    records: Records = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(
                f"{name}, row {number}: expected a JSON object with prompt/chosen/rejected, got "
                f"{_json_type(item)}. Fix the row."
            )
        records.append((number, item))
    return records, "row"


def _json_items(value: Any, name: str, split: str) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key in (split, "data", "train"):
            if isinstance(value.get(key), list):
                return value[key]
        keys = ", ".join(map(repr, list(value)[:8]))
        raise DataError(
            f"{name}: expected a list of rows, or an object with the list under '{split}', 'data' or "
            f"'train'; found an object with keys {keys}. Restructure the file or convert it to JSON Lines."
        )
    raise DataError(
        f"{name}: expected a list of rows, got {_json_type(value)}. Convert the file to JSON Lines."
    )


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_csv(name: str, text: str, delimiter: str) -> Records:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            raise DataError(f"{name}: no header row. The first line must name the columns.")
        return [(number, dict(record)) for number, record in enumerate(reader, start=1)]
    except csv.Error as err:
        raise DataError(f"{name}, line {reader.line_num}: not valid CSV ({err}). Fix the line.") from None


def _read_parquet(path: Path, name: str) -> Records:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{name}: not a readable Parquet file ({err}). Re-export the file.") from None
    return list(enumerate(table.to_pylist(), start=1))


def _read_saved_dataset(path: Path, name: str, split: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # FileNotFoundError for a plain folder, others for damaged ones
        raise DataError(
            f"{name}: a folder, but not one written by datasets' save_to_disk ({err}). Point the data "
            f"path at a .jsonl/.json/.parquet/.csv file or at a saved dataset folder."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{name}: no split '{split}' (splits: {', '.join(loaded)}). Set split to one of them."
            )
        loaded = loaded[split]
    return _enumerate(loaded)


def hub_dataset_name(source: str | os.PathLike) -> bool:
    """Whether ``source`` would be read as a Hub dataset name (neither a local path nor meant as one)."""
    name = os.fspath(source)
    return not Path(name).expanduser().exists() and not _looks_like_path(name)


def _check_hub_dataset(name: str) -> None:
    """One request to the Hub before ``load_dataset`` (which retries an unreachable Hub for half a minute,
    printing each retry): a name the Hub does not have, or a Hub that cannot be reached, is one message."""
    import logging

    from huggingface_hub import HfApi, constants

    logging.getLogger("huggingface_hub").propagate = False  # its own handler prints its warnings; not twice
    offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        return  # datasets looks in its cache only, and says so
    try:
        HfApi().dataset_info(name, timeout=10)
    except Exception as err:  # the Hub's HTTP errors, or no connection (several libraries' types)
        kind = type(err).__name__
        if kind == "RepositoryNotFoundError":
            raise DataError(
                f"{name}: no such file or folder here ({Path(name).resolve()}), and the Hugging Face Hub has "
                f"no dataset {name!r} (or it is private: log in with `hf auth login`). Check the path or the name."
            ) from None
        if kind in ("GatedRepoError", "HfHubHTTPError"):
            return  # load_dataset explains these itself
        raise DataError(
            f"{name}: no such file or folder here ({Path(name).resolve()}), and the Hugging Face Hub cannot be "
            f"reached to fetch a dataset of that name ({kind}: {err}). Check the path (relative paths start "
            f"from {os.getcwd()}), or the network."
        ) from None


def _read_hub(name: str, split: str) -> Records:
    import datasets

    _check_hub_dataset(name)
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing dataset, missing split, ...
        raise DataError(
            f"{name}: not a local file or folder, and loading it as a Hugging Face Hub dataset failed "
            f"({type(err).__name__}: {err}). Check the path, or the dataset name, split and network access."
        ) from None
    return _enumerate(loaded)


def _enumerate(rows: Iterable[dict[str, Any]]) -> Records:
    return list(enumerate(rows, start=1))


def _apply_columns(rows: list[Row], mapping: dict[str, str], name: str,
                   required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[Row]:
    available = list(dict.fromkeys(key for row in rows for key in row.data))
    for ours, theirs in mapping.items():
        if theirs not in available:
            raise _missing_column(name, ours, theirs, available, mapped=True)
    for ours in required:
        if mapping.get(ours, ours) not in available:
            raise _missing_column(name, ours, ours, available, mapped=False)
    if not mapping:
        return rows
    renamed = set(mapping.values())
    result = []
    for row in rows:
        data = {key: value for key, value in row.data.items() if key not in renamed}
        data.update({ours: row.data.get(theirs) for ours, theirs in mapping.items()})
        result.append(Row(row.source, row.index, data, row.unit))
    return result


def _missing_column(name: str, ours: str, theirs: str, available: list[str], *, mapped: bool) -> DataError:
    found = ", ".join(f"'{column}'" for column in available) or "none"
    close = difflib.get_close_matches(theirs, [str(column) for column in available], n=1, cutoff=0.5)
    guess = close[0] if close else "your_column"
    suggestion = f" Did you mean '{close[0]}'?" if close else ""
    if mapped:
        head = f"{name}: columns maps '{ours}' to '{theirs}', but there is no column '{theirs}'"
    else:
        head = f"{name}: no column '{ours}'"
    return DataError(
        f"{head} (columns found: {found}).{suggestion} If the file names it differently, map it with "
        f"columns: {{{ours}: {guess}}} (in Python: columns={{'{ours}': '{guess}'}})."
    )

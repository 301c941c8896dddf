"""Data files: where the default text is, reading a file as UTF-8 text, and JSON or JSON-lines rows."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError
from .records import BadRow, DataReport

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


def default_data_path() -> Path:
    """The bundled training text (Shakespeare, public domain), used when no data is given."""
    return Path(str(resources.files("adaptune").joinpath("resources").joinpath("shakespeare.txt")))


def check_data_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a file; DataError saying what it is otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a data file inside it (text or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    return path


def read_text(path: Path) -> str:
    """The file as text; DataError for missing, empty or non-UTF-8 files (the usual user slips)."""
    check_data_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (bad byte 0x{raw[err.start]:02x} at offset "
                        f"{err.start}); re-save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def is_json_file(path: Path) -> bool:
    return path.suffix.lower() in JSON_SUFFIXES


def json_rows(path: Path, text: str, report: DataReport) -> list[tuple[int, Any]]:
    """(line or item number, parsed value) per row; rows that are not JSON hold a ``BadRow``."""
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None  # not one document: read it as JSON lines below
        if isinstance(whole, list):
            report.line_unit = "item"
            return [(i + 1, row) for i, row in enumerate(whole)]
        if whole is not None:
            return [(1, whole)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing and are not rows
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            rows.append((number, BadRow("invalid JSON")))
        except RecursionError:
            rows.append((number, BadRow("JSON nested too deeply")))
    return rows

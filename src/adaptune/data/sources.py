"""Where training rows come from: a local file (txt, json, jsonl, csv, parquet, arrow), a folder
written by ``datasets``' ``save_to_disk``, or a Hugging Face hub dataset id; with the renames that
map a dataset's column names onto adaptune's.

Tables, ``save_to_disk`` folders and hub datasets are read through the ``datasets`` library (local
tables as a stream: no copy in its cache). Text and JSON files are read by adaptune itself, so that
each line that is not JSON is a counted bad row rather than an error for the whole file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .files import default_data_path, is_json_file
from .records import BadRow

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
DATA_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".ndjson", *TABLE_SUFFIXES)
COLUMN_NAMES = ("text", "prompt", "completion", "messages", "tools", "conversations", "system",
                "instruction", "input", "output", "chosen", "rejected", "label")  # the last three: preference rows
SOURCE_KEYS = ("path", "weight", "format", "columns", "split", "config")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# what a source is: how its rows are read
TEXT, JSON, DISK, HUB = "text", "json", "disk", "hub"


@dataclass
class DataSource:
    """One place to read rows from, with how to read them.

    ``columns`` maps adaptune's names to the data's (``{"prompt": "question"}``: the ``question``
    column is the prompt). ``split`` and ``config`` choose inside a hub dataset or a saved
    ``DatasetDict``; ``weight`` is the source's share of a mixture.
    """

    path: str
    fmt: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    config: str | None = None
    weight: float | None = None
    kind: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.path = str(self.path)
        self.columns = parse_columns(self.columns)
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                        or not math.isfinite(self.weight) or self.weight <= 0):
            raise ConfigError(f"{self.path}: weight must be a positive number, got {self.weight!r}")
        self.kind = source_kind(self.path, self.fmt)

    @property
    def name(self) -> str:
        """How reports name it: the file's name, or the hub id with its config and split."""
        if self.kind == HUB:
            extra = [x for x in (self.config, self.split) if x]
            return self.path + (f" ({', '.join(extra)})" if extra else "")
        return Path(self.path).name or self.path

    @property
    def line_unit(self) -> str:
        return "line" if self.kind in (TEXT, JSON) else "row"


def looks_like_hub_id(text: str) -> bool:
    """``name`` or ``owner/name`` that is not a data file's name (a missing ``x.jsonl`` is a typo)."""
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(DATA_SUFFIXES) and ".." not in text


def is_saved_dataset(folder: Path) -> bool:
    """A folder ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def source_kind(path: str, fmt: str | None) -> str:
    """How to read ``path``; DataError for a folder that is not a saved dataset, or a missing file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if is_saved_dataset(p):
            return DISK
        raise DataError(f"{path}: is a folder but not one written by datasets' save_to_disk; pass a data file "
                        "inside it (text, jsonl, csv, parquet, arrow) or a saved dataset folder")
    if p.is_file():
        if p.suffix.lower() in TABLE_SUFFIXES:
            return TABLE_SUFFIXES[p.suffix.lower()]
        return JSON if is_json_file(p) or fmt not in (None, "text") else TEXT
    if looks_like_hub_id(path):
        return HUB
    raise DataError(f"{path}: no such data file")


def parse_columns(value: str | dict | None) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` (or the same as a mapping) -> {adaptune name: column}."""
    if not value:
        return {}
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            target, sep, column = item.partition("=")
            if not sep or not target.strip() or not column.strip():
                raise ConfigError(f"--columns takes name=column pairs separated by commas "
                                  f"(e.g. prompt=question,completion=answer), got {item!r}")
            pairs.append((target.strip(), column.strip()))
        value = dict(pairs)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"columns must map adaptune names to column names, got {value!r:.80}")
    unknown = sorted(set(value) - set(COLUMN_NAMES))
    if unknown:
        raise ConfigError(f"--columns: {', '.join(unknown)} is not one of adaptune's names "
                          f"({', '.join(COLUMN_NAMES)})")
    return dict(value)


def parse_sources(data: Any, fmt: str | None = None, columns: str | dict | None = None,
                  split: str | None = None, config: str | None = None) -> list[DataSource]:
    """The job's ``data`` (None, a path or id, or a list of them / of mappings with per-source
    options) as sources; the other arguments are the defaults each source may override."""
    if data is None:
        return [DataSource(str(default_data_path()), fmt, columns or {}, split, config)]
    if isinstance(data, (str, os.PathLike)):
        return [DataSource(str(data), fmt, columns or {}, split, config)]
    if not isinstance(data, (list, tuple)) or not data:
        raise ConfigError("data must be a path, a hub dataset id, or a non-empty list of sources")
    sources = []
    for item in data:
        if isinstance(item, DataSource):
            sources.append(item)
            continue
        if isinstance(item, (str, os.PathLike)):
            item = {"path": str(item)}
        if not isinstance(item, dict) or "path" not in item:
            raise ConfigError(f"each source in data needs a path (a file, folder or hub id), got {item!r:.80}")
        unknown = sorted(set(item) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"data source {item['path']}: unknown keys {', '.join(unknown)} "
                              f"(known: {', '.join(SOURCE_KEYS)})")
        sources.append(DataSource(item["path"], item.get("format", fmt), item.get("columns", columns) or {},
                                  item.get("split", split), item.get("config", config), item.get("weight")))
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ConfigError("give every data source a weight, or none (then each gives all its examples)")
    return sources


def rename_columns(row: Any, columns: dict[str, str]) -> Any:
    """The row with each mapped column under adaptune's name (the original name is dropped)."""
    if not columns or not isinstance(row, dict):
        return row
    values = {target: row[column] for target, column in columns.items() if column in row}
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update(values)
    return out


def check_columns(source: DataSource, rows: list[Any]) -> None:
    """DataError when a column named in ``columns`` is in none of the first (renamed) rows: a typo
    would otherwise surface as every row 'missing' something."""
    objects = [r for r in rows if isinstance(r, dict)][:100]
    if not objects:
        return
    seen = {k for r in objects for k in r}
    missing = [column for target, column in source.columns.items() if target not in seen]
    if missing:
        original = sorted({source.columns.get(k, k) for k in seen})  # the data's own names
        raise DataError(f"{source.path}: --columns names {', '.join(map(repr, missing))}, which the data does not "
                        f"have (its columns: {', '.join(original[:20])})")


# ---- reading rows through datasets ----------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def hub_error(source: DataSource, exc: BaseException) -> DataError:
    """One line for a hub dataset that cannot be had, naming HF_HUB_OFFLINE and the cache."""
    import datasets
    from huggingface_hub import constants

    cache = f"{datasets.config.HF_DATASETS_CACHE} and {constants.HF_HUB_CACHE}"
    unreachable = isinstance(exc, (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError))
    if unreachable and (datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE):
        return DataError(f"{source.path}: not a local file or folder, and as a hub dataset it is not in the cache "
                         f"({cache}) while HF_HUB_OFFLINE=1 is set; download it once with network access (unset "
                         f"HF_HUB_OFFLINE), or pass a local file or a save_to_disk folder")
    if isinstance(exc, ConnectionError):
        return DataError(f"{source.path}: not a local file or folder, and the hub cannot be reached (no network?) "
                         f"nor is the dataset in the cache ({cache}); with the dataset cached, set "
                         f"HF_HUB_OFFLINE=1, or pass a local file")
    return DataError(f"{source.path}: cannot load it as a hub dataset ({_first_line(exc)})")


def check_available(source: DataSource) -> None:
    """Offline, a hub dataset that is not in the cache is said now (one line), not after the model
    loads; online the download itself tells (the network may be slow, not absent)."""
    if source.kind != HUB:
        return
    import datasets
    from huggingface_hub import constants

    if not (datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE):
        return
    try:
        datasets.load_dataset_builder(source.path, source.config)
    except Exception as exc:  # noqa: BLE001 - whatever datasets raises for it: the one line below
        raise hub_error(source, exc) from None


def load_hub(source: DataSource, streaming: bool) -> Any:
    """The hub dataset's split (a ``Dataset``, or an ``IterableDataset`` when streaming)."""
    import datasets

    try:
        return datasets.load_dataset(source.path, source.config, split=source.split or "train", streaming=streaming)
    except (ConnectionError, OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise hub_error(source, exc) from None


def _load_disk(source: DataSource) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(Path(source.path).expanduser()))
    except Exception as exc:  # noqa: BLE001 - any failure to read the folder is the user's data problem
        raise DataError(f"{source.path}: cannot read the saved dataset ({_first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = source.split or ("train" if "train" in loaded or len(loaded) != 1 else next(iter(loaded)))
        if split not in loaded:
            raise DataError(f"{source.path}: no split {split!r} in the saved dataset (it has "
                            f"{', '.join(loaded)}); choose one with --data-split")
        loaded = loaded[split]
    return loaded


def _load_table(source: DataSource) -> Any:
    """A local csv / parquet / arrow file as a stream of rows (CSV cells stay strings)."""
    import datasets

    options: dict[str, Any] = {}
    if source.kind == "csv":
        import csv

        with open(Path(source.path).expanduser(), newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise DataError(f"{source.path}: file is empty")
        # pandas would read '42' as a number and '' or 'NA' as missing; the formats want the text
        options = {"features": datasets.Features({c: datasets.Value("string") for c in header}),
                   "keep_default_na": False}
    return datasets.load_dataset(source.kind, data_files=str(Path(source.path).expanduser()), split="train",
                                 streaming=True, **options)


def open_dataset(source: DataSource, streaming: bool) -> Any:
    """The ``datasets`` object behind a table, saved-dataset or hub source."""
    if source.kind == HUB:
        return load_hub(source, streaming)
    if source.kind == DISK:
        return _load_disk(source)
    try:
        return _load_table(source)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed table: one line naming the file
        raise DataError(f"{source.path}: cannot read it as {source.kind} ({_first_line(exc)})") from None


def dataset_rows(source: DataSource, start: int = 0, streaming: bool = False) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row with columns renamed) from row ``start`` on, for the sources read
    through ``datasets``; a row that cannot be read ends the source with a DataError naming it."""
    dataset = open_dataset(source, streaming)
    if start:
        dataset = dataset.skip(start)
    number = start
    iterator = iter(dataset)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - a torn file found mid-way
            raise DataError(f"{source.path}: cannot read row {number + 1} ({_first_line(exc)})") from None
        number += 1
        yield number, rename_columns(row, source.columns)


def jsonl_rows(source: DataSource, start: int = 0) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) of a JSON-lines file read line by line, from its ``start``-th row
    on (blank lines are not rows); a line that is not JSON or not UTF-8 holds a ``BadRow``."""
    import json

    seen = 0
    with open(Path(source.path).expanduser(), "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            seen += 1
            if seen <= start:
                continue
            try:
                row: Any = rename_columns(json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8")),
                                          source.columns)
            except UnicodeDecodeError:
                row = BadRow("not UTF-8 text")
            except json.JSONDecodeError:
                row = BadRow("invalid JSON")
            except RecursionError:
                row = BadRow("JSON nested too deeply")
            yield number, row


def text_lines(source: DataSource, start: int = 0) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file from line ``start + 1`` on, read lazily; undecodable
    bytes are replaced (a streamed text file is never read whole to check it)."""
    with open(Path(source.path).expanduser(), encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if number > start:
                yield number, line.rstrip("\n")

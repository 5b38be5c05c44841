"""Reading rows from a source: local `.jsonl`/`.parquet` files, `datasets` folders and hub names, or lists of them."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError, first_line

log = logging.getLogger(__name__)


FILE_SUFFIXES = (".jsonl", ".parquet")


# Suffixes that mark a path as a file even when it does not exist, so that a typo in a file name
# is reported as a missing file rather than sent to the hub as a dataset name.
_OTHER_FILE_SUFFIXES = {".json", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip"}


_LOCAL_PREFIXES = ("/", "./", "../", "~")


class DataError(UserError, ValueError):
    """A problem with the user's data or data settings; the message is one line saying what to do."""


@dataclass(frozen=True)
class _Source:
    kind: str  # "jsonl", "parquet", "saved" (a save_to_disk folder) or "hub"
    location: str  # the path or dataset name as the user wrote it
    split: str | None = None
    config: str | None = None


def read_rows(source: Any, *, key: str = "data") -> list[tuple[str, dict]]:
    """Return `(origin, row)` for every row of `source`, in order.

    `origin` is `file.jsonl:LINE` (1-based, as an editor counts lines) for JSONL files and
    `name[INDEX]` (0-based, as Python indexes a table) for Parquet files and `datasets`.
    `key` names the setting in error messages, e.g. `data.train`.
    """
    rows = []
    for src in _resolve_sources(source, key):
        rows.extend(_read_source(src, key))
    return rows


def _resolve_sources(source: Any, key: str) -> list[_Source]:
    return [_resolve_one(spec, key) for spec in _source_specs(source, key)]


def _source_specs(source: Any, key: str) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        return [os.fspath(source)]
    # Hydra hands lists over as ListConfig, which is iterable but not a list.
    if source is None or not isinstance(source, Iterable):
        raise DataError(f"{key} is {source!r}; set it to a .jsonl/.parquet file, a list of them, or a datasets name")
    specs = list(source)
    if not specs:
        raise DataError(f"{key} is an empty list; give it at least one file or datasets name")
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)):
            raise DataError(f"{key} holds {spec!r}, which is not a path or name; list only files or datasets names")
    return [os.fspath(spec) for spec in specs]


def _resolve_one(spec: str, key: str) -> _Source:
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_source(spec, path, key)
    if path.is_dir():
        return _Source("saved", spec)
    folder, _, split = spec.rpartition(":")
    if folder and split and Path(folder).expanduser().is_dir():
        return _Source("saved", folder, split)
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES or spec.startswith(_LOCAL_PREFIXES):
        raise DataError(f"{key} file '{spec}' does not exist; check the path (relative paths start from {os.getcwd()})")
    if suffix in _OTHER_FILE_SUFFIXES:
        raise _unsupported_suffix(spec, key)
    return _dataset_source(spec, key)


def _file_source(spec: str, path: Path, key: str) -> _Source:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise _unsupported_suffix(spec, key)
    return _Source(suffix.lstrip("."), spec)


def _unsupported_suffix(spec: str, key: str) -> DataError:
    return DataError(f"{key} file '{spec}' is not a .jsonl or .parquet file; convert it to one of those formats")


def _dataset_source(spec: str, key: str) -> _Source:
    """Parse a hub name written as `name`, `name:split` or `name:config:split`."""
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise DataError(f"{key} '{spec}' is not a datasets name; write it as name, name:split or name:config:split")
    name, config, split = parts[0], None, None
    if len(parts) == 2:
        split = parts[1]
    elif len(parts) == 3:
        config, split = parts[1], parts[2]
    return _Source("hub", name, split or "train", config)


def _read_source(src: _Source, key: str) -> list[tuple[str, dict]]:
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "saved": _read_saved, "hub": _read_hub}
    rows = readers[src.kind](src)
    if not rows:
        raise DataError(f"{key} source '{src.location}' has no rows; add rows to it or point {key} at another source")
    return rows


def _read_jsonl(src: _Source) -> list[tuple[str, dict]]:
    rows = []
    # Read bytes and decode line by line so that an encoding error can name its line too.
    with open(Path(src.location).expanduser(), "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            origin = f"{src.location}:{number}"
            text = _decode_line(raw, origin, first=number == 1)
            if text.strip():  # blank lines, such as a trailing one, are not rows
                rows.append((origin, _parse_json(text, origin)))
    return rows


def _decode_line(raw: bytes, origin: str, first: bool) -> str:
    try:
        # Editors on Windows often start the file with a byte-order mark.
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{origin} is not UTF-8 text ({err.reason}); save the file as UTF-8") from err


def _parse_json(text: str, origin: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        problem = f"{err.msg} at column {err.colno}"
        raise DataError(f"{origin} is not valid JSON ({problem}); fix or remove that line") from err


def _read_parquet(src: _Source) -> list[tuple[str, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(Path(src.location).expanduser())
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(
            f"'{src.location}' is not a readable Parquet file ({first_line(err)}); rewrite it with pyarrow or pandas"
        ) from err
    return [(f"{src.location}[{index}]", row) for index, row in enumerate(table.to_pylist())]


def _read_saved(src: _Source) -> list[tuple[str, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(Path(src.location).expanduser()))
    except FileNotFoundError as err:
        raise DataError(
            f"folder '{src.location}' is not a dataset saved with save_to_disk; "
            "point at .jsonl/.parquet files or a saved dataset"
        ) from err
    dataset = _pick_split(loaded, src)
    return [(f"{src.location}[{index}]", row) for index, row in enumerate(dataset)]


def _pick_split(loaded: Any, src: _Source) -> Any:
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        if src.split is not None:
            raise DataError(f"'{src.location}' holds one dataset without splits; drop ':{src.split}' from its name")
        return loaded
    split = src.split or "train"
    if split not in loaded:
        choices = sorted(loaded)
        raise DataError(f"'{src.location}' has no split '{split}'; pick one of {choices} with '{src.location}:SPLIT'")
    return loaded[split]


def _read_hub(src: _Source) -> list[tuple[str, dict]]:
    import datasets

    names = [src.location] if src.config is None else [src.location, src.config]
    try:
        dataset = datasets.load_dataset(*names, split=src.split)
    except Exception as err:  # datasets raises many kinds (network, missing config, bad split); all mean the same here
        raise DataError(
            f"datasets.load_dataset could not load '{':'.join(names)}' split '{src.split}' ({first_line(err)}); "
            "check the name and split, go online or pre-download it, or use a local .jsonl/.parquet file"
        ) from err
    return [(f"{src.location}[{index}]", row) for index, row in enumerate(dataset)]

"""Training data: read rows, tokenize them with a loss mask, cache the result, split and batch.

A row is one of three formats (see CONTRACT.md):

    {"prompt": str, "response": str}      the loss covers the response and the end-of-sequence token
    {"messages": [{"role", "content"}]}   the loss covers the assistant turns of the chat template
    {"text": str}                         the loss covers every token

A source is a local `.jsonl` or `.parquet` file, a folder written by `datasets`' `save_to_disk`,
a `datasets` hub name (`org/ds`, `org/ds:split` or `org/ds:config:split`), or a list of these.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pickle
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.files import write_atomically

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Bump whenever tokenization changes the rows. It is part of `examples_fingerprint`, by which teacher
# caches and checkpoints know their data, so a bump makes them refuse this data. A cache file that
# lacks a field added later is rebuilt anyway (see `_load_cache`): a new field needs no bump.
FORMAT_VERSION = 1

FILE_SUFFIXES = (".jsonl", ".parquet")
# Suffixes that mark a path as a file even when it does not exist, so that a typo in a file name
# is reported as a missing file rather than sent to the hub as a dataset name.
_OTHER_FILE_SUFFIXES = {".json", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip"}
_LOCAL_PREFIXES = ("/", "./", "../", "~")

_FORMATS = {
    "prompt/response": ("prompt", "response"),
    "messages": ("messages",),
    "text": ("text",),
}
_EXPECTED_FORMATS = "expected {prompt,response}, {messages} or {text}"

# The roles the loss and common chat templates know; the loss learns the "assistant" turns only.
CHAT_ROLES = ("system", "user", "assistant")
# Roles that templates of tool-using models render as well, beside the assistant's turns.
TOOL_ROLES = ("tool", "developer", "function", "ipython")
# ShareGPT writes turns as {"from", "value"} with these roles; what they are called here.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class DataError(ValueError):
    """A problem with the user's data or data settings; the message is one line saying what to do."""


@dataclass
class TokenizedRow:
    """One tokenized row, at most `seq_len` tokens long.

    `labels` is aligned with `input_ids` (not shifted: the trainer shifts) and holds IGNORE_INDEX
    wherever the loss must not look.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    index: int = -1
    """The row's position in its source, which is how a teacher cache finds its entry."""
    empty_response: bool = False
    """Its response (its assistant turns, or its text) is empty or blank, so it teaches nothing but
    the end-of-sequence or end-of-turn marker."""

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Examples:
    """The tokenized rows of one source, with the counts worth logging."""

    rows: list[TokenizedRow]
    origin: str
    """The source as the user gave it, for log lines."""
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_truncated(self) -> int:
        return sum(row.truncated for row in self.rows)

    @property
    def num_supervised_tokens(self) -> int:
        return sum(row.num_supervised for row in self.rows)

    @property
    def num_unsupervised_rows(self) -> int:
        """Rows that add nothing to the loss, e.g. a prompt that fills all of `seq_len`."""
        return sum(row.num_supervised == 0 for row in self.rows)

    @property
    def num_empty_responses(self) -> int:
        return sum(row.empty_response for row in self.rows)


@dataclass(frozen=True)
class SpecialIds:
    """The tokens that `tokenize_row` puts around prompt/response and text rows."""

    bos: list[int]
    eos: list[int]


@dataclass(frozen=True)
class _Source:
    kind: str  # "jsonl", "parquet", "saved" (a save_to_disk folder) or "hub"
    location: str  # the path or dataset name as the user wrote it
    split: str | None = None
    config: str | None = None


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


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
            f"'{src.location}' is not a readable Parquet file ({_first_line(err)}); rewrite it with pyarrow or pandas"
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
            f"datasets.load_dataset could not load '{':'.join(names)}' split '{src.split}' ({_first_line(err)}); "
            "check the name and split, go online or pre-download it, or use a local .jsonl/.parquet file"
        ) from err
    return [(f"{src.location}[{index}]", row) for index, row in enumerate(dataset)]


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------
# Tokenizing rows
# --------------------------------------------------------------------------------------------


def special_ids(tokenizer: Any) -> SpecialIds:
    """Which bos/eos ids to put around prompt/response and text rows.

    A bos id is added only when the tokenizer adds one by default (Llama, Mistral, Gemma), so rows
    look the way the model saw text in pre-training; Qwen and GPT-2 add none.
    """
    bos_id = tokenizer.bos_token_id
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    without_specials = tokenizer.encode("a", add_special_tokens=False)
    adds_bos = bos_id is not None and with_specials[:1] == [bos_id] and without_specials[:1] != [bos_id]
    eos_id = tokenizer.eos_token_id
    return SpecialIds(bos=[bos_id] if adds_bos else [], eos=[] if eos_id is None else [eos_id])


def tokenize_row(
    row: Any, tokenizer: Any, seq_len: int, origin: str, *, specials: SpecialIds | None = None
) -> TokenizedRow:
    """Tokenize one row into at most `seq_len` tokens, with labels masked where the loss must not look.

    `specials` is `special_ids(tokenizer)`, computed here when not given; pass it when tokenizing
    many rows to save two tokenizer calls per row.
    """
    specials = special_ids(tokenizer) if specials is None else specials
    kind = _row_format(row, origin)
    if kind == "prompt/response":
        ids, supervised = _tokenize_prompt_response(row, tokenizer, specials)
    elif kind == "messages":
        ids, supervised = _tokenize_messages(row["messages"], tokenizer, origin)
    else:
        ids, supervised = _tokenize_text(row["text"], tokenizer, specials)
    tokenized = _to_row(ids, supervised, seq_len)
    tokenized.empty_response = _has_empty_response(row, kind)
    return tokenized


def _has_empty_response(row: dict, kind: str) -> bool:
    """A blank response, text, or assistant turns that are all blank (a row without any assistant
    turn has nothing to learn at all, which `supervised_only` counts)."""
    if kind == "prompt/response":
        return not row["response"].strip()
    if kind == "text":
        return not row["text"].strip()
    answers = [message["content"] for message in row["messages"] if message["role"] == "assistant"]
    return bool(answers) and not any(answer.strip() for answer in answers)


def _row_format(row: Any, origin: str) -> str:
    """Name the one format `row` fits, after checking its field types.

    Fields besides the format's own (ids, sources, metadata) are ignored: real datasets carry them.
    A null field counts as absent, since Parquet and `datasets` fill missing columns with null.
    """
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise DataError(f"data row {origin} fits no known format ({_EXPECTED_FORMATS}); got a {kind}, not an object; "
                        "make each row a JSON object")
    present = {field for field, value in row.items() if value is not None}
    fits = [kind for kind, fields in _FORMATS.items() if present.issuperset(fields)]
    if not fits:
        sharegpt = (" (ShareGPT's 'conversations' is 'messages' here, its turns {role, content} with the roles "
                    f"{_sharegpt_mapping()})") if "conversations" in present else ""
        raise DataError(f"data row {origin} fits no known format ({_EXPECTED_FORMATS}); got keys {sorted(row)}; "
                        f"rename its fields to one of those{sharegpt}")
    if len(fits) > 1:
        raise DataError(f"data row {origin} fits more than one format ({', '.join(fits)}); keep the fields of only one")
    _check_fields(row, fits[0], origin)
    return fits[0]


def _check_fields(row: dict, kind: str, origin: str) -> None:
    if kind == "messages":
        check_messages(row["messages"], origin)
        return
    for field in _FORMATS[kind]:
        if not isinstance(row[field], str):
            raise DataError(f"data row {origin} has a '{field}' of type {type(row[field]).__name__}; make it a string")


def check_messages(messages: Any, origin: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(
            f"data row {origin} has 'messages' that is not a non-empty list; "
            "make it a list of {role, content} objects"
        )
    for index, message in enumerate(messages):
        if isinstance(message, dict) and "from" in message and "value" in message and "role" not in message:
            raise DataError(
                f"data row {origin} has messages[{index}] in ShareGPT's form ('from'/'value'); rename the keys to "
                f"'role'/'content' and the roles {_sharegpt_mapping()}"
            )
        if not (isinstance(message, dict) and all(isinstance(message.get(f), str) for f in ("role", "content"))):
            raise DataError(
                f"data row {origin} has messages[{index}] without string 'role' and 'content'; give every message both"
            )


def _sharegpt_mapping() -> str:
    return ", ".join(f"{sharegpt}->{ours}" for sharegpt, ours in SHAREGPT_ROLES.items() if sharegpt != ours)


def _check_training_roles(messages: Sequence[dict], origin: str) -> None:
    """A conversation without an 'assistant' turn teaches nothing. When it also has roles no chat
    template knows, the assistant's turns are most likely under another name (ShareGPT's 'gpt'):
    refuse it by name rather than drop it with every row like it."""
    roles = list(dict.fromkeys(message["role"] for message in messages))
    unknown = [role for role in roles if role not in CHAT_ROLES + TOOL_ROLES]
    if "assistant" in roles or not unknown:
        return
    found = ", ".join(repr(role) for role in roles)
    hint = f" (ShareGPT's roles: {_sharegpt_mapping()})" if set(unknown) & set(SHAREGPT_ROLES) else ""
    raise DataError(
        f"data row {origin} has the roles {found} and no 'assistant' turn, so it has no token to learn; "
        f"name its roles {', '.join(CHAT_ROLES)}{hint}: the loss learns the 'assistant' turns"
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _tokenize_prompt_response(row: dict, tokenizer: Any, specials: SpecialIds) -> tuple[list[int], list[bool]]:
    # Encoding the two parts separately puts the mask boundary exactly between them; encoding the
    # joined string could merge the last prompt character with the first response character.
    prompt = specials.bos + encode_text(tokenizer, row["prompt"])
    response = encode_text(tokenizer, row["response"]) + specials.eos
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def _tokenize_text(text: str, tokenizer: Any, specials: SpecialIds) -> tuple[list[int], list[bool]]:
    ids = specials.bos + encode_text(tokenizer, text) + specials.eos
    return ids, [True] * len(ids)


def _tokenize_messages(messages: Sequence[dict], tokenizer: Any, origin: str) -> tuple[list[int], list[bool]]:
    """Supervise exactly the tokens of the assistant turns, each with its end-of-turn marker.

    The template writes its own bos and turn markers into the text, so nothing is added around it.
    """
    if not tokenizer.chat_template:
        raise DataError(
            f"data row {origin} has 'messages' but the tokenizer has no chat template; "
            "use prompt/response rows or a tokenizer with a chat template"
        )
    _check_training_roles(messages, origin)
    if messages[0]["role"] == "assistant":
        # Its start is where the template's generation prompt for the turns before it ends, and a
        # template cannot render zero turns; templates that require user/assistant turns refuse it too.
        raise DataError(
            f"data row {origin} starts with an assistant turn, which has no turn before it to answer; "
            "put the user (or system) turn it answers first, or drop that assistant turn"
        )
    # Null fields (from Parquet) would read as "defined" to templates that test `message.tool_calls is defined`.
    messages = [{field: value for field, value in message.items() if value is not None} for message in messages]
    rendered = render_chat(tokenizer, messages, origin)
    spans = _assistant_spans(tokenizer, messages, rendered, origin)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    supervised = [_within(offsets, spans) for offsets in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), supervised


def render_chat(tokenizer: Any, messages: list[dict], origin: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # templates raise anything, e.g. jinja2 errors or raise_exception("...")
        raise DataError(
            f"the chat template could not render data row {origin} ({_first_line(err)}); "
            "fix the row's messages or use prompt/response rows"
        ) from err


def _assistant_spans(tokenizer: Any, messages: list[dict], rendered: str, origin: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of each assistant turn in `rendered`.

    A turn starts where the template's generation prompt ends and stops where the rendering of
    the conversation up to that turn stops, so the end-of-turn marker is supervised: the student
    must learn to stop.
    """
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], origin, add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: index + 1], origin)
        # Templates that render earlier turns differently (e.g. dropping past reasoning) break this.
        if not (through.startswith(before) and rendered.startswith(through)):
            raise DataError(
                f"the tokenizer's chat template is not prefix-consistent for data row {origin}, so its assistant "
                "tokens cannot be located; use prompt/response rows or a tokenizer with a prefix-consistent template"
            )
        spans.append((len(before), len(through)))
    return spans


def _within(offsets: Sequence[int], spans: list[tuple[int, int]]) -> bool:
    start, end = offsets
    return any(span_start <= start and end <= span_end for span_start, span_end in spans)


def _to_row(ids: list[int], supervised: list[bool], seq_len: int) -> TokenizedRow:
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, supervised)]
    # Nothing predicts the first token once the trainer shifts labels, so counting it as
    # supervised would overstate the token count and hide rows that add nothing to the loss.
    if labels:
        labels[0] = IGNORE_INDEX
    return TokenizedRow(ids[:seq_len], labels[:seq_len], truncated=len(ids) > seq_len)


# --------------------------------------------------------------------------------------------
# Loading with a cache
# --------------------------------------------------------------------------------------------


def load_examples(
    source: Any, tokenizer: Any, seq_len: int, cache_dir: str | os.PathLike | None, *, key: str = "data",
    truncate: bool = True,
) -> Examples:
    """Read and tokenize `source`, reusing the cached result when nothing that shapes it changed.

    The cache is keyed by the contents of the source files (the name, for hub datasets), the
    tokenizer, `seq_len` and FORMAT_VERSION. `cache_dir=None` turns caching off.
    `truncate=False` refuses a row longer than `seq_len` instead of cutting it. The rows are the
    same either way, so the flag is not in the key: it is checked on the rows, cached or not.
    A source whose every response is empty is refused; one with some empty responses is warned about.
    """
    if seq_len < 2:
        raise DataError(f"seq_len is {seq_len}, too short to predict any token; set train.seq_len to 2 or more")
    examples = _tokenized(source, tokenizer, seq_len, cache_dir, key)
    if not truncate:
        _refuse_long_rows(examples.rows, source, tokenizer, seq_len, key)
    _check_empty_responses(examples, source, key)
    return examples


def _tokenized(source: Any, tokenizer: Any, seq_len: int, cache_dir, key: str) -> Examples:
    origin = _describe(source)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{examples_fingerprint(source, tokenizer, seq_len, key)}.pt"
        cached = _load_cache(cache_path)
        if cached is not None:
            return Examples(_numbered(cached), origin, from_cache=True)
    specials = special_ids(tokenizer)
    rows = [
        tokenize_row(row, tokenizer, seq_len, row_origin, specials=specials)
        for row_origin, row in read_rows(source, key=key)
    ]
    if cache_path is not None:
        _save_cache(cache_path, rows)
    return Examples(_numbered(rows), origin)


def _refuse_long_rows(rows: list[TokenizedRow], source: Any, tokenizer: Any, seq_len: int, key: str) -> None:
    """DataError naming the first row that was cut to `seq_len`. Rows keep no origin (nor does the
    cache), so the source is read again to name the file and line: only on the way to an error."""
    first = next((row.index for row in rows if row.truncated), None)
    if first is None:
        return
    origin, raw = read_rows(source, key=key)[first]
    length = len(tokenize_row(raw, tokenizer, sys.maxsize, origin).input_ids)
    raise DataError(
        f"data row {origin} is {length} tokens long, more than train.seq_len={seq_len}, and data.truncate=false "
        "refuses to cut it; raise train.seq_len, shorten or drop the row, or set data.truncate=true"
    )


def _check_empty_responses(examples: Examples, source: Any, key: str) -> None:
    """Refuse a source whose every response is empty (the student would learn to stop at once and
    its evaluation would look perfect); warn, naming the first, when only some are."""
    empty = examples.num_empty_responses
    if not empty:
        return
    first = next(row.index for row in examples.rows if row.empty_response)
    origin = read_rows(source, key=key)[first][0]  # rows keep no origin: read again, only on the way to a message
    if empty == len(examples):
        raise DataError(
            f"every one of the {empty} rows of {key} has an empty response (first: {origin}), so the student would "
            f"learn only to stop at once; fill in the responses (python -m trainer.generate writes the teacher's) "
            f"or point {key} at the data that has them"
        )
    log.warning("data: %d of %d rows of %s have an empty response (first: %s); they teach only where to stop: fill "
                "them in or drop them", empty, len(examples), key, origin)


def _numbered(rows: list[TokenizedRow]) -> list[TokenizedRow]:
    for index, row in enumerate(rows):
        row.index = index
    return rows


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return ", ".join(str(spec) for spec in source) if isinstance(source, Iterable) else repr(source)


def examples_fingerprint(source: Any, tokenizer: Any, seq_len: int, key: str = "data") -> str:
    """sha256 of everything that decides `load_examples`' rows: the sources' contents, the
    tokenizer, `seq_len` and FORMAT_VERSION. Equal fingerprints mean equal rows, in order."""
    described = {
        "format_version": FORMAT_VERSION,
        "sources": [_source_fingerprint(src) for src in _resolve_sources(source, key)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _source_fingerprint(src: _Source) -> list[Any]:
    # A hub dataset is keyed by name only, so a cache hit needs no network; delete the cache
    # folder to pick up a new upstream revision.
    if src.kind == "hub":
        return [src.kind, src.location, src.config, src.split]
    return [src.kind, src.split, _hash_path(Path(src.location).expanduser())]


def _hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of every file in a folder with its relative name."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about `tokenizer` that changes how rows are tokenized."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocab = json.loads(backend.to_str())
        # The wrapper switches these on and off around calls; they do not change our encodings.
        vocab.pop("truncation", None)
        vocab.pop("padding", None)
    else:
        vocab = sorted(tokenizer.get_vocab().items())
    described = {
        "class": type(tokenizer).__name__,
        "vocab": vocab,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _save_cache(path: Path, rows: list[TokenizedRow]) -> None:
    """Write flat tensors (compact and quick to load) atomically, so that ranks writing at once are safe."""
    blob = {
        "format_version": FORMAT_VERSION,
        "lengths": torch.tensor([len(row.input_ids) for row in rows], dtype=torch.int64),
        "input_ids": _flat_tensor(row.input_ids for row in rows),
        "labels": _flat_tensor(row.labels for row in rows),
        "truncated": torch.tensor([row.truncated for row in rows], dtype=torch.bool),
        "empty_response": torch.tensor([row.empty_response for row in rows], dtype=torch.bool),
    }
    write_atomically(path, lambda temporary: torch.save(blob, temporary))


def _flat_tensor(lists: Iterable[list[int]]) -> torch.Tensor:
    return torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.int64)


def _load_cache(path: Path) -> list[TokenizedRow] | None:
    """The cached rows, or None when there is no usable cache (a damaged one, or one written before a
    field existed, is rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob["format_version"] != FORMAT_VERSION:
            return None
        return _unpack(blob)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError):
        return None


def _unpack(blob: dict) -> list[TokenizedRow]:
    """The rows of a cache file; KeyError for one written before a field existed, so it is rebuilt."""
    input_ids, labels = blob["input_ids"].tolist(), blob["labels"].tolist()
    rows, start = [], 0
    flags = zip(blob["lengths"].tolist(), blob["truncated"].tolist(), blob["empty_response"].tolist())
    for length, truncated, empty_response in flags:
        rows.append(TokenizedRow(input_ids[start : start + length], labels[start : start + length], truncated,
                                 empty_response=empty_response))
        start += length
    return rows


# --------------------------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------------------------


def split_holdout(
    rows: Sequence[TokenizedRow], eval_fraction: float, seed: int
) -> tuple[list[TokenizedRow], list[TokenizedRow]]:
    """Hold out a seeded random `eval_fraction` of `rows` (at least one) for evaluation.

    Both parts keep the original order; the same rows and seed always give the same split.
    """
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction is {eval_fraction}; set it between 0 and 1, e.g. 0.05")
    if len(rows) < 2:
        raise DataError(
            f"data.train has {len(rows)} row(s), too few to hold one out for evaluation; add rows or set data.eval"
        )
    num_eval = min(max(1, round(len(rows) * eval_fraction)), len(rows) - 1)
    held_out = set(random.Random(seed).sample(range(len(rows)), num_eval))
    train = [row for index, row in enumerate(rows) if index not in held_out]
    evaluation = [row for index, row in enumerate(rows) if index in held_out]
    return train, evaluation


def supervised_only(rows: Sequence[TokenizedRow], seq_len: int) -> list[TokenizedRow]:
    """The rows with at least one token to learn. A row without one (no response or assistant turn,
    or one cut off by `seq_len`) adds nothing to the loss, and a batch of such rows has no token to
    normalise by; DataError when no row is left."""
    kept = [row for row in rows if row.num_supervised > 0]
    if not kept:
        raise DataError(
            f"none of the {len(rows)} training rows has a token to learn (no response or assistant turn, or one "
            f"cut off by train.seq_len={seq_len}); give rows a response or assistant turn, or raise train.seq_len"
        )
    return kept


def collate(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `rows` to the longest one.

    Returns LongTensors `input_ids`, `attention_mask` (1 real, 0 pad) and `labels`
    (IGNORE_INDEX at pads, not shifted), each `[B, T]` with T the longest row, and `row_index`
    `[B]`, each row's position in its source (-1 for rows that never came from one).
    """
    if pad_id is None:
        raise DataError("the tokenizer has no pad token; add a \"pad_token\" to the model folder's tokenizer_config.json "
                        "(any token will do: padding is masked out), or load it with trainer.models.load_tokenizer")
    longest = max((len(row.input_ids) for row in rows), default=0)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[index, :length] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[index, :length] = 1
        labels[index, :length] = torch.tensor(row.labels, dtype=torch.long)
    row_index = torch.tensor([row.index for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "row_index": row_index}

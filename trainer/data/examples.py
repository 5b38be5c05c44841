"""A split's tokenized rows: tokenised once, cached on disk by fingerprint, split into train and held-out."""

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

from trainer.data.sources import DataError, _resolve_sources, _Source, read_rows
from trainer.data.pairing import pair_tokenize_row, side_of
from trainer.data.tokenize import TeacherTokens, TokenizedRow, row_format, special_ids, tokenize_row
from trainer.files import write_atomically

log = logging.getLogger(__name__)


# Bump whenever tokenization changes the rows. It is part of `examples_fingerprint`, by which teacher
# caches and checkpoints know their data, so a bump makes them refuse this data. A cache file that
# lacks a field added later is rebuilt anyway (see `_load_cache`): a new field needs no bump.
FORMAT_VERSION = 1


@dataclass
class Examples:
    """The tokenized rows of one source, with the counts worth logging."""

    rows: list[TokenizedRow]
    origin: str
    """The source as the user gave it, for log lines."""
    fingerprint: str
    """:func:`examples_fingerprint` of the rows, computed once here for everything that identifies
    them (the tokenized-rows cache, teacher caches, checkpoints)."""
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

    @property
    def num_prompt_only(self) -> int:
        """`{"prompt"}` rows, whose responses the student writes (onpolicy.fraction=1)."""
        return sum(row.prompt_only for row in self.rows)


def load_examples(
    source: Any, tokenizer: Any, seq_len: int, cache_dir: str | os.PathLike | None, *, key: str = "data",
    truncate: bool = True, tokenizer_hash: str | None = None, teacher_tokenizer: Any = None,
    teacher_tokenizer_hash: str | None = None,
) -> Examples:
    """Read and tokenize `source`, reusing the cached result when nothing that shapes it changed.

    The cache is keyed by the contents of the source files (the name, for hub datasets), the
    tokenizer, `seq_len` and FORMAT_VERSION. `cache_dir=None` turns caching off.
    `truncate=False` refuses a row longer than `seq_len` instead of cutting it. The rows are the
    same either way, so the flag is not in the key: it is checked on the rows, cached or not.
    `tokenizer_hash`: :func:`tokenizer_fingerprint` of `tokenizer`, when the caller has it already.
    A source whose every response is empty is refused; one with some empty responses is warned about.
    `teacher_tokenizer` (a teacher with another tokenizer): each row also holds the teacher's tokens
    and their spans against the student's (`TokenizedRow.teacher`, trainer/data/pairing.py), and the
    teacher's tokenizer (`teacher_tokenizer_hash`, when the caller has it) joins the cache key.
    """
    if seq_len < 2:
        raise DataError(f"seq_len is {seq_len}, too short to predict any token; set train.seq_len to 2 or more")
    teacher_hash = None
    if teacher_tokenizer is not None:
        teacher_hash = teacher_tokenizer_hash or tokenizer_fingerprint(teacher_tokenizer)
    fingerprint = examples_fingerprint(source, tokenizer_hash or tokenizer_fingerprint(tokenizer), seq_len, key,
                                       teacher_tokenizer_hash=teacher_hash)
    examples = _tokenized(source, tokenizer, teacher_tokenizer, seq_len, fingerprint, cache_dir, key)
    if not truncate:
        _refuse_long_rows(examples.rows, source, tokenizer, seq_len, key)
        _refuse_long_teacher_rows(examples.rows, source, teacher_tokenizer, seq_len, key)
    _check_empty_responses(examples, source, key)
    return examples


def _tokenized(source: Any, tokenizer: Any, teacher_tokenizer: Any, seq_len: int, fingerprint: str, cache_dir,
               key: str) -> Examples:
    origin = _describe(source)
    paired = teacher_tokenizer is not None
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{fingerprint}.pt"
        cached = _load_cache(cache_path, paired)
        if cached is not None:
            return Examples(_numbered(cached), origin, fingerprint, from_cache=True)
    tokenize = _row_tokenizer(tokenizer, teacher_tokenizer, seq_len)
    rows = [tokenize(row, row_origin) for row_origin, row in read_rows(source, key=key)]
    if cache_path is not None:
        _save_cache(cache_path, rows, paired)
    return Examples(_numbered(rows), origin, fingerprint)


def _row_tokenizer(tokenizer: Any, teacher_tokenizer: Any, seq_len: int):
    """(row, origin) -> TokenizedRow: the student's alone, or both models' with their spans. The
    special ids are looked up once here, not once a row."""
    specials = special_ids(tokenizer)
    if teacher_tokenizer is None:
        return lambda row, origin: tokenize_row(row, tokenizer, seq_len, origin, specials=specials)
    teacher_specials = special_ids(teacher_tokenizer)
    return lambda row, origin: pair_tokenize_row(row, tokenizer, teacher_tokenizer, seq_len, origin,
                                                 specials=specials, teacher_specials=teacher_specials)


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


def _refuse_long_teacher_rows(rows: list[TokenizedRow], source: Any, teacher_tokenizer: Any, seq_len: int,
                              key: str) -> None:
    """As `_refuse_long_rows`, for a row that fits the student's `seq_len` but not the teacher's tokens."""
    first = next((row.index for row in rows if row.teacher is not None and row.teacher.truncated), None)
    if first is None:
        return
    origin, raw = read_rows(source, key=key)[first]
    kind = row_format(raw, origin)
    length = len(side_of(raw, kind, teacher_tokenizer, special_ids(teacher_tokenizer), origin, "teacher").tokens.ids)
    raise DataError(
        f"data row {origin} is {length} tokens long in the teacher's tokenizer, more than train.seq_len={seq_len}, and "
        "data.truncate=false refuses to cut it; raise train.seq_len, shorten or drop the row, or set data.truncate=true"
    )


def _check_empty_responses(examples: Examples, source: Any, key: str) -> None:
    """Refuse a source whose every response is empty (the student would learn to stop at once and
    its evaluation would look perfect); warn, naming the first, when only some are."""
    empty = examples.num_empty_responses
    if not empty:
        return
    origin = origin_of(source, next(row.index for row in examples.rows if row.empty_response), key)
    if empty == len(examples):
        raise DataError(
            f"every one of the {empty} rows of {key} has an empty response (first: {origin}), so the student would "
            f"learn only to stop at once; fill in the responses (python -m trainer.generate writes the teacher's) "
            f"or point {key} at the data that has them"
        )
    log.warning("data: %d of %d rows of %s have an empty response (first: %s); they teach only where to stop: fill "
                "them in or drop them", empty, len(examples), key, origin)


def origin_of(source: Any, index: int, key: str = "data") -> str:
    """`file.jsonl:LINE` (or `name[INDEX]`) of row `index` of `source`. Rows keep no origin (nor does
    the cache), so the source is read again: call it only on the way to a message."""
    return read_rows(source, key=key)[index][0]


def _numbered(rows: list[TokenizedRow]) -> list[TokenizedRow]:
    for index, row in enumerate(rows):
        row.index = index
    return rows


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return ", ".join(str(spec) for spec in source) if isinstance(source, Iterable) else repr(source)


def examples_fingerprint(source: Any, tokenizer_hash: str, seq_len: int, key: str = "data", *,
                         teacher_tokenizer_hash: str | None = None) -> str:
    """sha256 of everything that decides `load_examples`' rows: the sources' contents, the
    tokenizer (`tokenizer_hash`, its :func:`tokenizer_fingerprint`), `seq_len` and FORMAT_VERSION,
    and the teacher's tokenizer when the rows hold its tokens too. Equal fingerprints mean equal rows,
    in order. It reads every data file: callers take it from :attr:`Examples.fingerprint` rather than
    computing it again."""
    described = {
        "format_version": FORMAT_VERSION,
        "sources": [_source_fingerprint(src) for src in _resolve_sources(source, key)],
        "tokenizer": tokenizer_hash,
        "seq_len": seq_len,
    }
    if teacher_tokenizer_hash is not None:
        # Only then: student-only fingerprints stay what they were, so teacher caches and checkpoints
        # made before pairs existed still know their data.
        described["teacher_tokenizer"] = teacher_tokenizer_hash
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


def _save_cache(path: Path, rows: list[TokenizedRow], paired: bool = False) -> None:
    """Write flat tensors (compact and quick to load) atomically, so that ranks writing at once are safe."""
    blob = {
        "format_version": FORMAT_VERSION,
        "lengths": torch.tensor([len(row.input_ids) for row in rows], dtype=torch.int64),
        "input_ids": _flat_tensor(row.input_ids for row in rows),
        "labels": _flat_tensor(row.labels for row in rows),
        "truncated": torch.tensor([row.truncated for row in rows], dtype=torch.bool),
        "empty_response": torch.tensor([row.empty_response for row in rows], dtype=torch.bool),
        "prompt_only": torch.tensor([row.prompt_only for row in rows], dtype=torch.bool),
    }
    if paired:
        blob.update(_teacher_blob(rows))
    write_atomically(path, lambda temporary: torch.save(blob, temporary))


def _flat_tensor(lists: Iterable[list[int]]) -> torch.Tensor:
    return torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.int64)


def _teacher_blob(rows: list[TokenizedRow]) -> dict[str, torch.Tensor]:
    """The rows' teacher ids and spans (`[S, 4]`, each row's in order), flat like the rest."""
    return {
        "teacher_lengths": torch.tensor([len(row.teacher.input_ids) for row in rows], dtype=torch.int64),
        "teacher_input_ids": _flat_tensor(row.teacher.input_ids for row in rows),
        "teacher_span_counts": torch.tensor([len(row.teacher.spans) for row in rows], dtype=torch.int64),
        "teacher_spans": _flat_tensor(itertools.chain.from_iterable(row.teacher.spans) for row in rows).reshape(-1, 4),
        "teacher_truncated": torch.tensor([row.teacher.truncated for row in rows], dtype=torch.bool),
        "teacher_prompt_lengths": torch.tensor([row.teacher.prompt_length for row in rows], dtype=torch.int64),
    }


def _load_cache(path: Path, paired: bool = False) -> list[TokenizedRow] | None:
    """The cached rows, or None when there is no usable cache (a damaged one, or one written before a
    field existed, is rebuilt). `paired`: the rows must hold the teacher's tokens too."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        if blob["format_version"] != FORMAT_VERSION:
            return None
        rows = _unpack(blob)
        return _with_teacher(rows, blob) if paired else rows
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError):
        return None


def _unpack(blob: dict) -> list[TokenizedRow]:
    """The rows of a cache file; KeyError for one written before a field existed, so it is rebuilt."""
    input_ids, labels = blob["input_ids"].tolist(), blob["labels"].tolist()
    rows, start = [], 0
    flags = zip(blob["lengths"].tolist(), blob["truncated"].tolist(), blob["empty_response"].tolist(),
                blob["prompt_only"].tolist())
    for length, truncated, empty_response, prompt_only in flags:
        rows.append(TokenizedRow(input_ids[start : start + length], labels[start : start + length], truncated,
                                 empty_response=empty_response, prompt_only=prompt_only))
        start += length
    return rows


def _with_teacher(rows: list[TokenizedRow], blob: dict) -> list[TokenizedRow]:
    """`rows` with their teacher tokens from the cache file; KeyError when it has none."""
    teacher_ids, spans = blob["teacher_input_ids"].tolist(), [tuple(span) for span in blob["teacher_spans"].tolist()]
    id_start = span_start = 0
    columns = zip(rows, blob["teacher_lengths"].tolist(), blob["teacher_span_counts"].tolist(),
                  blob["teacher_truncated"].tolist(), blob["teacher_prompt_lengths"].tolist())
    for row, length, count, truncated, prompt_length in columns:
        row.teacher = TeacherTokens(teacher_ids[id_start : id_start + length], spans[span_start : span_start + count],
                                    truncated, prompt_length)
        id_start, span_start = id_start + length, span_start + count
    return rows


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


def supervised_only(rows: Sequence[TokenizedRow], seq_len: int, *, prompts_too: bool = False) -> list[TokenizedRow]:
    """The rows with at least one token to learn. A row without one (no response or assistant turn,
    or one cut off by `seq_len`) adds nothing to the loss, and a batch of such rows has no token to
    normalise by; DataError when no row is left.

    `prompts_too` (onpolicy.fraction=1, where the student writes every response) keeps prompt-only
    rows as well, those whose prompt leaves at least one position of `seq_len` to write into."""
    kept = [row for row in rows
            if row.num_supervised > 0 or (prompts_too and row.prompt_only and len(row.input_ids) < seq_len)]
    if not kept:
        raise DataError(
            f"none of the {len(rows)} training rows has a token to learn (no response or assistant turn, or one "
            f"cut off by train.seq_len={seq_len}{'; or a prompt that fills it' if prompts_too else ''}); give rows a "
            "response or assistant turn, or raise train.seq_len"
        )
    return kept

"""The teacher cache on disk: a manifest and, per data split, shards of rows.

    <folder>/manifest.json          what the cache was computed from, and whether it is complete
    <folder>/<split>/00000.safetensors, 00001.safetensors, ...

Shard `s` of a split holds rows `[s·shard_rows, (s+1)·shard_rows)` of that split's tokenized rows,
and for each row only its supervised positions (those whose next token the loss looks at), in order:

    offsets          int64  [R+1]    row r's positions are offsets[r]:offsets[r+1]
    logprobs         fp16   [P, k]   the teacher's top-k log-probabilities at temperature 1, descending
    ids              int32  [P, k]   their token ids (-1 pads a position that lists fewer than k)
    target_logprobs  fp32   [P]      the teacher's log-probability of the actual next token

A cache built for distillation across tokenizers (`loss.cross_tokenizer`, manifest key
`cross_tokenizer: true`) holds rows as the teacher tokenises them itself (trainer/cache/cross.py),
and, per position, what lets a student of any tokenizer find it:

    token_positions  int32  [P]      the index, in the teacher's row, of the token the position predicts
    token_ids        int32  [P]      that token's id
    char_offsets     int32  [P, 2]   the characters [start, end) it covers in the teacher's text of the row

and its folder holds the teacher's tokenizer (`tokenizer/`), which renders that text.

A shard is written to a temporary name and renamed, so a shard file on disk is always whole; a
build that stops resumes at the first missing shard. `complete` is set last.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.errors import UserError
from trainer.files import write_atomically, write_text_atomically
from trainer.losses import SparseTeacher
from trainer.losses.objective import targets_at_each_position
from trainer.losses.settings import IGNORE_INDEX

FORMAT = "distill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(UserError, ValueError):
    """A teacher cache cannot be used for this job; the message says what differs and what to do."""


@dataclass
class SplitInfo:
    data: str
    """Fingerprint of the split's tokenized rows (sources, tokenizer, seq_len)."""
    source: str
    """The source as the user gave it, for people reading the manifest."""
    rows: int
    shard_rows: int

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.shard_rows)


@dataclass
class Manifest:
    key: dict
    """teacher (weights fingerprint, or `api:<name>`), tokenizer (fingerprint), top_k, and
    tail_samples when some entries were drawn from the teacher's tail (trainer/cache/tail.py)."""
    teacher: dict
    """Who the teacher was, for people and provenance: path and revision, or the API model name."""
    dtype: str
    vocab_size: int
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    complete: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{folder} is not a teacher cache of format {FORMAT} v{FORMAT_VERSION}; rebuild it with "
                         "python -m trainer.cache.")
    raw["splits"] = {name: SplitInfo(**info) for name, info in raw["splits"].items()}
    return Manifest(**raw)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_text_atomically(folder / MANIFEST, manifest.to_json())


def shard_path(folder: Path, split: str, index: int) -> Path:
    return folder / split / f"{index:05d}.safetensors"


CROSS_FIELDS = ("token_positions", "token_ids", "char_offsets")


@dataclass
class RowTopK:
    """The cached teacher of one row's supervised positions."""

    logprobs: torch.Tensor  # [P, k]
    ids: torch.Tensor  # [P, k] int32
    target_logprobs: torch.Tensor  # [P]
    token_positions: torch.Tensor | None = None  # [P] int32, cross-tokenizer caches only
    token_ids: torch.Tensor | None = None  # [P] int32
    char_offsets: torch.Tensor | None = None  # [P, 2] int32


def write_shard(path: Path, rows: list[RowTopK], dtype: torch.dtype) -> None:
    lengths = torch.tensor([0] + [row.ids.shape[0] for row in rows], dtype=torch.int64)
    tensors = {
        "offsets": lengths.cumsum(0),
        "logprobs": torch.cat([row.logprobs for row in rows]).to(dtype).contiguous(),
        "ids": torch.cat([row.ids for row in rows]).to(torch.int32).contiguous(),
        "target_logprobs": torch.cat([row.target_logprobs for row in rows]).float().contiguous(),
    }
    if rows and rows[0].token_positions is not None:
        tensors.update({name: torch.cat([getattr(row, name) for row in rows]).to(torch.int32).contiguous()
                        for name in CROSS_FIELDS})
    write_atomically(path, lambda temporary: save_file(tensors, temporary))


class CacheReader:
    """Rows of a complete cache, read from memory-mapped shards: a cache larger than memory is fine."""

    def __init__(self, folder: Path):
        manifest = read_manifest(folder)
        if manifest is None:
            raise CacheError(f"{folder} holds no teacher cache (no {MANIFEST}); build one with python -m trainer.cache.")
        if not manifest.complete:
            raise CacheError(f"the teacher cache in {folder} is incomplete; run the same python -m trainer.cache "
                             "command again to finish it.")
        self.folder, self.manifest = folder, manifest
        self._open: dict[tuple[str, int], tuple] = {}

    @property
    def top_k(self) -> int:
        return self.manifest.key["top_k"]

    def row(self, split: str, index: int) -> RowTopK:
        shard_rows = self.manifest.splits[split].shard_rows
        handle, offsets = self._shard(split, index // shard_rows)
        start, end = offsets[index % shard_rows], offsets[index % shard_rows + 1]
        names = ("logprobs", "ids", "target_logprobs", *(CROSS_FIELDS if self.cross_tokenizer else ()))
        return RowTopK(*(handle.get_slice(name)[start:end] for name in names))

    @property
    def cross_tokenizer(self) -> bool:
        """Built for distillation across tokenizers: rows as the teacher tokenises them, with offsets."""
        return bool(self.manifest.key.get("cross_tokenizer"))

    def _shard(self, split: str, shard: int):
        if (split, shard) not in self._open:
            handle = safe_open(str(shard_path(self.folder, split, shard)), framework="pt")
            self._open[split, shard] = (handle, handle.get_tensor("offsets").tolist())
        return self._open[split, shard]

    def batch(self, split: str, row_index: torch.Tensor, labels: torch.Tensor) -> tuple[SparseTeacher, torch.Tensor]:
        """The cached teacher laid out like a collated batch.

        row_index: ``[B]`` each row's index in its split; labels: ``[B, T]`` (unshifted).
        Returns a :class:`SparseTeacher` ``[B, T, k]`` aligned with
        :func:`~trainer.losses.objective.targets_at_each_position` (unsupervised positions are all
        padding) and the teacher's log-probability of each target ``[B, T]`` (0 where unsupervised).
        The top-k log-probabilities keep the cache's dtype: the loss reads their rounding from it."""
        supervised = targets_at_each_position(labels) != IGNORE_INDEX
        batch_size, length = labels.shape
        logprobs = torch.zeros(batch_size, length, self.top_k, dtype=getattr(torch, self.manifest.dtype))
        ids = torch.full((batch_size, length, self.top_k), -1, dtype=torch.int64)
        target_logprobs = torch.zeros(batch_size, length, dtype=torch.float32)
        for b, index in enumerate(row_index.tolist()):
            positions = supervised[b].nonzero().squeeze(1)
            if positions.numel() == 0:  # a fully masked filler row
                continue
            row = self.row(split, index)
            if row.ids.shape[0] != positions.numel():
                raise CacheError(
                    f"row {index} of the {split} data has {positions.numel()} supervised tokens but the teacher "
                    f"cache in {self.folder} holds {row.ids.shape[0]}; the data changed since the cache was built, "
                    "rebuild it with python -m trainer.cache."
                )
            logprobs[b, positions] = row.logprobs
            ids[b, positions] = row.ids.long()
            target_logprobs[b, positions] = row.target_logprobs
        return SparseTeacher(logprobs, ids), target_logprobs

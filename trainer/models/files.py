"""Where a model's files are, and what they say before any of them is loaded: whether a tokenizer is
there, which safetensors files `from_pretrained` would read, and their headers (tensor names, shapes,
extents).

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON naming
every tensor's dtype, shape and byte range, so its header costs a few kilobytes to read whatever
the weights weigh, and the file's size alone tells whether the weights it declares are all there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
# Any one of these lets AutoTokenizer build the model's own tokenizer. Without them it does not
# fail: for some model types it builds an empty one of the right class (1 token), which only
# shows up later as a tokenizer that matches nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class ModelFiles:
    """A model setting (`path`, `revision`) resolved to its files on this machine."""

    path: str
    revision: str | None
    folder: Path | None
    """The folder itself, or a hub id's snapshot in the local hub cache; None when not downloaded."""
    local: bool
    """Whether `path` is a folder on this machine rather than a hub id."""

    @property
    def id(self) -> str:
        """A local folder as an absolute path (one folder named two ways is one model); a hub id as is."""
        return os.path.abspath(self.folder) if self.local else self.path


def resolve_model(path: str, revision: str | None) -> ModelFiles:
    """Where `path`'s files are: the one place a model setting is turned into a folder."""
    expanded = Path(os.path.expanduser(path))
    if expanded.is_dir():
        return ModelFiles(path, revision, expanded, local=True)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception:  # not downloaded, or not a valid repo id: from_pretrained reports it
        folder = None
    return ModelFiles(path, revision, folder, local=False)


def model_folder(path: str, revision: str | None) -> Path | None:
    """:func:`resolve_model`'s folder, for checks given only a model's settings."""
    return resolve_model(path, revision).folder


class WeightsFileError(ValueError):
    """A weights file that cannot hold what it should; the message names the file and what is wrong."""


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files `from_pretrained` reads from `folder`, or None when it holds none.
    A single `model.safetensors` wins over an index, as in transformers. Raises WeightsFileError
    when the index is unreadable or names shards that are not there."""
    single = folder / SAFE_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / SAFE_WEIGHTS_INDEX
    if not index.is_file():
        return None
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise WeightsFileError(f"{SAFE_WEIGHTS_INDEX} is not a readable index (no weight_map)") from None
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise WeightsFileError(f"{SAFE_WEIGHTS_INDEX} names {len(shards)} shard files, {len(missing)} of which "
                               f"are not there ({shown})")
    return [folder / name for name in shards]


def read_header(file: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of one safetensors file, after checking
    the file is long enough for every byte range its header declares (an interrupted copy or
    download leaves a file that is short, or empty)."""
    size = file.stat().st_size
    if size == 0:
        raise WeightsFileError(f"{file.name} is empty (0 bytes)")
    with file.open("rb") as stream:
        prefix = stream.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else size
        if 8 + length > size:
            raise WeightsFileError(f"{file.name} is truncated ({size} bytes, shorter than its own header)")
        try:
            header = json.loads(stream.read(length))
        except ValueError:
            header = None
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"} if isinstance(header, dict) else None
    try:
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise WeightsFileError(f"{file.name} is not a safetensors file (its header does not describe tensors)") from None
    if 8 + length + end > size:
        raise WeightsFileError(f"{file.name} is truncated ({size} bytes of the {8 + length + end} its header declares)")
    return tensors

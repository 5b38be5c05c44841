"""What a teacher cache was computed from, and where the automatic one lives.

A cache is valid for a job only if it came from the same teacher weights, the same tokenizer, the
same tokenized rows and the same k. Each of those is reduced to a fingerprint; the manifest keeps
them, and a job compares its own against them part by part, so a refusal can name what differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from trainer.files import write_text_atomically
from trainer.models.loading import ModelError

# Files that decide what a model computes. Tokenizer files are fingerprinted separately.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MODEL_FILES = ("config.json",)
# The Hugging Face hub cache stores each large file as blobs/<sha256 of its content>.
_HUB_BLOB = re.compile(r"^[0-9a-f]{64}$")


def weights_fingerprint(folder: Path, memo_file: Path) -> str:
    """sha256 over the names and content hashes of a model's config and weight files.

    Hashing a 70B teacher's 140 GB takes minutes, so content hashes are remembered in `memo_file`
    by (path, size, mtime); a hub blob's own name is its content hash and costs nothing."""
    files = sorted(p for p in folder.iterdir() if p.name in _MODEL_FILES or p.name.endswith(_WEIGHT_SUFFIXES))
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files):
        raise ModelError(f"{folder} holds no weight files; point teacher.path at a folder written by save_pretrained.")
    memo = _read_memo(memo_file)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + _content_hash(file, memo).encode() + b"\n")
    _write_memo(memo_file, memo)
    return digest.hexdigest()


def _content_hash(file: Path, memo: dict) -> str:
    target = file.resolve()
    if _HUB_BLOB.match(target.name):
        return target.name
    stat = target.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    known = memo.get(str(target))
    if known and known["stamp"] == stamp:
        return known["sha256"]
    digest = hashlib.sha256()
    with open(target, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    memo[str(target)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def _read_memo(memo_file: Path) -> dict:
    try:
        return json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}


def _write_memo(memo_file: Path, memo: dict) -> None:
    write_text_atomically(memo_file, json.dumps(memo))


def auto_cache_folder(cache_root: Path, key: dict, data: dict) -> Path:
    """Where `teacher.cache=auto` looks: one folder per (teacher, tokenizer, k, data)."""
    described = json.dumps({"key": key, "data": data}, sort_keys=True).encode()
    return cache_root / "teacher_cache" / hashlib.sha256(described).hexdigest()[:20]


def differences(expected: dict, found: dict) -> list[str]:
    """The key parts whose values differ, named."""
    return [name for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name)]

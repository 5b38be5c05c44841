"""`provenance.json`: what a run was made of, written by rank 0 to the run directory and beside the
adapter (or model), so the output carries its own history wherever it is copied.

It records the teacher and student (ids, revisions, sha256 of every weight, tokenizer and config
file), the data files (sha256, rows), the teacher cache's key when one was read, whether the run
was on-policy and with which sampling settings (`on_policy`), the resolved config, the code's git
commit, package versions, ranks and devices, start and end times, the final metrics and the licence
decision with its obligations.

Sealing: `record_sha256` is the sha256 (hex) of the record's canonical JSON without that field:
UTF-8, keys sorted, separators `,` and `:` with no spaces, non-ASCII characters as themselves, as
Python's `json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes it.
Non-finite floats, which JSON cannot hold, are stored as the strings "nan", "inf" and "-inf".
:func:`verify` recomputes it: any edit to the file's values makes it fail.

Hashing a large teacher is the expensive part. Each file's hash is remembered in
`<cache_dir>/weight_hashes.json` by (path, size, mtime), the memo the teacher cache's keys use, so
a file is read at most once per job and not again while it is unchanged; a hub blob's name is
already its sha256 and is not read at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from trainer.files import write_text_atomically

FORMAT = "distill-provenance"
FORMAT_VERSION = 1
FILE_NAME = "provenance.json"
SELF_HASH = "record_sha256"

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate", "safetensors", "tokenizers",
            "huggingface_hub", "datasets", "hydra-core", "omegaconf", "wandb", "numpy", "distill")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..+|merges\.txt|"
                              r"spiece\.model|.+\.tiktoken|chat_template\..+)$")
_CONFIG_FILES = re.compile(r"^(config\.json|generation_config\.json|.+\.index\.json)$")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ sealing
def canonical_json(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_hash(record: dict) -> str:
    """sha256 of the canonical JSON of `record` without its own `record_sha256`."""
    return hashlib.sha256(canonical_json({k: v for k, v in record.items() if k != SELF_HASH})).hexdigest()


def seal(record: dict) -> dict:
    """The record made JSON-safe, with `record_sha256` added."""
    plain = _plain({k: v for k, v in record.items() if k != SELF_HASH})
    return {**plain, SELF_HASH: record_hash(plain)}


def verify(record: dict) -> bool:
    """True when `record_sha256` matches the rest of the record."""
    return isinstance(record.get(SELF_HASH), str) and record[SELF_HASH] == record_hash(record)


def verify_file(path: Path) -> bool:
    return verify(json.loads(Path(path).read_text()))


def _plain(value):
    """JSON-safe: tuples and paths become lists and strings, non-finite floats strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write(record: dict, folders: list[Path]) -> dict:
    """Seal `record` and write the same bytes to `<folder>/provenance.json` for each folder."""
    sealed = seal(record)
    text = json.dumps(sealed, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    for folder in folders:
        write_text_atomically(Path(folder) / FILE_NAME, text)
    return sealed


# ----------------------------------------------------------------------------------- hashing
class FileHashes:
    """sha256 of files, remembered by (path, size, mtime) in the memo the teacher cache uses."""

    def __init__(self, memo_file: Path):
        # The cache keys' memo, shared so a teacher hashed for its cache is not read again here.
        from trainer.cache.key import _read_memo

        self.memo_file, self.memo = memo_file, _read_memo(memo_file)

    def __call__(self, file: Path) -> str:
        from trainer.cache.key import _content_hash

        return _content_hash(file, self.memo)

    def save(self) -> None:
        from trainer.cache.key import _write_memo

        _write_memo(self.memo_file, self.memo)


def model_files(path: str | None, revision: str | None, hashes: FileHashes) -> dict:
    """The model's id, revision and the sha256 of its weight, tokenizer and config files, as read
    from its local folder (a hub id's snapshot in the hub cache, whose folder name is the commit)."""
    from trainer.models.files import model_folder

    if path is None:
        return {"path": None}
    folder = model_folder(path, revision)
    entry = {"path": path, "revision": revision, "folder": str(folder) if folder else None,
             "commit": folder.name if folder is not None and folder.parent.name == "snapshots" else None}
    if folder is None:  # a hub id no longer in the local cache: nothing to hash
        return entry
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for group, wanted in (("weights", lambda n: n.endswith(_WEIGHT_SUFFIXES)), ("tokenizer", _TOKENIZER_FILES.match),
                          ("config", _CONFIG_FILES.match)):
        entry[group] = {p.name: hashes(p) for p in files if wanted(p.name)}
    return entry


def _held_out(cfg) -> dict | None:
    """Where the evaluation rows came from when no data.eval was given (None: from data.eval)."""
    if cfg.data.eval:
        return None
    return {"from": "data.train", "eval_fraction": cfg.data.eval_fraction, "seed": cfg.train.seed,
            "max_eval_rows": cfg.data.max_eval_rows}


def on_policy(onpolicy_cfg) -> dict:
    """Whether the student wrote some of its own training responses (on-policy distillation, GKD) and
    how it sampled them. An off-policy run records fraction 0 and no sampling settings: they did nothing."""
    fraction = float(onpolicy_cfg.fraction)
    if fraction == 0:
        return {"enabled": False, "fraction": 0.0}
    return {"enabled": True, "fraction": fraction, "max_new_tokens": int(onpolicy_cfg.max_new_tokens),
            "temperature": float(onpolicy_cfg.temperature), "top_p": float(onpolicy_cfg.top_p)}


def cross_tokenizer(loss_cfg) -> dict:
    """Whether the student was distilled across tokenizers (the teacher's differs), and by which
    method; a run with one tokenizer records `enabled: false` alone."""
    method = None if loss_cfg.kind == "sft" else loss_cfg.cross_tokenizer
    if method is None:
        return {"enabled": False}
    entry = {"enabled": True, "method": method, "uld_top_k": int(loss_cfg.uld_top_k)}
    return {**entry, "uld_weight": float(loss_cfg.uld_weight)} if method == "gold" else entry


def data_files(source, hashes: FileHashes) -> list[dict]:
    """One entry per source of a split: a file (sha256, bytes, rows), a saved dataset folder (every
    file's sha256) or a `datasets` name (only the name: its files are the hub's)."""
    specs = [str(source)] if isinstance(source, (str, Path)) else [str(s) for s in source]
    entries = []
    for spec in specs:
        path = Path(spec).expanduser()
        folder = Path(spec.rpartition(":")[0]).expanduser() if ":" in spec else None
        if path.is_file():
            entries.append({"source": spec, "path": str(path.resolve()), "sha256": hashes(path),
                            "bytes": path.stat().st_size, "rows": _count_rows(path)})
        elif path.is_dir() or (folder is not None and folder.is_dir()):
            root = path if path.is_dir() else folder
            entries.append({"source": spec, "path": str(root.resolve()), "rows": None,
                            "files": {str(p.relative_to(root)): hashes(p) for p in sorted(root.rglob("*")) if p.is_file()}})
        else:
            entries.append({"source": spec, "rows": None})
    return entries


def _count_rows(path: Path) -> int | None:
    """Rows as the trainer reads them: non-blank lines of a JSONL file, a Parquet file's row count."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    with open(path, "rb") as lines:
        return sum(1 for line in lines if line.strip())


# ---------------------------------------------------------------------------- the environment
def code_version() -> dict:
    """The git commit of the checkout this code runs from (null when it is installed, not checked
    out), and whether tracked files differ from it."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:  # --no-optional-locks: reading must not take the index lock from someone working in the checkout
            done = subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # not a checkout of this project (e.g. installed in a venv)
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def this_rank(rank) -> dict:
    """This rank's host and device, for gathering on rank 0."""
    import socket

    import torch

    device = rank.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"rank": rank.rank, "host": socket.gethostname(), "device": str(device), "name": name}


def gather_ranks(rank) -> list[dict]:
    """Every rank's :func:`this_rank`, on every rank. Collective."""
    import torch.distributed as dist

    ranks = [None] * rank.world_size
    dist.all_gather_object(ranks, this_rank(rank))
    return ranks


def model_entry(cfg_model, hashes: FileHashes, **extra) -> dict:
    return {**model_files(cfg_model.path, cfg_model.revision, hashes), **extra}


def build_record(cfg, *, run_dir: Path, out_dir: Path, decision, student_licence, model_name: str, name_complies,
                 started_at: str,
                 metrics: dict, ranks: list[dict], cache_manifest=None, cache_folder: Path | None = None,
                 rows_trained: int | None = None, memo_file: Path) -> dict:
    """Everything but the seal. Reads every model and data file (once: see :class:`FileHashes`)."""
    from omegaconf import OmegaConf

    from trainer.preflight.splits import data_sources

    hashes = FileHashes(memo_file)
    cache = None
    if cache_manifest is not None:
        cache = {"folder": str(cache_folder), "key": cache_manifest.key, "teacher": cache_manifest.teacher,
                 "splits": {name: {"data": info.data, "rows": info.rows} for name, info in cache_manifest.splits.items()}}
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "started_at": started_at, "finished_at": None,
        "run_dir": str(Path(run_dir).resolve()),
        "output": {"folder": out_dir.name, "model_name": model_name, "name_complies_with_licence": name_complies},
        "teacher": model_entry(cfg.teacher, hashes, source="cache" if cfg.teacher.cache else "model", cache=cache),
        "student": model_entry(cfg.student, hashes, peft=cfg.peft.kind,
                               licence={**student_licence.card_fields(), "read_from": student_licence.read_from}),
        "data": {split: data_files(source, hashes) for split, source in data_sources(cfg.data).items()},
        "held_out": _held_out(cfg),
        "rows_trained": rows_trained,
        "on_policy": on_policy(cfg.onpolicy),
        "cross_tokenizer": cross_tokenizer(cfg.loss),
        "licence": decision.as_record(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "code": code_version(),
        "packages": package_versions(),
        "world": {"world_size": len(ranks), "ranks": ranks},
        "metrics": metrics,
    }
    hashes.save()
    record["finished_at"] = now()
    return record

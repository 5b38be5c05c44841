"""Resumable training state (`checkpoints/`) and the outputs users load (`adapter/`, `model/`, `merged/`).

A checkpoint is the folder `checkpoints/step_<N>`: DeepSpeed's engine state (trainable weights,
optimizer, LR scheduler), every rank's RNG states and `trainer_state.json` (step, tokens seen, the
skipped steps, the W&B run id, and what the run was made of) plus one `rank<R>_state.pt` per
rank (its RNG states and its share of the open log window), and `manifest.json`, the size of every
other file, written last (resume.py verifies it before a resume). It is written
under `step_<N>.partial`, renamed once every rank's files are complete, and only then published by
rewriting the `latest` marker (write a temporary file, then rename it over the old one). A crash at
any moment therefore leaves `latest` naming a complete checkpoint, or no `latest` at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.errors import UserError, first_line
from trainer.files import free_space, write_failure_reason, write_text_atomically

log = logging.getLogger(__name__)


CHECKPOINTS = "checkpoints"


LATEST = "latest"


STATE_FILE = "trainer_state.json"


MANIFEST = "manifest.json"


PARTIAL = ".partial"


TAG_PREFIX = "step_"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or used; the message says what to do."""


@dataclass
class TrainerState:
    """What the loop needs besides the engine to go on exactly where it stopped."""

    step: int
    tokens_seen: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    world_size: int = 1
    rows_per_step: int = 0
    """The global batch: the rows of step s depend on it (batching.py), not on how ranks split it."""
    identity: dict = field(default_factory=dict)
    """What the run is made of (models, data, LoRA shape): a checkpoint of another run is refused."""
    zero_stage: int | None = None
    """The ZeRO stage it was saved under, which decides DeepSpeed's file layout (None: saved before
    this was recorded; resume.py then reads the layout from the file names)."""
    nonfinite_in_a_row: int = 0
    """Updates skipped (NaN/Inf) in a row up to `step`: a resumed run goes on counting from here."""
    largest_abs_weight: float | None = None
    """max |w| over the trainable weights at `step` (inf when one is not finite); None: not recorded."""
    initial_largest_abs_weight: float | None = None
    """The same at step 0 of the run, to judge the one above by."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


# ------------------------------------------------------------------------------------ finding
def published(root: Path) -> Path | None:
    """The checkpoint `root/latest` names; None when nothing was published yet."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    folder = root / marker.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{marker} names {folder.name}, which is not a complete checkpoint (it was written "
                              f"by another program, or edited); delete {marker} to start afresh, or point it at a "
                              "complete step_N folder.")
    return folder


def read_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / STATE_FILE).read_text()))


def check_same_run(folder: Path, state: TrainerState, identity: dict) -> None:
    """Refuse a checkpoint of a different teacher, student, data or LoRA shape, by name."""
    differing = [key for key in sorted(set(identity) | set(state.identity))
                 if state.identity.get(key) != identity.get(key)]
    if differing:
        key = differing[0]
        raise CheckpointError(
            f"checkpoint {folder} was made with {key}={state.identity.get(key)!r}, this job has {identity.get(key)!r}"
            + (f" (and {len(differing) - 1} more: {', '.join(differing[1:])})" if len(differing) > 1 else "")
            + "; restore the setting, or start afresh with resume=never in a new run directory (hydra.run.dir=...)."
        )


# ------------------------------------------------------------------------------------- saving
def save_checkpoint(engine, run_dir: Path, state: TrainerState, keep: int, rank_state: dict) -> Path:
    """Write `checkpoints/step_<N>` on every rank, publish it, and keep the newest `keep`. Collective.
    `rank_state`: this rank's own values (plain numbers and tensors), returned by `load_checkpoint`."""
    root = run_dir / CHECKPOINTS
    tag = tag_for(state.step)
    staging = root / (tag + PARTIAL)
    is_main = dist.get_rank() == 0
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a save of this step that crashed midway
    dist.barrier()
    with _save_failures_reported(root, staging, tag):
        # Frozen base weights are reloaded from the model folder; saving them would cost a copy
        # of the whole student per checkpoint for a LoRA run.
        engine.save_checkpoint(str(root), tag=staging.name, save_latest=False, exclude_frozen_parameters=True)
        torch.save({**rank_state, "rng": _rng_states()}, _rank_file(staging))
        if is_main:
            (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    dist.barrier()  # every rank's files are written before the checkpoint may count
    if is_main:
        with _save_failures_reported(root, staging, tag):
            _write_manifest(staging)
        _publish(root, staging, tag)
        _keep_newest(root, keep)
    dist.barrier()
    return root / tag


def _write_manifest(staging: Path) -> None:
    """Every file's size, read once all ranks have written theirs. Each is opened to be measured:
    on a network filesystem opening a file revalidates the size another node left it at."""
    sizes = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            sizes[path.relative_to(staging).as_posix()] = os.fstat(handle.fileno()).st_size
    (staging / MANIFEST).write_text(json.dumps({"files": sizes}, indent=1))


def _publish(root: Path, staging: Path, tag: str) -> None:
    final = root / tag
    if final.exists():
        # Left by an earlier life of this run that crashed after renaming but before publishing,
        # or that was resumed from an older checkpoint: this save supersedes it.
        stale = root / (tag + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        staging.rename(final)
        shutil.rmtree(stale)
    else:
        staging.rename(final)
    write_text_atomically(root / LATEST, tag)  # a reader sees the old marker or the new one, never half


def _keep_newest(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the published one), and the
    leftovers of saves that crashed."""
    published_tag = (root / LATEST).read_text().strip()
    complete = sorted((p for p in root.glob(f"{TAG_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()
                       and p.suffix == ""), key=lambda p: p.name)
    for folder in complete[:-keep] if keep > 0 else []:
        if folder.name != published_tag:
            shutil.rmtree(folder)
    for leftover in [*root.glob(f"*{PARTIAL}"), *root.glob("*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _save_failures_reported(root: Path, staging: Path, tag: str):
    """A failed write becomes one line saying why and what is left; the half-written folder goes."""
    try:
        yield
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        failure = _save_failed(error, root, tag)  # first: it asks the disk, before the cleanup frees space
        shutil.rmtree(staging, ignore_errors=True)
        raise failure from None


def _save_failed(error: BaseException, root: Path, tag: str) -> CheckpointError:
    reason = write_failure_reason(error, root)
    previous = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    kept = (f"the previous checkpoint {previous} is intact and the same command resumes from it"
            if previous else "no earlier checkpoint exists")
    return CheckpointError(f"writing checkpoint {tag} in {root} failed ({reason}; {free_space(root)}); "
                           f"{kept}; free some space (or lower checkpoint.keep) and run the same command again.")


# ------------------------------------------------------------------------------------ loading
def load_checkpoint(engine, folder: Path, step: int) -> dict:
    """Engine state and this rank's RNG states from `folder`; returns this rank's `rank_state`. Collective."""
    with _load_failures_reported(folder):
        path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}; start afresh with resume=never.")
        rank_state = {}
        if _rank_file(folder).is_file():
            rank_state = torch.load(_rank_file(folder), weights_only=True)
            _restore_rng_states(rank_state.pop("rng"))
        else:  # resumed on more ranks than saved: the new ranks' random streams start from the seed
            log.warning("%s has no state for rank %d; its random numbers will differ from an uninterrupted run.",
                        folder, dist.get_rank())
    log.info("resumed from %s at step %d", path, step)
    return rank_state


@contextlib.contextmanager
def _load_failures_reported(folder: Path):
    """The last net, for what the file checks before loading cannot see (bytes changed in place, a
    setting DeepSpeed needs the same): one line rather than DeepSpeed's bare assertion."""
    try:
        yield
    except (AssertionError, RuntimeError, OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {folder} ({type(error).__name__}: "
                              f"{first_line(error)}) although its files passed the checks made before loading; "
                              "restore the settings it was saved with (number of ranks, deepspeed), resume from an "
                              "earlier checkpoint with resume=<its step_N folder>, or start afresh with resume=never "
                              "in a new run directory (hydra.run.dir=...).") from None


def _rank_file(folder: Path) -> Path:
    return folder / f"rank{dist.get_rank()}_state.pt"


def _rng_states() -> dict:
    # Plain tuples and tensors only, so the file loads with weights_only=True (no pickle code).
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])

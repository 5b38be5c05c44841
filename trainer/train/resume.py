"""Which checkpoint a job may continue from, decided from its files before any weights load.

A damaged checkpoint (a file deleted, a model-states file cut short, an edited
`trainer_state.json`) or one saved under another ZeRO stage would otherwise fail inside
DeepSpeed with a bare AssertionError, after both models have loaded, and `resume=auto` would
repeat that on every retry. Each checkpoint lists its files' sizes in `manifest.json` when it is
saved (checkpoints.py), so a missing or truncated file is found here; checkpoints saved before
manifests existed are checked for the files they must hold. Sizes, not hashes: hashing a full
student's checkpoint at every save would cost minutes, and what breaks in practice is a file cut
short or removed, which the size shows.

:func:`checked_resume_point` is what the job calls: rank 0 chooses, every rank takes its choice,
and the checkpoint is refused by name when it belongs to another run (:func:`run_identity`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError
from trainer.errors import first_line
from trainer.metric_names import INITIAL
from trainer.preflight import Preflight
from trainer.ranks import broadcast_object
from trainer.train.checkpoints import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    STATE_FILE,
    TAG_PREFIX,
    CheckpointError,
    TrainerState,
    check_same_run,
    read_state,
)

log = logging.getLogger(__name__)

_TAG = re.compile(rf"{TAG_PREFIX}(\d+)")


# ------------------------------------------------------------------------------------ the job's
@dataclass
class ResumePoint:
    folder: Path
    state: TrainerState


def checked_resume_point(cfg, run_dir: Path, identity: dict, is_main: bool) -> ResumePoint | None:
    """The checkpoint this job continues from (None: a fresh start), verified, and refused by name
    when it belongs to another teacher, student, data or LoRA shape, another ZeRO layout, or a step
    past train.max_steps. Before any weights load: a wrong checkpoint costs nothing."""
    folder = agreed_resume_point(run_dir, cfg.resume, is_main)
    if folder is None:
        return None
    state = read_state(folder)
    check_same_run(folder, state, identity)
    check_fits_job(folder, state, cfg.deepspeed.stage, cfg.train.max_steps)
    check_metric_survives_resume(cfg.train.metric, folder, state.step)
    return ResumePoint(folder, state)


def agreed_resume_point(run_dir: Path, resume: str, is_main: bool) -> Path | None:
    """Rank 0 verifies the checkpoints and chooses; every rank takes its choice, or its error.
    Ranks judging the files each on their own could resume from different checkpoints."""
    choice = None
    if is_main:
        try:
            folder = choose_resume_point(run_dir, resume)
            choice = ("resume", str(folder) if folder is not None else None)
        except CheckpointError as error:
            choice = ("refuse", str(error))
    verdict, value = broadcast_object(choice)
    if verdict == "refuse":
        raise CheckpointError(value)
    return Path(value) if value is not None else None


def check_metric_survives_resume(metric: str, folder: Path, step: int) -> None:
    """A resumed job does not evaluate before its first step, so its summary has no `initial/...`."""
    if metric.startswith(INITIAL):
        raise ConfigError(f"train.metric={metric} is measured before the first step, and this job resumes from "
                          f"{folder} at step {step}, so it has none; pick an eval/ or train/ metric, or set "
                          "resume=never to start afresh.")


def run_identity(cfg, checked: Preflight) -> dict:
    """What makes a checkpoint belong to this run: a different value is a different run."""
    models = checked.models
    return {
        "teacher.path": models["teacher"].id if cfg.teacher.path else f"cache {cfg.teacher.cache}",
        "teacher.revision": cfg.teacher.revision,
        "student.path": models["student"].id,
        "student.revision": cfg.student.revision,
        # The rows' contents, wherever the files now live.
        **{f"data.{split}": f"rows with sha256 {fingerprint[:16]} at train.seq_len={cfg.train.seq_len}"
           for split, fingerprint in checked.data_fingerprints.items()},
        **({"data.pack": "true"} if cfg.data.pack else {}),  # packing changes every step's rows
        "peft.kind": cfg.peft.kind,
        **({f"peft.{key}": str(cfg.peft[key]) for key in ("r", "alpha", "target_modules")}
           if cfg.peft.kind == "lora" else {}),
    }


# ------------------------------------------------------------------------------------ choosing
def choose_resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint folder to continue from, verified; None for a fresh start.

    `auto`: the checkpoint the run directory's `latest` names, or, when that one does not verify,
    the newest earlier one that does (with a warning naming the damaged one). A path (a
    `step_N` folder, or a checkpoints folder with a `latest` marker) must verify itself: the
    user chose it, so it is refused by name rather than replaced."""
    if resume == "never":
        return None
    if resume == "auto":
        return _newest_intact(run_dir / CHECKPOINTS)
    folder = _named_folder(Path(os.path.expanduser(resume)), resume)
    problem = problem_with(folder)
    if problem:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed: {problem}; "
                              f"{_instead(folder.parent, below=_step_of(folder))}.")
    return folder


def _named_folder(path: Path, resume: str) -> Path:
    if _looks_like_a_checkpoint(path):
        return path
    marker = path / LATEST
    if marker.is_file():
        return path / marker.read_text().strip()
    raise CheckpointError(f"resume={resume} is not a checkpoint: it holds neither {STATE_FILE} nor a `{LATEST}` "
                          "marker; point it at a checkpoints/step_N folder, or use resume=auto or resume=never.")


def _looks_like_a_checkpoint(path: Path) -> bool:
    """A step folder, even one whose trainer_state.json is gone: it is then reported as damaged."""
    return (path / STATE_FILE).is_file() or (path / MANIFEST).is_file() or bool(_TAG.fullmatch(path.name))


def _newest_intact(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.is_file():
        return None  # nothing was published yet: a fresh start
    named = root / marker.read_text().strip()
    problem = problem_with(named)
    if problem is None:
        return named
    fallback = _newest_verifying(root, below=_step_of(named))
    if fallback is None:
        raise CheckpointError(f"checkpoint {named} cannot be resumed: {problem}; no earlier checkpoint in {root} "
                              "verifies either; start afresh with resume=never in a new run directory "
                              "(hydra.run.dir=...).")
    log.warning("checkpoint %s cannot be resumed: %s; resuming from %s, the newest earlier one that verifies (the "
                "damaged one is left in place until a save of its step replaces it).", named, problem, fallback)
    return fallback


def _instead(root: Path, below: int | None) -> str:
    """What an explicit resume to a damaged checkpoint can do instead."""
    fallback = _newest_verifying(root, below) if root.is_dir() else None
    if fallback is not None:
        return f"resume from the newest earlier one that verifies with resume={fallback}, or start afresh with resume=never"
    return "start afresh with resume=never in a new run directory (hydra.run.dir=...)"


def _newest_verifying(root: Path, below: int | None) -> Path | None:
    """The newest `step_N` folder in `root` before step `below` (any, when None) that verifies."""
    steps = sorted(((_step_of(p), p) for p in root.glob(f"{TAG_PREFIX}*") if _step_of(p) is not None),
                   key=lambda pair: pair[0], reverse=True)
    for step, folder in steps:
        if (below is None or step < below) and problem_with(folder) is None:
            return folder
    return None


def _step_of(folder: Path) -> int | None:
    match = _TAG.fullmatch(folder.name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------- verifying
def problem_with(folder: Path) -> str | None:
    """Why `folder` cannot be resumed, judged from its files without reading any weights; None
    when it verifies."""
    if not folder.is_dir():
        return "the folder does not exist"
    problem = _state_problem(folder)
    if problem is None:
        manifest = folder / MANIFEST
        problem = _manifest_problem(folder, manifest) if manifest.is_file() else _old_layout_problem(folder)
    return problem or _archive_problem(folder)


def _state_problem(folder: Path) -> str | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return f"its {STATE_FILE} is missing"
    try:
        state = read_state(folder)
    except (OSError, ValueError, TypeError) as error:  # TypeError: keys that are not TrainerState's
        return f"its {STATE_FILE} is not valid ({first_line(error)})"
    if not isinstance(state.step, int) or state.step < 0:
        return f"its {STATE_FILE} holds no valid step ({state.step!r})"
    return None


def _manifest_problem(folder: Path, manifest: Path) -> str | None:
    """Every file the save wrote is there, at the size it was written."""
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is not valid ({first_line(error)})"
    for name, size in sorted(sizes.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when it was saved"
    return None


def _old_layout_problem(folder: Path) -> str | None:
    """A checkpoint saved before manifests: the files every one holds (DeepSpeed's model states,
    one RNG file per rank it was saved with)."""
    state = read_state(folder)
    if not list(folder.glob("*model_states.pt")):
        return "it holds no DeepSpeed model states (*model_states.pt)"
    for rank in range(state.world_size):
        if not (folder / f"rank{rank}_state.pt").is_file():
            return f"rank{rank}_state.pt is missing (it was saved by {state.world_size} ranks)"
    return None


def _archive_problem(folder: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at its end: a file cut short has none.
    Reading that end costs a few kilobytes per file, whatever its size."""
    for path in sorted(folder.glob("*.pt")):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is not a complete torch file (cut short, or overwritten)"
    return None


# ------------------------------------------------------------------------------ fitting the job
# How DeepSpeed lays a checkpoint out at each ZeRO stage: it reads a checkpoint only into the same
# layout (stages 1 and 2 read each other's; stage 0 keeps the optimizer in the model states file,
# stage 3 partitions the weights too). Another layout fails in DeepSpeed after both models load.
_LAYOUTS = {0: "replicated", 1: "partitioned optimizer", 2: "partitioned optimizer", 3: "partitioned weights"}
_STAGES_OF = {"replicated": "0", "partitioned optimizer": "1 or 2", "partitioned weights": "3"}


def check_fits_job(folder: Path, state: TrainerState, zero_stage: int, max_steps: int) -> None:
    """Refuse, before any weights load, a checkpoint this job's ZeRO stage cannot read or one
    already past its last step."""
    saved = _LAYOUTS[state.zero_stage] if state.zero_stage is not None else _layout_from_files(folder)
    if saved is not None and saved != _LAYOUTS[zero_stage]:
        stages = str(state.zero_stage) if state.zero_stage is not None else _STAGES_OF[saved]
        raise CheckpointError(
            f"checkpoint {folder} was saved under ZeRO stage {stages} and this job runs stage {zero_stage}, whose "
            f"files DeepSpeed lays out differently; resume with deepspeed=zero{stages.split()[-1]}, or start afresh "
            "with resume=never in a new run directory (hydra.run.dir=...).")
    if state.step > max_steps:
        # Going on would train nothing, export the step-N weights under a run that says it took
        # max_steps, and log an evaluation of an earlier step after a later one.
        raise CheckpointError(
            f"checkpoint {folder} is at step {state.step}, past train.max_steps={max_steps}; set "
            f"train.max_steps={state.step} to export it as it is (or higher to train on), or start afresh with "
            "resume=never in a new run directory (hydra.run.dir=...).")


def _layout_from_files(folder: Path) -> str | None:
    """The layout of a checkpoint saved before its state recorded the stage, from DeepSpeed's file
    names; None when they do not tell (bf16 runs name their optimizer files differently)."""
    if list(folder.glob("zero_pp_rank_*_model_states.pt")):
        return "partitioned weights"
    if not (folder / "mp_rank_00_model_states.pt").is_file():
        return None
    if list(folder.glob("zero_pp_rank_*_optim_states.pt")):
        return "partitioned optimizer"
    return None if list(folder.glob("*optim_states.pt")) else "replicated"

"""The job's hold on its run directory: one job in it at a time, and nothing of an earlier run
changed before this job's inputs have passed their checks.

Hydra itself would write `.hydra/` and open its log in the run directory before any code of ours
runs, so a refused job, or a second job started into a directory another job is using, would
rewrite the record of the run already there. `conf/config.yaml` therefore turns both off
(`hydra.output_subdir: null`; a log handler that holds its lines, `conf/hydra/job_logging/held.yaml`)
and the job does them itself:

1. `claim_run_dir` (at the start, rank 0 for all ranks): an exclusive `flock` on `<run dir>/.lock`,
   held for the job's life. A second job into the same directory stops, every rank of it, with one
   line. The OS drops the lock when its holder dies, so a killed job leaves none behind, and
   workers restarted by torchrun or a requeued SLURM job come back into their directory.
2. `RunDir.keep_record()` (rank 0, once the inputs passed their checks): `.hydra/config.yaml`,
   `hydra.yaml` and `overrides.yaml` with what Hydra would have written, and the log file with the
   lines logged so far.

A user who sets `hydra.output_subdir` gets Hydra's own behaviour: it writes there at start-up.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import socket
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf, read_write

from trainer.errors import UserError

LOCK_FILE = ".lock"
RECORD_SUBDIR = ".hydra"


class RunDirError(UserError, RuntimeError):
    """The run directory is in use by another job, or cannot be written; the message says what to do."""


class HeldFileHandler(logging.FileHandler):
    """Hydra's log file, which holds its lines until the job has passed its checks: a refused job
    appends nothing to the log of the run already in its directory, and creates no log there."""

    def __init__(self, filename, mode: str = "a", encoding=None, errors=None):
        super().__init__(filename, mode, encoding=encoding, delay=True, errors=errors)
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is None:
            super().emit(record)
        else:
            self.held.append(record)

    def stop_holding(self) -> None:
        """Write the lines held so far, and every later one as it comes. (Not `release`: that is
        `logging.Handler`'s lock.)"""
        held, self.held = self.held or [], None
        for record in held:
            super().emit(record)


class RunDir:
    """A run directory this job holds (rank 0 holds the lock; the other ranks know the path)."""

    def __init__(self, path: Path, is_main: bool, cfg, lock_handle=None):
        self.path, self.is_main, self._lock = path, is_main, lock_handle
        self._record = _hydra_record(cfg) if is_main else {}

    def keep_record(self) -> None:
        """`.hydra/` and the log, on rank 0: the job is about to change the directory. Idempotent."""
        if not self.is_main:
            return
        for name, text in self._record.items():
            folder = self.path / RECORD_SUBDIR
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
        self._record = {}
        for handler in logging.getLogger().handlers:
            if isinstance(handler, HeldFileHandler):
                handler.stop_holding()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None


@contextlib.contextmanager
def claim_run_dir(path: Path, rank, cfg):
    """Hold `path` for the job whose config is `cfg` (yields a :class:`RunDir`); every rank raises
    RunDirError when rank 0 could not take it. Collective."""
    from trainer.ranks import broadcast_object

    lock, refusal = _lock(path) if rank.is_main else (None, None)
    path_and_refusal = broadcast_object((str(path), refusal))
    if path_and_refusal[1] is not None:
        raise RunDirError(path_and_refusal[1])
    run_dir = RunDir(Path(path_and_refusal[0]), rank.is_main, cfg, lock)
    try:
        yield run_dir
    finally:
        run_dir.release()


def _lock(path: Path):
    """(the open lock file, None) when this process now holds `path`, else (None, why not)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as error:
        return None, _unwritable(path, error)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another job"
        handle.close()
        return None, (f"the run directory {path} is in use by {holder}; wait for that job to end, or give this one "
                      f"a directory of its own ({_dir_key()}=<new folder>).")
    handle.truncate(0)  # who holds it, for the message a second job prints
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now():%Y-%m-%d %H:%M:%S}\n")
    handle.flush()
    return handle, None


def unusable_reason(folder: Path) -> str | None:
    """Why no run directory can be made at `folder` (a file in the way, a read-only place), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is read-only"
    return None


def _unwritable(path: Path, error: OSError) -> str:
    return (f"cannot write to the run directory {path} ({error.strerror or error}); make it a writable folder, or "
            f"choose another with {_dir_key()}=<folder>.")


def _dir_key() -> str:
    """The override that moves this job elsewhere: a sweep's jobs live under hydra.sweep.dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "hydra.sweep.dir"
    return "hydra.run.dir"


def _hydra_record(cfg) -> dict[str, str]:
    """The files Hydra writes to `.hydra/`, as it would have written them at the job's start (the
    job later fills in values such as the demo's paths); nothing when Hydra writes them itself."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return {}
    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    with read_write(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = RECORD_SUBDIR  # where the record is, as Hydra's own would say
    return {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}

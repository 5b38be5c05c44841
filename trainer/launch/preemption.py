"""Stopping cleanly when the cluster asks: checkpoint at a step boundary, then hand back for a requeue.

SLURM warns a job before its time limit or a preemption with a signal (`--signal=USR2@90`, or
submitit's USR2; USR1 is common too) and a preemption may end with TERM. A signal lands on whichever
ranks SLURM or the launcher delivers it to, at any point in a step, so the handler only notes it;
at the next step boundary every rank learns whether any rank got one (one small all-reduce), and
all of them save the same checkpoint and stop together.

What happens next depends on the signal and on who launched the job:

- USR1/USR2 under submitit (hydra-submitit-launcher): submitit's own handler runs, which resubmits
  the job with the same arguments; the job finds its checkpoint when it starts again.
- USR1/USR2 under plain SLURM (`sbatch scripts/slurm.sbatch`): rank 0 runs `scontrol requeue`; the
  job keeps its id, so it comes back to the same run directory and resumes there.
- TERM: the checkpoint is saved and the job exits; a preempting SLURM requeues it by itself, and
  anywhere else the same command resumes it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (*REQUEUE_SIGNALS, signal.SIGTERM)
# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry".
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Raised out of the training loop once the checkpoint for `step` is saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum = signum
        self.step = step


class PreemptionWatch:
    """Notes stop signals as they arrive; `agreed_signal()` is the collective check between steps.

    Collective on every rank. Under NCCL the check travels over a gloo group of its own, so it
    costs no device synchronisation."""

    def __init__(self):
        self.received = 0
        self.previous = {}
        self.group = _cpu_group()

    def __enter__(self) -> PreemptionWatch:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _note(self, signum, frame) -> None:
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)
        self.received = self.received or signum

    def agreed_signal(self) -> int:
        """The signal any rank received (0 if none), the same on every rank."""
        if dist.get_world_size() == 1:  # no one to agree with: no collective every step
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


@functools.cache
def _cpu_group():
    """None (the default group) under gloo; else one gloo group for the life of the process, made
    once on every rank, as new_group must be."""
    return dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None


def hand_back(stop: Preempted, previous_handler, is_main: bool) -> None:
    """After the checkpoint: have the job requeued (USR1/USR2), then exit on every rank together."""
    log.warning("%s; its checkpoint is saved, and the requeued job (or the same command run again) "
                "resumes from it.", stop)
    if stop.signum in REQUEUE_SIGNALS:
        _request_requeue(stop.signum, previous_handler, is_main)
    # No rank leaves before the requeue is asked for: srun may end a step once one task exits non-zero.
    dist.barrier(group=_cpu_group())
    raise SystemExit(EXIT_PREEMPTED)


def _request_requeue(signum: int, previous_handler, is_main: bool) -> None:
    if callable(previous_handler):
        try:
            previous_handler(signum, None)  # submitit's: rank 0 resubmits through checkpoint()
        except SystemExit:
            pass  # submitit exits after resubmitting; this rank leaves with the others instead
    elif is_main and "SLURM_JOB_ID" in os.environ:
        _scontrol_requeue(os.environ["SLURM_JOB_ID"])


def _scontrol_requeue(job_id: str) -> None:
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        log.error("scontrol requeue %s failed (%s); resubmit the same command to resume.", job_id,
                  done.stderr.strip())
    else:
        log.warning("requeued SLURM job %s", job_id)

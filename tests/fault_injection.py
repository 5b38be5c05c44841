"""`python -m fault_injection [overrides]`: `python -m trainer` with one fault, named by DISTILL_TEST_FAULT.

The faults are real where it matters (a process killed with SIGKILL, an OSError from a write)
and placed deterministically, so a test knows exactly what the restart must find:

- `kill_after_checkpoint=N`: every rank SIGKILLs itself once checkpoint N is published;
- `kill_while_saving=N`: every rank SIGKILLs itself in the middle of writing checkpoint N
  (DeepSpeed's files written, the rank and trainer state not yet);
- `no_space_while_saving=N`: writing checkpoint N fails with ENOSPC, as on a full disk;
- `nan_loss=R@S` or `nan_loss=R@S-`: rank R's loss is NaN at step S (or at every step from S);
- `nan_final_eval`: the final evaluation's student metrics are NaN, as those of a student whose
  weights diverged (every loss of training finite).

Every job also prints `PARAM_DIGEST rank=<r> <sha256>` of its trainable weights before exporting.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal

import torch
import torch.distributed as dist

from trainer.losses.objective import TokenSums
from trainer.train import checkpoints, job

FAULT, _, ARGUMENT = os.environ.get("DISTILL_TEST_FAULT", "").partition("=")
saving_step = {"now": None}


def _wrap_save_checkpoint():
    original = checkpoints.save_checkpoint

    def save_checkpoint(engine, run_dir, state, keep, rank_state):
        saving_step["now"] = state.step
        folder = original(engine, run_dir, state, keep, rank_state)
        if FAULT == "kill_after_checkpoint" and state.step == int(ARGUMENT):
            os.kill(os.getpid(), signal.SIGKILL)
        return folder

    checkpoints.save_checkpoint = save_checkpoint


def _wrap_rng_states():
    original = checkpoints._rng_states

    def rng_states():
        if FAULT in ("kill_while_saving", "no_space_while_saving") and saving_step["now"] == int(ARGUMENT):
            if FAULT == "kill_while_saving":
                os.kill(os.getpid(), signal.SIGKILL)
            if FAULT == "no_space_while_saving":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original()

    checkpoints._rng_states = rng_states


def _inject_nan_loss():
    rank, _, steps = ARGUMENT.partition("@")
    first = int(steps.rstrip("-"))
    hit = (lambda step: step >= first) if steps.endswith("-") else (lambda step: step == first)
    original_step, original_sums = job.DistillJob.train_step, job.DistillJob._micro_batch_sums

    def train_step(self, step, measure_grad_norm):
        self.poisoned = dist.get_rank() == int(rank) and hit(step + 1)
        return original_step(self, step, measure_grad_norm)

    def micro_batch_sums(self, teacher_states, student_states, labels, supervised, spans=None):
        sums = original_sums(self, teacher_states, student_states, labels, supervised, spans)
        if self.poisoned:
            return TokenSums(sums.objective * float("nan"), sums.kd, sums.ce)
        return sums

    job.DistillJob.train_step, job.DistillJob._micro_batch_sums = train_step, micro_batch_sums


def _poison_final_evaluation():
    original = job.DistillJob.evaluate

    def evaluate(self, step, **how):
        metrics = original(self, step, **how)
        if step == self.cfg.train.max_steps:
            return {**metrics, "eval/kl_to_teacher": float("nan"), "eval/student_ce": float("nan")}
        return metrics

    job.DistillJob.evaluate = evaluate


def _print_param_digest():
    original = job.DistillJob.finish

    def finish(self, initial, final, seconds):
        digest = hashlib.sha256()
        for name, param in self.parts.student.module.named_parameters():
            if param.requires_grad:
                digest.update(name.encode() + param.detach().to(torch.float32).cpu().numpy().tobytes())
        print(f"PARAM_DIGEST rank={dist.get_rank()} {digest.hexdigest()}", flush=True)
        return original(self, initial, final, seconds)

    job.DistillJob.finish = finish


if __name__ == "__main__":
    _wrap_save_checkpoint()
    _wrap_rng_states()
    if FAULT == "nan_loss":
        _inject_nan_loss()
    if FAULT == "nan_final_eval":
        _poison_final_evaluation()
    _print_param_digest()
    import runpy

    # Run as `python -m trainer` would: Hydra finds conf/ relative to trainer/__main__.py.
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)

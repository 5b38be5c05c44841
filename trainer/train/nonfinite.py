"""When NaN/Inf updates stop a job, and what it says about the weights when they do.

The skipping itself is the optimizer's (trainer/models/optimizer.py: a NaN/Inf step is skipped on
every rank together). The job counts the skips (trainer/train/progress.py) and stops with
:class:`TrainingDiverged` after train.max_nonfinite_steps in a row, or when the final evaluation is
not finite; :func:`streak_message` says what the weights and the newest checkpoint hold then.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.ranks import max_over_ranks


class TrainingDiverged(UserError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def largest_abs_weight(model: torch.nn.Module) -> float:
    """max |w| over the trainable weights of every rank (their shards under ZeRO-3); inf when one
    is NaN or Inf. Collective, and a host read: for checkpoints and stops, not for every step.

    A finite loss does not make weights healthy: at train.lr=1e6 one finite update took them to
    |w| ~ 1e5, and every later step was NaN. This number, beside its value at step 0, shows it."""
    tensors = [getattr(p, "ds_tensor", p).detach() for p in model.parameters() if p.requires_grad]
    tensors = [t for t in tensors if t.numel()]  # a rank's ZeRO-3 shard of a small weight may be empty
    local = torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).float().amax() if tensors else torch.zeros(())
    local = torch.nan_to_num(local, nan=float("inf")).reshape(1)  # NaN loses every comparison; inf wins them
    return float(max_over_ranks(local)[0])


def describe_weights(largest: float | None, at_step_0: float | None) -> str:
    """`finite, largest |w| 2.3e+05 (0.12 at step 0)`, or `not all finite`."""
    if largest is None:
        return "not recorded"
    if largest == float("inf"):
        return "not all finite"
    return f"finite, largest |w| {largest:.3g}" + (f" ({at_step_0:.3g} at step 0)" if at_step_0 is not None else "")


def streak_message(first: int, last: int, weights: str, newest: Path | None, newest_step: int | None,
                   newest_weights: str) -> str:
    """Why a run of `last - first + 1` skipped updates stopped the job, what its newest checkpoint
    holds, and what to do.

    Skipped updates leave the weights as they were and a step's rows depend on the seed and the
    step alone, so a checkpoint saved during the run of skips (or just before it) replays the
    same steps from the same weights. A resumed run also keeps its checkpoint's learning rate
    (the scheduler's state), so the way out is a fresh start with a lower one."""
    told = (f"the loss or gradients were NaN/Inf for {last - first + 1} steps in a row (steps {first}-{last}), so "
            f"the job stopped without saving; the trainable weights they started from are {weights}")
    if newest is None:
        kept = "no checkpoint was saved before them"
    elif newest_step is not None and newest_step >= first - 1:
        kept = (f"the newest checkpoint, {newest}, holds those same weights (skipped updates change nothing), so "
                "resuming it replays these steps")
    else:
        kept = f"the newest checkpoint, {newest}, is from step {newest_step}, before them (its trainable weights: {newest_weights})"
    return (f"{told}; {kept}; start afresh with a lower train.lr (resume=never in a new run directory, "
            "hydra.run.dir=...; a resumed run keeps its checkpoint's learning rate), or check those steps' rows "
            "(or raise train.max_nonfinite_steps).")

"""Skipping an optimizer step whose loss or gradients are NaN/Inf, on every rank together.

One bad batch (a fp overflow, a corrupt row) should cost one step, not the run: Adam's moments
never recover from a NaN. The check lives in the optimizer DeepSpeed wraps, because that is the
one place that sees the final gradients at every ZeRO stage: the replicas' averaged `.grad` at
stage 0, each rank's fp32 partition at stages 1-3. With gradient clipping on (the default), a NaN
anywhere makes the global norm NaN and so reaches every partition; the all-reduce below makes
the decision common even without it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SkippingAdamW(torch.optim.AdamW):
    """AdamW whose `step` does nothing, on every rank, when any rank's loss or gradient is not finite.

    The trainer calls `arm(loss)` before the engine's optimizer step; ZeRO-3 may call `step` once
    per parameter sub-group, and the decision made at the first call holds for the others."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.step_loss: torch.Tensor | None = None
        self.decision: bool | None = None
        self.skipped_last = False

    def arm(self, step_loss: torch.Tensor) -> None:
        """This rank's loss sums for the coming step (any shape; only finiteness is read)."""
        self.step_loss = step_loss.detach()
        self.decision = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.decision is None:
            self.decision = self._any_rank_non_finite()
        self.skipped_last = self.decision
        if self.decision:
            return None  # DeepSpeed zeroes the gradients after the step either way
        return super().step(closure)

    def _any_rank_non_finite(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One reduction per step: the sum of the norms is finite exactly when every entry is.
        total = torch.stack(torch._foreach_norm(grads)).sum().float() if grads else torch.zeros(())
        if self.step_loss is not None:  # times 0: a finite loss adds nothing, a NaN or Inf one adds NaN
            total = total + self.step_loss.float().sum().to(total.device) * 0
        flag = (~torch.isfinite(total)).to(torch.int32).reshape(1)
        if dist.is_initialized():
            if dist.get_backend() == "nccl" and flag.device.type != "cuda":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

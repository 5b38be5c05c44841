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

from trainer.ranks import max_over_ranks


class SkippingAdamW(torch.optim.AdamW):
    """AdamW whose update is skipped, on every rank, when any rank's loss or gradient is not finite,
    decided on the device: the step never waits for the host.

    torch's fused AdamW reads a `found_inf` flag tensor (what GradScaler gives it) and skips the
    update inside its kernel, step count included, so the decision needs no `.item()`. The skips
    are counted on the device too (`skip_counts`: in all, in a row) and read only at log points.

    The trainer calls `arm(loss)` before the engine's optimizer step; ZeRO-3 may call `step` once
    per parameter sub-group, and the decision made at the first call holds for the others."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self.step_loss: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None  # read by the fused kernel
        self.skip_counts: torch.Tensor | None = None
        self.decided = False
        self.resumed_in_a_row = 0

    def resume_skips_in_a_row(self, in_a_row: int) -> None:
        """Go on counting the run of skipped updates a checkpoint ended in: a job resumed after a
        NaN stop must stop again after the steps the limit has left, not after the whole limit."""
        self.resumed_in_a_row = in_a_row

    def arm(self, step_loss: torch.Tensor) -> None:
        """This rank's loss sums for the coming step (any shape; only finiteness is read)."""
        self.step_loss = step_loss.detach()
        self.decided = False

    @torch.no_grad()
    def step(self, closure=None):
        if not self.decided:
            self._decide()
        return super().step(closure)

    def _decide(self) -> None:
        bad = self._any_rank_non_finite()
        if self.skip_counts is None:
            self.skip_counts = torch.tensor([0, self.resumed_in_a_row], dtype=torch.int64, device=bad.device)
        self.skip_counts[0] += bad
        self.skip_counts[1] = (self.skip_counts[1] + bad) * bad  # back to 0 at a finite step
        device = next(p.device for group in self.param_groups for p in group["params"])
        self.found_inf = bad.to(device=device, dtype=torch.float32)
        self.decided = True

    def read_skips(self) -> tuple[int, int]:
        """Updates skipped (in all, in a row up to the last step) since this optimizer was made: a host read."""
        if self.skip_counts is None:
            return 0, self.resumed_in_a_row
        total, in_a_row = self.skip_counts.tolist()
        return total, in_a_row

    def _any_rank_non_finite(self) -> torch.Tensor:
        """A 0-d int64 tensor on the device: 1 when any rank's loss or gradient has a NaN or Inf."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One reduction per step: the sum of the norms is finite exactly when every entry is.
        total = torch.stack(torch._foreach_norm(grads)).sum().float() if grads else torch.zeros(())
        if self.step_loss is not None:  # times 0: a finite loss adds nothing, a NaN or Inf one adds NaN
            total = total + self.step_loss.float().sum().to(total.device) * 0
        flag = (~torch.isfinite(total)).to(torch.int64).reshape(1)
        return max_over_ranks(flag)[0]  # asynchronous to the host under NCCL

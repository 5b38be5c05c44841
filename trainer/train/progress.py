"""The loop's running account: the open log window, the run's speed, and the updates skipped.

A log window is the steps since the last logged one. Its loss sums stay on the device until it
closes (reading them every step would stall the device); its token counts, model FLOPs and
data-loading seconds are host numbers. Closing it sums every rank's window in one collective into
the metrics `Tracker.log_step` takes, and adds its work to the run's, which summary.json reports.
A checkpoint saves the open window's sums, so a resumed run logs the window it was stopped in as
the run never interrupted would.
"""

from __future__ import annotations

import contextlib
import time

import torch

from trainer.metric_names import LAST_WINDOW_METRICS
from trainer.ranks import all_gather_floats, all_reduce_sum
from trainer.train.checkpoints import TrainerState
from trainer.train.onpolicy import RolloutWork
from trainer.train.throughput import Stopwatch, Work, peak_memory_bytes

LOSS_SUMS = 3
"""[objective, kd, ce], summed over the window's supervised tokens."""

COUNTS = 2
"""[supervised tokens, input tokens]."""


class Progress:
    """One job's account of its steps. `state` is the record a checkpoint saves: the tokens seen
    and the skipped steps are counted there. The collectives are `reduce_sum` (a float64 tensor,
    summed over ranks) and `gather` (one float from every rank): a test passes its own."""

    def __init__(self, state: TrainerState, device: torch.device, peak_flops: float | None, world_size: int,
                 reduce_sum=all_reduce_sum, gather=all_gather_floats, onpolicy: bool = False):
        """`onpolicy`: the steps generate rollouts, whose work the windows and the summary report."""
        self.state, self.device, self.peak_flops, self.world_size = state, device, peak_flops, world_size
        self.onpolicy = onpolicy
        self._reduce_sum, self._gather = reduce_sum, gather
        self.losses = torch.zeros(LOSS_SUMS, dtype=torch.float64, device=device)
        self.counts = torch.zeros(COUNTS, dtype=torch.float64)
        self.flops = 0.0
        """Model FLOPs of the window's rows on this rank (trainer/train/throughput.py)."""
        self.data_time = Stopwatch()
        """Seconds this rank spent loading the window's data (rows, a teacher cache)."""
        self.rollouts = RolloutWork()
        """What this rank's rollouts did in the window (on-policy steps only)."""
        self.run_rollouts = RolloutWork()
        """Every closed window's rollouts, all ranks."""
        self.opened = time.perf_counter()
        self.run_work = Work()
        """Every closed window of this job (of its life, when resumed)."""
        self.last_rates: dict = {}
        self.pre_step_grad_norm: float | None = None
        """The replicas' gradient norm, measured before a logged step where DeepSpeed reports none."""
        self.skips_before = 0
        """Updates the run skipped before this job's life (a resumed run's checkpoint counted them)."""
        self.skips_counted_at = 0
        """The step up to which skipped updates were read."""

    # ------------------------------------------------------------------------------ the window
    def start(self, step: int) -> None:
        """The loop starts at `step`: the window's clock runs from now, and skipped updates are
        counted on from the state's (a resumed run's)."""
        self.opened = time.perf_counter()
        self.skips_before, self.skips_counted_at = self.state.skipped_steps, step

    def add_step(self, losses: torch.Tensor, counts: torch.Tensor) -> None:
        """`losses`: [3] float64 on the device; `counts`: [2] float64 on the CPU (`Job.train_step`'s)."""
        self.losses += losses
        self.counts += counts

    def add_rollouts(self, work: RolloutWork) -> None:
        """One micro-batch's rollouts; their FLOPs count as the window's model FLOPs too."""
        self.rollouts += work
        self.flops += work.flops

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not the window's: tokens/s counts training time only."""
        started = time.perf_counter()
        yield
        self.opened += time.perf_counter() - started

    def close_window(self, step: int, lr: float, grad_norm: float | None, kd_measured: bool) -> dict:
        """The metrics of the window ending after `step`, summed over ranks, for `Tracker.log_step`.
        Collective. `grad_norm`: DeepSpeed's, or None where it reports none (then the one measured
        before the step is logged); `kd_measured`: False under loss.kind=sft, whose kd is no number."""
        seconds = time.perf_counter() - self.opened
        host = torch.tensor([self.flops, self.data_time.take(), *self._rollout_sums()], dtype=torch.float64)
        summed = self._reduce_sum(torch.cat([self.losses.cpu(), self.counts, host])).tolist()
        objective, kd, ce, tokens, inputs, flops, data_seconds = summed[:7]
        self.state.tokens_seen += int(inputs)
        per_token = 1.0 / max(tokens, 1.0)
        if grad_norm is None:
            grad_norm = self.pre_step_grad_norm
        rates = self._add_work(Work(seconds, inputs, flops, data_seconds))
        if self.onpolicy:
            rollouts = RolloutWork.from_list(summed[7:])
            self.run_rollouts += rollouts
            rates.update(rollouts.rates(seconds, self.world_size))
        return {
            "step": step,
            "loss": objective * per_token,
            "kd_loss": kd * per_token if kd_measured else None,
            "ce_loss": ce * per_token,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": rates["tokens_per_s"],
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            **rates,
        }

    def _rollout_sums(self) -> list[float]:
        return self.rollouts.as_list() if self.onpolicy else []

    def open_window(self) -> None:
        """A new window, empty, its clock running from now (after the last one was logged)."""
        self.losses.zero_()
        self.counts.zero_()
        self.flops = 0.0
        self.rollouts = RolloutWork()
        self.opened = time.perf_counter()

    def _add_work(self, window: Work) -> dict:
        """The window's tokens/s and model FLOP/s (all ranks), MFU, data-loading share and peak
        memory per rank (collective); the window is added to the run's work."""
        self.run_work += window
        peaks = [b / 2**30 for b in self._gather(float(peak_memory_bytes(self.device)))]
        self.last_rates = {**window.rates(self.peak_flops, self.world_size),
                           "peak_memory_gib": max(peaks), "peak_memory_gib_per_rank": peaks}
        return self.last_rates

    # ----------------------------------------------------------------------------- checkpoints
    def open_sums(self) -> list[float]:
        """This rank's sums of the open window, [objective, kd, ce, supervised tokens, input
        tokens] and, on-policy, its rollouts' work: what a checkpoint saves (a host read of the
        device sums)."""
        return torch.cat([self.losses.cpu(), self.counts]).tolist() + self._rollout_sums()

    def restore_sums(self, saved: list[float] | None) -> None:
        """Reopen the window a checkpoint saved with `open_sums` (None: it saved none, the window is empty)."""
        if saved is None:
            return
        self.losses = torch.tensor(saved[:LOSS_SUMS], dtype=torch.float64, device=self.device)
        self.counts = torch.tensor(saved[LOSS_SUMS:LOSS_SUMS + COUNTS], dtype=torch.float64)
        if self.onpolicy and len(saved) > LOSS_SUMS + COUNTS:
            self.rollouts = RolloutWork.from_list(saved[LOSS_SUMS + COUNTS:])

    # ------------------------------------------------------------------------- skipped updates
    def read_skips(self, skipped_this_life: int, step: int) -> tuple[int, int]:
        """Record the optimizer's count of skipped updates as of `step` (`skipped_this_life`: since
        this job started). Returns how many are new since the last read, and the first step they
        may be at."""
        skipped = self.skips_before + skipped_this_life
        new, self.state.skipped_steps = skipped - self.state.skipped_steps, skipped
        since, self.skips_counted_at = self.skips_counted_at + 1, step
        return new, since

    # ------------------------------------------------------------------------------ the summary
    def summary(self) -> dict:
        """summary.json's speed and counts: the whole run's rates (its windows' work over their
        seconds), the last window's beside them; tokens/s NaN for a job that trained no step
        (resumed at the end)."""
        counts = {"train/tokens_seen": self.state.tokens_seen, "train/skipped_steps": self.state.skipped_steps}
        if not self.run_work.seconds:
            return {"train/tokens_per_s": float("nan"), **counts}
        run = {f"train/{key}": value for key, value in self.run_work.rates(self.peak_flops, self.world_size).items()}
        last = {f"train/last_window_{key}": value for key, value in self.last_rates.items()
                if key in LAST_WINDOW_METRICS}
        rollouts = ({f"train/{key}": value for key, value in
                     self.run_rollouts.rates(self.run_work.seconds, self.world_size).items() if key != "rollout_rows"}
                    if self.onpolicy else {})
        return {**run, **last, "train/peak_memory_gib": self.last_rates["peak_memory_gib"], **counts, **rollouts}

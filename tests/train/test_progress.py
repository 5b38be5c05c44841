"""The loop's account on its own: CPU, no process group (the collectives are passed in, as two
ranks that did the same work would sum and gather)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.train import progress as progress_module
from trainer.train.checkpoints import TrainerState
from trainer.train.progress import Progress

CPU = torch.device("cpu")


class Clock:
    """time.perf_counter, moved by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    return clock


class TwoRanks:
    """Collectives of two ranks holding the same numbers; counts the calls."""

    def __init__(self):
        self.reduces = self.gathers = 0

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        self.reduces += 1
        return values * 2

    def gather(self, value: float) -> list[float]:
        self.gathers += 1
        return [value, value]


def make(state: TrainerState | None = None, ranks: TwoRanks | None = None, peak: float | None = None) -> Progress:
    ranks = ranks or TwoRanks()
    return Progress(state or TrainerState(step=0), CPU, peak, 2, reduce_sum=ranks.reduce_sum, gather=ranks.gather)


def step_sums(objective: float, kd: float, ce: float, supervised: float, inputs: float):
    losses = torch.tensor([objective, kd, ce], dtype=torch.float64)
    return losses, torch.tensor([supervised, inputs], dtype=torch.float64)


def test_a_window_logs_its_steps_per_supervised_token_over_all_ranks(clock, monkeypatch):
    monkeypatch.setattr(progress_module, "peak_memory_bytes", lambda device: 2**30)
    ranks = TwoRanks()
    progress = make(ranks=ranks, peak=1e12)
    progress.start(0)
    progress.add_step(*step_sums(6.0, 4.0, 2.0, 3.0, 10.0))
    progress.add_step(*step_sums(2.0, 4.0, 6.0, 1.0, 10.0))
    progress.flops += 3e12
    with progress.data_time:
        clock.now += 0.5
    clock.now += 1.5  # 2 s in the window in all
    metrics = progress.close_window(2, lr=1e-3, grad_norm=0.25, kd_measured=True)
    assert ranks.reduces == 1, "one collective sums the losses, counts, FLOPs and data time"
    assert metrics == {
        "step": 2, "loss": 2.0, "kd_loss": 2.0, "ce_loss": 2.0, "lr": 1e-3, "grad_norm": 0.25,
        "tokens_per_s": 20.0, "tokens_seen": 40, "skipped_steps": 0, "tflops_per_s": 3.0, "mfu": 1.5,
        "data_share": 0.25, "peak_memory_gib": 1.0, "peak_memory_gib_per_rank": [1.0, 1.0]}
    assert progress.state.tokens_seen == 40


def test_the_next_window_starts_empty_and_its_clock_after_the_log(clock):
    progress = make()
    progress.start(0)
    progress.add_step(*step_sums(1.0, 1.0, 1.0, 1.0, 4.0))
    progress.flops += 1e12
    clock.now += 1.0
    progress.close_window(1, lr=0.0, grad_norm=None, kd_measured=True)
    clock.now += 5.0  # writing the log line: neither window's time
    progress.open_window()
    assert progress.open_sums() == [0.0] * 5 and progress.flops == 0.0
    progress.add_step(*step_sums(1.0, 1.0, 1.0, 1.0, 4.0))
    clock.now += 2.0
    assert progress.close_window(2, lr=0.0, grad_norm=None, kd_measured=True)["tokens_per_s"] == 4.0
    assert progress.summary()["train/tokens_per_s"] == 16 / 3


def test_an_evaluation_inside_the_window_is_not_training_time(clock):
    progress = make()
    progress.start(0)
    progress.add_step(*step_sums(1.0, 1.0, 1.0, 1.0, 4.0))
    clock.now += 1.0
    with progress.paused():
        clock.now += 30.0
    clock.now += 1.0
    assert progress.close_window(1, lr=0.0, grad_norm=None, kd_measured=True)["tokens_per_s"] == 4.0


def test_without_deepspeed_s_norm_the_one_measured_before_the_step_is_logged_and_sft_has_no_kd(clock):
    progress = make()
    progress.start(0)
    progress.add_step(*step_sums(1.0, float("nan"), 1.0, 1.0, 1.0))
    assert progress.close_window(1, lr=0.0, grad_norm=None, kd_measured=True)["grad_norm"] is None
    progress.open_window()
    progress.pre_step_grad_norm = 0.5
    progress.add_step(*step_sums(1.0, float("nan"), 1.0, 1.0, 1.0))
    metrics = progress.close_window(2, lr=0.0, grad_norm=None, kd_measured=False)
    assert metrics["grad_norm"] == 0.5 and metrics["kd_loss"] is None


def test_a_restored_window_logs_as_the_window_never_interrupted(clock):
    whole = make()
    whole.start(0)
    for _ in range(2):
        whole.add_step(*step_sums(3.0, 2.0, 1.0, 2.0, 5.0))
    before = make()
    before.add_step(*step_sums(3.0, 2.0, 1.0, 2.0, 5.0))
    saved = before.open_sums()
    resumed = make()
    resumed.restore_sums(saved)
    resumed.start(1)
    resumed.add_step(*step_sums(3.0, 2.0, 1.0, 2.0, 5.0))
    clock.now += 1.0
    expected = whole.close_window(2, lr=0.0, grad_norm=None, kd_measured=True)
    assert resumed.close_window(2, lr=0.0, grad_norm=None, kd_measured=True) == expected


def test_no_saved_window_leaves_the_window_empty():
    progress = make()
    progress.restore_sums(None)
    assert progress.open_sums() == [0.0] * 5


def test_skipped_updates_are_counted_on_from_the_checkpoints_and_each_read_says_which_steps_are_new(clock):
    state = TrainerState(step=4, skipped_steps=3)
    progress = make(state)
    progress.start(4)
    assert progress.read_skips(0, 5) == (0, 5)
    assert progress.read_skips(2, 8) == (2, 6), "two new, somewhere in steps 6-8"
    assert state.skipped_steps == 5
    assert progress.read_skips(2, 9) == (0, 9)


def test_the_summary_gives_the_runs_rates_beside_the_last_windows(clock):
    state = TrainerState(step=0, tokens_seen=0, skipped_steps=1)
    progress = make(state)
    progress.start(0)
    for step, seconds in ((1, 1.0), (2, 3.0)):
        progress.add_step(*step_sums(1.0, 1.0, 1.0, 1.0, 6.0))
        clock.now += seconds
        progress.close_window(step, lr=0.0, grad_norm=None, kd_measured=True)
        progress.open_window()
    summary = progress.summary()
    assert summary["train/tokens_per_s"] == 24 / 4 and summary["train/last_window_tokens_per_s"] == 12 / 3
    assert summary["train/tokens_seen"] == 24 and summary["train/skipped_steps"] == 1
    assert "train/peak_memory_gib" in summary and "train/last_window_peak_memory_gib" not in summary


def test_a_job_that_trained_no_step_has_no_rate():
    summary = make(TrainerState(step=4, tokens_seen=80)).summary()
    assert math.isnan(summary["train/tokens_per_s"])
    assert summary == {"train/tokens_per_s": summary["train/tokens_per_s"], "train/tokens_seen": 80,
                       "train/skipped_steps": 0}

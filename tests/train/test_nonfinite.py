"""The NaN/Inf skip decided on the device: no host read in the step, counts read when asked."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.models.optimizer import SkippingAdamW
from trainer.train.nonfinite import describe_weights, largest_abs_weight, streak_message


def optimizer_with_grads(grad: torch.Tensor):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = SkippingAdamW([weight], lr=0.1)
    weight.grad = grad.clone()
    return weight, optimizer


def step_without_host_reads(optimizer, loss, monkeypatch):
    with monkeypatch.context() as patch:
        def refuse(*args, **kwargs):
            raise AssertionError("the step read a tensor on the host")

        for name in ("item", "tolist", "cpu", "numpy"):  # the ways a value reaches the host
            patch.setattr(torch.Tensor, name, refuse)
        optimizer.arm(loss)
        optimizer.step()


def test_a_nan_gradient_skips_the_update_and_its_step_count_without_reading_the_device(monkeypatch):
    weight, optimizer = optimizer_with_grads(torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    step_without_host_reads(optimizer, torch.tensor(2.0), monkeypatch)
    assert torch.equal(weight.detach(), torch.ones(4))
    assert float(optimizer.state[weight]["step"]) == 0.0 and optimizer.read_skips() == (1, 1)


def test_a_nan_loss_skips_too_and_a_finite_step_resets_the_run_of_skips(monkeypatch):
    weight, optimizer = optimizer_with_grads(torch.ones(4))
    step_without_host_reads(optimizer, torch.tensor(float("inf")), monkeypatch)
    step_without_host_reads(optimizer, torch.tensor(float("nan")), monkeypatch)
    assert optimizer.read_skips() == (2, 2) and torch.equal(weight.detach(), torch.ones(4))
    step_without_host_reads(optimizer, torch.tensor(1.0), monkeypatch)
    assert optimizer.read_skips() == (2, 0)
    assert float(optimizer.state[weight]["step"]) == 1.0 and (weight.detach() < 1.0).all()


def test_the_decision_of_the_first_call_holds_for_every_sub_group_of_the_step(monkeypatch):
    weight, optimizer = optimizer_with_grads(torch.tensor([float("nan")] * 4))
    optimizer.arm(torch.tensor(1.0))
    optimizer.step()
    weight.grad = torch.ones(4)  # ZeRO-3 steps sub-groups one after another; the first saw the NaN
    optimizer.step()
    assert torch.equal(weight.detach(), torch.ones(4)) and optimizer.read_skips() == (1, 1)


def test_a_resumed_optimizer_goes_on_counting_the_run_of_skips_its_checkpoint_ended_in(monkeypatch):
    weight, optimizer = optimizer_with_grads(torch.ones(4))
    optimizer.resume_skips_in_a_row(2)
    assert optimizer.read_skips() == (0, 2), "before its first step, the run of skips is the checkpoint's"
    step_without_host_reads(optimizer, torch.tensor(float("nan")), monkeypatch)
    assert optimizer.read_skips() == (1, 3)
    step_without_host_reads(optimizer, torch.tensor(1.0), monkeypatch)
    assert optimizer.read_skips() == (1, 0)


def test_the_largest_trainable_weight_is_inf_when_one_is_not_finite():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.full((2,), 1e9), requires_grad=False)  # frozen weights are not counted
    model.register_parameter("frozen", frozen)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.copy_(torch.tensor([-3.0, 1.0]))
    assert largest_abs_weight(model) == 3.0
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    assert largest_abs_weight(model) == float("inf")
    assert describe_weights(3.0, 0.125) == "finite, largest |w| 3 (0.125 at step 0)"
    assert describe_weights(float("inf"), 0.125) == "not all finite"


def test_the_stop_message_says_whether_the_newest_checkpoint_holds_the_weights_the_bad_steps_started_from():
    during = streak_message(3, 7, "finite, largest |w| 2.3e+05 (0.125 at step 0)", Path("/run/checkpoints/step_00000006"),
                            6, "finite, largest |w| 2.3e+05")
    assert during.startswith("the loss or gradients were NaN/Inf for 5 steps in a row (steps 3-7), so the job stopped "
                             "without saving; the trainable weights they started from are finite, largest |w| 2.3e+05 "
                             "(0.125 at step 0); the newest checkpoint, /run/checkpoints/step_00000006, holds those "
                             "same weights (skipped updates change nothing), so resuming it replays these steps; "
                             "start afresh with a lower train.lr (resume=never in a new run directory"), during
    before = streak_message(5, 9, "not all finite", Path("/run/checkpoints/step_00000002"), 2,
                            "finite, largest |w| 0.5 (0.125 at step 0)")
    assert ("the newest checkpoint, /run/checkpoints/step_00000002, is from step 2, before them (its trainable "
            "weights: finite, largest |w| 0.5 (0.125 at step 0)); start afresh") in before
    assert "no checkpoint was saved before them; start afresh" in streak_message(1, 5, "not all finite", None, None, "")

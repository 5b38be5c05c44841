"""The NaN/Inf skip decided on the device: no host read in the step, counts read when asked."""

from __future__ import annotations

import torch

from trainer.nonfinite import SkippingAdamW


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

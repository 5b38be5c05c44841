"""`train.deterministic`: torch's strict mode, cuBLAS's fixed workspace and cuDNN untuned for the
process, both ways; a workspace setting cuBLAS cannot reproduce with is refused at start-up, by name."""

from __future__ import annotations

import os

import pytest
import torch
from test_config import composed

from trainer.config import ConfigError, validate
from trainer.launch.determinism import use_deterministic_kernels
from trainer.ranks import RankInfo
from trainer.train.job import DistillJob

CPU = RankInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture
def restored():
    """The process's settings as they were: other tests in this process run nondeterministic."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def test_on_sets_every_switch_and_off_clears_them(monkeypatch, restored):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so that the job's setting is undone after
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    torch.backends.cudnn.benchmark = True
    use_deterministic_kernels(True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    use_deterministic_kernels(False)  # the next job of a sequential sweep asked for speed
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_a_workspace_cublas_cannot_reproduce_with_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2")
    validate(composed())  # only train.deterministic=true needs it
    with pytest.raises(ConfigError, match=r"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG .*':4096:2'"):
        validate(composed("train.deterministic=true"))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    validate(composed("train.deterministic=true"))


def test_a_job_turns_its_setting_on_before_it_builds_anything(monkeypatch, restored, tmp_path):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    DistillJob(composed("train.deterministic=true"), CPU, tmp_path / "run")
    assert torch.are_deterministic_algorithms_enabled()
    DistillJob(composed(), CPU, tmp_path / "run")
    assert not torch.are_deterministic_algorithms_enabled()

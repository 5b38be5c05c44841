"""`train.deterministic`: torch's strict mode, cuBLAS's fixed workspace and cuDNN untuned for the
process, both ways; a workspace setting cuBLAS cannot reproduce with is refused at start-up, by name;
and no deterministic job runs an op that strict mode refuses on CUDA (tests/cuda_strict_watch.py):
there such a job would crash, and only there."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import REPO, assert_ok, run_cli, save_model, tiny_llama_config, tiny_overrides
from cuda_strict_watch import RefusedOnCuda
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


# ------------------------------------------------------------------ ops strict mode refuses on CUDA
def test_the_watch_names_the_ops_cuda_s_strict_mode_refuses_and_passes_their_deterministic_kin():
    watch = RefusedOnCuda()
    values, ids = torch.rand(4, 8), torch.tensor([1, 2, 2])
    with watch:
        values.cumsum(-1)  # a deterministic scan on CUDA since before 2.11, though the docstring lists it
        torch.histc(values)
        torch.bincount(ids, weights=torch.rand(3))
        torch.bincount(ids)
        values.median(dim=0)
        values.median()  # no indices: a deterministic kernel
        torch.zeros(3).index_reduce(0, ids, torch.rand(3), "amax")
        torch.zeros(3).scatter_reduce(0, ids, torch.rand(3), "prod")
        torch.zeros(3).scatter_reduce(0, ids, torch.rand(3), "sum")  # sorted into a deterministic sum on CUDA
        torch.nn.functional.cross_entropy(torch.randn(2, 5, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
        torch.nn.functional.cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    assert dict(watch.refused) == {"histc: floating (float32)": 1, "bincount: with weights": 1,
                                   "median: with indices": 1, "index_reduce: no deterministic CUDA kernel": 1,
                                   "scatter_reduce: reduce='prod'": 1, "nll_loss2d_forward: reduction sum or mean": 1}


@pytest.fixture(scope="module")
def pair_student(tmp_path_factory):
    """A 1-layer student whose tokenizer merges digit pairs: the character-level teacher's is another."""
    from trainer.demo.cross_student import build_pair_tokenizer

    tokenizer = build_pair_tokenizer()
    return save_model(tiny_llama_config(len(tokenizer), layers=1), tokenizer,
                      tmp_path_factory.mktemp("pair") / "student", seed=2)


ONPOLICY = ("onpolicy.fraction=0.5", "onpolicy.top_p=0.9", "onpolicy.max_new_tokens=8")
DETERMINISTIC_JOBS = {
    # The GPU check's kill-and-resume job (ZeRO-3, bf16, LoRA dropout), half its rows on-policy.
    "zero3_bf16_onpolicy": ("deepspeed=zero3", "train.precision=bf16", "peft.dropout=0.1", *ONPOLICY),
    "uld_top_k_onpolicy": ("student.path={pair}", "loss.cross_tokenizer=uld", "loss.uld_top_k=16",
                           "loss.ce_weight=0.5", *ONPOLICY),
    "gold_onpolicy": ("student.path={pair}", "loss.cross_tokenizer=gold", *ONPOLICY),
    "teacher_cache_with_tails": ("teacher.cache={cache}",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", DETERMINISTIC_JOBS)
def test_a_deterministic_job_runs_no_op_cuda_s_strict_mode_refuses(name, tiny, pair_student, tmp_path):
    """Each kind of job, with train.deterministic=true, through the CLI under the watch: its forward,
    backward, optimizer, evaluation and rollouts (the ops seen say the watch saw each)."""
    cache = tmp_path / "teacher_cache"
    if name == "teacher_cache_with_tails":
        assert_ok(run_cli(tiny_overrides(tiny, tmp_path / "build", tmp_path / "c", f"teacher.cache={cache}",
                                         "teacher.top_k=8", "teacher.tail_samples=3"), module="trainer.cache"))
    extra = [o.format(pair=pair_student, cache=cache) for o in DETERMINISTIC_JOBS[name]]
    proc = run_cli(tiny_overrides(tiny, tmp_path / name, tmp_path / "c", "train.deterministic=true",
                                  "train.max_steps=2", *extra),
                   env={"PYTHONPATH": str(REPO / "tests")}, module="cuda_strict_watch")
    assert_ok(proc)
    printed = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith(("REFUSED_ON_CUDA ", "OPS_SEEN "))}
    assert printed["REFUSED_ON_CUDA"] == {}
    backward_and_optimizer = {"_scaled_dot_product_flash_attention_for_cpu_backward", "silu_backward", "_fused_adamw_"}
    rollouts = {"searchsorted"} if "onpolicy.fraction=0.5" in extra else set()
    assert backward_and_optimizer | rollouts <= set(printed["OPS_SEEN"])

"""Per-step accounting: model FLOPs by the formula in trainer/train/throughput.py, counted independently
here; MFU against the peak table; data-loading share; peak memory per rank; activation checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, outside_any_launcher, read_jsonl, run_cli, tiny_overrides
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trainer.data.batching import step_row_ids
from trainer.data.examples import load_examples
from trainer.outputs.tracking import _for_wandb, _progress_fields
from trainer.train import throughput

RATES = ("tflops_per_s", "data_share", "peak_memory_gib", "peak_memory_gib_per_rank")


def linear_weights(model, trainable: bool | None = None) -> int:
    """Weights of every 2-D parameter the forward multiplies by: all but the embedding table."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in name and (trainable is None or p.requires_grad == trainable))


def attention_width_sum(path) -> int:
    config = AutoConfig.from_pretrained(path)
    return config.num_hidden_layers * config.hidden_size  # these models' heads × head size = hidden size


def formula_cost(tiny) -> tuple[int, int]:
    """FLOPs per token and per token per row length of a step by the issue's formula: teacher forward
    2·N + 4·L·d·T; student with LoRA r=16 on every linear layer but the head: 4·N_frozen + 6·N_lora
    + 12·L·d·T."""
    from peft import LoraConfig, get_peft_model

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    student = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["student"]),
                             LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    per_token = 2 * linear_weights(teacher) + 4 * linear_weights(student, False) + 6 * linear_weights(student, True)
    per_length = 4 * attention_width_sum(tiny["teacher"]) + 12 * attention_width_sum(tiny["student"])
    return per_token, per_length


def test_the_cost_of_rows_counts_the_squared_length_of_each_row():
    cost = throughput.ModelCost(per_token=10.0, per_token_per_length=2.0)
    assert cost.of_rows([3, 5]) == 3 * (10 + 2 * 3) + 5 * (10 + 2 * 5)
    assert (cost + cost).of_rows([4]) == 2 * cost.of_rows([4])


def test_the_peak_table_names_each_gpu_and_nothing_else(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362.05e12), ("NVIDIA L40", None),
                       ("NVIDIA A10G", None), ("Tesla V100-SXM2-16GB", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert throughput.peak_flops(cuda, bf16=True, configured=None) == peak, name
    assert throughput.peak_flops(cuda, bf16=False, configured=None) is None
    assert throughput.peak_flops(torch.device("cpu"), bf16=False, configured=None) is None
    assert throughput.peak_flops(torch.device("cpu"), bf16=False, configured=2.5) == 2.5e12


def test_the_progress_bar_shows_mfu_where_known_else_flops_and_wandb_gets_one_chart_per_rank():
    metrics = {"step": 3, "loss": 0.5, "tokens_per_s": 1234.0, "tflops_per_s": 0.0421, "mfu": None,
               "data_share": 0.031, "peak_memory_gib": 1.25, "peak_memory_gib_per_rank": [1.25, 1.0]}
    assert _progress_fields(metrics) == {"loss": "0.5000", "tok/s": "1234", "TFLOP/s": "0.0421", "data": "3%",
                                         "mem": "1.2GiB"}
    assert _progress_fields({**metrics, "mfu": 0.4567})["MFU"] == "45.7%"
    logged = _for_wandb(metrics)
    assert logged["memory/rank0_peak_gib"] == 1.25 and logged["memory/rank1_peak_gib"] == 1.0
    assert "peak_memory_gib_per_rank" not in logged and "mfu" not in logged


@pytest.mark.slow
def test_each_step_logs_model_flops_by_the_formula_data_share_and_memory_per_rank(tiny, tmp_path):
    runs = {}
    for nproc, micro_batch in ((1, 4), (2, 2)):
        run_dir = tmp_path / f"ranks{nproc}"
        proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=3",
                                      f"train.micro_batch_size={micro_batch}"), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[nproc] = read_jsonl(run_dir / "metrics.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["train/tflops_per_s"] > 0 and summary["train/peak_memory_gib"] > 0.1
        assert "train/mfu" in summary and summary["train/mfu"] is None  # CPU: no peak to compare with
        _assert_the_summary_gives_the_runs_rate_and_the_last_windows(runs[nproc], summary)
        # Evaluated between too by default (train.eval_every=null), so the report's plots are curves.
        assert [e["step"] for e in read_jsonl(run_dir / "eval.jsonl")] == [0, 1, 2, 3]
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    rows = load_examples(tiny["train"], tokenizer, 32, cache_dir=None).rows
    per_token, per_length = formula_cost(tiny)
    for nproc, metrics in runs.items():
        assert all(set(RATES) <= set(m) for m in metrics)
        seen = 0
        for step, logged in enumerate(metrics):
            assert len(logged["peak_memory_gib_per_rank"]) == nproc
            assert logged["peak_memory_gib"] == max(logged["peak_memory_gib_per_rank"]) > 0.1
            assert 0.0 <= logged["data_share"] < 1.0
            lengths = [len(rows[i].input_ids) for i in step_row_ids(step, len(rows), 4, seed=0)]
            window_tokens, seen = logged["tokens_seen"] - seen, logged["tokens_seen"]
            assert window_tokens == sum(lengths)
            flops_per_token = logged["tflops_per_s"] * 1e12 / logged["tokens_per_s"]
            expected = per_token + per_length * sum(t * t for t in lengths) / sum(lengths)
            assert flops_per_token == pytest.approx(expected, rel=1e-6)


def _assert_the_summary_gives_the_runs_rate_and_the_last_windows(metrics: list[dict], summary: dict) -> None:
    tokens = [m["tokens_seen"] - previous for m, previous in zip(metrics, [0] + [m["tokens_seen"] for m in metrics])]
    seconds = [window / m["tokens_per_s"] for window, m in zip(tokens, metrics)]
    assert summary["train/tokens_per_s"] == pytest.approx(sum(tokens) / sum(seconds), rel=1e-9)
    assert summary["train/tflops_per_s"] == pytest.approx(
        sum(m["tflops_per_s"] * s for m, s in zip(metrics, seconds)) / sum(seconds), rel=1e-9)
    assert summary["train/last_window_tokens_per_s"] == metrics[-1]["tokens_per_s"]
    assert summary["train/last_window_tflops_per_s"] == metrics[-1]["tflops_per_s"]


def test_the_runs_rates_weigh_each_window_by_its_seconds():
    """Not the last window's rate (367 tokens/s against a run average of 672 in one run)."""
    run = throughput.Work(1.0, 900.0, 4e12, 0.1) + throughput.Work(3.0, 300.0, 2e12, 0.3)
    assert run.rates(peak=None, world_size=2) == {"tokens_per_s": 300.0, "tflops_per_s": 1.5, "mfu": None,
                                                   "data_share": 0.05}
    assert run.rates(peak=1e12, world_size=2)["mfu"] == 0.75


@pytest.mark.slow
def test_activation_checkpointing_trains_the_same_student(tiny, tmp_path):
    losses = {}
    for name, extra in (("kept", []), ("recomputed", ["train.activation_checkpointing=true"])):
        run_dir = tmp_path / name
        proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=3", *extra))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert ("activation checkpointing on" in proc.stdout + proc.stderr) == bool(extra)
        losses[name] = [value for m in read_jsonl(run_dir / "metrics.jsonl") for value in (m["loss"], m["grad_norm"])]
    assert losses["recomputed"] == pytest.approx(losses["kept"], rel=1e-6)


LONE_REPLICA_STEP = """
import os, torch, torch.distributed as dist
from omegaconf import OmegaConf
from trainer.models import engines
from trainer.launch.distributed import free_port
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
cfg = OmegaConf.create({
    "train": {"lr": 0.1, "weight_decay": 0.0, "warmup_steps": 0, "max_steps": 2, "micro_batch_size": 3, "grad_accum": 1},
    "deepspeed": {"stage": STAGE, "offload_optimizer": False, "offload_param": False, "gradient_clipping": 1.0,
                  "extra": {}}})
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
engine, optimizer = engines.build_student_engine(model, engines.deepspeed_config(cfg.deepspeed, cfg.train, False, 1), cfg.train)
calls = []
reduce = engine.allreduce_gradients
engine.allreduce_gradients = lambda *args, **kwargs: (calls.append(1), reduce(*args, **kwargs))
before = [p.detach().clone() for p in engine.module.parameters()]
loss = engine(torch.randn(3, 4)).square().sum()
engine.backward(loss)
optimizer.arm(loss)
engine.step()
moved = any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
print("ALLREDUCES", len(calls), "MOVED", moved)
"""


@pytest.mark.parametrize("stage,reduces", [(0, 0), (1, 1)])
def test_a_lone_stage_0_replica_skips_deepspeed_s_gradient_all_reduce(stage, reduces):
    """A fixed per-step cost with nothing to average; stages 1-3 keep DeepSpeed's own path. In a child
    process: the process group it starts must not outlive the test."""
    proc = subprocess.run([sys.executable, "-c", LONE_REPLICA_STEP.replace("STAGE", str(stage))], cwd=REPO,
                          env={**outside_any_launcher(os.environ), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ALLREDUCES {reduces} MOVED True" in proc.stdout


LONE_RANK_CHECKS = """
import os, signal, torch, torch.distributed as dist
from trainer.launch.distributed import free_port
from trainer.models.optimizer import SkippingAdamW
from trainer.launch.preemption import PreemptionWatch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
calls = []
reduce = dist.all_reduce
dist.all_reduce = lambda *args, **kwargs: (calls.append(1), reduce(*args, **kwargs))[1]
watch = PreemptionWatch()
quiet = watch.agreed_signal()
watch.received = signal.SIGUSR1
weight = torch.nn.Parameter(torch.ones(3))
optimizer = SkippingAdamW([weight], lr=0.1)
weight.grad = torch.tensor([1.0, float("nan"), 1.0])
optimizer.arm(torch.tensor(1.0))
optimizer.step()
print("COLLECTIVES", len(calls), "SIGNALS", quiet, watch.agreed_signal() == signal.SIGUSR1,
      "SKIPPED", optimizer.read_skips()[0], bool((weight == 1).all()))
"""


def test_a_lone_rank_agrees_on_stop_signals_and_skips_without_a_collective_each_step():
    """Each step's two checks (a stop signal on any rank, a NaN/Inf on any rank) need no all-reduce
    when there is one rank, and still decide the same."""
    proc = subprocess.run([sys.executable, "-c", LONE_RANK_CHECKS], cwd=REPO,
                          env={**outside_any_launcher(os.environ), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "COLLECTIVES 0 SIGNALS 0 True SKIPPED 1 True" in proc.stdout

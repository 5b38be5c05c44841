"""Real jobs through the CLI: Hydra, DeepSpeed engines, torchrun ranks on gloo, W&B offline files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_ok, read_jsonl, run_cli, tiny_overrides
from wandb_records import history_rows

pytestmark = pytest.mark.slow

CONTRACT_METRICS = {"step", "loss", "kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_s"}
CONTRACT_SUMMARY = {"eval/kl_to_teacher", "eval/student_ce", "eval/teacher_ce", "eval/top1_agreement",
                    "train/tokens_per_s"}
ONPOLICY_SUMMARY = ("eval/onpolicy_kl", "eval/teacher_nll_of_student")


def result_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the job printed nothing on stdout"
    return lines[-1]


def test_single_rank_job_writes_the_contract_files_and_a_wandb_run(tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "logger=wandb", "train.max_steps=3"))
    assert_ok(proc)

    last = result_line(proc.stdout)
    assert last.startswith("RESULT eval/kl_to_teacher=") and last.endswith(f"run_dir={run_dir.resolve()}")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(CONTRACT_METRICS <= set(m) for m in metrics)
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in metrics)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert CONTRACT_SUMMARY <= set(summary)
    assert float(last.split("=")[1].split()[0]) == pytest.approx(summary["eval/kl_to_teacher"], rel=1e-5)
    # An off-policy job measures its student's own responses too, before and after, so runs compare.
    evaluations = read_jsonl(run_dir / "eval.jsonl")
    for key in ONPOLICY_SUMMARY:
        assert summary[key] == evaluations[-1][key] and summary[f"initial/{key}"] == evaluations[0][key]
        assert summary[key] > 0 and any(line.split()[:1] == [key] for line in proc.stdout.splitlines())

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert not list(adapter.glob("*.bin")), "the adapter must be safetensors only"
    assert (run_dir / "checkpoints" / "latest").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()

    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "exactly one W&B run, written offline"
    logged = [row for row in history_rows(run_files[0]) if "loss" in row]
    assert [row["loss"] for row in logged] == pytest.approx([m["loss"] for m in metrics])


def test_saved_adapter_loads_with_peft_and_reproduces_the_student(tiny, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "peft.merge=true", "train.lr=0.05")))
    base = AutoModelForCausalLM.from_pretrained(tiny["student"])
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny["student"])(ids).logits
        assert not torch.allclose(adapted(ids).logits, plain, atol=1e-4), "training changed nothing"
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


def test_two_ranks_shard_the_teacher_under_zero3_and_the_loss_falls(tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "deepspeed=zero3", "train.max_steps=12",
                                  "train.micro_batch_size=4", "train.lr=0.02"), nproc=2)
    assert_ok(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss/fused"] is True
    per_rank, full = summary["teacher/param_bytes_per_rank"], summary["teacher/param_bytes_full"]
    assert summary["teacher/sharded"] is True and len(per_rank) == 2
    for held in per_rank:
        assert held == pytest.approx(full / 2, rel=0.05), "each rank should hold about half of the teacher"
    losses = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert summary["eval/kl_to_teacher"] < summary["initial/eval/kl_to_teacher"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert result_line(proc.stdout).startswith("RESULT ")


def test_two_ranks_of_micro_batch_2_match_one_rank_of_micro_batch_4(tiny, tmp_path):
    first_losses = {}
    for nproc, micro_batch in ((1, 4), (2, 2)):
        run_dir = tmp_path / f"run{nproc}"
        assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=1",
                                         f"train.micro_batch_size={micro_batch}"), nproc=nproc))
        first_losses[nproc] = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert first_losses[2]["loss"] == pytest.approx(first_losses[1]["loss"], rel=1e-5)
    assert first_losses[2]["ce_loss"] == pytest.approx(first_losses[1]["ce_loss"], rel=1e-5)


def test_full_fine_tuning_under_zero2_saves_a_loadable_student(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "peft=none", "deepspeed=zero2",
                                     "loss.kind=jsd", "loss.ce_weight=0.5")))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.num_hidden_layers == 1


def test_different_tokenizers_stop_the_job_before_weights_load(tiny, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other_student"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((Path(tiny["student"]) / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    (other / "model.safetensors").write_bytes(b"not loaded: the check comes first")

    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache") + [f"student.path={other}"])
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(error_lines) == 1 and "tokenizers differ" in error_lines[0]
    assert "Traceback" not in proc.stderr


def test_a_mistyped_key_fails_at_start_up_by_name(tmp_path):
    proc = run_cli([f"hydra.run.dir={tmp_path}", "train.lrr=0.1"])
    assert proc.returncode != 0
    assert "lrr" in proc.stderr


def test_a_multirun_sweep_runs_each_point_in_its_own_directory(tiny, tmp_path):
    overrides = [o for o in tiny_overrides(tiny, tmp_path / "unused", tmp_path / "cache", "train.max_steps=2")
                 if not o.startswith("hydra.run.dir=")]
    proc = run_cli(["-m", *overrides, "loss.kind=fkl,jsd", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert_ok(proc)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2
    for point in ("0", "1"):
        assert (tmp_path / "sweep" / point / "summary.json").exists()

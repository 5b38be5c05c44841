"""Issue 20: whole jobs distilling across tokenizers, through the CLI.

GOLD between one tokenizer and itself trains like the same-tokenizer loss (the wiring reads the
right positions); a student whose tokenizer merges digit pairs learns from the character-level
teacher with GOLD and ULD, on one rank and on two under ZeRO-3 with a sharded teacher; a killed and
resumed run is the run never interrupted; the run's outputs say it was cross-tokenizer; on-policy, the
student learns from the teacher on its own rollouts, re-tokenised for it, and resumes exactly.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, assert_ok, read_jsonl, run_cli, save_model, tiny_llama_config, tiny_overrides

LOSSES = ("loss", "kd_loss", "ce_loss", "grad_norm")


@pytest.fixture(scope="module")
def cross_student(tmp_path_factory):
    """A random 1-layer student whose tokenizer is the demo's cross-tokenizer one: the characters and
    every two-digit pair as one token, in another id order ("12+34=" is 4 tokens to the teacher's 6)."""
    from trainer.demo.cross_student import build_pair_tokenizer

    tokenizer = build_pair_tokenizer()
    return save_model(tiny_llama_config(len(tokenizer), layers=1), tokenizer,
                      tmp_path_factory.mktemp("cross") / "student", seed=2)


def run_job(tiny, tmp_path, name: str, *overrides: str, nproc: int = 1) -> tuple[list[dict], dict]:
    run_dir = tmp_path / name
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", *overrides), nproc=nproc))
    return read_jsonl(run_dir / "metrics.jsonl"), json.loads((run_dir / "summary.json").read_text())


def falls(metrics: list[dict]) -> bool:
    """A random 1-layer student with a frozen head cannot move its mass between the two-digit ids and
    the characters through LoRA alone in a few steps: the learning tests fine-tune it whole."""
    losses = [m["loss"] for m in metrics]
    return sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3


@pytest.mark.slow
def test_gold_between_one_tokenizer_and_itself_trains_like_the_same_tokenizer_loss(tiny, tmp_path):
    """Every supervised token is a 1:1 span and every id is shared: GOLD is forward KL exactly."""
    plain, plain_summary = run_job(tiny, tmp_path, "plain", "train.max_steps=3")
    gold, gold_summary = run_job(tiny, tmp_path, "gold", "train.max_steps=3", "loss.cross_tokenizer=gold")
    for a, b in zip(plain, gold, strict=True):
        for key in LOSSES:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a, b)
    for key in ("eval/kl_to_teacher", "eval/student_ce", "eval/student_ce_per_byte", "eval/top1_agreement",
                "eval/exact_match"):
        assert gold_summary[key] == pytest.approx(plain_summary[key], rel=1e-5, abs=1e-7), key
    assert gold_summary["cross_tokenizer/one_to_one_share"] == 1.0
    assert gold_summary["cross_tokenizer/supervised_coverage"] == 1.0
    assert gold_summary["eval/unshared_mass"] == 0.0
    # The held-out rollouts, decoded and re-tokenised by the same tokenizer, are the same tokens.
    for key in ("eval/teacher_nll_of_student", "eval/onpolicy_tokens"):
        assert gold_summary[key] == pytest.approx(plain_summary[key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("method, ce_weight", [("gold", 0.0), ("uld", 0.5)])
def test_a_student_with_another_tokenizer_learns_from_the_teacher(method, ce_weight, tiny, cross_student, tmp_path):
    """ULD cannot tell which token is which (it sorts): it trains with CE, as in its paper."""
    metrics, summary = run_job(tiny, tmp_path, method, f"student.path={cross_student}", f"loss.ce_weight={ce_weight}",
                               f"loss.cross_tokenizer={method}", "train.max_steps=12", "train.lr=0.01", "peft=none")
    assert falls(metrics), [m["loss"] for m in metrics]
    assert 0 < summary["cross_tokenizer/vocab_share"] < 1
    assert summary["cross_tokenizer/one_to_one_share"] < 1, "digit pairs meet two teacher tokens"
    assert 0 <= summary["eval/unshared_mass"] <= 1 and summary["eval/aligned_spans"] > 0
    assert summary["eval/student_ce_per_byte"] < summary["initial/eval/student_ce_per_byte"]
    record = json.loads((tmp_path / method / "provenance.json").read_text())
    assert record["cross_tokenizer"]["enabled"] and record["cross_tokenizer"]["method"] == method
    card = (tmp_path / method / "model" / "README.md").read_text()
    assert "across tokenizers" in card and "cross-tokenizer-distillation" in card


@pytest.mark.slow
def test_two_ranks_under_zero3_with_a_sharded_teacher_learn_across_tokenizers(tiny, cross_student, tmp_path):
    metrics, summary = run_job(tiny, tmp_path, "zero3", f"student.path={cross_student}", "loss.cross_tokenizer=gold",
                               "deepspeed=zero3", "train.max_steps=12", "train.lr=0.01", "peft=none", nproc=2)
    assert summary["teacher/sharded"] is True
    assert falls(metrics), [m["loss"] for m in metrics]


def killed_and_resumed_matches_straight(tiny, tmp_path, extra: tuple, keys: tuple) -> list[dict]:
    """Run once straight, once killed after its step-3 checkpoint and resumed; the two runs' `keys`
    must agree at every step. Returns the straight run's metrics."""
    env = {"PYTHONPATH": str(REPO / "tests")}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def run(run_dir, fault):
        return run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", *extra), module="fault_injection",
                       env={**env, "DISTILL_TEST_FAULT": fault})

    assert_ok(run(straight, "none"))
    assert run(resumed, "kill_after_checkpoint=3").returncode != 0
    assert_ok(run(resumed, "none"))
    metrics = read_jsonl(straight / "metrics.jsonl")
    assert [[m[k] for k in keys] for m in read_jsonl(resumed / "metrics.jsonl")] == [[m[k] for k in keys] for m in metrics]
    return metrics


@pytest.mark.slow
def test_a_cross_tokenizer_run_killed_after_a_checkpoint_and_resumed_is_the_run_never_interrupted(        tiny, cross_student, tmp_path):
    killed_and_resumed_matches_straight(
        tiny, tmp_path, (f"student.path={cross_student}", "loss.cross_tokenizer=gold", "train.max_steps=6",
                         "checkpoint.every=3", "peft.dropout=0.1"), LOSSES)


@pytest.mark.slow
def test_a_student_with_another_tokenizer_learns_from_the_teacher_on_its_own_rollouts(tiny, cross_student, tmp_path):
    """Every row's response is the student's, decoded and re-tokenised for the teacher."""
    metrics, summary = run_job(tiny, tmp_path, "onpolicy", f"student.path={cross_student}", "loss.cross_tokenizer=gold",
                               "onpolicy.fraction=1", "onpolicy.max_new_tokens=8", "train.max_steps=12",
                               "train.lr=0.01", "peft=none")
    assert all(m["rollout_rows"] == 4 and m["rollout_mean_length"] > 0 for m in metrics)
    assert falls(metrics), [m["loss"] for m in metrics]
    assert all(m["kd_loss"] > 0 for m in metrics), "the teacher scores spans of every rollout"
    # The held-out prompts' rollouts, re-tokenised and scored over their spans, before and after.
    for when in ("initial/", ""):
        assert summary[f"{when}eval/onpolicy_spans"] > 0 and summary[f"{when}eval/onpolicy_tokens"] > 0
        assert summary[f"{when}eval/onpolicy_kl"] >= 0 and summary[f"{when}eval/teacher_nll_of_student"] > 0
    assert summary["eval/onpolicy_kl"] < 0.5 * summary["initial/eval/onpolicy_kl"]


@pytest.mark.slow
def test_an_onpolicy_cross_tokenizer_run_killed_and_resumed_is_the_run_never_interrupted(tiny, cross_student, tmp_path):
    """The resumed run redraws the same rows and regenerates the same rollouts, re-tokenised alike."""
    killed_and_resumed_matches_straight(
        tiny, tmp_path, (f"student.path={cross_student}", "loss.cross_tokenizer=gold", "train.max_steps=6",
                         "checkpoint.every=3", "peft.dropout=0.1", "onpolicy.fraction=0.5", "onpolicy.max_new_tokens=8"),
        (*LOSSES, "rollout_rows", "rollout_mean_length", "rollout_truncation_rate"))

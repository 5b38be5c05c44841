"""On-policy steps: which rows a step rewrites, with which rollouts, and what the loop counts of them.

The fast tests drive `OnPolicyRows` with a real tiny model (greedy) or a recording engine; the slow
ones run whole jobs through the CLI: a fraction that draws no row trains bit for bit like an
off-policy job, a student equal to its teacher has an on-policy loss of 0, and one and two ranks
draw and write the same rollouts.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_ok, read_jsonl, run_cli, save_model, tiny_llama_config, tiny_overrides
from omegaconf import OmegaConf

from trainer.data.batching import micro_batch_rows_for_step
from trainer.data.tokenize import TokenizedRow
from trainer.losses.settings import IGNORE_INDEX
from trainer.rollout.engine import RolloutEngine, Rollouts
from trainer.rollout.hf import HFRolloutEngine
from trainer.rollout.prompts import rollout_rows, rollout_seed
from trainer.train.checkpoints import TrainerState
from trainer.train.onpolicy import OnPolicyRows, RolloutWork
from trainer.train.progress import Progress
from trainer.train.throughput import ModelCost

EOS = 2


def onpolicy_cfg(fraction=1.0, max_new_tokens=4, temperature=0.0, top_p=1.0):
    return OmegaConf.create({"fraction": fraction, "max_new_tokens": max_new_tokens, "temperature": temperature,
                             "top_p": top_p})


def prompt_response_row(index: int, prompt: list[int], response: list[int]) -> TokenizedRow:
    return TokenizedRow(prompt + response, [IGNORE_INDEX] * len(prompt) + response, index=index)


class RecordingEngine(RolloutEngine):
    """Writes `[7] * (seed % 3 + 1)` and remembers what it was asked."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds, settings):
        self.calls.append((prompts, seeds, settings))
        tokens = [[7] * (seed % 3 + 1) for seed in seeds]
        return Rollouts(tokens=tokens, stopped_at_eos=[False] * len(tokens), seconds=0.5)


ROWS = [prompt_response_row(i, [5, 6, 5 + i % 4], [9, 9, EOS]) for i in range(16)]


def test_the_drawn_rows_get_the_engines_response_and_the_others_stay_as_they_were():
    engine = RecordingEngine()
    rows = OnPolicyRows(onpolicy_cfg(fraction=0.5, max_new_tokens=8), seed=3, seq_len=32, engine=engine,
                        forward_cost=ModelCost(per_token=10.0))
    positions = list(range(8))
    out, work = rows.rewrite(step=5, positions=positions, rows=ROWS[:8])
    drawn = rollout_rows(5, positions, 0.5, 3)
    assert 0 < sum(drawn) < 8, "this seed draws some rows and leaves others"
    (prompts, seeds, settings), = engine.calls
    assert seeds == [rollout_seed(3, 5, p) for p, d in zip(positions, drawn) if d]
    assert prompts == [ROWS[p].input_ids[:3] for p, d in zip(positions, drawn) if d]
    for position, picked in zip(positions, drawn):
        if not picked:
            assert out[position] is ROWS[position]
            continue
        written = [7] * (rollout_seed(3, 5, position) % 3 + 1)
        assert out[position].input_ids == ROWS[position].input_ids[:3] + written
        assert out[position].labels == [IGNORE_INDEX] * 3 + written, "only the rollout is supervised"
        assert out[position].index == ROWS[position].index
    generated = sum(len(out[p].input_ids) - 3 for p, d in zip(positions, drawn) if d)
    assert work == RolloutWork(rollouts=sum(drawn), generated_tokens=generated, truncated=sum(drawn), seconds=0.5,
                               flops=10.0 * (3 * sum(drawn) + generated))


def test_no_more_tokens_are_generated_than_the_shortest_prompt_leaves_room_for():
    engine = RecordingEngine()
    OnPolicyRows(onpolicy_cfg(max_new_tokens=50), seed=0, seq_len=8, engine=engine,
                 forward_cost=ModelCost()).rewrite(0, [0, 1], ROWS[:2])
    assert engine.calls[0][2].max_new_tokens == 5  # 8 tokens of room minus a 3-token prompt


def test_every_micro_batch_calls_the_engine_even_with_no_row_drawn():
    """Under ZeRO-3 a rollout is collective: a rank with nothing to write still takes part."""
    engine = RecordingEngine()
    out, work = OnPolicyRows(onpolicy_cfg(fraction=1e-12), seed=0, seq_len=32, engine=engine,
                             forward_cost=ModelCost()).rewrite(0, list(range(4)), ROWS[:4])
    assert out == ROWS[:4] and work.rollouts == 0
    assert engine.calls == [([], [], engine.calls[0][2])]


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from trainer.demo.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    path = save_model(tiny_llama_config(len(tokenizer), layers=1), tokenizer, tmp_path_factory.mktemp("s"), seed=2)
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


def test_one_rank_and_two_ranks_of_half_the_micro_batch_write_the_same_greedy_rollouts(tiny_student):
    model, tokenizer = tiny_student
    rows = [prompt_response_row(i, tokenizer.encode(f"{i}+{i % 5}="), tokenizer.encode(f"{i + i % 5}"))
            for i in range(12)]
    onpolicy = OnPolicyRows(onpolicy_cfg(fraction=0.5, max_new_tokens=6), seed=1, seq_len=32,
                            engine=HFRolloutEngine.for_tokenizer(model, tokenizer), forward_cost=ModelCost())

    def step_rows(world_size: int, micro_batch_size: int, grad_accum: int) -> dict[int, TokenizedRow]:
        written = {}
        for rank in range(world_size):
            for positions, slot in micro_batch_rows_for_step(2, rows, rank, world_size, micro_batch_size,
                                                             grad_accum, seed=1):
                written.update(zip(positions, onpolicy.rewrite(2, positions, slot)[0]))
        return written

    one_rank = step_rows(1, 8, 1)
    assert one_rank == step_rows(2, 4, 1) == step_rows(2, 2, 2)
    assert any(row.input_ids != rows[row.index].input_ids for row in one_rank.values()), "some rows were rewritten"


def test_an_onpolicy_window_reports_its_rollouts_and_a_checkpoint_keeps_them():
    state = TrainerState(step=0, world_size=2, rows_per_step=4, zero_stage=0)
    twice = lambda values: values * 2  # two ranks with the same sums  # noqa: E731
    progress = Progress(state, torch.device("cpu"), None, 2, reduce_sum=twice, gather=lambda v: [v, v],
                        onpolicy=True)
    progress.add_step(torch.tensor([8.0, 6.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 10.0],
                                                                                       dtype=torch.float64))
    progress.add_rollouts(RolloutWork(rollouts=4, generated_tokens=12, truncated=1, seconds=0.25, flops=100.0))
    saved = progress.open_sums()
    resumed = Progress(state, torch.device("cpu"), None, 2, reduce_sum=twice, gather=lambda v: [v, v], onpolicy=True)
    resumed.restore_sums(saved)
    assert resumed.rollouts == progress.rollouts
    progress.opened -= 1.0  # the window lasted a second (at least)
    metrics = progress.close_window(step=1, lr=0.1, grad_norm=1.0, kd_measured=True)
    assert metrics["rollout_rows"] == 8 and metrics["rollout_mean_length"] == 3.0
    assert metrics["rollout_truncation_rate"] == 0.25
    assert metrics["rollout_share"] == pytest.approx(0.25, rel=0.05)  # 0.25 s of each rank's ~1 s
    assert metrics["rollout_tokens_per_s"] == pytest.approx(24 / 0.25)
    summary = progress.summary()
    assert summary["train/rollout_mean_length"] == 3.0 and "train/rollout_rows" not in summary


def test_an_offpolicy_window_says_nothing_of_rollouts():
    state = TrainerState(step=0, world_size=1, rows_per_step=4, zero_stage=0)
    progress = Progress(state, torch.device("cpu"), None, 1, reduce_sum=lambda v: v, gather=lambda v: [v])
    progress.add_step(torch.zeros(3, dtype=torch.float64), torch.tensor([4.0, 10.0], dtype=torch.float64))
    assert len(progress.open_sums()) == 5
    assert not any(key.startswith("rollout") for key in progress.close_window(1, 0.1, 1.0, True))
    assert not any("rollout" in key for key in progress.summary())


# ----------------------------------------------------------------------------------- whole jobs
def run_job(tiny, tmp_path, name: str, *overrides: str, nproc: int = 1) -> list[dict]:
    run_dir = tmp_path / name
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=3", *overrides),
                      nproc=nproc))
    return read_jsonl(run_dir / "metrics.jsonl")


LOSSES = ("loss", "kd_loss", "ce_loss", "grad_norm")


@pytest.mark.slow
def test_a_fraction_that_draws_no_row_trains_bit_for_bit_like_an_offpolicy_job(tiny, tmp_path):
    offpolicy = run_job(tiny, tmp_path, "off")
    no_row_drawn = run_job(tiny, tmp_path, "tiny_fraction", "onpolicy.fraction=1e-12")
    assert [[m[k] for k in LOSSES] for m in offpolicy] == [[m[k] for k in LOSSES] for m in no_row_drawn]
    assert all(m["rollout_rows"] == 0 for m in no_row_drawn)
    assert not any("rollout_rows" in m for m in offpolicy)


@pytest.mark.slow
def test_a_student_equal_to_its_teacher_has_an_onpolicy_loss_of_zero(tiny, tmp_path):
    """LoRA starts as the identity (B = 0): at the first step the student is its teacher."""
    first = run_job(tiny, tmp_path, "same", f"student.path={tiny['teacher']}", "onpolicy.fraction=1",
                    "onpolicy.max_new_tokens=8", "loss.kind=rkl")[0]
    assert first["rollout_rows"] == 4 and first["rollout_mean_length"] > 0
    assert abs(first["loss"]) < 1e-6


@pytest.mark.slow
def test_one_rank_and_two_ranks_train_on_the_same_greedy_rollouts(tiny, tmp_path):
    overrides = ("onpolicy.fraction=0.5", "onpolicy.temperature=0", "onpolicy.max_new_tokens=8", "loss.kind=jsd")
    one = run_job(tiny, tmp_path, "one", *overrides, "train.micro_batch_size=4")
    two = run_job(tiny, tmp_path, "two", *overrides, "train.micro_batch_size=2", nproc=2)
    for a, b in zip(one, two, strict=True):
        assert (a["rollout_rows"], a["rollout_mean_length"]) == (b["rollout_rows"], b["rollout_mean_length"])
        assert a["rollout_rows"] > 0
        for key in LOSSES:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)


def test_rollouts_never_write_an_id_past_the_tokenizers_vocabulary(tmp_path):
    """An embedding padded beyond the tokenizer (Qwen2.5's is) must not leak its extra ids."""
    from transformers import AutoModelForCausalLM

    from trainer.demo.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    vocab = len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        save_model(tiny_llama_config(vocab + 3, layers=1), tokenizer, tmp_path / "padded", seed=2)).eval()
    with torch.no_grad():
        model.lm_head.weight[vocab:] = model.lm_head.weight[:vocab].abs().sum(0) * 10  # the padded ids win
    prompts, seeds = [tokenizer.encode("1+2=")], [0]
    unlimited = HFRolloutEngine.for_tokenizer(model, tokenizer).generate(prompts, seeds, onpolicy_rows_settings())
    assert max(unlimited.tokens[0]) >= vocab, "without the limit the padded ids are written"
    limited = HFRolloutEngine.for_tokenizer(model, tokenizer, vocab_size=vocab).generate(prompts, seeds, onpolicy_rows_settings())
    assert limited.tokens[0] and max(limited.tokens[0]) < vocab


def onpolicy_rows_settings():
    from trainer.rollout.engine import RolloutSettings

    return RolloutSettings(max_new_tokens=4, temperature=0.0)


@pytest.mark.slow
def test_two_ranks_under_zero3_with_a_sharded_teacher_learn_onpolicy(tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "deepspeed=zero3", "train.max_steps=12",
                                     "train.micro_batch_size=4", "train.lr=0.02", "onpolicy.fraction=1",
                                     "onpolicy.max_new_tokens=8", "loss.kind=rkl"), nproc=2))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher/sharded"] is True
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert all(m["rollout_rows"] == 8 for m in metrics), "every row of both ranks is the student's"
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert 0 < summary["train/rollout_share"] < 1 and summary["train/rollout_mean_length"] > 0


@pytest.mark.slow
def test_an_onpolicy_run_killed_after_a_checkpoint_and_resumed_is_the_run_never_interrupted(tiny, tmp_path):
    """Sampled rollouts (temperature 1) at fraction 0.5: the rows drawn and every rollout come back."""
    from conftest import REPO

    env = {"PYTHONPATH": str(REPO / "tests")}
    extra = ("train.max_steps=6", "checkpoint.every=3", "peft.dropout=0.1", "onpolicy.fraction=0.5",
             "onpolicy.max_new_tokens=8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def run(run_dir, fault):
        return run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", *extra), module="fault_injection",
                       env={**env, "DISTILL_TEST_FAULT": fault})

    assert_ok(run(straight, "none"))
    assert run(resumed, "kill_after_checkpoint=3").returncode != 0
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3]
    assert_ok(run(resumed, "none"))
    keys = (*LOSSES, "rollout_rows", "rollout_mean_length", "rollout_truncation_rate")
    assert ([[m[k] for k in keys] for m in read_jsonl(resumed / "metrics.jsonl")]
            == [[m[k] for k in keys] for m in read_jsonl(straight / "metrics.jsonl")])
    assert any(0 < m["rollout_rows"] < 4 for m in read_jsonl(straight / "metrics.jsonl")), "some rows, not all"


@pytest.mark.slow
def test_full_fine_tuning_trains_onpolicy_under_zero2(tiny, tmp_path):
    metrics = run_job(tiny, tmp_path, "full", "peft=none", "deepspeed=zero2", "onpolicy.fraction=1",
                      "onpolicy.max_new_tokens=6")
    assert [m["rollout_rows"] for m in metrics] == [4, 4, 4]
    assert (tmp_path / "full" / "model" / "model.safetensors").exists()

"""The on-policy held-out evaluation (`eval/onpolicy_kl`, `eval/teacher_nll_of_student`) on tiny Llama
models built here: against `model.generate` and plain float64 torch, zero for a student that is its
teacher, the same before and after when nothing trained, and absent (or refused) with a teacher cache."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from test_config import composed
from transformers import AutoModelForCausalLM

from trainer.config import ConfigError, validate
from trainer.data.tokenize import tokenize_row
from trainer.losses.settings import IGNORE_INDEX
from trainer.models.heads import Scorer
from trainer.models.teacher import ModelTeacher, Teacher
from trainer.rollout.engine import RolloutEngine, RolloutSettings
from trainer.rollout.hf import HFRolloutEngine
from trainer.rollout.prompts import rollout_seed
from trainer.train import evaluation, job

CPU = torch.device("cpu")
SEQ_LEN = 16
GREEDY = RolloutSettings(max_new_tokens=12, temperature=0)
SAMPLED = RolloutSettings(max_new_tokens=12, temperature=1.0, top_p=0.9)
ROWS = [{"prompt": "12+34=", "response": "46"}, {"prompt": "7+8=", "response": "15"},
        {"text": "a text row has no prompt"}, {"prompt": "99+1=", "response": "100"},
        {"prompt": "5+55=", "response": "60"}, {"prompt": "30+3=", "response": "33"}]


def tiny_model(tokenizer, extra_vocab: int, layers: int, seed: int):
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer) + extra_vocab, layers)
    config.initializer_range = 0.2  # a wide initialisation: a random model's rollouts vary instead of repeating
    # The tokenizer's ids, not LlamaConfig's defaults: the engine also stops at the config's EOS.
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"teacher": tiny_model(tokenizer, 3, layers=2, seed=1), "student": tiny_model(tokenizer, 0, layers=1, seed=2)}


@pytest.fixture(scope="module")
def rows(tokenizer):
    return [replace(tokenize_row(row, tokenizer, SEQ_LEN, "test"), index=10 + i) for i, row in enumerate(ROWS)]


class RecordingEngine(RolloutEngine):
    """An engine that writes what it was asked and what its inner engine wrote."""

    def __init__(self, inner: RolloutEngine):
        self.inner, self.calls = inner, []

    def generate(self, prompts, seeds, settings):
        rollouts = self.inner.generate(prompts, seeds, settings)
        self.calls.append({"prompts": prompts, "seeds": seeds, "settings": settings, "tokens": rollouts.tokens})
        return rollouts


def measured(tokenizer, models, rows, settings, *, fused=True, seed=0, batch_size=2, student="student", **extra):
    vocab = len(tokenizer)
    engine = RecordingEngine(HFRolloutEngine.for_tokenizer(models[student], tokenizer))
    teacher = ModelTeacher(Scorer(models["teacher"], vocab, fused))
    metrics = evaluation.onpolicy_evaluate(
        rows, engine, settings, seed, teacher, Scorer(models[student], vocab, fused), device=CPU, chunk_size=5,
        pad_id=tokenizer.pad_token_id, batch_size=batch_size, seq_len=SEQ_LEN, **extra)
    return metrics, engine


def generate_alone(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """`model.generate`'s greedy continuation of one prompt (no padding), up to and with its EOS."""
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def reference(models, prompts_and_rollouts, vocab: int) -> dict:
    """Plain float64 torch over each row alone: KL(student ‖ teacher) and the teacher's NLL at every
    position that predicts a generated token kept within SEQ_LEN."""
    kl = nll = tokens = 0.0
    for prompt, generated in prompts_and_rollouts:
        ids = (prompt + generated)[:SEQ_LEN]
        kept = len(ids) - len(prompt)
        with torch.no_grad():
            logp = {role: F.log_softmax(models[role](torch.tensor([ids])).logits[0, :, :vocab].double(), dim=-1)
                    for role in ("teacher", "student")}
        predicting = slice(len(prompt) - 1, len(ids) - 1)
        student, teacher = logp["student"][predicting], logp["teacher"][predicting]
        kl += float((student.exp() * (student - teacher)).sum())
        nll -= float(teacher.gather(1, torch.tensor(ids[len(prompt):])[:, None]).sum())
        tokens += kept
    return {"eval/onpolicy_kl": kl / tokens, "eval/teacher_nll_of_student": nll / tokens, "eval/onpolicy_tokens": tokens}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "full_logits"])
def test_the_metrics_equal_generate_and_a_plain_float64_computation(tokenizer, models, rows, one_gloo_rank, fused):
    metrics, engine = measured(tokenizer, models, rows, GREEDY, fused=fused)

    prompted = [row for row in rows if row.labels[1] == IGNORE_INDEX]  # the text row is left out
    assert len(prompted) == len(rows) - 1
    prompts = [row.input_ids[: next(i for i, label in enumerate(row.labels) if label != IGNORE_INDEX)]
               for row in prompted]
    assert [p for call in engine.calls for p in call["prompts"]] == prompts
    written = [t for call in engine.calls for t in call["tokens"]]
    eos = tokenizer.eos_token_id
    alone = [generate_alone(models["student"], prompt, GREEDY.max_new_tokens, eos) for prompt in prompts]
    for prompt, tokens, expected in zip(prompts, written, alone):
        # A rollout may stop early where the rest would be cut to SEQ_LEN: what is kept is generate's.
        assert tokens == expected[: len(tokens)] and len(prompt) + len(tokens) >= min(SEQ_LEN, len(prompt) + len(expected))
    assert any(len(p) + len(t) > SEQ_LEN for p, t in zip(prompts, alone)), "no rollout was cut to SEQ_LEN"
    expected = reference(models, list(zip(prompts, alone)), len(tokenizer))
    assert metrics["eval/onpolicy_tokens"] == expected["eval/onpolicy_tokens"]
    assert metrics["eval/onpolicy_kl"] == pytest.approx(expected["eval/onpolicy_kl"], rel=1e-6)
    assert metrics["eval/teacher_nll_of_student"] == pytest.approx(expected["eval/teacher_nll_of_student"], rel=1e-6)
    assert metrics["eval/onpolicy_kl"] > 0.1  # two different random models: far from zero


def test_a_student_that_is_its_teacher_has_zero_kl_and_the_teachers_own_nll(tokenizer, models, rows, one_gloo_rank):
    # The student's vocabulary: a teacher's extra rows would let the twin sample ids no token has.
    same = {"teacher": models["student"], "twin": copy.deepcopy(models["student"])}
    metrics, _ = measured(tokenizer, same, rows, SAMPLED, student="twin")
    assert metrics["eval/onpolicy_kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["eval/teacher_nll_of_student"] > 0.5


def test_the_same_student_measures_the_same_before_and_after(tokenizer, models, rows, one_gloo_rank):
    """Sampled, with the global RNG moved between the two: each prompt keeps its seed, so nothing but
    a trained student could change the value; another train.seed draws other rollouts."""
    before, engine = measured(tokenizer, models, rows, SAMPLED, seed=7)
    torch.rand(100)
    after, _ = measured(tokenizer, models, rows, SAMPLED, seed=7)
    assert after == before
    prompted = [row for row in rows if row.labels[1] == IGNORE_INDEX]
    assert [s for call in engine.calls for s in call["seeds"]] == [
        rollout_seed(7, evaluation.EVAL_ROLLOUT_STEP, row.index) for row in prompted]
    other_seed, _ = measured(tokenizer, models, rows, SAMPLED, seed=8)
    assert other_seed["eval/onpolicy_kl"] != before["eval/onpolicy_kl"]


def test_the_batch_size_changes_nothing(tokenizer, models, rows, one_gloo_rank):
    one, _ = measured(tokenizer, models, rows, GREEDY, batch_size=1)
    four, _ = measured(tokenizer, models, rows, GREEDY, batch_size=4)
    assert one["eval/onpolicy_tokens"] == four["eval/onpolicy_tokens"]
    assert one["eval/onpolicy_kl"] == pytest.approx(four["eval/onpolicy_kl"], rel=1e-5)


def test_a_rank_out_of_prompts_still_generates_and_runs_the_models_each_batch(tokenizer, models, rows, one_gloo_rank,
                                                                              monkeypatch):
    """Every rank runs as many batches as the busiest one (here, pretend it has 4): the engine and the
    forwards are collectives under ZeRO-3. The empty batches add nothing to the metrics."""
    alone, _ = measured(tokenizer, models, rows, GREEDY, batch_size=4)
    forwards = []
    counting = models["student"].register_forward_hook(lambda *_: forwards.append(1))
    monkeypatch.setattr(evaluation, "max_over_ranks", lambda count: torch.tensor([4]))
    try:
        padded, engine = measured(tokenizer, models, rows, GREEDY, batch_size=4)
    finally:
        counting.remove()
    assert [len(call["prompts"]) for call in engine.calls] == [4, 1, 0, 0]
    rollout_forwards = sum(max(len(t) for t in call["tokens"]) for call in engine.calls if call["tokens"])
    assert len(forwards) - rollout_forwards == 4, "one scoring forward per batch, filler batches included"
    assert padded == alone


def test_text_rows_only_leave_the_metrics_out(tokenizer, models, rows, one_gloo_rank):
    metrics, engine = measured(tokenizer, models, [rows[2]], GREEDY)
    assert metrics == {} and [call["prompts"] for call in engine.calls] == []


class CacheLikeTeacher(Teacher):
    """A teacher that cannot score new text, as a cache cannot."""

    def states(self, batch, host_batch):
        raise AssertionError("not asked in an evaluation")

    def evaluation_terms(self, batch, host_batch):
        raise AssertionError("not asked here")


class RefusingEngine(RolloutEngine):
    def generate(self, prompts, seeds, settings):
        raise AssertionError("no rollout should be written for a teacher that cannot score it")


def test_a_cached_teacher_measures_nothing_on_policy_and_its_metric_is_refused_at_start_up(tokenizer, rows):
    bare = job.DistillJob.__new__(job.DistillJob)
    bare.cfg = composed()
    bare.parts = SimpleNamespace(rollout_engine=RefusingEngine(), eval_teacher=CacheLikeTeacher(), cross=None)
    assert bare._onpolicy_evaluate() == {}
    with pytest.raises(ValueError, match="cannot score the student's rollouts"):
        evaluation.onpolicy_evaluate(rows, RefusingEngine(), GREEDY, 0, CacheLikeTeacher(), None, device=CPU,
                                     chunk_size=4, pad_id=0, batch_size=2, seq_len=SEQ_LEN)
    for metric in ("eval/onpolicy_kl", "initial/eval/teacher_nll_of_student"):
        with pytest.raises(ConfigError, match=rf"^train.metric={metric} is never measured with a teacher cache"):
            validate(composed("teacher.cache=auto", f"train.metric={metric}"))
        validate(composed(f"train.metric={metric}"))


def test_a_diverged_student_writes_nothing_and_its_pair_is_nan(tokenizer):
    bare = job.DistillJob.__new__(job.DistillJob)
    bare.cfg = composed()
    bare.parts = SimpleNamespace(rollout_engine=RefusingEngine(),
                                 eval_teacher=SimpleNamespace(scores_new_text=True), cross=None)
    measured = bare._onpolicy_evaluate(diverged=True)
    assert math.isnan(measured["eval/onpolicy_kl"]) and math.isnan(measured["eval/teacher_nll_of_student"])


def test_before_and_after_prints_the_on_policy_pair_where_it_was_measured(capsys):
    initial = {"eval/kl_to_teacher": 1.0, "eval/student_ce": 2.0, "eval/top1_agreement": 0.1, "eval/exact_match": 0.0,
               "eval/teacher_ce": 0.5}
    final = {**initial, "eval/kl_to_teacher": 0.5}
    job._print_before_after(initial, final)
    assert "onpolicy" not in capsys.readouterr().out
    onpolicy = {"eval/onpolicy_kl": 3.0, "eval/teacher_nll_of_student": 4.0}
    job._print_before_after({**initial, **onpolicy}, {**final, **onpolicy, "eval/onpolicy_kl": 1.5})
    lines = capsys.readouterr().out.splitlines()
    assert "eval/onpolicy_kl                 3.0000     1.5000" in lines
    assert "eval/teacher_nll_of_student      4.0000     4.0000" in lines

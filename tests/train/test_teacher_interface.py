"""The step and the evaluation use a teacher only through `trainer.models.teacher.Teacher`, and a job
decides its precision and builds each model's DeepSpeed config once.

A fake teacher that is neither a model nor a cache (it subclasses only the interface) drives both
on CPU tensors; its KL, CE and top-1 come back as the float64 references say."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_config import composed

from trainer.losses import distill_loss
from trainer.losses.objective import Objective
from trainer.losses.settings import IGNORE_INDEX
from trainer.models import engines
from trainer.models.teacher import Teacher
from trainer.ranks import RankInfo
from trainer.train import evaluation, job, setup
from trainer.train.nonfinite import TrainingDiverged

V = 7


class FixedTeacher(Teacher):
    """The teacher as fixed logits ``[B, T, V]``, one batch at a time; counts what it is asked."""

    def __init__(self, logits_by_batch: list[torch.Tensor]):
        self.logits_by_batch, self.asked = logits_by_batch, []

    def _logits(self, host_batch: dict) -> torch.Tensor:
        return self.logits_by_batch[int(host_batch["batch"][0])]

    def states(self, batch, host_batch):
        self.asked.append("states")
        return self._logits(host_batch)

    def evaluation_terms(self, batch, host_batch):
        self.asked.append("evaluation_terms")
        rows = self._logits(host_batch).reshape(-1, V)

        def terms(index, student_logits, student_logp, targets):
            teacher_logp = F.log_softmax(rows.index_select(0, index).float(), dim=-1)
            kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
            return kl, F.nll_loss(teacher_logp, targets, reduction="sum"), teacher_logp.argmax(-1)

        return terms

    def gathered(self):
        self.asked.append("gathered")
        return contextlib.nullcontext()


class FixedStudent:
    """A plain (unfused) student scorer whose logits are fixed."""

    fused = False
    head = None
    vocab_size = V

    def __init__(self, logits_by_batch: list[torch.Tensor]):
        self.logits_by_batch = logits_by_batch
        self.engine = torch.nn.Linear(1, 1)  # what eval_mode toggles

    def states(self, batch):
        return self.logits_by_batch[int(batch["batch"][0])]

    def logits_of(self, rows):
        return rows[:, :V].float()

    def gathered(self):
        return contextlib.nullcontext()


def _batches(count: int, generator: torch.Generator) -> list[dict]:
    batches = []
    for index in range(count):
        labels = torch.randint(0, V, (2, 5), generator=generator)
        labels[0, :2] = IGNORE_INDEX  # a prompt
        labels[1, -1] = IGNORE_INDEX  # padding
        batches.append({"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels),
                        "labels": labels, "batch": torch.full((2,), index)})
    return batches


def test_evaluation_reads_the_teacher_through_the_interface_only(one_gloo_rank):
    generator = torch.Generator().manual_seed(0)
    batches = _batches(2, generator)
    teacher_logits = [torch.randn(2, 5, V, generator=generator, dtype=torch.float64) for _ in batches]
    student_logits = [torch.randn(2, 5, V, generator=generator, dtype=torch.float64) for _ in batches]
    teacher = FixedTeacher(teacher_logits)

    metrics = evaluation.evaluate(teacher, FixedStudent(student_logits), batches, torch.device("cpu"), chunk_size=3)

    student = torch.cat([s[:, :-1] for s in student_logits])
    reference = torch.cat([t[:, :-1] for t in teacher_logits])
    targets = torch.cat([b["labels"][:, 1:] for b in batches])
    expected_kl = distill_loss(student, reference, targets, kind="fkl")
    supervised = targets != IGNORE_INDEX
    teacher_ce = F.cross_entropy(reference[supervised], targets[supervised])
    agree = (student.argmax(-1) == reference.argmax(-1))[supervised].double().mean()
    assert metrics["eval/tokens"] == supervised.sum()
    assert metrics["eval/kl_to_teacher"] == pytest.approx(float(expected_kl), rel=1e-5)
    assert metrics["eval/teacher_ce"] == pytest.approx(float(teacher_ce), rel=1e-5)
    assert metrics["eval/top1_agreement"] == pytest.approx(float(agree))
    assert "states" not in teacher.asked and teacher.asked.count("evaluation_terms") == len(batches)


def _bare_job(objective: Objective, teacher: Teacher, student: FixedStudent) -> job.DistillJob:
    """A DistillJob holding only what a step's forward and loss read."""
    distill_job = job.DistillJob.__new__(job.DistillJob)
    distill_job.objective = objective
    distill_job.parts = SimpleNamespace(step_teacher=teacher, student_scorer=student, cross=None)
    return distill_job


def test_the_step_reads_the_teacher_through_the_interface_only():
    generator = torch.Generator().manual_seed(1)
    (batch,) = _batches(1, generator)
    teacher_logits = torch.randn(2, 5, V, generator=generator, dtype=torch.float64)
    student_logits = torch.randn(2, 5, V, generator=generator, dtype=torch.float64)
    teacher = FixedTeacher([teacher_logits])
    objective = Objective.from_config(composed("loss.kind=jsd", "loss.temperature=2.0", "loss.ce_weight=0.0").loss)
    distill_job = _bare_job(objective, teacher, FixedStudent([student_logits]))

    teacher_states, student_states = distill_job._forward_models(batch, batch)
    sums = distill_job._micro_batch_sums(teacher_states, student_states, batch["labels"], None)

    targets = batch["labels"][:, 1:]
    expected = distill_loss(student_logits[:, :-1], teacher_logits[:, :-1], targets, kind="jsd", temperature=2.0)
    assert float(sums.kd) == pytest.approx(float(expected * (targets != IGNORE_INDEX).sum()), rel=1e-6)
    assert teacher.asked == ["states"]


def test_under_sft_the_step_asks_the_teacher_nothing():
    generator = torch.Generator().manual_seed(2)
    (batch,) = _batches(1, generator)
    student_logits = torch.randn(2, 5, V, generator=generator)
    teacher = FixedTeacher([])
    distill_job = _bare_job(Objective.from_config(composed("loss.kind=sft").loss), teacher, FixedStudent([student_logits]))

    teacher_states, student_states = distill_job._forward_models(batch, batch)
    sums = distill_job._micro_batch_sums(teacher_states, student_states, batch["labels"], None)

    assert teacher_states is None and teacher.asked == []
    assert torch.isnan(sums.kd) and float(sums.ce) > 0


def _counting(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_job_decides_precision_and_builds_each_deepspeed_config_once(monkeypatch, tmp_path: Path):
    precisions = _counting(monkeypatch, engines, "precision")
    configs = _counting(monkeypatch, engines, "deepspeed_config")
    loaded = []
    monkeypatch.setattr(setup, "load_teacher", lambda *args: loaded.append(args) or (None, {}))
    cpu = RankInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

    distill_job = job.DistillJob(composed("deepspeed=zero3", "train.precision=bf16"), cpu, tmp_path)
    setup._build_teacher(distill_job.cfg.teacher, None, distill_job.engine_configs, distill_job.precision, cpu, {})

    assert len(precisions) == 1 and len(configs) == 1
    assert distill_job.precision == engines.Precision(True, torch.bfloat16)
    assert distill_job.precision.model_dtype("auto") == torch.bfloat16
    assert distill_job.precision.model_dtype("float32") == torch.float32
    (teacher_cfg, engine_configs, precision, _), = loaded
    assert engine_configs is distill_job.engine_configs and precision is distill_job.precision
    assert engine_configs.teacher_sharded and engine_configs.teacher["zero_optimization"] == {"stage": 3}
    assert engine_configs.student["bf16"] == engine_configs.teacher["bf16"] == {"enabled": True}


def test_held_out_rows_without_a_response_token_give_nan_means_that_do_not_stop_the_job(one_gloo_rank):
    """Prompt-only held-out rows (issue 19): the teacher-forced means have no token to average, so
    they are NaN (not 0, a perfect score), and the job's check for a diverged student lets them pass."""
    generator = torch.Generator().manual_seed(0)
    batches = _batches(1, generator)
    batches[0]["labels"].fill_(IGNORE_INDEX)
    logits = [torch.randn(2, 5, V, generator=generator, dtype=torch.float64)]

    metrics = evaluation.evaluate(FixedTeacher(logits), FixedStudent(logits), batches, torch.device("cpu"), chunk_size=3)

    assert metrics["eval/tokens"] == 0
    unaveraged = {key for key, value in metrics.items() if value != value}
    assert unaveraged == {"eval/kl_to_teacher", "eval/student_ce", "eval/student_ce_per_byte", "eval/teacher_ce",
                          "eval/top1_agreement", "eval/exact_match"}
    stopper = SimpleNamespace(_weights_now=lambda: "finite", _newest_checkpoint=lambda: (None, None),
                              state=SimpleNamespace(nonfinite_in_a_row=0),
                              cfg=SimpleNamespace(peft=SimpleNamespace(kind="lora")))
    job.DistillJob._refuse_non_finite(stopper, metrics)  # passes: nothing to average is no divergence
    # The same NaN where there were tokens to average is a diverged student.
    with pytest.raises(TrainingDiverged, match=r"the final evaluation gave eval/exact_match=nan, eval/kl_to_teacher"):
        job.DistillJob._refuse_non_finite(stopper, {**metrics, "eval/tokens": 3.0})

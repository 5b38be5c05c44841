"""Building what a job's loop reads: the teacher (a model, or its cache), the student and its
optimizer, how each is scored, the student's rollout engine, the rows, and the FLOPs a step costs.
:func:`build_parts` is the one place that knows whether a model or a cache teaches; everything after
reads the :class:`~trainer.models.teacher.Teacher` interface.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from trainer.cache.store import CacheReader
from trainer.cache.cross import CrossCachedTeacher
from trainer.cache.teacher import CachedTeacher
from trainer.data.alignment import token_byte_lengths
from trainer.data.batching import collate, eval_batches
from trainer.data.tokenize import TokenizedRow
from trainer.losses import default_chunk_size
from trainer.losses.cross_tokenizer import default_chunk_size as cross_tokenizer_chunk_size
from trainer.models import engines, loading, lora
from trainer.models.heads import Scorer, fused_unsupported_reason
from trainer.models.optimizer import SkippingAdamW
from trainer.models.probes import check_documents_stay_apart, check_head_parity
from trainer.models.teacher import ModelTeacher, Teacher, load_teacher
from trainer.preflight import Preflight
from trainer.ranks import RankInfo
from trainer.rollout.engine import RolloutEngine
from trainer.rollout.hf import HFRolloutEngine
from trainer.rollout.retokenize import RolloutPairing
from trainer.train import throughput
from trainer.train.cross_tokenizer import CrossTokenizer
from trainer.train.onpolicy import OnPolicyRows

log = logging.getLogger(__name__)


@dataclass
class JobParts:
    """What the loop reads besides the config, built once by :func:`build_parts`."""

    student: object
    """The student's DeepSpeed engine."""
    optimizer: SkippingAdamW
    teacher: object | None
    """The teacher's DeepSpeed engine; None when its top-k is read from a cache."""
    step_teacher: Teacher
    eval_teacher: Teacher
    """The same teacher as `step_teacher`, except a cache's, which reads the held-out split."""
    student_scorer: Scorer
    chunk_size: int
    """Tokens per chunk of the fused loss and of the evaluation's logits."""
    step_cost: throughput.ModelCost
    """FLOPs per token of every model a step runs on the student's rows (the teacher's too, with one tokenizer)."""
    teacher_cost: throughput.ModelCost | None
    """Across tokenizers: the teacher's FLOPs per token of its own rows (not in `step_cost`); else None."""
    train_rows: list[TokenizedRow]
    eval_batches: list[dict]
    """This rank's share of the held-out rows, collated."""
    eval_rows: list[TokenizedRow]
    """The same share as rows, not padded: the prompts the student answers in the on-policy evaluation."""
    rollout_engine: RolloutEngine | None
    """The student writing responses (on-policy steps, on-policy evaluation); None only in an off-policy
    job whose student has no EOS token, so that its rollouts could never stop."""
    pad_id: int
    byte_lengths: torch.Tensor
    """``[V]`` float64: the UTF-8 bytes of text each student id stands for (eval/student_ce_per_byte)."""
    onpolicy: OnPolicyRows | None
    """Rewrites each step's drawn rows with rollouts; None off-policy (onpolicy.fraction=0)."""
    teacher_cache: CacheReader | None
    cross: CrossTokenizer | None
    """Distilling across tokenizers (loss.cross_tokenizer): the method and the ids both vocabularies
    share; None with one tokenizer."""
    pairing: RolloutPairing | None
    """Across tokenizers, re-tokenises the student's rollouts for the teacher (on-policy steps, the
    on-policy evaluation); None with one tokenizer."""
    summary: dict
    """What summary.json says of the teacher and the loss path."""


def build_parts(cfg, rank: RankInfo, checked: Preflight, teacher_cache: CacheReader | None,
                precision: engines.Precision, configs: engines.EngineConfigs, data_time) -> JobParts:
    """Load and wrap both models (after the inputs passed their checks) and prove on probes what the
    step assumes of them. `data_time`: the stopwatch a cached teacher's reads run in (data loading)."""
    summary: dict = {}
    teacher = _build_teacher(cfg.teacher, teacher_cache, configs, precision, rank, summary)
    student, optimizer = _build_student(cfg, configs, precision)
    by_role = {"student": student} if teacher is None else {"teacher": teacher, "student": student}
    fused = cfg.loss.fused and _fused_loss_fits(by_role)
    # Across tokenizers each model scores its own ids; with one tokenizer, the ids both score.
    vocab_sizes = {"student": checked.vocab_size, "teacher": checked.teacher_vocab_size or checked.vocab_size}
    scorers = {role: Scorer(engine, vocab_sizes[role], fused) for role, engine in by_role.items()}
    if fused:
        for role, scorer in scorers.items():
            check_head_parity(role, scorer.engine, scorer.tap, scorer.head, rank.device)
    chunk_size = cfg.loss.chunk_size or _default_chunk_size(vocab_sizes, checked.cross_tokenizer)
    log.info("loss: %s, %d tokens per chunk", "fused with the heads" if fused else "on full logits", chunk_size)
    summary["loss/fused"] = fused
    if cfg.data.pack:  # every rank: a sharded model's forward is collective
        for role, engine in by_role.items():
            check_documents_stay_apart(role, engine.module, rank.device)
    step_teacher, eval_teacher = _teachers(scorers.get("teacher"), teacher_cache, checked.rows.eval_split, rank,
                                           data_time, checked.cross_tokenizer)
    pad_id = checked.tokenizer.pad_token_id
    cross = CrossTokenizer.for_job(cfg.loss, checked) if checked.cross_tokenizer else None
    collate_rows = cross.collate if cross is not None else collate
    summary.update(checked.alignment)
    rollout_engine = _rollout_engine(student, checked.tokenizer, checked.vocab_size, cfg.onpolicy.fraction)
    # Across tokenizers each rollout is re-tokenised for the teacher, here and nowhere else.
    pairing = (RolloutPairing.for_tokenizers(checked.tokenizer, checked.teacher_tokenizer, cfg.train.seq_len)
               if cross is not None else None)
    onpolicy = (OnPolicyRows(cfg.onpolicy, cfg.train.seed, cfg.train.seq_len, rollout_engine,
                             throughput.teacher_cost(student.module),  # generating is the student's forward only
                             pairing)
                if cfg.onpolicy.fraction > 0 else None)
    return JobParts(
        student=student, optimizer=optimizer, teacher=teacher, step_teacher=step_teacher, eval_teacher=eval_teacher,
        student_scorer=scorers["student"], chunk_size=chunk_size,
        step_cost=_step_cost(student, None if cross else teacher, cfg.loss.kind),
        teacher_cost=(throughput.teacher_cost(teacher.module)
                      if cross and teacher is not None and cfg.loss.kind != "sft" else None),
        train_rows=checked.rows.train,
        eval_batches=eval_batches(checked.rows.eval, rank.rank, rank.world_size, cfg.train.micro_batch_size, pad_id,
                                  collate_rows),
        eval_rows=checked.rows.eval[rank.rank::rank.world_size], pad_id=pad_id, rollout_engine=rollout_engine,
        byte_lengths=torch.tensor(token_byte_lengths(checked.tokenizer, checked.vocab_size), dtype=torch.float64),
        onpolicy=onpolicy, teacher_cache=teacher_cache, cross=cross, pairing=pairing, summary=summary)


def _default_chunk_size(vocab_sizes: dict[str, int], cross_tokenizer) -> int:
    """Rows per chunk when ``loss.chunk_size`` is unset: across tokenizers the sorts' ``[C, V]``
    intermediates bound it (fewer rows than the same-tokenizer loss runs), otherwise the fused loss's."""
    if cross_tokenizer:
        return cross_tokenizer_chunk_size(vocab_sizes["student"], vocab_sizes["teacher"])
    return default_chunk_size(max(vocab_sizes.values()))


def _build_teacher(teacher_cfg, teacher_cache: CacheReader | None, configs: engines.EngineConfigs,
                   precision: engines.Precision, rank: RankInfo, summary: dict):
    """The teacher's engine, or None when its top-k is read from a cache instead."""
    if teacher_cache is not None:
        manifest = teacher_cache.manifest
        summary.update({"teacher/source": "cache", "teacher/cache": str(teacher_cache.folder),
                        "teacher/cache_top_k": manifest.key["top_k"], "teacher/cached_from": manifest.teacher})
        return None
    engine, held = load_teacher(teacher_cfg, configs, precision, rank)
    summary.update({"teacher/source": "model", **held})
    return engine


def _build_student(cfg, configs: engines.EngineConfigs, precision: engines.Precision):
    """The student's engine and optimizer: loaded (partitioned at ZeRO-3), LoRA applied when asked."""
    stage = cfg.deepspeed.stage
    student = loading.load_model("student", cfg.student, precision.model_dtype(cfg.student.dtype),
                                 configs.student if stage == 3 else None)
    if cfg.train.activation_checkpointing:
        loading.checkpoint_activations(student)
        log.info("student: activation checkpointing on (each layer is recomputed in the backward)")
    if cfg.peft.kind == "lora":
        student, targets = lora.apply_lora(student, cfg.peft)
        log.info("LoRA r=%d on %s", cfg.peft.r, ", ".join(targets))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters() if p.requires_grad)
    log.info("student: %d trainable parameters, ZeRO stage %d", trainable, stage)
    return engines.build_student_engine(student, configs.student, cfg.train)


def _rollout_engine(student, tokenizer, vocab_size: int, fraction: float) -> RolloutEngine | None:
    """The student's rollout engine. An off-policy job trains as well without one, so a student with
    no EOS token costs it only the on-policy evaluation (a warning); an on-policy job stops."""
    try:
        return HFRolloutEngine.for_tokenizer(student, tokenizer, vocab_size=vocab_size)
    except loading.ModelError as error:
        if fraction > 0:
            raise
        log.warning("eval/onpolicy_kl is left out: %s", error)
        return None


def _fused_loss_fits(engines_by_role: dict) -> bool:
    reasons = {role: fused_unsupported_reason(engine.module) for role, engine in engines_by_role.items()}
    for role, reason in reasons.items():
        if reason:
            log.warning("loss: the %s cannot use the fused loss (%s); using full logits.", role, reason)
    return not any(reasons.values())


def _teachers(model_scorer: Scorer | None, teacher_cache: CacheReader | None, eval_split: str, rank: RankInfo,
              data_time, cross_tokenizer: bool = False) -> tuple[Teacher, Teacher]:
    """The step's teacher and the evaluation's: one model, or a cache read by split (held-out rows
    split off the training data keep their index in it, so they may read the train split); across
    tokenizers, a cache read at the teacher positions of the batch's spans (trainer/cache/cross.py)."""
    if model_scorer is not None:
        teacher = ModelTeacher(model_scorer)
        return teacher, teacher
    cached = CrossCachedTeacher if cross_tokenizer else CachedTeacher
    # Reading the cache is data loading: the step waits on it as on rows.
    return (cached(teacher_cache, "train", rank.device, reading=data_time),
            cached(teacher_cache, eval_split, rank.device))


def _step_cost(student, teacher, loss_kind: str) -> throughput.ModelCost:
    """FLOPs per token of each model that runs in a step (see trainer/train/throughput.py)."""
    cost = throughput.student_cost(student.module)
    if teacher is not None and loss_kind != "sft":
        cost = cost + throughput.teacher_cost(teacher.module)
    return cost

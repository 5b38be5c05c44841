"""One distillation job, for any number of ranks: setup, step, evaluate, checkpoint, finish."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainer import checkpoints, engines, models
from trainer.batching import eval_batches, micro_batches_for_step
from trainer.cache.cached_teacher import CachedStates, CachedTeacher, open_cache
from trainer.config import validate
from trainer.data import split_holdout
from trainer.distributed import RankInfo, all_reduce_sum, broadcast_object
from trainer.evaluation import evaluate, to_device
from trainer.heads import Scorer, check_head_parity, fused_unsupported_reason
from trainer.inputs import load_splits, materialise_demo
from trainer.losses import default_chunk_size
from trainer.objective import IGNORE_INDEX, fused_micro_batch_sums, micro_batch_sums
from trainer.preemption import Preempted, PreemptionWatch, hand_back
from trainer.teacher import load_teacher
from trainer.tracking import Tracker

log = logging.getLogger(__name__)


class DistillJob:
    """Holds what a run needs between stages; each method is one stage of the run."""

    def __init__(self, cfg, rank: RankInfo, run_dir: Path):
        validate(cfg)  # before anything is loaded, so a bad value costs nothing
        self.cfg, self.rank, self.run_dir = cfg, rank, run_dir
        self.summary: dict = {}
        self.tokens_seen = 0

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        materialise_demo(cfg, self.rank)
        self.tokenizer, self.vocab_size = self._check_models_fit()
        self._load_data()
        # Seeded here, after anything that may draw random numbers (building the demo's teacher on a
        # cold cache does): the same LoRA initialisation on every rank, cold cache or warm.
        torch.manual_seed(cfg.train.seed)
        self.teacher = self._build_teacher()
        self.student = self._build_student()
        self.teacher_scorer, self.student_scorer = self._build_scorers()
        self.first_step = self._resume()
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.tracker = Tracker(self.run_dir, cfg, resolved, self.first_step, enabled=self.rank.is_main)

    def _check_models_fit(self):
        """Tokenizers and configs only: a mismatch is reported before any weights load."""
        cfg = self.cfg
        models.check_model_source("student", cfg.student.path)
        student_tokenizer = models.load_tokenizer("student", cfg.student)
        student_config = models.load_config("student", cfg.student)
        if cfg.teacher.path is None:  # a teacher cache that records its own teacher (e.g. an API model)
            return student_tokenizer, models.shared_vocab_size(student_tokenizer, None, student_config)
        models.check_model_source("teacher", cfg.teacher.path)
        teacher_tokenizer = models.load_tokenizer("teacher", cfg.teacher)
        models.check_same_tokenizer(teacher_tokenizer, student_tokenizer)
        vocab_size = models.shared_vocab_size(
            student_tokenizer, models.load_config("teacher", cfg.teacher), student_config
        )
        return student_tokenizer, vocab_size

    def _load_data(self) -> None:
        cfg = self.cfg
        splits = load_splits(cfg, self.tokenizer, self.rank)
        train = splits["train"]
        if "eval" in splits:
            self.train_rows, eval_rows = train.rows, splits["eval"].rows
        else:
            self.train_rows, eval_rows = split_holdout(train.rows, cfg.data.eval_fraction, cfg.train.seed)
        eval_rows = eval_rows[: cfg.data.max_eval_rows]
        # Held-out rows split off the training data keep their index in it, which a cache reads by.
        self.eval_split = "eval" if "eval" in splits else "train"
        self.eval_batches = eval_batches(eval_rows, self.rank.rank, self.rank.world_size,
                                         cfg.train.micro_batch_size, self.tokenizer.pad_token_id)
        log.info("data: %d training rows (%d truncated to train.seq_len=%d), %d held-out rows",
                 len(self.train_rows), train.num_truncated, cfg.train.seq_len, len(eval_rows))

    def _build_teacher(self):
        """The teacher's engine, or None when its top-k is read from a cache instead."""
        cfg = self.cfg
        if cfg.teacher.cache:
            self.teacher_cache = open_cache(cfg, self.tokenizer, self.vocab_size, self.rank)
            manifest = self.teacher_cache.manifest
            self.summary.update({"teacher/source": "cache", "teacher/cache": str(self.teacher_cache.folder),
                                 "teacher/cache_top_k": manifest.key["top_k"], "teacher/cached_from": manifest.teacher})
            return None
        engine, held = load_teacher(cfg, self.rank)
        self.summary.update({"teacher/source": "model", **held})
        return engine

    def _build_student(self):
        cfg = self.cfg
        bf16, default_dtype = engines.precision(cfg, self.rank.device)
        ds_config = engines.deepspeed_config(cfg, cfg.deepspeed.stage, bf16, self.rank.world_size)
        dtype = default_dtype if cfg.student.dtype == "auto" else models.torch_dtype(cfg.student.dtype, self.rank.device)
        student = models.load_model("student", cfg.student, dtype, ds_config if cfg.deepspeed.stage == 3 else None)
        if cfg.peft.kind == "lora":
            student, targets = models.apply_lora(student, cfg.peft)
            log.info("LoRA r=%d on %s", cfg.peft.r, ", ".join(targets))
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters() if p.requires_grad)
        log.info("student: %d trainable parameters, ZeRO stage %d", trainable, cfg.deepspeed.stage)
        return engines.build_student_engine(student, ds_config, cfg)

    def _build_scorers(self) -> tuple:
        """Fused heads unless configured off or a model cannot take them; proven on a probe."""
        cfg = self.cfg
        by_role = {"student": self.student} if self.teacher is None else {"teacher": self.teacher, "student": self.student}
        fused = cfg.loss.fused and self._fused_loss_fits(by_role)
        scorers = {role: Scorer(engine, self.vocab_size, fused) for role, engine in by_role.items()}
        if fused:
            for role, scorer in scorers.items():
                check_head_parity(role, scorer.engine, scorer.tap, scorer.head, self.rank.device)
        self.chunk_size = cfg.loss.chunk_size or default_chunk_size(self.vocab_size)
        log.info("loss: %s, %d tokens per chunk", "fused with the heads" if fused else "on full logits", self.chunk_size)
        self.summary["loss/fused"] = fused
        if self.teacher is None:
            self.eval_teacher = CachedTeacher(self.teacher_cache, self.eval_split, self.rank.device)
            return CachedTeacher(self.teacher_cache, "train", self.rank.device), scorers["student"]
        self.eval_teacher = scorers["teacher"]
        return scorers["teacher"], scorers["student"]

    def _fused_loss_fits(self, engines_by_role: dict) -> bool:
        reasons = {role: fused_unsupported_reason(engine.module) for role, engine in engines_by_role.items()}
        for role, reason in reasons.items():
            if reason:
                log.warning("loss: the %s cannot use the fused loss (%s); using full logits.", role, reason)
        return not any(reasons.values())

    def _resume(self) -> int:
        root = checkpoints.find_resume_point(self.run_dir, self.cfg.resume)
        if root is None:
            return 0
        state = checkpoints.load_training_state(self.student, root)
        self.tokens_seen = state.get("tokens_seen", 0)
        return state["step"]

    # ------------------------------------------------------------------------------------ step
    def train_step(self, step: int, measure_grad_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches. Returns this rank's sums
        [objective, kd, ce] (left on the device: reading them would stall it every micro-batch)
        and its counts [supervised tokens, input tokens] (on the CPU, from the collated rows)."""
        cfg = self.cfg
        batches = micro_batches_for_step(step, self.train_rows, self.rank.rank, self.rank.world_size,
                                         cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed,
                                         self.tokenizer.pad_token_id)
        counts = torch.tensor([[float((b["labels"][:, 1:] != IGNORE_INDEX).sum()), float(b["attention_mask"].sum())]
                               for b in batches], dtype=torch.float64).sum(dim=0)
        global_tokens = all_reduce_sum(counts[:1].clone()).item()
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
        # that of (Σ over the step's tokens) / (the step's token count).
        scale = self.rank.world_size * cfg.train.grad_accum / max(global_tokens, 1.0)
        loss_sums = torch.zeros(3, dtype=torch.float64, device=self.rank.device)
        for index, batch in enumerate(batches):
            batch = to_device(batch, self.rank.device)
            teacher_states, student_states = self._forward_models(batch)
            # Gathered after the student's forward (DeepSpeed's own hook releases the head when the
            # head runs) and through the backward (a trainable head's gradient must reach the whole
            # weight before ZeRO-3 partitions it again).
            with self.student_scorer.gathered():
                sums = self._micro_batch_sums(teacher_states, student_states, batch["labels"])
                self.student.backward(sums.objective * scale)
            if measure_grad_norm and index == len(batches) - 1:
                self.pre_step_grad_norm = self._replica_grad_norm()
            self.student.step()
            loss_sums += torch.stack([sums.objective.detach(), sums.kd, sums.ce]).double()
        return loss_sums, counts

    def _forward_models(self, batch: dict):
        """Teacher (no grad; None under sft) and student: hidden states when fused, else logits."""
        teacher_states = None
        if self.cfg.loss.kind != "sft":
            with torch.no_grad():
                teacher_states = self.teacher_scorer.states(batch)
        return teacher_states, self.student_scorer.states(batch)

    def _micro_batch_sums(self, teacher_states, student_states, labels):
        teacher, student = self.teacher_scorer, self.student_scorer
        if isinstance(teacher_states, CachedStates):
            teacher_states = teacher_states.sparse
        if not student.fused:
            return micro_batch_sums(student_states, teacher_states, labels, self.cfg.loss, self.vocab_size)
        with teacher.gathered() if teacher_states is not None else contextlib.nullcontext():
            return fused_micro_batch_sums(student_states, student.head, teacher_states,
                                          getattr(teacher, "head", None), labels, self.cfg.loss)

    def _replica_grad_norm(self) -> float | None:
        """DeepSpeed reports the gradient norm only on its ZeRO and mixed-precision paths; at
        stage 0 in fp32 each rank holds the averaged gradients, so take the norm here."""
        if self.cfg.deepspeed.stage != 0:
            return None
        grads = [p.grad for p in self.student.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else None

    def train(self, watch: PreemptionWatch) -> None:
        """Steps from `first_step` to `train.max_steps`; raises Preempted, checkpoint saved, when
        any rank was signalled to stop."""
        cfg = self.cfg
        window_losses = torch.zeros(3, dtype=torch.float64, device=self.rank.device)
        window_counts = torch.zeros(2, dtype=torch.float64)
        window_start = time.perf_counter()
        for step in range(self.first_step, cfg.train.max_steps):
            done = step + 1
            log_now = done % cfg.train.log_every == 0 or done == cfg.train.max_steps
            lr = self.student.get_lr()[0]
            losses, counts = self.train_step(step, measure_grad_norm=log_now)
            window_losses += losses
            window_counts += counts
            self.tracker.advance()
            if log_now:
                window = torch.cat([window_losses.cpu(), window_counts])
                self._log_window(done, lr, window, time.perf_counter() - window_start)
                window_losses.zero_()
                window_counts.zero_()
                window_start = time.perf_counter()
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.max_steps:
                self.evaluate(done)
            saved = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
            if saved:
                checkpoints.save_training_state(self.student, self.run_dir, done, self.tokens_seen)
            signum = watch.agreed_signal()
            if signum and done < cfg.train.max_steps:
                if not saved:
                    checkpoints.save_training_state(self.student, self.run_dir, done, self.tokens_seen)
                raise Preempted(signum, done)

    def _log_window(self, step: int, lr: float, window: torch.Tensor, seconds: float) -> None:
        objective, kd, ce, tokens, inputs = all_reduce_sum(window.clone()).tolist()
        self.tokens_seen += int(inputs)
        per_token = 1.0 / max(tokens, 1.0)
        grad_norm = self.student.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.pre_step_grad_norm
        self.throughput = inputs / max(seconds, 1e-9)
        self.tracker.log_step({
            "step": step,
            "loss": objective * per_token,
            "kd_loss": kd * per_token if self.cfg.loss.kind != "sft" else None,
            "ce_loss": ce * per_token,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": self.throughput,
            "tokens_seen": self.tokens_seen,
        })

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self, step: int) -> dict:
        metrics = evaluate(self.eval_teacher, self.student_scorer, self.eval_batches, self.rank.device,
                           self.chunk_size)
        self.tracker.log_eval(step, metrics)
        return metrics

    # ---------------------------------------------------------------------------------- finish
    def finish(self, initial: dict, final: dict, seconds: float) -> float:
        cfg = self.cfg
        checkpoints.save_training_state(self.student, self.run_dir, cfg.train.max_steps, self.tokens_seen)
        out_dir = checkpoints.export_student(self.student.module, self.tokenizer, self.run_dir, cfg.peft.kind,
                                             self.rank.is_main)
        if cfg.peft.merge and cfg.peft.kind == "lora" and self.rank.is_main:
            checkpoints.export_merged(cfg.student.path, out_dir, self.run_dir,
                                     engines.precision(cfg, self.rank.device)[1])
        self.summary.update(final)
        self.summary.update({f"initial/{k}": v for k, v in initial.items()})
        self.summary.update({"train/tokens_per_s": getattr(self, "throughput", float("nan")),
                             "train/tokens_seen": self.tokens_seen, "train/steps": cfg.train.max_steps,
                             "train/wall_s": seconds, "world_size": self.rank.world_size})
        self.tracker.write_summary(self.summary)
        self.tracker.close()
        if cfg.train.metric not in self.summary:
            raise ValueError(f"train.metric={cfg.train.metric} is not in summary.json; use one of {sorted(self.summary)}.")
        return float(self.summary[cfg.train.metric])


def run(cfg, rank: RankInfo, run_dir: Path) -> float:
    """The whole job. Returns the metric named by `train.metric` (for Hydra sweepers)."""
    # Watching from the start: SIGUSR1/2's default action would kill a job still loading its models.
    with PreemptionWatch() as watch:
        job = DistillJob(cfg, rank, run_dir)
        job.setup()
        started = time.perf_counter()
        initial = job.evaluate(job.first_step) if job.first_step == 0 else {}
        try:
            job.train(watch)
        except Preempted as stop:
            job.tracker.close()
            hand_back(stop, watch.previous[stop.signum], rank.is_main)
    final = job.evaluate(cfg.train.max_steps)
    metric = job.finish(initial, final, time.perf_counter() - started)
    if rank.is_main:
        _print_before_after(initial, final)
        print(f"RESULT {cfg.train.metric}={metric:.6g} run_dir={run_dir.resolve()}", flush=True)
    return metric


def _print_before_after(initial: dict, final: dict) -> None:
    if not initial:
        return
    print("held-out metric          before      after")
    for key in ("eval/kl_to_teacher", "eval/student_ce", "eval/top1_agreement", "eval/exact_match"):
        print(f"{key:<22} {initial[key]:>10.4f} {final[key]:>10.4f}")
    print(f"{'eval/teacher_ce':<22} {final['eval/teacher_ce']:>10.4f} (the teacher itself)")


def agree_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory on every rank, whatever each process's Hydra resolved."""
    return Path(broadcast_object(str(run_dir)))

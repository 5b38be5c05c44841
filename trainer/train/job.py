"""One distillation job, for any number of ranks: setup, step, evaluate, checkpoint, finish."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainer.cache.teacher import CachedTeacher, open_cache
from trainer.config import ConfigError, evaluation_interval, unread_loss_settings, validate
from trainer.data.batching import collate, eval_batches, micro_batches_for_step, step_row_ids, to_device
from trainer.data.examples import examples_fingerprint, split_holdout, supervised_only
from trainer.data.packing import collate_packed, document_lengths, pack_rows
from trainer.launch.preemption import Preempted, PreemptionWatch, hand_back
from trainer.losses import default_chunk_size
from trainer.losses.objective import Objective, fused_micro_batch_sums, micro_batch_sums, supervised_positions
from trainer.losses.settings import IGNORE_INDEX
from trainer.metric_names import INITIAL, LAST_WINDOW_METRICS
from trainer.models import checks, engines, loading, lora
from trainer.models.heads import Scorer, fused_unsupported_reason
from trainer.models.probes import check_documents_stay_apart, check_head_parity
from trainer.models.teacher import ModelTeacher, load_teacher
from trainer.outputs import export, provenance
from trainer.outputs.tracking import Tracker, forget_steps_after
from trainer.preflight import licence_check
from trainer.preflight.inputs import data_sources, load_splits, materialise_demo
from trainer.ranks import RankInfo, all_gather_floats, all_reduce_sum, broadcast_object
from trainer.train import checkpoints, throughput
from trainer.train import resume as checkpoint_trust
from trainer.train.evaluation import evaluate
from trainer.train.nonfinite import TrainingDiverged, describe_weights, largest_abs_weight, streak_message

log = logging.getLogger(__name__)


class DistillJob:
    """Holds what a run needs between stages; each method is one stage of the run."""

    def __init__(self, cfg, rank: RankInfo, run_dir: Path, inputs_checked=lambda: None):
        """`inputs_checked()` is called once the inputs passed their checks, before the job changes
        anything in `run_dir` (there may be an earlier run's files) or loads any weights."""
        validate(cfg)  # before anything is loaded, so a bad value costs nothing
        self.cfg, self.rank, self.run_dir, self.inputs_checked = cfg, rank, run_dir, inputs_checked
        # Decided once: every model's dtype, both DeepSpeed configs and the FLOP peak read these.
        self.precision = engines.precision(cfg.train, rank.device)
        self.engine_configs = engines.engine_configs(cfg.deepspeed, cfg.train, cfg.teacher, self.precision,
                                                     rank.world_size)
        self.objective = Objective.from_config(cfg.loss)
        self.data_time = throughput.Stopwatch()  # data loading, a cached teacher's reads included
        self._check_metric_is_measured()
        if rank.is_main:
            for warning in unread_loss_settings(cfg.loss):
                log.warning(warning)
        self.summary: dict = {}
        self.position_limits: dict[str, int | None] = {}  # by role; see _warn_past_positions
        self.state = checkpoints.TrainerState(
            step=0, world_size=rank.world_size,
            rows_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * rank.world_size,
            zero_stage=cfg.deepspeed.stage)

    def _check_metric_is_measured(self) -> None:
        """`validate` knows the names; only the device decides whether MFU has a peak to divide by."""
        cfg = self.cfg
        bf16 = self.precision.bf16
        if cfg.train.metric == "train/mfu" and throughput.peak_flops(self.rank.device, bf16, cfg.train.peak_tflops) is None:
            raise ConfigError(f"train.metric=train/mfu has no value on this device ({self.rank.device.type}, no known "
                              "bf16 peak); set train.peak_tflops to its peak TFLOP/s, or pick another train.metric "
                              "such as train/tflops_per_s.")

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        materialise_demo(cfg, self.rank)
        self.tokenizer, self.vocab_size = self._check_models_fit()
        self._load_data()
        self.resume_from = self._checked_resume_point()  # before any weights: a wrong checkpoint costs nothing
        self.teacher_cache = open_cache(cfg, self.tokenizer, self.vocab_size, self.rank) if cfg.teacher.cache else None
        self.inputs_checked()
        # Seeded here, after anything that may draw random numbers (building the demo's teacher on a
        # cold cache does): the same LoRA initialisation on every rank, cold cache or warm.
        torch.manual_seed(cfg.train.seed)
        self.teacher = self._build_teacher()
        self.student = self._build_student()
        self.step_teacher, self.student_scorer = self._build_scorers()
        if cfg.data.pack:  # every rank: a sharded model's forward is collective
            for role, engine in (("teacher", self.teacher), ("student", self.student)):
                if engine is not None:
                    check_documents_stay_apart(role, engine.module, self.rank.device)
        self._start_accounting()
        self.first_step = self._resume()
        if self.rank.is_main:  # steps after the checkpoint (all, on a fresh start) are about to be redone
            forget_steps_after(self.run_dir, self.first_step)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.tracker = Tracker(self.run_dir, cfg, resolved, self.first_step, enabled=self.rank.is_main)
        self.state.wandb_run_id = self.tracker.wandb_run.id if self.tracker.wandb_run is not None else None

    def _check_models_fit(self):
        """Tokenizers, configs and the teacher's licence only: a mismatch, or a licence that does not
        allow distillation, is reported before any weights load."""
        cfg = self.cfg
        self.started_at = provenance.now()
        checks.check_model("student", cfg.student)
        # The student's licence goes into its model card, and decides the exception some teacher
        # licences make for students of their own family.
        self.student_licence = licence_check.student_licence(cfg)
        if cfg.teacher.path is not None:  # a missing teacher folder is reported as such, not as a missing card
            # A cached teacher's weights are never loaded, so only its tokenizer and config must be safe.
            checks.check_model("teacher", cfg.teacher, loads_weights=not cfg.teacher.cache)
        self.licence = licence_check.check_teacher_licence(cfg, self.rank.is_main, self.student_licence)
        self.model_name = licence_check.model_name(cfg, self.licence)
        self.name_complies = licence_check.check_name(self.licence, self.model_name, self.rank.is_main)
        student_tokenizer = loading.load_tokenizer("student", cfg.student)
        student_config = loading.load_config("student", cfg.student)
        if cfg.teacher.path is not None:  # else a teacher cache that records its own teacher (e.g. an API model)
            # First: with another tokenizer nothing else about the pair matters.
            checks.check_same_tokenizer(loading.load_tokenizer("teacher", cfg.teacher), student_tokenizer)
        student = self._check_fits("student", cfg.student, student_config)
        if cfg.peft.kind == "lora":
            lora.lora_targets(student, cfg.peft.target_modules)
        if cfg.teacher.path is None:
            return student_tokenizer, checks.shared_vocab_size(student_tokenizer, None, student_config)
        teacher_config = loading.load_config("teacher", cfg.teacher)
        vocab_size = checks.shared_vocab_size(student_tokenizer, teacher_config, student_config)
        # A cached teacher is never run: its weights and positions do not matter.
        teacher = None if cfg.teacher.cache else self._check_fits("teacher", cfg.teacher, teacher_config)
        if self.rank.is_main:
            checks.warn_about_pair(cfg.teacher, cfg.student, teacher, student)
        return student_tokenizer, vocab_size

    def _check_fits(self, role: str, model_cfg, config):
        """The model built on the meta device, checked against its weights and train.seq_len. The
        positions it was made for are kept for a warning once the rows' lengths are known."""
        model, self.position_limits[role] = checks.check_fits(role, model_cfg, config, self.cfg.train.seq_len)
        return model

    def _load_data(self) -> None:
        cfg = self.cfg
        splits = load_splits(cfg, self.tokenizer, self.rank)
        train = splits["train"]
        if "eval" in splits:
            train_rows, eval_rows = train.rows, splits["eval"].rows
        else:
            train_rows, eval_rows = split_holdout(train.rows, cfg.data.eval_fraction, cfg.train.seed)
        self.train_rows = supervised_only(train_rows, cfg.train.seq_len)
        self._warn_past_positions([*self.train_rows, *eval_rows[: cfg.data.max_eval_rows]])  # before packing
        if len(self.train_rows) < len(train_rows):
            log.warning("data: dropped %d of %d training rows with no token to learn (no response or assistant "
                        "turn, or one cut off by train.seq_len=%d)", len(train_rows) - len(self.train_rows),
                        len(train_rows), cfg.train.seq_len)
        if cfg.data.pack:
            self._pack_training_rows()
        eval_rows = eval_rows[: cfg.data.max_eval_rows]
        # Held-out rows split off the training data keep their index in it, which a cache reads by.
        self.eval_split = "eval" if "eval" in splits else "train"
        self.eval_batches = eval_batches(eval_rows, self.rank.rank, self.rank.world_size,
                                         cfg.train.micro_batch_size, self.tokenizer.pad_token_id)
        log.info("data: %d training rows (%d truncated to train.seq_len=%d), %d held-out rows",
                 len(self.train_rows), train.num_truncated, cfg.train.seq_len, len(eval_rows))

    def _warn_past_positions(self, rows: list) -> None:
        """Rows longer than a model without a learned position table was made for (checked on the
        rows, not train.seq_len: the demo's teacher has 128 positions, its rows fewer, seq_len 512).
        Before packing: a packed row's positions restart at each of its documents."""
        longest = max((len(row.input_ids) for row in rows), default=0)
        if self.rank.is_main:
            for role, limit in self.position_limits.items():
                checks.warn_past_positions(role, limit, longest)

    def _pack_training_rows(self) -> None:
        rows = self.train_rows
        self.train_rows = pack_rows(rows, self.cfg.train.seq_len)
        tokens = sum(len(row.input_ids) for row in rows)
        log.info("data: %d training rows packed into %d rows of up to %d tokens (%.0f%% full)", len(rows),
                 len(self.train_rows), self.cfg.train.seq_len, 100 * tokens / (len(self.train_rows) * self.cfg.train.seq_len))

    def _build_teacher(self):
        """The teacher's engine, or None when its top-k is read from a cache instead."""
        cfg = self.cfg
        if self.teacher_cache is not None:
            manifest = self.teacher_cache.manifest
            self.summary.update({"teacher/source": "cache", "teacher/cache": str(self.teacher_cache.folder),
                                 "teacher/cache_top_k": manifest.key["top_k"], "teacher/cached_from": manifest.teacher})
            return None
        engine, held = load_teacher(cfg.teacher, self.engine_configs, self.precision, self.rank)
        self.summary.update({"teacher/source": "model", **held})
        return engine

    def _build_student(self):
        cfg = self.cfg
        ds_config = self.engine_configs.student
        student = loading.load_model("student", cfg.student, self.precision.model_dtype(cfg.student.dtype),
                                     ds_config if cfg.deepspeed.stage == 3 else None)
        if cfg.train.activation_checkpointing:
            loading.checkpoint_activations(student)
            log.info("student: activation checkpointing on (each layer is recomputed in the backward)")
        if cfg.peft.kind == "lora":
            student, targets = lora.apply_lora(student, cfg.peft)
            log.info("LoRA r=%d on %s", cfg.peft.r, ", ".join(targets))
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters() if p.requires_grad)
        log.info("student: %d trainable parameters, ZeRO stage %d", trainable, cfg.deepspeed.stage)
        engine, self.optimizer = engines.build_student_engine(student, ds_config, cfg.train)
        return engine

    def _build_scorers(self) -> tuple:
        """The step's teacher and the student's scorer; the evaluation's teacher (a cache reads
        another split) in `eval_teacher`. Fused heads unless configured off or a model cannot
        take them; proven on a probe. The one place that knows whether a model or a cache teaches."""
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
            # Reading the cache is data loading: the step waits on it as on rows.
            step_teacher = CachedTeacher(self.teacher_cache, "train", self.rank.device, reading=self.data_time)
            return step_teacher, scorers["student"]
        self.eval_teacher = ModelTeacher(scorers["teacher"])
        return self.eval_teacher, scorers["student"]

    def _fused_loss_fits(self, engines_by_role: dict) -> bool:
        reasons = {role: fused_unsupported_reason(engine.module) for role, engine in engines_by_role.items()}
        for role, reason in reasons.items():
            if reason:
                log.warning("loss: the %s cannot use the fused loss (%s); using full logits.", role, reason)
        return not any(reasons.values())

    def _start_accounting(self) -> None:
        """FLOPs per token of each model that runs in a step, and the device's peak (see trainer/train/throughput.py)."""
        cost = throughput.student_cost(self.student.module)
        if self.teacher is not None and self.cfg.loss.kind != "sft":
            cost = cost + throughput.teacher_cost(self.teacher.module)
        self.step_cost = cost
        self.peak_flops = throughput.peak_flops(self.rank.device, self.precision.bf16, self.cfg.train.peak_tflops)
        self.window_flops = 0.0
        self.run_work = throughput.Work()  # every log window of this job (of its life, when resumed)

    def _checked_resume_point(self):
        """The checkpoint this job continues from (None: a fresh start), verified, and refused by
        name when it belongs to another teacher, student, data or LoRA shape, another ZeRO layout,
        or a step past train.max_steps."""
        cfg = self.cfg
        folder = self._agreed_resume_point()
        if folder is not None:
            self.resumed_state = checkpoints.read_state(folder)
            checkpoints.check_same_run(folder, self.resumed_state, self._identity())
            checkpoint_trust.check_fits_job(folder, self.resumed_state, cfg.deepspeed.stage, cfg.train.max_steps)
            self._check_metric_survives_resume(folder)
        return folder

    def _check_metric_survives_resume(self, folder: Path) -> None:
        """A resumed job does not evaluate before its first step, so its summary has no `initial/...`."""
        metric = self.cfg.train.metric
        if metric.startswith(INITIAL):
            raise ConfigError(f"train.metric={metric} is measured before the first step, and this job resumes from "
                              f"{folder} at step {self.resumed_state.step}, so it has none; pick an eval/ or train/ "
                              "metric, or set resume=never to start afresh.")

    def _agreed_resume_point(self) -> Path | None:
        """Rank 0 verifies the checkpoints and chooses; every rank takes its choice, or its error.
        Ranks judging the files each on their own could resume from different checkpoints."""
        choice = None
        if self.rank.is_main:
            try:
                folder = checkpoint_trust.choose_resume_point(self.run_dir, self.cfg.resume)
                choice = ("resume", str(folder) if folder is not None else None)
            except checkpoints.CheckpointError as error:
                choice = ("refuse", str(error))
        verdict, value = broadcast_object(choice)
        if verdict == "refuse":
            raise checkpoints.CheckpointError(value)
        return Path(value) if value is not None else None

    def _identity(self) -> dict:
        """What makes a checkpoint belong to this run: a different value is a different run."""
        cfg = self.cfg
        if not hasattr(self, "identity"):
            self.identity = {
                "teacher.path": _model_id(cfg.teacher.path) if cfg.teacher.path else f"cache {cfg.teacher.cache}",
                "teacher.revision": cfg.teacher.revision,
                "student.path": _model_id(cfg.student.path),
                "student.revision": cfg.student.revision,
                # The rows' contents, wherever the files now live.
                **{f"data.{split}": f"rows with sha256 "
                   f"{examples_fingerprint(source, self.tokenizer, cfg.train.seq_len, key=f'data.{split}')[:16]} "
                   f"at train.seq_len={cfg.train.seq_len}" for split, source in data_sources(cfg).items()},
                **({"data.pack": "true"} if cfg.data.pack else {}),  # packing changes every step's rows
                "peft.kind": cfg.peft.kind,
                **({f"peft.{key}": str(cfg.peft[key]) for key in ("r", "alpha", "target_modules")}
                   if cfg.peft.kind == "lora" else {}),
            }
        return self.identity

    def _resume(self) -> int:
        """Engine, RNG and loop state from the checkpoint found at setup; the step to start at."""
        if self.resume_from is None:
            self.state.initial_largest_abs_weight = largest_abs_weight(self.student.module)
            return 0
        saved = self.resumed_state
        rank_state = checkpoints.load_checkpoint(self.student, self.resume_from, saved.step)
        self.state.step, self.state.tokens_seen, self.state.skipped_steps = saved.step, saved.tokens_seen, saved.skipped_steps
        self.state.initial_largest_abs_weight = saved.initial_largest_abs_weight
        self.state.nonfinite_in_a_row = saved.nonfinite_in_a_row
        self.optimizer.resume_skips_in_a_row(saved.nonfinite_in_a_row)
        self.resumed_window = rank_state.get("window")
        if saved.rows_per_step != self.state.rows_per_step:
            log.warning("resumed with %d rows per optimizer step a checkpoint saved with %d (micro-batch x accumulation "
                        "x ranks): the run will differ from one never interrupted.", self.state.rows_per_step,
                        saved.rows_per_step)
        return saved.step

    # ------------------------------------------------------------------------------------ step
    def train_step(self, step: int, measure_grad_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum` micro-batches. Returns this rank's sums
        [objective, kd, ce] (left on the device: reading them would stall it every micro-batch)
        and its counts [supervised tokens, input tokens] (on the CPU, from the collated rows)."""
        cfg = self.cfg
        with self.data_time:
            batches = micro_batches_for_step(step, self.train_rows, self.rank.rank, self.rank.world_size,
                                             cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed,
                                             self.tokenizer.pad_token_id, collate_packed if cfg.data.pack else collate)
            counts = torch.tensor([[float((b["labels"][:, 1:] != IGNORE_INDEX).sum()), float(b["attention_mask"].sum())]
                                   for b in batches], dtype=torch.float64).sum(dim=0)
            self.window_flops += sum(self.step_cost.of_rows(document_lengths(b)) for b in batches)
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
        # that of (Σ over the step's tokens) / (the step's token count).
        scale = self.rank.world_size * cfg.train.grad_accum / max(self._global_supervised_tokens(step), 1.0)
        loss_sums = torch.zeros(3, dtype=torch.float64, device=self.rank.device)
        for index, host_batch in enumerate(batches):
            with self.data_time:
                # Found on the host, where the labels are: on the GPU it would make the host wait.
                host_batch["supervised"] = supervised_positions(host_batch["labels"])
                batch = to_device(host_batch, self.rank.device)
            teacher_states, student_states = self._forward_models(batch, host_batch)
            # Gathered after the student's forward (DeepSpeed's own hook releases the head when the
            # head runs) and through the backward (a trainable head's gradient must reach the whole
            # weight before ZeRO-3 partitions it again).
            with self.student_scorer.gathered():
                sums = self._micro_batch_sums(teacher_states, student_states, batch["labels"], batch["supervised"])
                self.student.backward(sums.objective * scale)
            loss_sums += torch.stack([sums.objective.detach(), sums.kd, sums.ce]).double()
            if index == len(batches) - 1:
                if measure_grad_norm:
                    self.pre_step_grad_norm = self._replica_grad_norm()
                # The objective only: under sft the kd slot is NaN by design.
                self.optimizer.arm(loss_sums[0])  # the optimizer skips the step if any rank's loss is NaN/Inf
            self.student.step()
        return loss_sums, counts

    def _global_supervised_tokens(self, step: int) -> int:
        """The step's supervised tokens over all ranks, from the rows it takes: no collective, no host sync."""
        cfg = self.cfg
        rows = (self.train_rows[i] for i in step_row_ids(step, len(self.train_rows), self.state.rows_per_step,
                                                          cfg.train.seed))
        return sum(len(row.labels) - 1 - row.labels[1:].count(IGNORE_INDEX) for row in rows)

    def _forward_models(self, batch: dict, host_batch: dict):
        """The teacher as the loss takes it (None under sft: no teacher runs), and the student's
        states: hidden states when fused, else logits."""
        teacher = None if self.objective.sft else self.step_teacher.states(batch, host_batch)
        return teacher, self.student_scorer.states(batch)

    def _micro_batch_sums(self, teacher_states, student_states, labels, supervised):
        student = self.student_scorer
        if not student.fused:
            return micro_batch_sums(student_states, teacher_states, labels, self.objective, self.vocab_size)
        with contextlib.nullcontext() if self.objective.sft else self.step_teacher.gathered():
            return fused_micro_batch_sums(student_states, student.head, teacher_states, labels, self.objective,
                                          supervised)

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
        # The open log window: [objective, kd, ce] on the device (read only when logged) and
        # [supervised tokens, input tokens] on the CPU. A resumed run reopens the saved one.
        window = getattr(self, "resumed_window", None) or [0.0] * 5
        window_losses = torch.tensor(window[:3], dtype=torch.float64, device=self.rank.device)
        window_counts = torch.tensor(window[3:], dtype=torch.float64)
        window_start = time.perf_counter()
        eval_every = evaluation_interval(cfg.train)
        self.skips_before, self.skips_counted_at = self.state.skipped_steps, self.first_step
        # Dropout on for the steps, whatever ran before: from_pretrained returns a model in eval
        # mode, and a resumed job runs no evaluation first. Evaluations restore it (eval_mode).
        self.student.train()
        for step in range(self.first_step, cfg.train.max_steps):
            done = step + 1
            log_now = done % cfg.train.log_every == 0 or done == cfg.train.max_steps
            lr = self.student.get_lr()[0]
            losses, counts = self.train_step(step, measure_grad_norm=log_now)
            window_losses += losses
            window_counts += counts
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != cfg.train.max_steps
            signum = watch.agreed_signal()
            stopping = signum and done < cfg.train.max_steps
            if log_now or periodic or stopping:
                self._count_skipped(done)  # a host read: only where the step is logged or saved
            self.tracker.advance()
            if log_now:
                window = torch.cat([window_losses.cpu(), window_counts])
                self._log_window(done, lr, window, time.perf_counter() - window_start)
                window_losses.zero_()
                window_counts.zero_()
                window_start = time.perf_counter()
            if eval_every and done % eval_every == 0 and done != cfg.train.max_steps:
                evaluating = time.perf_counter()
                self.evaluate(done)
                window_start += time.perf_counter() - evaluating  # tokens/s counts training time only
            if periodic or stopping:
                self.save_checkpoint(done, torch.cat([window_losses.cpu(), window_counts]).tolist())
            if stopping:
                raise Preempted(signum, done)

    def save_checkpoint(self, step: int, window: list[float]) -> None:
        """`window`: this rank's sums of the log window still open after `step`."""
        self.state.step = step
        self.state.identity = self._identity()
        self.state.largest_abs_weight = largest_abs_weight(self.student.module)
        checkpoints.save_checkpoint(self.student, self.run_dir, self.state, self.cfg.checkpoint.keep,
                                    rank_state={"window": window})

    def _count_skipped(self, step: int) -> None:
        """Read the updates the optimizer skipped on every rank since the last read (it counts them on
        the device); warn about new ones; stop after train.max_nonfinite_steps in a row."""
        total, in_a_row = self.optimizer.read_skips()
        new = self.skips_before + total - self.state.skipped_steps
        self.state.skipped_steps = self.skips_before + total
        self.state.nonfinite_in_a_row = in_a_row
        since, self.skips_counted_at = self.skips_counted_at + 1, step
        if new:
            where, what = (f"step {step}", "this update") if since == step else (f"steps {since}-{step}",
                                                                                f"{new} of these updates")
            log.warning("%s: a loss or gradient was NaN/Inf on some rank; every rank skipped %s (%d in a row, %d in "
                        "all).", where, what, in_a_row, self.state.skipped_steps)
        if in_a_row >= self.cfg.train.max_nonfinite_steps:
            weights = self._weights_now()  # collective: every rank reads the same counts, and stops here
            newest, saved = self._newest_checkpoint()
            raise TrainingDiverged(streak_message(
                step - in_a_row + 1, step, weights, newest, saved.step if saved else None,
                describe_weights(saved.largest_abs_weight, saved.initial_largest_abs_weight) if saved else ""))

    def _weights_now(self) -> str:
        return describe_weights(largest_abs_weight(self.student.module), self.state.initial_largest_abs_weight)

    def _newest_checkpoint(self) -> tuple[Path | None, checkpoints.TrainerState | None]:
        """The published checkpoint and its state: what a stop message can tell about it."""
        newest = checkpoints.published(self.run_dir / checkpoints.CHECKPOINTS)
        return newest, checkpoints.read_state(newest) if newest is not None else None

    def _refuse_non_finite(self, final: dict) -> None:
        """A student whose final evaluation is NaN/Inf is no result: stop before its checkpoint,
        adapter and RESULT line, saying what is known. Collective (every rank has the same `final`).
        The teacher's own CE is left out: a cached teacher's stored log-probabilities may hold -inf."""
        bad = {key: value for key, value in final.items() if key != "eval/teacher_ce" and not math.isfinite(value)}
        if not bad:
            return
        weights = self._weights_now()
        newest, _ = self._newest_checkpoint()
        skipped = self.state.nonfinite_in_a_row
        last_steps = (f"the last {skipped} updates were skipped as NaN/Inf" if skipped
                      else "the last update's loss and gradients were finite")
        kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved"
        out = "adapter/" if self.cfg.peft.kind == "lora" else "model/"
        raise TrainingDiverged(
            f"the final evaluation gave {', '.join(f'{k}={v}' for k, v in sorted(bad.items()))}, so no {out} and "
            f"no final checkpoint were written; the trainable weights are {weights} and {last_steps}; {kept}; "
            "start afresh with a lower train.lr (resume=never in a new run directory, hydra.run.dir=...).")

    def _log_window(self, step: int, lr: float, window: torch.Tensor, seconds: float) -> None:
        objective, kd, ce, tokens, inputs = all_reduce_sum(window.clone()).tolist()
        self.state.tokens_seen += int(inputs)
        per_token = 1.0 / max(tokens, 1.0)
        grad_norm = self.student.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self.pre_step_grad_norm
        rates = self._window_rates(seconds, inputs)
        self.tracker.log_step({
            "step": step,
            "loss": objective * per_token,
            "kd_loss": kd * per_token if self.cfg.loss.kind != "sft" else None,
            "ce_loss": ce * per_token,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": rates["tokens_per_s"],
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            **rates,
        })

    def _window_rates(self, seconds: float, inputs: float) -> dict:
        """The log window's tokens/s and model FLOP/s (all ranks), MFU, data-loading share and peak
        memory per rank; the window is added to the run's work."""
        flops, data_seconds = all_reduce_sum(torch.tensor([self.window_flops, self.data_time.take()],
                                                          dtype=torch.float64)).tolist()
        self.window_flops = 0.0
        window = throughput.Work(seconds, inputs, flops, data_seconds)
        self.run_work += window
        peaks = [b / 2**30 for b in all_gather_floats(float(throughput.peak_memory_bytes(self.rank.device)))]
        self.rates = {**window.rates(self.peak_flops, self.rank.world_size),
                      "peak_memory_gib": max(peaks), "peak_memory_gib_per_rank": peaks}
        return self.rates

    def _run_rates(self) -> dict:
        """summary.json's speed: the whole run's rates (its windows' work over their seconds), and the
        last window's beside them; NaN for a job that trained no step (resumed at the end)."""
        if not self.run_work.seconds:
            return {"train/tokens_per_s": float("nan")}
        last = {f"train/last_window_{key}": value for key, value in self.rates.items()
                if key in LAST_WINDOW_METRICS}
        return {**{f"train/{key}": value for key, value in self.run_work.rates(self.peak_flops,
                                                                                self.rank.world_size).items()},
                **last, "train/peak_memory_gib": self.rates["peak_memory_gib"]}

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self, step: int) -> dict:
        metrics = evaluate(self.eval_teacher, self.student_scorer, self.eval_batches, self.rank.device,
                           self.chunk_size)
        self.tracker.log_eval(step, metrics)
        return metrics

    # ---------------------------------------------------------------------------------- finish
    def finish(self, initial: dict, final: dict, seconds: float) -> float:
        cfg = self.cfg
        self._refuse_non_finite(final)
        if self.first_step < cfg.train.max_steps:  # else the final checkpoint is the one resumed from
            self.save_checkpoint(cfg.train.max_steps, [0.0] * 5)  # the last step always closes its window
        out_dir = export.export_student(self.student.module, self.tokenizer, self.run_dir, cfg.peft.kind,
                                             self.rank.is_main)
        if cfg.peft.merge and cfg.peft.kind == "lora" and self.rank.is_main:
            export.export_merged(cfg.student, out_dir, self.run_dir, self.precision.default_dtype)
        self.summary.update(final)
        self.summary.update({f"initial/{k}": v for k, v in initial.items()})
        self.summary.update({**self._run_rates(), "train/tokens_seen": self.state.tokens_seen,
                             "train/skipped_steps": self.state.skipped_steps, "train/steps": cfg.train.max_steps,
                             "train/wall_s": seconds, "world_size": self.rank.world_size})
        self.tracker.write_summary(self.summary)
        ranks = provenance.gather_ranks(self.rank)  # every rank joins; rank 0 writes
        if self.rank.is_main:  # after the summary: the record holds the final metrics
            cache = self.teacher_cache
            provenance.write(cfg, self.run_dir, out_dir, decision=self.licence, ranks=ranks,
                             student_licence=self.student_licence, model_name=self.model_name,
                             name_complies=self.name_complies, started_at=self.started_at,
                             metrics=self.summary, cache=cache, rows_trained=len(self.train_rows))
        self.tracker.write_report()  # report.md and plots, in the run directory and on W&B
        self.tracker.close()
        if cfg.train.metric not in self.summary:
            raise ValueError(f"train.metric={cfg.train.metric} is not in summary.json; use one of {sorted(self.summary)}.")
        return float(self.summary[cfg.train.metric])


def run(cfg, rank: RankInfo, run_dir: Path, inputs_checked=lambda: None) -> float:
    """The whole job (see :class:`DistillJob` for `inputs_checked`). Returns the metric named by
    `train.metric` (for Hydra sweepers)."""
    # Watching from the start: SIGUSR1/2's default action would kill a job still loading its models.
    with PreemptionWatch() as watch:
        job = DistillJob(cfg, rank, run_dir, inputs_checked)
        job.setup()
        started = time.perf_counter()
        initial = job.evaluate(job.first_step) if job.first_step == 0 else {}
        try:
            job.train(watch)
        except Preempted as stop:
            job.tracker.close()
            hand_back(stop, watch.previous[stop.signum], rank.is_main)
        except BaseException:
            job.tracker.close(failed=True)  # the progress bar ends before the error is printed
            raise
    final = job.evaluate(cfg.train.max_steps)
    try:
        metric = job.finish(initial, final, time.perf_counter() - started)
    except BaseException:
        job.tracker.close(failed=True)
        raise
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


def _model_id(path: str) -> str:
    """A local folder as an absolute path (the same folder named two ways is one model); a hub id as is."""
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else path

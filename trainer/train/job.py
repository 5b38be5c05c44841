"""One distillation job, for any number of ranks: setup, step, evaluate, checkpoint, finish."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from trainer import preflight
from trainer.cache.teacher import CachedTeacher, open_cache
from trainer.config import ConfigError, cache_root, evaluation_interval, unread_loss_settings, validate
from trainer.data.batching import collate, eval_batches, micro_batches_for_step, step_row_ids, to_device
from trainer.data.packing import collate_packed, document_lengths
from trainer.launch.preemption import Preempted, PreemptionWatch, hand_back
from trainer.losses import default_chunk_size
from trainer.losses.objective import Objective, fused_micro_batch_sums, micro_batch_sums, supervised_positions
from trainer.losses.settings import IGNORE_INDEX
from trainer.metric_names import INITIAL
from trainer.models import engines, loading, lora
from trainer.models.heads import Scorer, fused_unsupported_reason
from trainer.models.probes import check_documents_stay_apart, check_head_parity
from trainer.models.teacher import ModelTeacher, load_teacher
from trainer.outputs.finish import RunFacts, finish_run
from trainer.outputs.tracking import Tracker, forget_steps_after
from trainer.ranks import RankInfo, broadcast_object
from trainer.train import checkpoints, throughput
from trainer.train import resume as checkpoint_trust
from trainer.train.evaluation import evaluate
from trainer.train.nonfinite import TrainingDiverged, describe_weights, largest_abs_weight, streak_message
from trainer.train.progress import Progress

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
        self._check_metric_is_measured()
        if rank.is_main:
            for warning in unread_loss_settings(cfg.loss):
                log.warning(warning)
        self.summary: dict = {}
        self.state = checkpoints.TrainerState(
            step=0, world_size=rank.world_size,
            rows_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * rank.world_size,
            zero_stage=cfg.deepspeed.stage)
        self.peak_flops = throughput.peak_flops(rank.device, self.precision.bf16, cfg.train.peak_tflops)
        # The loop's account; its data stopwatch also times a cached teacher's reads (data loading).
        self.progress = Progress(self.state, rank.device, self.peak_flops, rank.world_size)

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
        self._read_preflight(preflight.check(cfg, self.rank, "train"))
        self.resume_from = self._checked_resume_point()  # before any weights: a wrong checkpoint costs nothing
        self.teacher_cache = (open_cache(cfg.teacher, cfg.loss.kind, self.preflight, cache_root(cfg))
                              if cfg.teacher.cache else None)
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

    def _read_preflight(self, checked: preflight.Preflight) -> None:
        """What the later stages read of the start-up checks, and the held-out batches of this rank."""
        self.preflight = checked
        self.tokenizer, self.vocab_size, self.started_at = checked.tokenizer, checked.vocab_size, checked.started_at
        self.licence, self.student_licence = checked.licence, checked.student_licence
        self.model_name, self.name_complies = checked.model_name, checked.name_complies
        self.train_rows, self.eval_split = checked.rows.train, checked.rows.eval_split
        self.eval_batches = eval_batches(checked.rows.eval, self.rank.rank, self.rank.world_size,
                                         self.cfg.train.micro_batch_size, self.tokenizer.pad_token_id)

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
            step_teacher = CachedTeacher(self.teacher_cache, "train", self.rank.device, reading=self.progress.data_time)
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
        """FLOPs per token of each model that runs in a step (see trainer/train/throughput.py)."""
        cost = throughput.student_cost(self.student.module)
        if self.teacher is not None and self.cfg.loss.kind != "sft":
            cost = cost + throughput.teacher_cost(self.teacher.module)
        self.step_cost = cost

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
        cfg, models = self.cfg, self.preflight.models
        if not hasattr(self, "identity"):
            self.identity = {
                "teacher.path": models["teacher"].id if cfg.teacher.path else f"cache {cfg.teacher.cache}",
                "teacher.revision": cfg.teacher.revision,
                "student.path": models["student"].id,
                "student.revision": cfg.student.revision,
                # The rows' contents, wherever the files now live.
                **{f"data.{split}": f"rows with sha256 {fingerprint[:16]} at train.seq_len={cfg.train.seq_len}"
                   for split, fingerprint in self.preflight.data_fingerprints.items()},
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
        self.progress.restore_sums(rank_state.get("window"))
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
        with self.progress.data_time:
            batches = micro_batches_for_step(step, self.train_rows, self.rank.rank, self.rank.world_size,
                                             cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed,
                                             self.tokenizer.pad_token_id, collate_packed if cfg.data.pack else collate)
            counts = torch.tensor([[float((b["labels"][:, 1:] != IGNORE_INDEX).sum()), float(b["attention_mask"].sum())]
                                   for b in batches], dtype=torch.float64).sum(dim=0)
            self.progress.flops += sum(self.step_cost.of_rows(document_lengths(b)) for b in batches)
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
        # that of (Σ over the step's tokens) / (the step's token count).
        scale = self.rank.world_size * cfg.train.grad_accum / max(self._global_supervised_tokens(step), 1.0)
        loss_sums = torch.zeros(3, dtype=torch.float64, device=self.rank.device)
        for index, host_batch in enumerate(batches):
            with self.progress.data_time:
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
                    self.progress.pre_step_grad_norm = self._replica_grad_norm()
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
        any rank was signalled to stop. A resumed run goes on with the log window it saved."""
        cfg, progress = self.cfg, self.progress
        eval_every = evaluation_interval(cfg.train)
        progress.start(self.first_step)
        # Dropout on for the steps, whatever ran before: from_pretrained returns a model in eval
        # mode, and a resumed job runs no evaluation first. Evaluations restore it (eval_mode).
        self.student.train()
        for step in range(self.first_step, cfg.train.max_steps):
            done = step + 1
            log_now = done % cfg.train.log_every == 0 or done == cfg.train.max_steps
            lr = self.student.get_lr()[0]
            progress.add_step(*self.train_step(step, measure_grad_norm=log_now))
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != cfg.train.max_steps
            signum = watch.agreed_signal()
            stopping = signum and done < cfg.train.max_steps
            if log_now or periodic or stopping:
                self._count_skipped(done)  # a host read: only where the step is logged or saved
            self.tracker.advance()
            if log_now:
                self.tracker.log_step(progress.close_window(done, lr, self.student.get_global_grad_norm(),
                                                            kd_measured=cfg.loss.kind != "sft"))
                progress.open_window()
            if eval_every and done % eval_every == 0 and done != cfg.train.max_steps:
                with progress.paused():  # tokens/s counts training time only
                    self.evaluate(done)
            if periodic or stopping:
                self.save_checkpoint(done)
            if stopping:
                raise Preempted(signum, done)

    def save_checkpoint(self, step: int) -> None:
        """With this rank's sums of the log window still open after `step`."""
        self.state.step = step
        self.state.identity = self._identity()
        self.state.largest_abs_weight = largest_abs_weight(self.student.module)
        checkpoints.save_checkpoint(self.student, self.run_dir, self.state, self.cfg.checkpoint.keep,
                                    rank_state={"window": self.progress.open_sums()})

    def _count_skipped(self, step: int) -> None:
        """Read the updates the optimizer skipped on every rank since the last read (it counts them on
        the device); warn about new ones; stop after train.max_nonfinite_steps in a row."""
        total, in_a_row = self.optimizer.read_skips()
        new, since = self.progress.read_skips(total, step)
        self.state.nonfinite_in_a_row = in_a_row
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

    # -------------------------------------------------------------------------------- evaluate
    def evaluate(self, step: int) -> dict:
        metrics = evaluate(self.eval_teacher, self.student_scorer, self.eval_batches, self.rank.device,
                           self.chunk_size)
        self.tracker.log_eval(step, metrics)
        return metrics

    # ---------------------------------------------------------------------------------- finish
    def finish(self, initial: dict, final: dict, seconds: float) -> float:
        """The final checkpoint, then what a finished run leaves (trainer/outputs/finish.py); the
        metric named by train.metric."""
        cfg = self.cfg
        self._refuse_non_finite(final)
        if self.first_step < cfg.train.max_steps:  # else the final checkpoint is the one resumed from
            self.save_checkpoint(cfg.train.max_steps)  # the last step always closes its window: none is saved
        summary = {**self.summary, **final, **{f"initial/{k}": v for k, v in initial.items()},
                   **self.progress.summary(), "train/steps": cfg.train.max_steps, "train/wall_s": seconds,
                   "world_size": self.rank.world_size}
        facts = RunFacts(cfg, decision=self.licence, student_licence=self.student_licence, model_name=self.model_name,
                         name_complies=self.name_complies, started_at=self.started_at, cache=self.teacher_cache,
                         rows_trained=len(self.train_rows))
        merged_dtype = self.precision.default_dtype
        return finish_run(self.student.module, self.tokenizer, run_dir=self.run_dir, rank=self.rank,
                          tracker=self.tracker, summary=summary, facts=facts, peft_cfg=cfg.peft,
                          student_cfg=cfg.student, merged_dtype=merged_dtype, metric=cfg.train.metric)

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


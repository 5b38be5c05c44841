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
from trainer.cache.teacher import open_cache
from trainer.config import ConfigError, cache_root, evaluation_interval, unread_loss_settings, validate
from trainer.data.batching import collate, micro_batch_rows_for_step, step_row_ids, to_device
from trainer.data.packing import collate_packed, document_lengths
from trainer.launch.determinism import use_deterministic_kernels
from trainer.launch.preemption import Preempted, PreemptionWatch, hand_back
from trainer.losses.objective import Objective, fused_micro_batch_sums, micro_batch_sums, supervised_positions
from trainer.losses.settings import IGNORE_INDEX
from trainer.models import engines
from trainer.outputs.finish import RunFacts, finish_run
from trainer.outputs.tracking import Tracker, forget_steps_after
from trainer.ranks import RankInfo, all_reduce_sum
from trainer.train import checkpoints, resume, throughput
from trainer.train.cross_tokenizer import cross_tokenizer_evaluate, cross_tokenizer_onpolicy_evaluate, teacher_view
from trainer.train.evaluation import evaluate, nothing_to_average, onpolicy_evaluate
from trainer.train.nonfinite import TrainingDiverged, describe_weights, largest_abs_weight, streak_message
from trainer.train.onpolicy import rollout_settings
from trainer.train.progress import Progress
from trainer.train.setup import JobParts, build_parts

log = logging.getLogger(__name__)


class DistillJob:
    """One job's stages: `setup` builds what the loop reads (:class:`~trainer.train.setup.JobParts`),
    then `train` steps, `evaluate` measures and `finish` leaves the run's outputs. The loop's account
    (log window, rates, skips) lives in `progress`; what a checkpoint saves of the loop in `state`."""

    def __init__(self, cfg, rank: RankInfo, run_dir: Path, inputs_checked=lambda: None):
        """`inputs_checked()` is called once the inputs passed their checks, before the job changes
        anything in `run_dir` (there may be an earlier run's files) or loads any weights."""
        validate(cfg)  # before anything is loaded, so a bad value costs nothing
        use_deterministic_kernels(cfg.train.deterministic)  # before the process's first matrix product
        self.cfg, self.rank, self.run_dir, self.inputs_checked = cfg, rank, run_dir, inputs_checked
        # Decided once: every model's dtype, both DeepSpeed configs and the FLOP peak read these.
        self.precision = engines.precision(cfg.train, rank.device)
        self.engine_configs = engines.engine_configs(cfg.deepspeed, cfg.train, cfg.teacher, self.precision,
                                                     rank.world_size)
        self.objective = Objective.from_config(cfg.loss)
        self.peak_flops = throughput.peak_flops(rank.device, self.precision.bf16, cfg.train.peak_tflops)
        self._check_metric_is_measured()
        if rank.is_main:
            for warning in unread_loss_settings(cfg.loss):
                log.warning(warning)
        self.state = checkpoints.TrainerState(
            step=0, world_size=rank.world_size,
            rows_per_step=cfg.train.micro_batch_size * cfg.train.grad_accum * rank.world_size,
            zero_stage=cfg.deepspeed.stage)
        # The loop's account; its data stopwatch also times a cached teacher's reads (data loading).
        self.progress = Progress(self.state, rank.device, self.peak_flops, rank.world_size,
                                 onpolicy=cfg.onpolicy.fraction > 0)
        # Set by setup():
        self.preflight: preflight.Preflight | None = None
        self.identity: dict = {}  # what a checkpoint of this run records (resume.run_identity)
        self.parts: JobParts | None = None
        self.tracker: Tracker | None = None
        self.first_step = 0

    def _check_metric_is_measured(self) -> None:
        """`validate` knows the names; only the device decides whether MFU has a peak to divide by."""
        if self.cfg.train.metric == "train/mfu" and self.peak_flops is None:
            raise ConfigError(f"train.metric=train/mfu has no value on this device ({self.rank.device.type}, no known "
                              "bf16 peak); set train.peak_tflops to its peak TFLOP/s, or pick another train.metric "
                              "such as train/tflops_per_s.")

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.preflight = preflight.check(cfg, self.rank, "train")
        self.identity = resume.run_identity(cfg, self.preflight)
        resume_from = resume.checked_resume_point(cfg, self.run_dir, self.identity, self.rank.is_main)
        teacher_cache = (open_cache(cfg.teacher, cfg.loss.kind, self.preflight, cache_root(cfg))
                         if cfg.teacher.cache else None)
        self.inputs_checked()
        # Seeded here, after anything that may draw random numbers (building the demo's teacher on a
        # cold cache does): the same LoRA initialisation on every rank, cold cache or warm.
        torch.manual_seed(cfg.train.seed)
        self.parts = build_parts(cfg, self.rank, self.preflight, teacher_cache, self.precision, self.engine_configs,
                                 self.progress.data_time)
        self.first_step = self._resume(resume_from)
        if self.rank.is_main:  # steps after the checkpoint (all, on a fresh start) are about to be redone
            forget_steps_after(self.run_dir, self.first_step)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.tracker = Tracker(self.run_dir, cfg, resolved, self.first_step, enabled=self.rank.is_main)
        self.state.wandb_run_id = self.tracker.wandb_run.id if self.tracker.wandb_run is not None else None

    def _resume(self, point: resume.ResumePoint | None) -> int:
        """Engine, RNG and loop state from the checkpoint found at setup; the step to start at."""
        student = self.parts.student
        if point is None:
            self.state.initial_largest_abs_weight = largest_abs_weight(student.module)
            return 0
        saved = point.state
        rank_state = checkpoints.load_checkpoint(student, point.folder, saved.step)
        self.state.step, self.state.tokens_seen, self.state.skipped_steps = saved.step, saved.tokens_seen, saved.skipped_steps
        self.state.initial_largest_abs_weight = saved.initial_largest_abs_weight
        self.state.nonfinite_in_a_row = saved.nonfinite_in_a_row
        self.parts.optimizer.resume_skips_in_a_row(saved.nonfinite_in_a_row)
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
        cfg, parts = self.cfg, self.parts
        with self.progress.data_time:
            slots = micro_batch_rows_for_step(step, parts.train_rows, self.rank.rank, self.rank.world_size,
                                              cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed)
        if parts.onpolicy is not None:  # not data loading: the student's own work, timed apart
            slots = [(positions, self._rolled_out(step, positions, rows)) for positions, rows in slots]
        with self.progress.data_time:
            batches = [self._collate(rows) for _, rows in slots]
            counts = torch.tensor([[float((b["labels"][:, 1:] != IGNORE_INDEX).sum()), float(b["attention_mask"].sum())]
                                   for b in batches], dtype=torch.float64).sum(dim=0)
            self.progress.flops += sum(self._flops(b) for b in batches)
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so the gradient is
        # that of (Σ over the step's tokens) / (the step's token count).
        scale = self.rank.world_size * cfg.train.grad_accum / max(self._global_supervised_tokens(step, counts), 1.0)
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
            with parts.student_scorer.gathered():
                sums = self._micro_batch_sums(teacher_states, student_states, batch["labels"], batch["supervised"],
                                              batch.get("spans"))
                parts.student.backward(sums.objective * scale)
            loss_sums += torch.stack([sums.objective.detach(), sums.kd, sums.ce]).double()
            if index == len(batches) - 1:
                if measure_grad_norm:
                    self.progress.pre_step_grad_norm = self._replica_grad_norm()
                # The objective only: under sft the kd slot is NaN by design.
                parts.optimizer.arm(loss_sums[0])  # the optimizer skips the step if any rank's loss is NaN/Inf
            parts.student.step()
        return loss_sums, counts

    def _collate(self, rows: list) -> dict:
        if self.parts.cross is not None:
            return self.parts.cross.collate(rows, self.parts.pad_id)
        return (collate_packed if self.cfg.data.pack else collate)(rows, self.parts.pad_id)

    def _flops(self, batch: dict) -> float:
        """A micro-batch's FLOPs; across tokenizers the teacher runs on its own (longer or shorter) rows."""
        parts = self.parts
        if parts.cross is None or parts.teacher_cost is None:
            return parts.step_cost.of_rows(document_lengths(batch))
        teacher_lengths = batch["teacher_attention_mask"].sum(dim=1).tolist()
        return parts.step_cost.of_rows(document_lengths(batch)) + parts.teacher_cost.of_rows(teacher_lengths)

    def _rolled_out(self, step: int, positions: list[int], rows: list) -> list:
        """One micro-batch's rows, those drawn for rollouts rewritten with the student's responses."""
        rows, work = self.parts.onpolicy.rewrite(step, positions, rows)
        self.progress.add_rollouts(work)
        return rows

    def _global_supervised_tokens(self, step: int, counts: torch.Tensor) -> float:
        """The step's supervised tokens over all ranks. Off-policy, from the rows it takes: no
        collective, no host sync. On-policy the rollouts' lengths are known only where they were
        written, so the ranks sum their counts (`counts`: this rank's, from its collated rows)."""
        if self.parts.onpolicy is not None:
            return float(all_reduce_sum(counts[:1].clone())[0])
        rows = self.parts.train_rows
        taken = (rows[i] for i in step_row_ids(step, len(rows), self.state.rows_per_step, self.cfg.train.seed))
        return sum(len(row.labels) - 1 - row.labels[1:].count(IGNORE_INDEX) for row in taken)

    def _forward_models(self, batch: dict, host_batch: dict):
        """The teacher as the loss takes it (None under sft: no teacher runs), and the student's
        states: hidden states when fused, else logits."""
        if self.objective.sft:
            teacher = None
        elif self.parts.cross is not None:  # the teacher reads its own tokenisation of the rows
            teacher = self.parts.step_teacher.states(teacher_view(batch), host_batch)
        else:
            teacher = self.parts.step_teacher.states(batch, host_batch)
        return teacher, self.parts.student_scorer.states(batch)

    def _micro_batch_sums(self, teacher_states, student_states, labels, supervised, spans=None):
        student, cross = self.parts.student_scorer, self.parts.cross
        if cross is not None and not self.objective.sft:
            with self.parts.step_teacher.gathered():
                return cross.micro_batch_sums(student_states, student.head, teacher_states, labels, self.objective,
                                              spans, supervised)
        if not student.fused:
            return micro_batch_sums(student_states, teacher_states, labels, self.objective, student.vocab_size)
        with contextlib.nullcontext() if self.objective.sft else self.parts.step_teacher.gathered():
            return fused_micro_batch_sums(student_states, student.head, teacher_states, labels, self.objective,
                                          supervised)

    def _replica_grad_norm(self) -> float | None:
        """DeepSpeed reports the gradient norm only on its ZeRO and mixed-precision paths; at
        stage 0 in fp32 each rank holds the averaged gradients, so take the norm here."""
        if self.cfg.deepspeed.stage != 0:
            return None
        grads = [p.grad for p in self.parts.student.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else None

    def train(self, watch: PreemptionWatch) -> None:
        """Steps from `first_step` to `train.max_steps`; raises Preempted, checkpoint saved, when
        any rank was signalled to stop. A resumed run goes on with the log window it saved."""
        cfg, progress, student = self.cfg, self.progress, self.parts.student
        eval_every = evaluation_interval(cfg.train)
        progress.start(self.first_step)
        # Dropout on for the steps, whatever ran before: from_pretrained returns a model in eval
        # mode, and a resumed job runs no evaluation first. Evaluations restore it (eval_mode).
        student.train()
        for step in range(self.first_step, cfg.train.max_steps):
            done = step + 1
            log_now = done % cfg.train.log_every == 0 or done == cfg.train.max_steps
            lr = student.get_lr()[0]
            progress.add_step(*self.train_step(step, measure_grad_norm=log_now))
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != cfg.train.max_steps
            signum = watch.agreed_signal()
            stopping = signum and done < cfg.train.max_steps
            if log_now or periodic or stopping:
                self._count_skipped(done)  # a host read: only where the step is logged or saved
            self.tracker.advance()
            if log_now:
                self.tracker.log_step(progress.close_window(done, lr, student.get_global_grad_norm(),
                                                            kd_measured=cfg.loss.kind != "sft"))
                progress.open_window()
            if eval_every and done % eval_every == 0 and done != cfg.train.max_steps:
                with progress.paused():  # tokens/s counts training time only
                    self.evaluate(done, between=True)
            if periodic or stopping:
                self.save_checkpoint(done)
            if stopping:
                raise Preempted(signum, done)

    def save_checkpoint(self, step: int) -> None:
        """With this rank's sums of the log window still open after `step`."""
        self.state.step = step
        self.state.identity = self.identity
        self.state.largest_abs_weight = largest_abs_weight(self.parts.student.module)
        checkpoints.save_checkpoint(self.parts.student, self.run_dir, self.state, self.cfg.checkpoint.keep,
                                    rank_state={"window": self.progress.open_sums()})

    def _count_skipped(self, step: int) -> None:
        """Read the updates the optimizer skipped on every rank since the last read (it counts them on
        the device); warn about new ones; stop after train.max_nonfinite_steps in a row."""
        total, in_a_row = self.parts.optimizer.read_skips()
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
        return describe_weights(largest_abs_weight(self.parts.student.module), self.state.initial_largest_abs_weight)

    def _newest_checkpoint(self) -> tuple[Path | None, checkpoints.TrainerState | None]:
        """The published checkpoint and its state: what a stop message can tell about it."""
        newest = checkpoints.published(self.run_dir / checkpoints.CHECKPOINTS)
        return newest, checkpoints.read_state(newest) if newest is not None else None

    def _refuse_non_finite(self, final: dict) -> None:
        """A student whose final evaluation is NaN/Inf is no result: stop before its checkpoint,
        adapter and RESULT line, saying what is known. Collective (every rank has the same `final`).
        The teacher's own CE is left out: a cached teacher's stored log-probabilities may hold -inf; so
        are the means that prompt-only held-out rows leave nothing to average over."""
        bad = {key: value for key, value in final.items() if key != "eval/teacher_ce" and not math.isfinite(value)
               and not nothing_to_average(key, final) and not _no_bytes_to_divide_by(key, final)}
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
    def evaluate(self, step: int, between: bool = False) -> dict:
        """Held-out metrics at `step`. The on-policy evaluation (rollouts: several times the cost of
        the rest) runs before and after training in every job, and `between` those only where the
        job trains on-policy, whose curve it is."""
        parts = self.parts
        if parts.cross is not None:
            metrics = cross_tokenizer_evaluate(parts.eval_teacher, parts.student_scorer, parts.cross,
                                               parts.eval_batches, self.rank.device, parts.chunk_size,
                                               parts.byte_lengths)
        else:
            metrics = evaluate(parts.eval_teacher, parts.student_scorer, parts.eval_batches, self.rank.device,
                               parts.chunk_size, parts.byte_lengths)
        if between and self.cfg.onpolicy.fraction == 0:
            self.tracker.log_eval(step, metrics)
            return metrics
        student_ce = metrics["eval/student_ce"]
        diverged = not math.isfinite(student_ce) and not nothing_to_average("eval/student_ce", metrics)
        metrics.update(self._onpolicy_evaluate(diverged))
        self.tracker.log_eval(step, metrics)
        return metrics

    def _onpolicy_evaluate(self, diverged: bool = False) -> dict:
        """The student's own responses to the held-out prompts, scored by the teacher; in every job,
        off-policy too, so that runs compare. Nothing with a cache: it cannot score new text.
        `diverged`: the student's logits are already NaN/Inf (every rank knows it from the same
        sums), so it writes nothing (sampling from NaN fails) and the pair is NaN too."""
        cfg, parts = self.cfg, self.parts
        if parts.rollout_engine is None or not parts.eval_teacher.scores_new_text:
            return {}
        if diverged:
            return {"eval/onpolicy_kl": math.nan, "eval/teacher_nll_of_student": math.nan, "eval/onpolicy_tokens": 0.0}
        if parts.cross is not None:  # the rollouts re-tokenised for the teacher, scored over the spans
            return cross_tokenizer_onpolicy_evaluate(
                parts.eval_rows, parts.rollout_engine, rollout_settings(cfg.onpolicy), cfg.train.seed, parts.pairing,
                parts.eval_teacher.scorer, parts.student_scorer, parts.cross, device=self.rank.device,
                chunk_size=parts.chunk_size, pad_id=parts.pad_id, batch_size=cfg.train.micro_batch_size)
        return onpolicy_evaluate(parts.eval_rows, parts.rollout_engine, rollout_settings(cfg.onpolicy), cfg.train.seed, parts.eval_teacher,
                                 parts.student_scorer, device=self.rank.device, chunk_size=parts.chunk_size,
                                 pad_id=parts.pad_id, batch_size=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len)

    # ---------------------------------------------------------------------------------- finish
    def finish(self, initial: dict, final: dict, seconds: float) -> float:
        """The final checkpoint, then what a finished run leaves (trainer/outputs/finish.py); the
        metric named by train.metric."""
        cfg, parts, checked = self.cfg, self.parts, self.preflight
        self._refuse_non_finite(final)
        if self.first_step < cfg.train.max_steps:  # else the final checkpoint is the one resumed from
            self.save_checkpoint(cfg.train.max_steps)  # the last step always closes its window: none is saved
        summary = {**parts.summary, **final, **{f"initial/{k}": v for k, v in initial.items()},
                   **self.progress.summary(), "train/steps": cfg.train.max_steps, "train/wall_s": seconds,
                   "world_size": self.rank.world_size}
        facts = RunFacts(cfg, decision=checked.licence, student_licence=checked.student_licence,
                         model_name=checked.model_name, name_complies=checked.name_complies,
                         started_at=checked.started_at, cache=parts.teacher_cache, rows_trained=len(parts.train_rows))
        merged_dtype = self.precision.default_dtype
        return finish_run(parts.student.module, checked.tokenizer, run_dir=self.run_dir, rank=self.rank,
                          tracker=self.tracker, summary=summary, facts=facts, peft_cfg=cfg.peft,
                          student_cfg=cfg.student, merged_dtype=merged_dtype, metric=cfg.train.metric)

def _no_bytes_to_divide_by(key: str, final: dict) -> bool:
    """CE per byte is NaN, not a diverged student, when the supervised tokens stand for no text (a
    tokenizer whose ids are all special or unreadable as bytes): the CE itself is finite then."""
    return key == "eval/student_ce_per_byte" and math.isfinite(final.get("eval/student_ce", math.nan))


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
    print("held-out metric                before      after")
    # The on-policy pair is absent where nothing measured it (a teacher cache cannot score new text).
    for key in ("eval/kl_to_teacher", "eval/student_ce", "eval/student_ce_per_byte", "eval/top1_agreement", "eval/exact_match",
                "eval/onpolicy_kl", "eval/teacher_nll_of_student"):
        if key in initial and key in final:
            print(f"{key:<28} {initial[key]:>10.4f} {final[key]:>10.4f}")
    print(f"{'eval/teacher_ce':<28} {final['eval/teacher_ce']:>10.4f} (the teacher itself)")


"""The numbers a job writes to `summary.json`, by name: what `train.metric` may name.

Kept apart from the code that computes them (`trainer/train/evaluation.py`, `DistillJob.finish`) so
that `trainer/config.py` can refuse, at start-up, a metric no job produces without importing
models; a test holds a real job's summary to these names, so a new metric must be named here.
"""

from __future__ import annotations

ONPOLICY_EVAL_METRICS = ("onpolicy_kl", "teacher_nll_of_student", "onpolicy_tokens")
"""The held-out evaluation of the student's own responses, which only a teacher model can score:
absent from a job that reads a teacher cache."""

CROSS_TOKENIZER_EVAL_METRICS = ("unshared_mass", "aligned_spans", "one_to_one_spans", "onpolicy_spans")
"""What only a job distilling across tokenizers (loss.cross_tokenizer) measures: the student's mean
probability mass on ids the teacher's vocabulary lacks, and the aligned spans its KLs average over
(teacher-forced, and on the student's own rollouts)."""

EVAL_METRICS = ("kl_to_teacher", "student_ce", "student_ce_per_byte", "teacher_ce", "top1_agreement", "exact_match",
                "tokens", *ONPOLICY_EVAL_METRICS, *CROSS_TOKENIZER_EVAL_METRICS)
"""Held-out evaluation, written as `eval/<name>` (after training) and `initial/eval/<name>` (before)."""

TEACHER_FORCED = ("kl_to_teacher", "student_ce", "student_ce_per_byte", "teacher_ce", "top1_agreement", "exact_match",
                  "unshared_mass")
"""The held-out metrics that are means over the held-out rows' response tokens (or rows) under teacher
forcing: NaN when there are none, as with prompt-only held-out rows."""

TRAIN_METRICS = ("tokens_per_s", "tokens_seen", "skipped_steps", "steps", "wall_s", "tflops_per_s", "mfu",
                 "data_share", "peak_memory_gib")
"""The run as a whole, written as `train/<name>`; `mfu` is null where the device's peak is unknown."""

LAST_WINDOW_METRICS = ("tokens_per_s", "tflops_per_s", "mfu", "data_share")
"""The last log window's speed, written as `train/last_window_<name>` beside the run's."""

INITIAL = "initial/"


def eval_key(name: str) -> str:
    return f"eval/{name}"


def teacher_forced(key: str) -> bool:
    """Whether `key` (`eval/...` or `initial/eval/...`) is one of the :data:`TEACHER_FORCED` means."""
    key = key.removeprefix(INITIAL)
    return any(key == eval_key(name) for name in TEACHER_FORCED)


def is_onpolicy_eval_metric(metric: str) -> bool:
    """Whether `metric` (e.g. `initial/eval/onpolicy_kl`) is one of :data:`ONPOLICY_EVAL_METRICS`."""
    return metric.removeprefix(INITIAL) in {eval_key(name) for name in ONPOLICY_EVAL_METRICS}


def metric_names() -> tuple[str, ...]:
    """Every number `summary.json` holds that `train.metric` may name."""
    evals = tuple(eval_key(name) for name in EVAL_METRICS)
    return (evals + tuple(INITIAL + key for key in evals) + tuple(f"train/{name}" for name in TRAIN_METRICS)
            + tuple(f"train/last_window_{name}" for name in LAST_WINDOW_METRICS))


def describe_metric_names() -> str:
    """The valid names for an error line, the before-training ones folded into one phrase."""
    evals = ", ".join(eval_key(name) for name in EVAL_METRICS)
    trains = ", ".join(f"train/{name}" for name in TRAIN_METRICS)
    return (f"{evals} (each also as {INITIAL}eval/..., before training), {trains} "
            f"(and train/last_window_... of {', '.join(LAST_WINDOW_METRICS)})")

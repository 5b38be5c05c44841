"""A run directory as the report sees it: what `trainer.outputs.tracking` wrote, read without the trainer.

Everything but `metrics.jsonl` may be missing (a run stopped early has no `summary.json`; one
stopped before its first evaluation has no `eval.jsonl`), and the last line of a file may be cut
short by a job killed mid-write: the report shows what is there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError

# The held-out metrics a report leads with, in this order, with what "better" means.
EVAL_METRICS = (
    ("eval/kl_to_teacher", "KL(teacher ‖ student) per token", "lower"),
    ("eval/student_ce", "student CE on the labels", "lower"),
    ("eval/top1_agreement", "top-1 agreement with the teacher", "higher"),
    ("eval/exact_match", "task accuracy (exact match)", "higher"),
)
# Held-out metrics of the student's own samples (on-policy evaluation), which jobs with a teacher
# cache lack (a cache cannot score new text): shown where a run has them, not as empty rows.
ONPOLICY_EVAL_METRICS = (
    ("eval/onpolicy_kl", "KL(student ‖ teacher) per token of its own samples", "lower"),
    ("eval/teacher_nll_of_student", "teacher NLL per token of the student's samples", "lower"),
)
# What metrics.jsonl holds per log window when onpolicy.fraction > 0, with labels and units.
ROLLOUT_METRICS = (
    ("rollout_share", "share of step time spent generating", "share"),
    ("rollout_mean_length", "mean rollout length", "tokens"),
    ("rollout_truncation_rate", "rollouts cut by onpolicy.max_new_tokens", "share"),
    ("rollout_tokens_per_s", "rollout tokens per second (all ranks)", "tokens/s"),
)


class NotARunDirectory(UserError, ValueError):
    """The folder holds no `metrics.jsonl`; the message says what to pass instead."""


@dataclass
class Run:
    """One run directory. `metrics`/`evals`: the jsonl records in step order; `summary`: {} when
    the run has not finished; `config`: the resolved config flattened to dotted keys ({} if absent)."""

    path: Path
    metrics: list[dict]
    evals: list[dict]
    summary: dict
    config: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return bool(self.summary)

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.metrics + self.evals if isinstance(r.get("step"), int)]
        return max(steps, default=0)

    @property
    def max_steps(self) -> int | None:
        value = self.summary.get("train/steps", self.config.get("train.max_steps"))
        return int(value) if value is not None else None

    def initial(self) -> dict:
        """Held-out metrics before training: `initial/*` of the summary, else the step-0 evaluation."""
        if self.summary:
            found = {k[len("initial/"):]: v for k, v in self.summary.items() if k.startswith("initial/")}
            if found:
                return found
        return next((_metrics_only(r) for r in self.evals if r.get("step") == 0), {})

    def final(self) -> dict:
        """Held-out metrics at the end: the summary's, else the latest evaluation after step 0."""
        if self.summary:
            return {k: v for k, v in self.summary.items() if k.startswith("eval/")}
        later = [r for r in self.evals if r.get("step", 0) > 0]
        return _metrics_only(later[-1]) if later else {}

    @property
    def has_rollouts(self) -> bool:
        """Whether any logged step generated rollouts (an on-policy run)."""
        return any(isinstance(r.get(key), (int, float)) for r in self.metrics for key, _, _ in ROLLOUT_METRICS)

    def has_eval(self, key: str) -> bool:
        """Whether `key` was evaluated at all: in the summary or any eval.jsonl record."""
        return any(isinstance(r.get(key), (int, float)) for r in (self.summary, *self.evals))

    def series(self, key: str, source: str = "metrics") -> tuple[list[int], list[float]]:
        """(steps, values) of `key`, skipping records where it is missing or null."""
        records = self.metrics if source == "metrics" else self.evals
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        return [s for s, _ in points], [float(v) for _, v in points]


def eval_metrics(runs: list[Run]) -> tuple:
    """The held-out metrics to show for `runs`: EVAL_METRICS, then each on-policy one any run has."""
    return EVAL_METRICS + tuple(m for m in ONPOLICY_EVAL_METRICS if any(run.has_eval(m[0]) for run in runs))


def is_run_directory(path: Path) -> bool:
    return (Path(path) / "metrics.jsonl").is_file()


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not is_run_directory(path):
        why = "does not exist" if not path.exists() else "holds no metrics.jsonl"
        raise NotARunDirectory(
            f"{path} is not a run directory ({why}); pass the folder a training job wrote "
            "(outputs/<date>/<time>/ or its hydra.run.dir), or a multirun folder holding such runs.")
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(path=path, metrics=_read_jsonl(path / "metrics.jsonl"), evals=_read_jsonl(path / "eval.jsonl"),
               summary=summary, config=_read_config(path / ".hydra" / "config.yaml"))


def runs_in_sweep(path: Path) -> list[Path]:
    """The run directories directly inside a Hydra multirun folder (`0/`, `1/`, ...), in job order."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [child for child in path.iterdir() if child.is_dir() and is_run_directory(child)]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def flatten(config: dict, prefix: str = "") -> dict:
    """{"loss": {"kind": "fkl"}} -> {"loss.kind": "fkl"}; lists stay values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _metrics_only(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step"}


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file in step order (a step logged twice keeps its last record); a
    line cut short by a killed job is skipped."""
    if not path.is_file():
        return []
    by_step: dict = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            by_step[record.get("step")] = record
    return sorted(by_step.values(), key=lambda r: r.get("step") if isinstance(r.get("step"), int) else -1)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    # As saved, unresolved: an interpolation such as cache_dir's ${oc.env:DISTILL_CACHE,...} stays as
    # written instead of being read from the environment of whoever makes the report.
    return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))

"""The end of a job that trained to train.max_steps: the student exported, `summary.json`,
provenance and the model card, the report; then the metric Hydra's sweepers optimise.

The order is the one a failure must leave behind: the final checkpoint is saved before this runs
(a failed export costs no training), the weights before the summary, the summary before the
provenance record that holds its metrics, and the report, which reads them all, last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.outputs import export, provenance
from trainer.outputs.tracking import Tracker
from trainer.ranks import RankInfo


@dataclass(frozen=True)
class RunFacts:
    """What provenance.json and the model card say besides the final metrics, known before the
    first step (see `provenance.write`)."""

    cfg: object
    """The job's whole config: the record holds it, resolved."""
    decision: object
    """The teacher licence's decision (trainer/preflight/licence_check.py)."""
    student_licence: object
    model_name: str
    name_complies: object
    started_at: str
    cache: object | None
    """The teacher cache the job read, or None."""
    rows_trained: int


def finish_run(model, tokenizer, *, run_dir: Path, rank: RankInfo, tracker: Tracker, summary: dict, facts: RunFacts,
               peft_cfg, student_cfg, merged_dtype: torch.dtype, metric: str) -> float:
    """Every rank: writes what a finished run leaves (rank 0 writes, every rank joins the gathers)
    and returns `summary[metric]`. `model`: the trained student (a ZeRO-3 shard on each rank);
    `merged_dtype`: the dtype of `merged/`, written when peft.merge is set."""
    out_dir = export_student(model, tokenizer, run_dir, peft_cfg, student_cfg, merged_dtype, rank.is_main)
    tracker.write_summary(summary)
    ranks = provenance.gather_ranks(rank)  # every rank joins; rank 0 writes
    if rank.is_main:
        write_provenance(facts, run_dir, out_dir, ranks, summary)
    tracker.write_report()  # report.md and plots, in the run directory and on W&B
    tracker.close()
    return metric_value(summary, metric)


def export_student(model, tokenizer, run_dir: Path, peft_cfg, student_cfg, merged_dtype: torch.dtype,
                   is_main: bool) -> Path:
    """`adapter/` (LoRA) or `model/`, and `merged/` for a LoRA student with peft.merge. Returns the
    folder the provenance record and the model card go into."""
    out_dir = export.export_student(model, tokenizer, run_dir, peft_cfg.kind, is_main)
    if peft_cfg.merge and peft_cfg.kind == "lora" and is_main:
        export.export_merged(student_cfg, out_dir, run_dir, merged_dtype)
    return out_dir


def write_provenance(facts: RunFacts, run_dir: Path, out_dir: Path, ranks: list[dict], summary: dict) -> None:
    """Rank 0, after the summary: the record holds the final metrics."""
    provenance.write(facts.cfg, run_dir, out_dir, decision=facts.decision, ranks=ranks,
                     student_licence=facts.student_licence, model_name=facts.model_name,
                     name_complies=facts.name_complies, started_at=facts.started_at, metrics=summary,
                     cache=facts.cache, rows_trained=facts.rows_trained)


def metric_value(summary: dict, metric: str) -> float:
    """The value of train.metric, for the sweepers."""
    if metric not in summary:
        raise ValueError(f"train.metric={metric} is not in summary.json; use one of {sorted(summary)}.")
    return float(summary[metric])

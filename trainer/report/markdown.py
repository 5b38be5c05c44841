"""The words and tables of `report.md` and `comparison.md`."""

from __future__ import annotations

import math
import os
from pathlib import Path

from trainer.report.runs import Run, eval_metrics

# Settings a reader of one run's report wants in front of them, when the config holds them.
KEY_SETTINGS = (
    "teacher.path", "teacher.cache", "student.path", "data.train", "data.eval", "peft.kind", "peft.r",
    "loss.kind", "loss.temperature", "loss.ce_weight", "loss.beta", "loss.skew", "train.max_steps",
    "train.micro_batch_size", "train.grad_accum", "train.lr", "train.warmup_steps", "train.seq_len",
    "train.seed", "deepspeed.stage", "onpolicy.fraction",
)
# The rollouts' sampling settings: shown only where onpolicy.fraction > 0 (elsewhere they did nothing).
ONPOLICY_SETTINGS = ("onpolicy.max_new_tokens", "onpolicy.temperature", "onpolicy.top_p")
# The last logged step's training numbers, with their labels.
TRAINING_KEYS = (
    ("loss", "objective (loss)"), ("kd_loss", "KD term (kd_loss)"), ("ce_loss", "CE term (ce_loss)"),
    ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens per second"),
    ("tokens_seen", "tokens seen"), ("skipped_steps", "skipped steps (NaN/Inf)"),
    ("tflops_per_s", "model TFLOP/s (all ranks)"), ("mfu", "MFU"), ("data_share", "data-loading share"),
    ("rollout_tokens_per_s", "rollout tokens per second (all ranks)"),
    ("rollout_share", "share of the window spent generating rollouts"), ("rollout_mean_length", "mean rollout length"),
    ("rollout_truncation_rate", "rollouts cut by onpolicy.max_new_tokens"), ("rollout_rows", "rollouts in the window"),
    ("peak_memory_gib", "peak memory, GiB (largest rank)"),
)


def fmt(value) -> str:
    """A number as the report prints it: 4 decimals, 3 significant digits below 0.001, 1 decimal
    from 100 up; anything else as text; a missing value as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value}"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 100:
        return f"{value:.4f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3e}"


def _table(header: list[str], rows: list[list[str]], numbers: range) -> list[str]:
    """A markdown table whose columns at the indices in `numbers` are right-aligned."""
    align = ["---:" if i in numbers else "---" for i in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def status_line(run: Run) -> str:
    if run.finished:
        wall = run.summary.get("train/wall_s")
        took = f" in {wall:.1f} s of training" if isinstance(wall, (int, float)) else ""
        return f"finished: {fmt(run.max_steps)} steps{took} (`summary.json`)"
    of = f" of {run.max_steps}" if run.max_steps else ""
    return (f"not finished: last logged step {run.last_step}{of}, no `summary.json`; the final column is "
            "the latest evaluation after step 0")


def run_report(run: Run, plots: dict[str, Path]) -> str:
    """report.md for one run; `plots` maps each plot's title to its file in the run directory."""
    lines = [f"# Run report: {run.path.name}", "",
             f"- run directory: `{run.path.resolve()}`",
             f"- status: {status_line(run)}"]
    keys = KEY_SETTINGS + (ONPOLICY_SETTINGS if is_on_policy(run) else ())
    settings = [f"`{k}={run.config[k]}`" for k in keys if run.config.get(k) is not None]
    if settings:
        lines.append("- settings: " + ", ".join(settings))
    lines += [f"- regenerate: `python -m trainer.report {run.path}`", "", "## Held-out metrics", ""]

    initial, final = run.initial(), run.final()
    if initial or final:
        rows = [[f"{label} (`{key}`)", fmt(initial.get(key)), fmt(final.get(key)), better]
                for key, label, better in eval_metrics([run])]
        teacher_ce = final.get("eval/teacher_ce", initial.get("eval/teacher_ce"))
        rows.append(["teacher CE on the labels (`eval/teacher_ce`)", "", fmt(teacher_ce), "the teacher itself"])
        lines += _table(["metric", "before training", "final", "better"], rows, numbers=range(1, 3))
        tokens = final.get("eval/tokens", initial.get("eval/tokens"))
        if tokens is not None:
            lines += ["", f"Over {fmt(int(tokens))} supervised held-out tokens."]
        sampled = final.get("eval/onpolicy_tokens", initial.get("eval/onpolicy_tokens"))
        if isinstance(sampled, (int, float)):
            lines += ["", f"The on-policy metrics average over {fmt(int(sampled))} tokens the student wrote "
                          "itself to the held-out prompts."]
    else:
        lines.append("No evaluation was logged yet (`eval.jsonl` is missing or empty).")

    lines += ["", "## Training", ""]
    if run.metrics:
        last = run.metrics[-1]
        rows = [[label, f"{last[key]:.3g}" if key == "lr" and last[key] is not None else fmt(last[key])]
                for key, label in TRAINING_KEYS if key in last]
        lines += [f"At the last logged step, {last.get('step')}:", ""]
        lines += _table(["", "value"], rows, numbers=range(1, 2))
        if last.get("kd_loss") is None and "kd_loss" in last:
            lines += ["", "No KD term: this run trains on hard labels only (`loss.kind=sft`)."]
    else:
        lines.append("No training step was logged yet (`metrics.jsonl` is empty).")
    throughput = run.summary.get("train/tokens_per_s")
    if isinstance(throughput, (int, float)):
        lines += ["", f"Throughput of the last log window: {throughput:.0f} input tokens/s "
                      f"on {run.summary.get('world_size', 1)} rank(s)."]
    lines += _rollout_summary(run.summary)

    lines += ["", "## Plots", ""]
    for title, path in plots.items():
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def is_on_policy(run: Run) -> bool:
    fraction = run.config.get("onpolicy.fraction")
    return isinstance(fraction, (int, float)) and fraction > 0


def _rollout_summary(summary: dict) -> list[str]:
    """A sentence on the run's rollouts as a whole, from summary.json (on-policy runs only)."""
    share, speed = summary.get("train/rollout_share"), summary.get("train/rollout_tokens_per_s")
    if not isinstance(share, (int, float)) or not isinstance(speed, (int, float)):
        return []
    length, cut = summary.get("train/rollout_mean_length"), summary.get("train/rollout_truncation_rate")
    return ["", f"Rollouts: {share:.0%} of the training time went to generating, at {speed:.0f} generated tokens/s "
                f"(all ranks); mean length {fmt(length)} tokens, {fmt(cut)} of them cut by "
                "`onpolicy.max_new_tokens`."]


def differing_settings(runs: list[Run]) -> list[str]:
    """Config keys whose values are not the same in every run. A key one run lacks counts as null
    there: a run made before a setting existed ran with it unset."""
    keys = sorted({key for run in runs for key in run.config})
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


def run_label(run: Run, out_dir: Path) -> str:
    """The run's folder relative to the comparison's folder (a multirun's `0`, `1`, ...)."""
    try:
        return os.path.relpath(run.path.resolve(), out_dir.resolve())
    except ValueError:  # another drive on Windows
        return str(run.path)


def comparison(runs: list[Run], out_dir: Path, plot: Path) -> str:
    """comparison.md: one row per run, its differing settings, final metrics and status."""
    differing = differing_settings(runs)
    metrics_shown = eval_metrics(runs)
    generating = any(isinstance(run.summary.get("train/rollout_share"), (int, float)) for run in runs)
    header = ["run", *(f"`{k}`" for k in differing),
              *(f"{key.split('/')[1]} ({'↓' if better == 'lower' else '↑'})" for key, _, better in metrics_shown),
              *(["generating"] if generating else []), "steps", "train s", "status"]
    finals = [run.final() for run in runs]
    best = {}
    for key, _, better in metrics_shown:
        values = [f[key] for f in finals if isinstance(f.get(key), (int, float)) and math.isfinite(f[key])]
        if len(values) > 1:
            best[key] = min(values) if better == "lower" else max(values)
    rows = []
    for run, final in zip(runs, finals):
        metrics = []
        for key, _, _ in metrics_shown:
            cell = fmt(final.get(key))
            metrics.append(f"**{cell}**" if key in best and final.get(key) == best[key] else cell)
        if generating:
            share = run.summary.get("train/rollout_share")
            metrics.append(f"{share:.0%}" if isinstance(share, (int, float)) else "—")
        wall = run.summary.get("train/wall_s")
        rows.append([f"`{run_label(run, out_dir)}`", *(fmt(run.config.get(k)) for k in differing), *metrics,
                     fmt(run.last_step), f"{wall:.1f}" if isinstance(wall, (int, float)) else "—",
                     "finished" if run.finished else "not finished"])
    lines = [f"# Comparison of {len(runs)} runs", "",
             f"Held-out metrics at the end of each run (the latest evaluation for a run that has not finished); "
             f"best of each column in bold. Folder: `{out_dir.resolve()}`.", ""]
    if not differing:
        lines += ["The runs' configs do not differ (or none was found).", ""]
    lines += _table(header, rows, numbers=range(1 + len(differing), len(header) - 1))
    initial = next((run.initial() for run in runs if run.initial()), {})
    if initial:
        lines += ["", "Student before training (" + ", ".join(
            f"{key.split('/')[1]} {fmt(initial.get(key))}" for key, _, _ in metrics_shown) + ")."]
    lines += ["", f"![eval KL and training loss of every run]({plot.name})", "",
              "The training objective is each run's own loss, so its curves compare runs of one `loss.kind`; "
              "the held-out KL compares any runs."]
    if len(metrics_shown) > len(eval_metrics([])):
        lines += ["", "`onpolicy_kl` and `teacher_nll_of_student` score responses the student wrote itself to the "
                      "held-out prompts, so they compare on- and off-policy runs on the text each would produce."]
    if generating:
        lines += ["", "generating: the share of each run's training time spent writing rollouts "
                      "(`train/rollout_share`; — for an off-policy run)."]
    lines += ["",
              "Regenerate with `python -m trainer.report " + " ".join(str(run.path) for run in runs) + "`."]
    return "\n".join(lines) + "\n"

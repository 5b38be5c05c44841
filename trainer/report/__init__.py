"""Reports of finished (or stopped) runs: `report.md` and PNG plots in a run directory, one
comparison table and plot for several runs, and the same plots and summary table on W&B.

`python -m trainer.report RUN_DIR [RUN_DIR ...] [--out DIR]` regenerates them from the files a
run leaves (`metrics.jsonl`, `eval.jsonl`, `summary.json`, `.hydra/config.yaml`); nothing here
imports torch or needs the models.

- `runs.py`: a run directory as the report reads it; `markdown.py`: the words and tables;
  `plots.py`: the PNGs.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.files import write_text_atomically
from trainer.report.markdown import comparison, differing_settings, fmt, run_label, run_report
from trainer.report.plots import COMPARISON_PNG, plot_comparison, plot_run, run_plots
from trainer.report.runs import NotARunDirectory, eval_metrics, load_run, runs_in_sweep

REPORT_MD = "report.md"
COMPARISON_MD = "comparison.md"

__all__ = ["NotARunDirectory", "common_parent", "expand_run_dirs", "fmt", "log_report_to_wandb",
           "write_comparison", "write_report"]


def write_report(run_dir: Path) -> Path:
    """Write `report.md` and its PNGs into `run_dir` (replacing earlier ones); return report.md's path.
    Raises NotARunDirectory when `run_dir` holds no `metrics.jsonl`."""
    run = load_run(run_dir)
    plots = plot_run(run, run.path)
    path = run.path / REPORT_MD
    write_text_atomically(path, run_report(run, plots))
    return path


def write_comparison(run_dirs, out_dir: Path) -> Path:
    """Write `comparison.md` (one row per run: differing settings and final metrics) and
    `comparison.png` (eval KL and loss curves overlaid, and the on-policy KL where any run has it)
    into `out_dir`; return comparison.md's path."""
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    differing = differing_settings(runs)
    labels = [_plot_label(run_label(run, out_dir), run, differing[:3]) for run in runs]
    plot = plot_comparison(runs, labels, out_dir / COMPARISON_PNG)
    path = out_dir / COMPARISON_MD
    write_text_atomically(path, comparison(runs, out_dir, plot))
    return path


def expand_run_dirs(paths) -> list[Path]:
    """Run directories as given; a Hydra multirun folder (no metrics.jsonl of its own, run
    directories inside) stands for its runs. Raises NotARunDirectory for anything else."""
    found = []
    for path in map(Path, paths):
        inside = [] if (path / "metrics.jsonl").is_file() else runs_in_sweep(path)
        if inside:
            found += inside
        else:
            found.append(load_run(path).path)  # raises, naming the folder, when it is not a run
    return found


def common_parent(run_dirs) -> Path:
    """The deepest folder holding every run (a multirun's folder for its jobs)."""
    resolved = [str(Path(d).resolve()) for d in run_dirs]
    common = Path(os.path.commonpath(resolved))
    return common.parent if len(set(resolved)) == 1 else common


def log_report_to_wandb(wandb_run, run_dir: Path, step: int | None = None) -> None:
    """Log the run's report plots (as `wandb.Image`, under `report/...`) and a `wandb.Table` of
    its held-out metrics before and after training (`report/summary`) to `wandb_run`; an on-policy
    run's rollout plot and the on-policy evaluation too, where the run has them.

    Uses the PNGs `write_report` left, and writes the report first when one is missing. `step`:
    the W&B step to log at (default: the run's last logged step, where its final evaluation
    already is, so the report does not move W&B's step counter past the end of training)."""
    import wandb

    run = load_run(run_dir)
    plots = {title: run.path / name for title, name in run_plots(run).items()}
    if not all(path.is_file() for path in plots.values()):
        write_report(run.path)
    initial, final = run.initial(), run.final()
    table = wandb.Table(columns=["metric", "before training", "final"])
    for key, _, _ in eval_metrics([run]):
        table.add_data(key, _number(initial.get(key)), _number(final.get(key)))
    table.add_data("eval/teacher_ce", None, _number(final.get("eval/teacher_ce")))
    logged = {f"report/{path.stem.removeprefix('report_')}": wandb.Image(str(path), caption=title)
              for title, path in plots.items()}
    logged["report/summary"] = table
    wandb_run.log(logged, step=run.last_step if step is None else step)


def _plot_label(folder: str, run, keys: list[str]) -> str:
    """`0 loss.kind=fkl` for a multirun job; `fkl` alone for a folder already named after its value."""
    values = [f"{key}={run.config.get(key)}" for key in keys if str(run.config.get(key)) != folder]
    return " ".join([folder, *values])


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None


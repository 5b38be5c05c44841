"""The report's PNGs, drawn with matplotlib's Agg canvas.

Figures are made with `matplotlib.figure.Figure` and an Agg canvas, never `pyplot`: no display is
needed, no backend has to be chosen before import, and no global figure state outlives a call.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.files import write_atomically
from trainer.report.runs import ROLLOUT_METRICS, Run

# Each plot's title and file name inside the run directory, in the order the report shows them.
RUN_PLOTS = {"training loss": "report_loss.png", "eval KL to the teacher": "report_eval_kl.png",
             "top-1 agreement and exact match": "report_agreement.png"}
# Plots only some runs have, after RUN_PLOTS: rollouts (on-policy runs) and the evaluation of the
# student's own samples (runs whose teacher is a model, not a cache).
ROLLOUT_TITLE, ONPOLICY_EVAL_TITLE = "rollouts", "on-policy evaluation (the student's own samples)"
ROLLOUT_PLOT = {ROLLOUT_TITLE: "report_rollouts.png"}
ONPOLICY_EVAL_PLOT = {ONPOLICY_EVAL_TITLE: "report_onpolicy_eval.png"}
COMPARISON_PNG = "comparison.png"


def run_plots(run: Run) -> dict[str, str]:
    """The plots `run` gets: {title: file name}, RUN_PLOTS first."""
    plots = dict(RUN_PLOTS)
    if run.has_rollouts:
        plots.update(ROLLOUT_PLOT)
    if run.has_eval("eval/onpolicy_kl") or run.has_eval("eval/teacher_nll_of_student"):
        plots.update(ONPOLICY_EVAL_PLOT)
    return plots


def _figure(columns: int = 1, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4 * columns, 4.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(rows * columns)]


def _save(figure, path: Path) -> Path:
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    return path


def _plot(axes, steps, values, label, **style) -> bool:
    """One line (markers too when there are few points, e.g. before and after training only)."""
    if not steps:
        return False
    axes.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=4, **style)
    return True


def _finish_axes(axes, title: str, ylabel: str, drew: bool, log_if_wide: list[float] | None = None) -> None:
    axes.set_title(title)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if not drew:
        axes.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=axes.transAxes)
        return
    # A KL that falls by orders of magnitude is unreadable on a linear axis.
    if log_if_wide and min(log_if_wide) > 0 and max(log_if_wide) / min(log_if_wide) > 20:
        from matplotlib.ticker import FuncFormatter

        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.03, not 3×10⁻²
        axes.yaxis.set_minor_formatter(FuncFormatter(_sparse_minor_label))
    axes.legend(fontsize="small")


def _sparse_minor_label(value: float, _position) -> str:
    """Minor ticks of a log axis labelled at 2, 3 and 5 times a power of ten only (no crowding)."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if leading in (2, 3, 5) else ""


def _draw_loss(axes, run: Run) -> None:
    drew = _plot(axes, *run.series("loss"), "objective (loss)", linewidth=2)
    drew |= _plot(axes, *run.series("kd_loss"), "KD term (kd_loss)", linestyle="--")  # none under sft
    drew |= _plot(axes, *run.series("ce_loss"), "CE term on labels (ce_loss)", linestyle=":")
    values = [v for key in ("loss", "kd_loss", "ce_loss") for v in run.series(key)[1]]
    _finish_axes(axes, "training loss per supervised token", "loss", drew, values)


def _draw_kl(axes, run: Run) -> None:
    steps, values = run.series("eval/kl_to_teacher", "evals")
    drew = _plot(axes, steps, values, "KL(teacher ‖ student)")
    _finish_axes(axes, "held-out KL to the teacher per token", "KL (nats)", drew, values)


def _draw_agreement(axes, run: Run) -> None:
    drew = _plot(axes, *run.series("eval/top1_agreement", "evals"), "top-1 agreement with the teacher")
    drew |= _plot(axes, *run.series("eval/exact_match", "evals"), "task accuracy (exact match)", linestyle="--")
    _finish_axes(axes, "held-out agreement and accuracy", "share", drew)
    axes.set_ylim(-0.02, 1.02)


def _draw_onpolicy_eval(figure, all_axes, run: Run) -> None:
    """KL and the teacher's NLL side by side: their scales differ by orders of magnitude."""
    for axes, (key, label) in zip(all_axes, (("eval/onpolicy_kl", "KL(student ‖ teacher) per token"),
                                             ("eval/teacher_nll_of_student", "teacher NLL per token"))):
        steps, values = run.series(key, "evals")
        drew = _plot(axes, steps, values, key)
        _finish_axes(axes, label, "nats", drew, values)
    figure.suptitle("held-out prompts answered by the student, scored by the teacher")


def _draw_rollouts(figure, all_axes, run: Run) -> None:
    """One panel per rollout metric of metrics.jsonl; shares on a 0-1 axis."""
    for axes, (key, label, unit) in zip(all_axes, ROLLOUT_METRICS):
        drew = _plot(axes, *run.series(key), label)
        _finish_axes(axes, label, unit, drew)
        if drew:  # one line per panel: its title names it
            axes.get_legend().remove()
        if unit == "share":
            axes.set_ylim(-0.02, 1.02)
    figure.suptitle("rollouts per log window (on-policy distillation)")


_DRAWERS = {"training loss": _draw_loss, "eval KL to the teacher": _draw_kl,
            "top-1 agreement and exact match": _draw_agreement}
# Plots of several panels: (columns, rows) and the drawer, which is given the figure and every panel.
_PANELLED = {ROLLOUT_TITLE: ((2, 2), _draw_rollouts), ONPOLICY_EVAL_TITLE: ((2, 1), _draw_onpolicy_eval)}


def plot_run(run: Run, out_dir: Path) -> dict[str, Path]:
    """Training loss terms, eval KL to the teacher, and top-1 agreement / exact match over steps,
    then, where the run has them, its rollout metrics and the on-policy evaluation: one PNG each in
    `out_dir` (named by `run_plots`). A plot the run no longer gets is removed. Returns {title: path}."""
    written = {}
    plots = run_plots(run)
    for title, name in plots.items():
        if title in _PANELLED:
            (columns, rows), draw = _PANELLED[title]
            figure, all_axes = _figure(columns, rows)
            draw(figure, all_axes, run)
        else:
            figure, (axes,) = _figure()
            _DRAWERS[title](axes, run)
        written[title] = _save(figure, out_dir / name)
    for title, name in {**ROLLOUT_PLOT, **ONPOLICY_EVAL_PLOT}.items():
        if title not in plots:  # an earlier report's PNG must not pass for this run's
            (out_dir / name).unlink(missing_ok=True)
    return written


def plot_comparison(runs: list[Run], labels: list[str], path: Path) -> Path:
    """Eval KL to the teacher and training loss of every run, overlaid, side by side; then the
    on-policy KL (on the student's own samples) where any run has it."""
    panels = [("eval/kl_to_teacher", "evals", "held-out KL to the teacher per token", "KL (nats)"),
              ("loss", "metrics", "training objective per supervised token", "loss")]
    if any(run.has_eval("eval/onpolicy_kl") for run in runs):
        panels.append(("eval/onpolicy_kl", "evals", "held-out KL(student ‖ teacher) on its own samples", "KL (nats)"))
    figure, all_axes = _figure(columns=len(panels))
    for axes, (key, source, title, ylabel) in zip(all_axes, panels):
        values, drew = [], False
        for run, label in zip(runs, labels):
            steps, run_values = run.series(key, source)
            drew |= _plot(axes, steps, run_values, label)
            values += run_values
        _finish_axes(axes, title, ylabel, drew, values)
    return _save(figure, path)

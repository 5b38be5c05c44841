"""The report of on-policy runs (`python -m trainer.report`), from hand-written run folders: the
rollout metrics and the on-policy evaluation over steps, and the comparison of on- and off-policy runs."""

from __future__ import annotations

import json
from itertools import dropwhile, takewhile
from pathlib import Path

import pytest
import yaml

from trainer.report import fmt, log_report_to_wandb, write_comparison, write_report
from trainer.report.plots import (
    ONPOLICY_EVAL_PLOT,
    ROLLOUT_PLOT,
    RUN_PLOTS,
    _draw_onpolicy_eval,
    _draw_rollouts,
    _figure,
)
from trainer.report.runs import ROLLOUT_METRICS, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
(ROLLOUT_PNG,) = ROLLOUT_PLOT.values()
(ONPOLICY_EVAL_PNG,) = ONPOLICY_EVAL_PLOT.values()


def _rollouts(step: int) -> dict:
    return {"rollout_tokens_per_s": 500.0 + 10 * step, "rollout_share": 0.30 + 0.01 * step,
            "rollout_mean_length": 20.0 + step, "rollout_truncation_rate": 0.25 - 0.05 * step, "rollout_rows": 8}


def _write_run(folder: Path, *, fraction: float, model_teacher: bool = True) -> Path:
    """A finished 4-step run as the job leaves it: metrics.jsonl, eval.jsonl, summary.json and its config.
    `fraction` > 0 logs rollouts; `model_teacher` evaluates the student's own samples (no cache)."""
    (folder / ".hydra").mkdir(parents=True)
    config = {"loss": {"kind": "rkl"}, "train": {"max_steps": 4},
              "onpolicy": {"fraction": fraction, "max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with (folder / "metrics.jsonl").open("w") as lines:
        for step in range(1, 5):
            record = {"step": step, "loss": 1.0 / step, "kd_loss": 1.0 / step, "ce_loss": 0.0, "lr": 1e-3,
                      "grad_norm": 0.5, "tokens_per_s": 1000.0}
            lines.write(json.dumps({**record, **(_rollouts(step) if fraction else {})}) + "\n")
    evals = []
    for step, scale in ((0, 1.0), (2, 0.6), (4, 0.4 if fraction else 0.5)):
        record = {"step": step, "eval/kl_to_teacher": 0.8 * scale, "eval/student_ce": 2.0 * scale,
                  "eval/top1_agreement": 1 - scale / 2, "eval/exact_match": 0.1, "eval/teacher_ce": 0.3}
        if model_teacher:
            record.update({"eval/onpolicy_kl": 1.2 * scale, "eval/teacher_nll_of_student": 2.4 * scale,
                           "eval/onpolicy_tokens": 96 + step})
        evals.append(record)
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    summary = {f"initial/{k}": v for k, v in evals[0].items() if k != "step"}
    summary.update({k: v for k, v in evals[-1].items() if k != "step"})
    summary.update({"train/steps": 4, "train/wall_s": 12.5, "train/tokens_per_s": 1000.0})
    if fraction:
        summary.update({"train/rollout_tokens_per_s": 530.0, "train/rollout_share": 0.325,
                        "train/rollout_mean_length": 22.5, "train/rollout_truncation_rate": 0.125})
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def assert_valid_png(path: Path, min_width: int = 100) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    height, width, _ = imread(path).shape
    assert height > 100 and width >= min_width


def _row(report: str, key: str) -> list[str]:
    line = next(line for line in report.splitlines() if f"(`{key}`)" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_an_on_policy_run_gets_a_rollout_plot_and_an_on_policy_evaluation_plot(tmp_path):
    run = _write_run(tmp_path / "onpolicy", fraction=0.5)
    report = write_report(run).read_text()
    for name in (*RUN_PLOTS.values(), ROLLOUT_PNG, ONPOLICY_EVAL_PNG):
        assert f"]({name})" in report
        assert_valid_png(run / name)
    assert_valid_png(run / ROLLOUT_PNG, min_width=1200)  # four panels, two wide
    assert_valid_png(run / ONPOLICY_EVAL_PNG, min_width=1200)  # KL and NLL side by side
    assert _row(report, "eval/onpolicy_kl")[1:3] == [fmt(1.2), fmt(0.48)]
    assert _row(report, "eval/teacher_nll_of_student")[1:3] == [fmt(2.4), fmt(0.96)]
    assert "The on-policy metrics average over 100 tokens the student wrote itself to the held-out prompts." in report
    assert "`onpolicy.fraction=0.5`" in report and "`onpolicy.max_new_tokens=16`" in report
    assert "| share of the window spent generating rollouts | 0.3400 |" in report  # step 4's
    assert "| rollouts in the window | 8 |" in report
    assert ("Rollouts: 32% of the training time went to generating, at 530 generated tokens/s (all ranks); "
            "mean length 22.5000 tokens, 0.1250 of them cut by `onpolicy.max_new_tokens`.") in report


def test_the_rollout_panels_draw_each_metric_of_metrics_jsonl_over_steps(tmp_path):
    run = load_run(_write_run(tmp_path / "onpolicy", fraction=1.0))
    figure, all_axes = _figure(columns=2, rows=2)
    _draw_rollouts(figure, all_axes, run)
    for axes, (key, label, _) in zip(all_axes, ROLLOUT_METRICS):
        (line,) = axes.lines
        assert list(line.get_xdata()) == [1, 2, 3, 4] and line.get_label() == label
        assert list(line.get_ydata()) == [_rollouts(step)[key] for step in range(1, 5)]


def test_the_on_policy_evaluation_panels_draw_kl_and_teacher_nll_over_the_evaluations(tmp_path):
    run = load_run(_write_run(tmp_path / "onpolicy", fraction=0.5))
    figure, all_axes = _figure(columns=2)
    _draw_onpolicy_eval(figure, all_axes, run)
    for axes, key, first in zip(all_axes, ("eval/onpolicy_kl", "eval/teacher_nll_of_student"), (1.2, 2.4)):
        (line,) = axes.lines
        assert line.get_label() == key and list(line.get_xdata()) == [0, 2, 4]
        assert list(line.get_ydata()) == pytest.approx([first, first * 0.6, first * 0.4])


def test_an_off_policy_run_has_no_rollout_plot_or_sampling_settings_but_its_on_policy_evaluation(tmp_path):
    run = _write_run(tmp_path / "offpolicy", fraction=0.0)
    (run / ROLLOUT_PNG).write_bytes(PNG_MAGIC)  # left by an earlier report in this folder
    report = write_report(run).read_text()
    assert not (run / ROLLOUT_PNG).exists() and ROLLOUT_PNG not in report
    assert_valid_png(run / ONPOLICY_EVAL_PNG)
    assert "`onpolicy.fraction=0.0`" in report and "onpolicy.max_new_tokens" not in report
    assert "generating rollouts" not in report and "Rollouts:" not in report
    assert _row(report, "eval/onpolicy_kl")[1:3] == [fmt(1.2), fmt(0.6)]


def test_a_run_with_a_teacher_cache_shows_no_on_policy_evaluation(tmp_path):
    run = _write_run(tmp_path / "cached", fraction=0.0, model_teacher=False)
    report = write_report(run).read_text()
    assert "onpolicy_kl" not in report and "teacher_nll_of_student" not in report
    assert "on-policy metrics average" not in report
    assert not (run / ONPOLICY_EVAL_PNG).exists()


def test_the_comparison_of_a_fraction_sweep_has_the_on_policy_columns(tmp_path):
    runs = [_write_run(tmp_path / name, fraction=fraction) for name, fraction in (("0", 0.0), ("1", 0.5))]
    table = [line for line in write_comparison(runs, tmp_path).read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:2] == ["run", "`onpolicy.fraction`"]
    assert "onpolicy_kl (↓)" in header and "teacher_nll_of_student (↓)" in header and "generating" in header
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([cell.strip().strip("*") for cell in line.strip("|").split("|")] for line in table[2:])}
    assert rows["`0`"]["`onpolicy.fraction`"] == fmt(0.0) and rows["`1`"]["`onpolicy.fraction`"] == fmt(0.5)
    assert rows["`0`"]["onpolicy_kl (↓)"] == fmt(0.6) and rows["`1`"]["onpolicy_kl (↓)"] == fmt(0.48)
    assert rows["`0`"]["generating"] == "—" and rows["`1`"]["generating"] == "32%"
    assert "**" + fmt(0.48) + "**" in table[3]  # the lower on-policy KL is the best of its column
    assert_valid_png(tmp_path / "comparison.png", min_width=1800)  # a third panel: the on-policy KL


def test_runs_without_on_policy_metrics_compare_as_before(tmp_path):
    runs = [_write_run(tmp_path / name, fraction=0.0, model_teacher=False) for name in ("a", "b")]
    text = write_comparison(runs, tmp_path).read_text()
    assert "onpolicy_kl" not in text and "generating" not in text
    from matplotlib.image import imread

    assert imread(tmp_path / "comparison.png").shape[1] < 1800  # two panels


class _RecordingRun:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((values, step))


@pytest.mark.parametrize("fraction, plots", [(0.5, {"rollouts", "onpolicy_eval"}), (0.0, {"onpolicy_eval"})])
def test_wandb_gets_the_on_policy_plots_and_summary_rows_the_run_has(tmp_path, fraction, plots):
    run = _write_run(tmp_path / "run", fraction=fraction)
    write_report(run)
    recording = _RecordingRun()
    log_report_to_wandb(recording, run)
    ((logged, step),) = recording.logged
    assert step == 4
    images = {key.removeprefix("report/") for key in logged if key != "report/summary"}
    assert images == {"loss", "eval_kl", "agreement", *plots}
    table = logged["report/summary"]
    assert [row[0] for row in table.data][-3:] == ["eval/onpolicy_kl", "eval/teacher_nll_of_student", "eval/teacher_ce"]


# ------------------------------------------------------------------ scripts/compare_runs.py, results_table.py
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _compare_runs(*run_dirs: Path) -> list[str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPTS / "compare_runs.py"), *map(str, run_dirs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _cells(lines: list[str], label: str) -> list[str]:
    line = next(line for line in lines if line.startswith(label))
    return line[len(label):].split()


def test_compare_runs_prints_lambda_and_the_on_policy_metrics_where_runs_have_them(tmp_path):
    lines = _compare_runs(_write_run(tmp_path / "off", fraction=0.0), _write_run(tmp_path / "on", fraction=0.5))
    assert _cells(lines, "on-policy λ (onpolicy.fraction)") == ["0.0000", "0.5000"]
    assert _cells(lines, "on-policy KL(s || t) (lower)") == ["1.2000", "0.6000", "0.4800"]
    assert _cells(lines, "teacher NLL of samples (lower)") == ["2.4000", "1.2000", "0.9600"]


def test_compare_runs_of_off_policy_runs_with_a_teacher_cache_prints_no_on_policy_rows(tmp_path):
    lines = _compare_runs(*(_write_run(tmp_path / name, fraction=0.0, model_teacher=False) for name in ("a", "b")))
    assert not [line for line in lines if "on-policy" in line or "samples" in line]
    assert _cells(lines, "KL(teacher || student) (lower)") == ["0.8000", "0.4000", "0.4000"]


def _results_table(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table", SCRIPTS / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "versions", lambda: "the test's versions")  # not deepspeed's import time
    return module


def _table_rows(text: str) -> dict[str, list[str]]:
    """The knowledge-transfer table's rows by their first cell (the header under 'header'): the
    page's first table only, since the across-tokenizers section below it has rows of the same names."""
    lines = list(takewhile(lambda line: line.startswith("|"), dropwhile(lambda line: not line.startswith("|"),
                                                                        text.splitlines())))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {"header": rows[0], **{f"{row[0]} {row[1]}": row for row in rows[2:]}}


def _table_run(tmp_path, kind: str, fraction: float, **summary) -> dict:
    base = {"train/steps": 4, "train/wall_s": 10.0, "eval/teacher_ce": 0.3, "eval/kl_to_teacher": 0.5,
            "eval/student_ce": 1.0, "eval/top1_agreement": 0.7, "eval/exact_match": 0.2,
            "initial/eval/kl_to_teacher": 0.9, "initial/eval/student_ce": 2.0, "initial/eval/top1_agreement": 0.4,
            "initial/eval/exact_match": 0.0}
    name = f"{kind}_onpolicy{fraction:g}" if fraction else kind
    return {"kind": kind, "fraction": fraction, "name": name, "dir": tmp_path / name, "summary": {**base, **summary},
            "wall_s": 12.0, "cpu_s": 20.0, "load": 1.0, "command": f"python -m trainer loss.kind={kind}"}


TEACHER = {"eval/teacher_ce": 0.3, "eval/exact_match": 0.9, "rows": 16, "tokens": 100}


def test_the_results_table_gains_lambda_and_on_policy_columns_where_runs_have_them(tmp_path, monkeypatch):
    from types import SimpleNamespace

    results_table = _results_table(monkeypatch)
    onpolicy = {"eval/onpolicy_kl": 0.8, "eval/teacher_nll_of_student": 1.5, "initial/eval/onpolicy_kl": 1.1,
                "initial/eval/teacher_nll_of_student": 2.5}
    runs = [_table_run(tmp_path, "rkl", 0.0, **onpolicy),
            _table_run(tmp_path, "rkl", 1.0, **{**onpolicy, "eval/onpolicy_kl": 0.4, "eval/teacher_nll_of_student": 1.2,
                                             "eval/kl_to_teacher": 0.45})]
    text = results_table.render(runs, TEACHER, SimpleNamespace(work=tmp_path), 0.0, 60.0, "python scripts/x.py")
    rows = _table_rows(text)
    assert rows["header"][1] == "λ (`onpolicy.fraction`)"
    assert rows["header"][-2:] == ["KL(student ‖ teacher) on its own samples ↓",
                                   "teacher NLL of the student's samples ↓"]
    assert rows["teacher "][-2:] == ["—", "—"]
    assert rows["student before training "][-2:] == ["1.1000", "2.5000"]
    assert rows["after KD (`rkl`) 0"][-2:] == ["0.8000", "1.5000"]
    assert rows["after KD (`rkl`) 1"][-2:] == ["**0.4000**", "**1.2000**"]
    assert "only `loss.kind` and `onpolicy.fraction` differ" in text
    assert "Lowest KL to the teacher: `rkl_onpolicy1`" in text
    assert "| `rkl_onpolicy1` | `python -m trainer loss.kind=rkl` |" in text


def test_the_results_table_of_off_policy_runs_with_a_teacher_cache_keeps_its_columns(tmp_path, monkeypatch):
    from types import SimpleNamespace

    results_table = _results_table(monkeypatch)
    runs = [_table_run(tmp_path, kind, 0.0) for kind in ("fkl", "rkl")]
    text = results_table.render(runs, TEACHER, SimpleNamespace(work=tmp_path), 0.0, 60.0, "python scripts/x.py")
    assert _table_rows(text)["header"] == ["model", *(label for _, label, _ in results_table.METRICS)]
    assert "onpolicy" not in text and "λ" not in text


@pytest.mark.parametrize("spec, expected", [("rkl", ("rkl", 0.0)), ("jsd@1", ("jsd", 1.0)), ("rkl@0.5", ("rkl", 0.5))])
def test_a_results_table_run_is_a_kind_with_an_optional_fraction(monkeypatch, spec, expected):
    results_table = _results_table(monkeypatch)
    assert results_table.parse_run(spec) == expected
    names = {"rkl": "rkl", "jsd@1": "jsd_onpolicy1", "rkl@0.5": "rkl_onpolicy0.5"}
    assert results_table.run_name(*expected) == names[spec]


@pytest.mark.parametrize("spec", ["kl", "rkl@2", "rkl@half"])
def test_a_results_table_run_it_cannot_read_is_one_line_saying_what_to_write(monkeypatch, spec):
    results_table = _results_table(monkeypatch)
    with pytest.raises(SystemExit) as refused:
        results_table.parse_run(spec)
    assert "write KIND or KIND@FRACTION" in str(refused.value) and "\n" not in str(refused.value)


def test_the_equal_wall_run_gets_the_steps_that_fit_in_the_on_policy_runs_training_time(monkeypatch):
    results_table = _results_table(monkeypatch)
    onpolicy = {"summary": {"train/wall_s": 30.0, "train/steps": 4}}
    offpolicy = {"summary": {"train/wall_s": 10.0, "train/steps": 4}}  # 2.5 s a step
    assert results_table.steps_in_wall_time(onpolicy, offpolicy) == 12
    assert results_table.steps_in_wall_time({"summary": {"train/wall_s": 0.1}}, offpolicy) == 1


def test_an_equal_wall_spec_names_a_run_and_an_off_policy_kind_among_the_runs(monkeypatch):
    results_table = _results_table(monkeypatch)
    specs = [("rkl", 0.0), ("rkl", 1.0)]
    assert results_table.parse_equal_wall("rkl@1=rkl", specs) == (("rkl", 1.0), "rkl")
    assert results_table.parse_equal_wall(None, specs) is None
    for spec in ("rkl@1=fkl", "jsd@1=rkl", "rkl@1"):  # fkl and jsd@1 are not among the runs; no kind
        with pytest.raises(SystemExit) as refused:
            results_table.parse_equal_wall(spec, specs)
        assert "write RUN=KIND" in str(refused.value) and "\n" not in str(refused.value)


def test_the_results_table_shows_the_equal_wall_comparison_and_how_its_steps_were_chosen(tmp_path, monkeypatch):
    from types import SimpleNamespace

    results_table = _results_table(monkeypatch)
    offpolicy = _table_run(tmp_path, "rkl", 0.0)  # 10 s for 4 steps
    onpolicy = _table_run(tmp_path, "rkl", 1.0, **{"train/wall_s": 30.0, "train/rollout_share": 0.6,
                                                   "train/rollout_mean_length": 31.25,
                                                   "train/rollout_truncation_rate": 0.125})
    matched = {**_table_run(tmp_path, "rkl", 0.0, **{"train/steps": 12, "train/wall_s": 29.0,
                                                     "eval/kl_to_teacher": 0.3}),
               "name": "rkl_equal_wall_rkl_onpolicy1"}
    text = results_table.render([offpolicy, onpolicy], TEACHER, SimpleNamespace(work=tmp_path), 0.0, 60.0,
                                "python scripts/x.py",
                                {"run": matched, "reference": onpolicy, "pace": offpolicy, "steps": 12})
    section = text.split("## At equal wall time")[1].split("## Runs")[0]
    assert "30 s / 2.500 s = 12 steps" in section and "it trained for 29 s" in section
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `")}
    assert rows["`rkl_equal_wall_rkl_onpolicy1`"][1:5] == ["0", "12", "29 s", "0.3000"]
    assert rows["`rkl_onpolicy1`"][1:4] == ["1", "4", "30 s"]
    runs = text.split("## Runs")[1]
    assert "| `rkl_onpolicy1` | `python -m trainer loss.kind=rkl` | 4 | 12 s | 30 s | 60% | 31.2, 12.5% |" in runs
    assert "| `rkl_equal_wall_rkl_onpolicy1` |" in runs
    assert "| `rkl` | `python -m trainer loss.kind=rkl` | 4 | 12 s | 10 s | — | — |" in runs  # off-policy: none


def test_a_results_table_on_policy_run_samples_as_the_on_policy_demo_does(monkeypatch):
    results_table = _results_table(monkeypatch)
    assert results_table.run_overrides("jsd", 1.0, None) == ["experiment=demo_onpolicy", "loss.kind=jsd",
                                                             "onpolicy.fraction=1", "logger=none"]
    assert results_table.run_overrides("rkl", 0.0, 12) == ["loss.kind=rkl", "train.max_steps=12", "logger=none"]

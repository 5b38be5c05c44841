"""Run reports and sweep comparisons (`python -m trainer.report`) from run folders the real CLI wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, tiny_overrides
from wandb_records import history_rows

from trainer.report import fmt, write_report
from trainer.report.plots import RUN_PLOTS

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINAL_KEYS = ("eval/kl_to_teacher", "eval/student_ce", "eval/top1_agreement", "eval/exact_match")


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory) -> Path:
    """Two finished runs side by side, as a sweep over loss.kind leaves them: `fkl` (with W&B, three
    evaluations) and `sft` (no KD term, evaluated only before and after training)."""
    root = tmp_path_factory.mktemp("sweep")
    _ok(run_cli(tiny_overrides(tiny, root / "fkl", root / "cache", "logger=wandb", "train.eval_every=2")))
    _ok(run_cli(tiny_overrides(tiny, root / "sft", root / "cache", "loss.kind=sft")))
    return root


def report_cli(*args) -> object:
    return run_cli([str(a) for a in args], module="trainer.report", timeout=120)


def assert_valid_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    height, width, channels = imread(path).shape
    assert height > 100 and width > 100 and channels in (3, 4)


def test_the_job_writes_its_report_and_logs_the_plots_and_a_summary_table_to_wandb(sweep):
    for name in ("fkl", "sft"):
        assert (sweep / name / "report.md").exists()
    (run_file,) = (sweep / "fkl").glob("wandb/offline-run-*/run-*.wandb")
    (logged,) = [row for row in history_rows(run_file) if "report/summary/_type" in row]
    for name in RUN_PLOTS.values():  # the reader flattens nested values: "report/loss/_type"
        key = f"report/{Path(name).stem.removeprefix('report_')}"
        assert logged[f"{key}/_type"] == "image-file"
        assert_valid_png(run_file.parent / "files" / logged[f"{key}/path"])
    summary = json.loads((sweep / "fkl" / "summary.json").read_text())
    onpolicy_rows = sum(key in summary for key in ("eval/onpolicy_kl", "eval/teacher_nll_of_student"))
    assert logged["report/summary/_type"] == "table-file" and logged["report/summary/nrows"] == 5 + onpolicy_rows
    assert logged["_step"] == 4 and "eval/kl_to_teacher" in logged  # with the final evaluation, not past it


def test_report_of_a_finished_run_names_its_final_metrics_and_draws_the_plots(sweep):
    run = sweep / "fkl"
    for name in ("report.md", *RUN_PLOTS.values()):  # whatever the job left: the CLI must make them
        (run / name).unlink(missing_ok=True)
    proc = _ok(report_cli(run))

    assert proc.stdout.strip().splitlines()[-1] == f"REPORT {(run / 'report.md').resolve()}"
    report = (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for key in FINAL_KEYS:
        row = next(line for line in report.splitlines() if f"(`{key}`)" in line)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1:3] == [fmt(summary[f"initial/{key}"]), fmt(summary[key])], row
    assert fmt(summary["eval/teacher_ce"]) in report
    assert "`loss.kind=fkl`" in report and "finished: 4 steps" in report
    for name in RUN_PLOTS.values():
        assert f"]({name})" in report
        assert_valid_png(run / name)


def test_report_of_a_hard_label_run_says_it_has_no_kd_term(sweep):
    path = write_report(sweep / "sft")
    report = path.read_text()
    assert "No KD term" in report and "| KD term (kd_loss) | — |" in report
    summary = json.loads((sweep / "sft" / "summary.json").read_text())
    assert fmt(summary["eval/exact_match"]) in report
    for name in RUN_PLOTS.values():
        assert_valid_png(sweep / "sft" / name)


def test_several_runs_get_their_reports_and_one_comparison_in_their_common_folder(sweep):
    proc = _ok(report_cli(sweep / "fkl", sweep / "sft"))

    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"REPORT {(sweep / 'comparison.md').resolve()}"
    assert [line for line in lines if line.startswith("REPORT ")][:2] == [
        f"REPORT {(sweep / name / 'report.md').resolve()}" for name in ("fkl", "sft")]
    table = [line for line in (sweep / "comparison.md").read_text().splitlines() if line.startswith("|")]
    header, rows = table[0], table[2:]
    assert "`loss.kind`" in header and "`logger.kind`" in header  # the two settings the runs differ in
    assert "`train.lr`" not in header  # one they share
    assert len(rows) == 2
    for row, name in zip(rows, ("fkl", "sft")):
        summary = json.loads((sweep / name / "summary.json").read_text())
        cells = [cell.strip().strip("*") for cell in row.strip("|").split("|")]
        assert cells[0] == f"`{name}`" and name in cells
        assert fmt(summary["eval/kl_to_teacher"]) in cells
    assert_valid_png(sweep / "comparison.png")


def test_a_sweep_folder_stands_for_its_runs_and_out_chooses_where_the_comparison_goes(sweep, tmp_path):
    proc = _ok(report_cli(sweep, "--out", tmp_path / "cmp"))
    assert proc.stdout.strip().splitlines()[-1] == f"REPORT {(tmp_path / 'cmp' / 'comparison.md').resolve()}"
    rows = [line for line in (tmp_path / "cmp" / "comparison.md").read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == 2


def test_a_run_stopped_early_reports_its_latest_evaluation(sweep, tmp_path):
    run = tmp_path / "stopped"
    shutil.copytree(sweep / "fkl", run, ignore=shutil.ignore_patterns("wandb", "checkpoints", "adapter"))
    (run / "summary.json").unlink()
    evals = (run / "eval.jsonl").read_text().splitlines()
    (run / "eval.jsonl").write_text("\n".join(evals[:2]) + "\n")  # before training and at step 2
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(metrics[:2]) + '\n{"step": 3, "lo')  # cut mid-write

    report = write_report(run).read_text()
    assert "not finished: last logged step 2 of 4" in report
    at_step_2 = json.loads(evals[1])
    assert at_step_2["step"] == 2
    row = next(line for line in report.splitlines() if "(`eval/kl_to_teacher`)" in line)
    assert fmt(at_step_2["eval/kl_to_teacher"]) in row
    for name in RUN_PLOTS.values():
        assert_valid_png(run / name)


def test_a_folder_that_is_not_a_run_is_one_line_of_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = report_cli(tmp_path / "empty")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distill: error: {tmp_path / 'empty'} is not a run directory (holds no metrics.jsonl); pass the folder "
        "a training job wrote (outputs/<date>/<time>/ or its hydra.run.dir), or a multirun folder holding such runs."]
    assert not proc.stdout.strip()


def test_a_report_that_cannot_be_drawn_is_a_warning_not_a_failed_job(tmp_path, caplog):
    from omegaconf import OmegaConf

    from trainer.outputs.tracking import Tracker

    cfg = OmegaConf.create({"logger": {"kind": "none"}, "train": {"max_steps": 1}})
    tracker = Tracker(tmp_path, cfg, {}, first_step=0, enabled=True)
    tracker.write_report()  # no metrics.jsonl: nothing to report
    tracker.close()
    assert f"make it again with: python -m trainer.report {tmp_path}" in caplog.text
    assert not (tmp_path / "report.md").exists()

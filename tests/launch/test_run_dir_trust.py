"""What a run directory can be trusted with (issue 17): one job in it at a time, an earlier run's
record left as it was by a job that is refused, files readable as the umask allows, and Hydra's own
failures reported in one line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, mount_tmpfs, run_cli, tiny_overrides

from trainer.files import honour_umask, write_atomically, write_text_atomically
from trainer.launch import rundir

WEIGHTS_LOADED = "parameters held per rank"  # logged once the teacher's weights are loaded


@pytest.fixture
def umask():
    """Set the process's umask for one test (jobs started from it inherit it); restored after."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


# ------------------------------------------------------------------------------- the umask
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_files_written_atomically_get_the_mode_the_umask_gives(umask, tmp_path, mask, mode):
    import torch
    from safetensors.torch import save_file

    umask(mask)
    write_text_atomically(tmp_path / "report.md", "# report\n")
    # safetensors replaces the temporary file with an owner-only one of its own.
    write_atomically(tmp_path / "shard.safetensors", lambda temporary: save_file({"x": torch.zeros(2)}, temporary))
    assert {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()} == {
        "report.md": mode, "shard.safetensors": mode}


def test_a_folder_saved_by_a_library_gets_the_umasks_mode(umask, tmp_path):
    import torch
    from safetensors.torch import save_file

    umask(0o022)
    (tmp_path / "adapter").mkdir()
    save_file({"x": torch.zeros(2)}, tmp_path / "adapter" / "adapter_model.safetensors")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # safetensors' own
    honour_umask(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["022", "077"])
def test_every_file_a_run_writes_has_the_mode_its_umask_gives(umask, tiny, tmp_path, mask):
    umask(mask)
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {str(path.relative_to(run_dir)): path.stat().st_mode & 0o777 for path in run_dir.rglob("*")
             if path.is_file()}
    assert {"adapter/adapter_model.safetensors", "provenance.json", "report.md", "report_loss.png"} <= set(modes)
    assert {path: mode for path, mode in modes.items() if mode != 0o666 & ~mask} == {}
    # The record Hydra would have written at the start is there, written once the job passed its checks.
    record = run_dir / ".hydra"
    assert yaml.safe_load((record / "config.yaml").read_text())["train"]["max_steps"] == 2
    assert "train.max_steps=2" in yaml.safe_load((record / "overrides.yaml").read_text())
    assert yaml.safe_load((record / "hydra.yaml").read_text())["hydra"]["output_subdir"] == ".hydra"
    assert "data: " in (run_dir / "__main__.log").read_text()  # the lines logged before the record, kept


# ---------------------------------------------------------------------- one job at a time
def test_a_second_lock_on_a_held_run_directory_is_refused_naming_its_holder(tmp_path):
    held, refusal = rundir._lock(tmp_path / "run")
    assert refusal is None
    try:
        again, refusal = rundir._lock(tmp_path / "run")
        assert again is None
        assert refusal.startswith(f"the run directory {tmp_path / 'run'} is in use by pid {os.getpid()} on ")
        assert "hydra.run.dir=<new folder>" in refusal
    finally:
        held.close()
    after, refusal = rundir._lock(tmp_path / "run")  # released: the next job takes it
    assert refusal is None
    after.close()


def test_a_run_directory_whose_holder_was_killed_can_be_taken_again(tmp_path):
    """As torchrun's restarted workers and a requeued SLURM job must: the OS drops a dead holder's lock."""
    holder = _hold_in_another_process(tmp_path / "run")
    assert rundir._lock(tmp_path / "run")[0] is None
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    handle, refusal = rundir._lock(tmp_path / "run")
    assert refusal is None
    handle.close()


def test_a_run_directory_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    handle, refusal = rundir._lock(tmp_path / "file")
    assert handle is None and refusal.startswith(f"cannot write to the run directory {tmp_path / 'file'} (")
    assert "hydra.run.dir=<folder>" in refusal


def _hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    """A process holding `run_dir`'s lock until killed, as a running job does."""
    code = textwrap.dedent(f"""
        import sys, time
        from trainer.launch import rundir
        handle, refusal = rundir._lock(__import__("pathlib").Path({str(run_dir)!r}))
        print("held" if refusal is None else refusal, flush=True)
        time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _run_dir_of_an_earlier_run(run_dir: Path) -> dict[Path, bytes]:
    """The files a finished run leaves, Hydra's record and log among them; returns their bytes."""
    (run_dir / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).write_text(f"# the earlier run's {name}\n")
    (run_dir / "__main__.log").write_text("[the earlier run's log]\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n')
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_job_into_a_run_directory_another_job_holds_stops_every_rank_in_one_line(tiny, tmp_path, nproc):
    run_dir = tmp_path / "run"
    before = _run_dir_of_an_earlier_run(run_dir)
    holder = _hold_in_another_process(run_dir)
    try:
        proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache"), nproc=nproc, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distill: error: ")]
    assert proc.returncode == 2 if nproc == 1 else proc.returncode != 0, proc.stderr[-3000:]
    assert len(errors) == nproc, proc.stderr[-3000:]  # every rank stops, each with the same line
    assert all(f"the run directory {run_dir} is in use by pid {holder.pid} on " in line for line in errors)
    assert WEIGHTS_LOADED not in proc.stdout + proc.stderr
    assert all(path.read_bytes() == content for path, content in before.items()), "a file of the run was changed"


# ------------------------------------------------------------- a refused job changes nothing
@pytest.mark.slow
def test_a_refused_job_leaves_the_earlier_runs_record_and_log_as_they_were(tiny, tmp_path):
    run_dir = tmp_path / "run"
    before = _run_dir_of_an_earlier_run(run_dir)
    proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "loss.kind=jsd", "loss.beta=1.5"), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("distill: error: loss.beta=1.5 is out of range")
    assert {path: path.read_bytes() for path in before} == before
    assert {path.name for path in run_dir.iterdir()} == {".hydra", "__main__.log", "metrics.jsonl", rundir.LOCK_FILE}


def test_the_held_log_writes_nothing_until_the_job_passed_its_checks(tmp_path):
    handler = rundir.HeldFileHandler(tmp_path / "job.log")
    logger = logging.getLogger("test_run_dir_trust.held")
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    try:
        logger.info("checked the inputs")
        assert not (tmp_path / "job.log").exists()
        handler.stop_holding()
        logger.info("loading weights")
        handler.flush()
        assert (tmp_path / "job.log").read_text() == "checked the inputs\nloading weights\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


# ------------------------------------------------------- Hydra's own failures, in one line
def _one_line_refusal(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("distill: error: ")]) == 1, proc.stderr
    return lines[-1]


@pytest.mark.parametrize("override, quoted", [
    ("logger.name=a=b", """'logger.name="a=b"'"""),
    ("logger.name=~/runs", """'logger.name="~/runs"'"""),
])
def test_an_override_hydra_cannot_read_stops_in_one_line_saying_how_to_quote_it(tmp_path, override, quoted):
    proc = run_cli([f"hydra.run.dir={tmp_path / 'run'}", override], timeout=120)
    line = _one_line_refusal(proc)
    assert line.startswith(f"distill: error: Hydra cannot read the override '{override}' (") and quoted in line, line
    assert not (tmp_path / "run").exists()


def test_a_run_directory_that_is_a_file_stops_in_one_line(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    for run_dir in (tmp_path / "run", tmp_path / "run" / "sub"):
        line = _one_line_refusal(run_cli([f"hydra.run.dir={run_dir}"], timeout=120))
        assert line == (f"distill: error: the run directory {run_dir} cannot be used: {tmp_path / 'run'} is a file, "
                        "not a folder; choose another with hydra.run.dir=<folder>.")


def test_a_sweep_directory_that_is_a_file_stops_in_one_line(tmp_path):
    (tmp_path / "sweep").write_text("not a folder")
    line = _one_line_refusal(run_cli(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "loss.kind=fkl,jsd"],
                                     timeout=120))
    assert line.endswith("is a file, not a folder; choose another with hydra.sweep.dir=<folder>."), line


def test_a_read_only_run_directory_stops_in_one_line(tmp_path):
    disk = tmp_path / "read_only"
    if not mount_tmpfs(disk, "ro,size=64k"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        line = _one_line_refusal(run_cli([f"hydra.run.dir={disk / 'run'}"], timeout=120))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert line == (f"distill: error: the run directory {disk / 'run'} cannot be used: {disk} is read-only; "
                    "choose another with hydra.run.dir=<folder>.")


def test_a_folder_the_user_may_not_write_is_unusable(tmp_path, monkeypatch):
    """Permissions as a user other than root sees them (root may write anywhere but a read-only mount)."""
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert rundir.unusable_reason(tmp_path / "a" / "b") == f"{tmp_path} is read-only"
    assert rundir.unusable_reason(tmp_path.parent / "elsewhere") is None

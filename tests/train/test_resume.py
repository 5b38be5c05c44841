"""Never lose a run: exact resume, atomic checkpoints, elastic restarts and the non-finite guard.

Faults come from tests/fault_injection.py (a SIGKILL at a chosen point, an ENOSPC from a write,
a NaN loss on one rank), so each test knows exactly which checkpoint the restart must find.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_ok, mount_tmpfs, outside_any_launcher, read_jsonl, run_cli, tiny_overrides
from safetensors.torch import load_file

from trainer.launch.rundir import LOCK_FILE

pytestmark = pytest.mark.slow

FAULTS_ENV = {"PYTHONPATH": str(REPO / "tests")}
# LoRA dropout draws random numbers every step: a resume that lost the RNG states would show.
EXACT = ("train.max_steps=6", "checkpoint.every=3", "peft.dropout=0.1", "logger=wandb")


def with_fault(fault: str) -> dict:
    return {**FAULTS_ENV, "DISTILL_TEST_FAULT": fault}


def run_faulty(args, fault: str, nproc: int = 1):
    return run_cli(args, nproc=nproc, env=with_fault(fault), module="fault_injection")


def digests(stdout: str) -> dict[int, str]:
    return {int(rank): digest for rank, digest in re.findall(r"PARAM_DIGEST rank=(\d+) ([0-9a-f]{64})", stdout)}


def checkpoint_tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def published(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


@pytest.mark.parametrize("nproc,stage", [(1, 0), (2, 2)], ids=["1-rank-zero0", "2-ranks-zero2"])
def test_a_run_killed_after_a_checkpoint_and_resumed_is_the_run_never_interrupted(tiny, tmp_path, nproc, stage):
    cache = tmp_path / "cache"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = (*EXACT, f"deepspeed=zero{stage}", f"train.micro_batch_size={4 // nproc}")
    uninterrupted = run_faulty(tiny_overrides(tiny, straight, cache, *extra), "none", nproc)
    assert_ok(uninterrupted)

    killed = run_faulty(tiny_overrides(tiny, resumed, cache, *extra), "kill_after_checkpoint=3", nproc)
    assert killed.returncode != 0
    assert [m["step"] for m in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3]
    rerun = run_faulty(tiny_overrides(tiny, resumed, cache, *extra), "none", nproc)
    assert_ok(rerun)
    assert re.search(r"resumed from \S*/step_00000003/\S* at step 3\n", rerun.stdout), rerun.stdout[-3000:]

    # Same loss at every step, bit for bit, and the same weights at the end.
    losses = [(m["step"], m["loss"], m["kd_loss"], m["grad_norm"]) for m in read_jsonl(resumed / "metrics.jsonl")]
    assert losses == [(m["step"], m["loss"], m["kd_loss"], m["grad_norm"]) for m in read_jsonl(straight / "metrics.jsonl")]
    assert digests(rerun.stdout) == digests(uninterrupted.stdout)
    assert len(set(digests(rerun.stdout).values())) == 1, "every rank holds the same trainable weights"
    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, resumed)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, resumed)]
    assert summaries[0]["eval/kl_to_teacher"] == summaries[1]["eval/kl_to_teacher"]
    assert summaries[0]["eval/onpolicy_kl"] == summaries[1]["eval/onpolicy_kl"]  # the same rollouts, seeded by row
    assert summaries[0]["train/tokens_seen"] == summaries[1]["train/tokens_seen"]
    run_ids = {p.name.rsplit("-", 1)[1] for p in (resumed / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1, "the resumed job continues the same W&B run"
    state = json.loads((resumed / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["wandb_run_id"] in run_ids


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_chosen(tiny, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = tiny_overrides(tiny, run_dir, cache, "train.max_steps=6", "checkpoint.every=2")
    killed = run_faulty(args, "kill_while_saving=4")
    assert killed.returncode == -signal.SIGKILL
    assert published(run_dir) == "step_00000002"
    partial = run_dir / "checkpoints" / "step_00000004.partial"
    assert partial.is_dir() and any(partial.iterdir()), "the kill came after some files of step 4 were written"
    assert not (partial / "trainer_state.json").exists()

    rerun = run_cli(args)
    assert_ok(rerun)
    assert re.search(r"resumed from \S*/step_00000002/\S* at step 2\n", rerun.stdout), rerun.stdout[-3000:]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert published(run_dir) == "step_00000006"
    assert checkpoint_tags(run_dir) == ["step_00000002", "step_00000004", "step_00000006"], "no leftovers"


def test_only_the_newest_checkpoints_are_kept(tiny, tmp_path):
    run_dir = tmp_path / "run"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=7", "checkpoint.every=2",
                                     "checkpoint.keep=2")))
    assert checkpoint_tags(run_dir) == ["step_00000006", "step_00000007"]
    assert published(run_dir) == "step_00000007"
    files = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000007").iterdir())
    # Stage 0 keeps the optimizer state inside DeepSpeed's model states file.
    assert files == ["manifest.json", "mp_rank_00_model_states.pt", "rank0_state.pt", "trainer_state.json"]


def test_a_checkpoint_of_another_run_is_refused_by_name_before_weights_load(tiny, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, cache, "train.max_steps=2", "checkpoint.every=1")))
    before = _run_files(run_dir)
    cases = {
        "student.path": [f"student.path={tiny['student_tied']}"],
        "peft.r": ["peft.r=4"],
        "data.train": [f"data.train={tiny['eval']}"],
        "teacher.path": [f"teacher.path={tiny['student']}"],
    }
    for key, extra in cases.items():
        proc = run_cli(tiny_overrides(tiny, run_dir, cache, "train.max_steps=4", *extra))
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"distill: error: checkpoint {run_dir}/checkpoints/step_00000002 was made with {key}="), last
        assert "resume=never" in last and "Traceback" not in proc.stderr
    assert _run_files(run_dir) == before, "the checkpoints, metrics, adapter and summary are as they were"
    # Starting afresh is the user's call: resume=never in a new directory trains the other student.
    assert_ok(run_cli(tiny_overrides(tiny, tmp_path / "other", cache, "train.max_steps=2", "resume=never",
                                     f"student.path={tiny['student_tied']}")))


def _run_files(run_dir: Path) -> dict:
    """The run's files, but the lock file, which names whichever job last held the directory."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def test_resume_from_a_checkpoint_path_of_another_run_directory(tiny, tmp_path):
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    assert_ok(run_cli(tiny_overrides(tiny, first, cache, "train.max_steps=4", "checkpoint.every=2")))
    proc = run_cli(tiny_overrides(tiny, tmp_path / "second", cache, "train.max_steps=4",
                                  f"resume={first / 'checkpoints' / 'step_00000002'}"))
    assert_ok(proc)
    assert "at step 2" in proc.stdout
    assert [m["step"] for m in read_jsonl(tmp_path / "second" / "metrics.jsonl")] == [3, 4]
    bad = run_cli(tiny_overrides(tiny, tmp_path / "third", cache, f"resume={tmp_path}"))
    assert bad.returncode == 2
    assert "is not a checkpoint" in bad.stderr.strip().splitlines()[-1]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = tiny_overrides(tiny, run_dir, cache, "train.max_steps=6", "checkpoint.every=2")
    proc = run_faulty(args, "no_space_while_saving=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error: writing checkpoint step_00000004 in "), last
    assert "No space left on device" in last and "step_00000002 is intact" in last
    assert "Traceback" not in proc.stderr
    assert published(run_dir) == "step_00000002"
    assert checkpoint_tags(run_dir) == ["step_00000002"], "the failed save's files are removed"
    rerun = run_cli(args)
    assert_ok(rerun)
    assert "at step 2" in rerun.stdout


def test_a_real_full_filesystem_while_saving_keeps_the_previous_checkpoint(tiny, tmp_path):
    """The same on a real, small filesystem (a tmpfs, where this machine lets us mount one)."""
    probe = tmp_path / "probe"
    assert_ok(run_cli(tiny_overrides(tiny, probe, tmp_path / "cache", "train.max_steps=1")))
    size = sum(p.stat().st_size for p in (probe / "checkpoints").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, f"size={int(size * 2.5) // 1024}k"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "checkpoints").symlink_to(disk)
        proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=8", "checkpoint.every=1",
                                      "checkpoint.keep=0"))
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert re.match(r"distill: error: writing checkpoint step_0000000(\d) in \S+ failed \(", last), last
        # Whichever file met the full disk (torch.save's own words for it are "unexpected pos N vs M").
        assert re.search(rf"failed \(No space left on device; \d+ MiB free on the filesystem at {disk.resolve()}\)",
                         last), last
        failed = int(re.search(r"step_0000000(\d)", last).group(1))
        assert f"step_{failed - 1:08d} is intact" in last
        assert published(run_dir) == f"step_{failed - 1:08d}"
        assert not list(disk.glob("*.partial"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_while_exporting_keeps_the_final_checkpoint_and_the_same_command_exports_it(tiny, tmp_path):
    """adapter/ on a real filesystem too small for its weights (a tmpfs, where this machine lets us mount one)."""
    run_dir, disk = tmp_path / "run", tmp_path / "disk"
    if not mount_tmpfs(disk, "size=32k"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    args = tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=2")
    try:
        run_dir.mkdir()
        (run_dir / "adapter").symlink_to(disk)
        proc = run_cli(args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"distill: error: writing {run_dir}/adapter failed \(No space left on device; \d+ MiB "
                            rf"free on the filesystem at {disk.resolve()}\), so its files are incomplete; the final "
                            r"checkpoint is intact: free some space and run the same command again, which writes "
                            r"them from it without training\.", last), last
        assert "Traceback" not in proc.stderr and "RESULT" not in proc.stdout
        assert published(run_dir) == "step_00000002"
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    (run_dir / "adapter").unlink()  # space freed: adapter/ is now a folder on a disk with room
    rerun = run_cli(args)
    assert_ok(rerun)
    assert "at step 2" in rerun.stdout
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_torchrun_restarts_a_job_whose_rank_was_killed_and_it_resumes_from_its_checkpoint(tiny, tmp_path):
    """--max-restarts 1 and no hydra.run.dir: the restarted workers find the first ones' run directory."""
    args = [a for a in tiny_overrides(tiny, tmp_path / "unused", tmp_path / "cache", "train.max_steps=300",
                                      "checkpoint.every=20") if not a.startswith("hydra.run.dir=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "trainer", *args]
    env = {**outside_any_launcher(os.environ), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    workdir = tmp_path / "work"
    workdir.mkdir()
    launcher = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    latest = _wait_for_file(workdir, "outputs/*/*/checkpoints/latest", launcher)
    victim = _worker_pids(launcher.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    output = launcher.communicate(timeout=600)[0]
    assert launcher.returncode == 0, output[-4000:]
    run_dirs = list(workdir.glob("outputs/*/*"))
    assert run_dirs == [latest.parents[1]], "the restarted job used the first one's run directory"
    assert re.search(r"resumed from \S*/step_\d{8}/\S* at step \d+", output), output[-4000:]
    steps = [m["step"] for m in read_jsonl(run_dirs[0] / "metrics.jsonl")]
    assert steps == list(range(1, 301)), "every step logged once: the redone steps replaced the lost ones"
    assert json.loads((run_dirs[0] / "summary.json").read_text())["train/steps"] == 300


def _wait_for_file(root: Path, pattern: str, launcher, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        assert launcher.poll() is None, launcher.communicate()[0][-4000:]
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {root} after {timeout} s")


def _worker_pids(launcher_pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True)
    return sorted(int(pid) for pid in children.stdout.split())


def _free_port() -> int:
    from trainer.launch.distributed import free_port

    return free_port()


def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_faulty(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=5",
                                     "train.micro_batch_size=2"), "nan_loss=1@3", nproc=2)
    assert_ok(proc)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1]
    assert all(m["loss"] == m["loss"] for m in metrics[3:]), "the weights stayed finite after the skipped step"
    assert "step 3: a loss or gradient was NaN/Inf on some rank; every rank skipped this update" in proc.stdout
    ranks = digests(proc.stdout)
    assert len(ranks) == 2 and len(set(ranks.values())) == 1, "both replicas skipped the same update"
    assert json.loads((run_dir / "summary.json").read_text())["train/skipped_steps"] == 1


def test_skips_between_log_points_are_counted_when_the_window_is_logged(tiny, tmp_path):
    """The skip is decided on the device; the host reads the counts only at log points."""
    run_dir = tmp_path / "run"
    proc = run_faulty(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=8", "train.log_every=4"),
                      "nan_loss=0@2")
    assert_ok(proc)
    assert [(m["step"], m["skipped_steps"]) for m in read_jsonl(run_dir / "metrics.jsonl")] == [(4, 1), (8, 1)]
    assert ("steps 1-4: a loss or gradient was NaN/Inf on some rank; every rank skipped 1 of these updates "
            "(0 in a row, 1 in all)") in proc.stdout


def test_too_many_non_finite_steps_in_a_row_stop_the_job_keeping_the_last_good_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=20", "checkpoint.every=2",
                          "train.max_nonfinite_steps=3")
    proc = run_faulty(args, "nan_loss=0@3-")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error: the loss or gradients were NaN/Inf for 3 steps in a row (steps 3-5)"), last
    # Step 4's checkpoint holds step 2's weights: the skipped updates changed nothing.
    assert "the trainable weights they started from are finite, largest |w| " in last
    assert (f"the newest checkpoint, {run_dir}/checkpoints/step_00000004, holds those same weights (skipped updates "
            "change nothing), so resuming it replays these steps; start afresh with a lower train.lr") in last
    assert "Traceback" not in proc.stderr
    assert published(run_dir) == "step_00000004"
    assert checkpoint_tags(run_dir) == ["step_00000002", "step_00000004"]
    assert [m["skipped_steps"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 0, 1, 2]
    assert json.loads((run_dir / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())[
        "nonfinite_in_a_row"] == 2

    # Run again as it was, the run of skips goes on from the checkpoint's 2: one more stops it.
    again = run_faulty(args, "nan_loss=0@3-")
    assert again.returncode == 2, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error: the loss or gradients were NaN/Inf for 3 steps in a row (steps 3-5)"), last
    assert [m["skipped_steps"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [0, 0, 1, 2], "step 5 stopped it"
    assert not (run_dir / "adapter").exists() and "RESULT" not in again.stdout


def test_a_final_evaluation_that_is_not_finite_fails_the_job_without_an_adapter(tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_faulty(tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=2", "checkpoint.every=1"),
                      "nan_final_eval")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("distill: error: the final evaluation gave eval/kl_to_teacher=nan, eval/student_ce=nan, "
                           "so no adapter/ and no final checkpoint were written; the trainable weights are finite, "
                           "largest |w| "), last
    assert (f"the last update's loss and gradients were finite; the newest checkpoint is "
            f"{run_dir}/checkpoints/step_00000001; start afresh with a lower train.lr") in last
    assert "Traceback" not in proc.stderr and "RESULT" not in proc.stdout
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    assert published(run_dir) == "step_00000001"

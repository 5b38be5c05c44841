"""Launching: torchrun on one and two "nodes", a real one-node SLURM (sbatch, the submitit launcher,
a preemption that requeues and resumes), and an Optuna sweep.

The SLURM here is `scripts/local_slurm.sh`: Debian's slurmctld and slurmd on this machine (installed
on first use, as root). Jobs run the trainer exactly as on a cluster, on CPU ranks."""

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
import yaml
from conftest import REPO, assert_ok, outside_any_launcher, read_jsonl, run_cli, tiny_overrides

pytestmark = pytest.mark.slow

LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"


def overrides(tiny, tmp_path, *extra: str) -> list[str]:
    """The tiny job without a fixed run directory: the launcher under test chooses it."""
    return [o for o in tiny_overrides(tiny, tmp_path, tmp_path / "cache", *extra) if not o.startswith("hydra.run.dir=")]


def job_env(**extra: str) -> dict:
    return {**outside_any_launcher(os.environ), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "DISTILL_PYTHON": sys.executable, **extra}


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_log(path: Path) -> str:
    """A SLURM output file. A task stopped mid-write (a preempted progress bar) can leave half a
    UTF-8 character behind, so undecodable bytes are replaced rather than failing the read."""
    return path.read_text(errors="replace")


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [row["step"] for row in read_jsonl(path)] if path.exists() else []


# ------------------------------------------------------------------------------------ torchrun
def test_two_torchrun_agents_with_nnodes_2_form_one_two_rank_job(tiny, tmp_path):
    from trainer.launch.distributed import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    env = job_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint, RDZV_ID=f"test-{tmp_path.name}")
    command = ["bash", str(REPO / "scripts" / "torchrun.sh"), *tiny_overrides(tiny, tmp_path / "run", tmp_path / "cache")]
    agents = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert logged_steps(tmp_path / "run") == [1, 2, 3, 4]


def test_a_signal_to_one_rank_stops_every_rank_at_one_checkpoint_and_the_rerun_resumes(tiny, tmp_path):
    """Outside SLURM nothing requeues: the job exits with status 75 and the same command resumes."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny, run_dir, tmp_path / "cache", "train.max_steps=400")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "trainer", *args]
    launcher = subprocess.Popen(command, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, 300, "three logged steps")
    os.kill(_worker_pids(launcher.pid)[-1], signal.SIGUSR1)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0
    stopped_at = logged_steps(run_dir)[-1]
    assert 3 <= stopped_at < 400, output[-3000:]
    # Only rank 1 was signalled; both ranks stopped after the same step.
    assert output.count(f"stopped by SIGUSR1 after step {stopped_at}") == 2, output[-3000:]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()

    assert_ok(run_cli(args, nproc=2))
    assert logged_steps(run_dir) == list(range(1, 401))
    assert json.loads((run_dir / "summary.json").read_text())["train/steps"] == 400


def _free_port() -> int:
    from trainer.launch.distributed import free_port

    return free_port()


def _worker_pids(launcher_pid: int) -> list[int]:
    """torchrun's worker processes, rank 0 first (started first)."""
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(launcher_pid)], capture_output=True, text=True)
    pids = sorted(int(line.split()[0]) for line in children.stdout.splitlines() if "-m trainer" in line)
    assert len(pids) == 2, children.stdout
    return pids


# --------------------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM for this module; left running if it was already up."""
    already_up = subprocess.run(["squeue"], env=_slurm_env(), capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(LOCAL_SLURM), "up"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    yield _slurm_env()
    if not already_up:
        subprocess.run(["bash", str(LOCAL_SLURM), "down"], capture_output=True, timeout=120)


def _slurm_env() -> dict:
    state = os.environ.get("DISTILL_SLURM_DIR", "/tmp/distill-slurm")
    return {**outside_any_launcher(os.environ), "SLURM_CONF": f"{state}/slurm.conf"}


def sbatch(slurm_env, workdir: Path, *args: str) -> str:
    """Submit scripts/slurm.sbatch as a user would, with this machine's shape given on the command
    line (which overrides the script's #SBATCH lines): 2 CPU tasks, no GPU."""
    command = ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
               "--time=15", f"--chdir={workdir}", str(REPO / "scripts" / "slurm.sbatch"), *args]
    submitted = subprocess.run(command, env=job_env(**slurm_env), capture_output=True, text=True, check=True)
    return submitted.stdout.strip().split(";")[0]


def job_state(slurm_env, job_id: str) -> dict:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm_env, capture_output=True, text=True)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def release_if_held(slurm_env, job_id: str) -> dict:
    """The job's state, after letting it start now if SLURM holds it as requeued jobs are held (for a
    while, reason BeginTime): on a cluster that is lost in queueing time, here it only slows tests."""
    state = job_state(slurm_env, job_id)
    if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env=slurm_env)
    return state


def wait_until_done(slurm_env, job_id: str, timeout: float) -> dict:
    def finished():
        state = release_if_held(slurm_env, job_id)
        return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    return wait_for(finished, timeout, f"SLURM job {job_id} to end", poll=1.0)


def test_sbatch_runs_a_two_rank_distillation_job_in_its_slurm_run_directory(slurm, tiny, tmp_path):
    job_id = sbatch(slurm, tmp_path, *overrides(tiny, tmp_path))
    state = wait_until_done(slurm, job_id, 600)
    log = job_log(tmp_path / f"slurm-{job_id}.out")
    assert state["JobState"] == "COMPLETED", log[-3000:]
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}.0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    assert "RESULT eval/kl_to_teacher=" in log


@pytest.mark.parametrize("recipients", [(), ("--batch",)], ids=["every-task", "batch-shell-only"])
def test_a_job_signalled_before_its_time_limit_is_requeued_and_resumes_from_its_checkpoint(slurm, tiny, tmp_path,
                                                                                           recipients):
    """`scancel --signal=USR2` is what `#SBATCH --signal=USR2@120` sends at the time limit; with
    `--batch`, what `--signal=B:USR2@120` sends (the script passes it on to the ranks)."""
    job_id = sbatch(slurm, tmp_path, *overrides(tiny, tmp_path, "train.max_steps=300", "logger=wandb"))
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}.0"
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, 300, "three logged steps")
    subprocess.run(["scancel", "--signal=USR2", *recipients, job_id], env=slurm, check=True)
    state = wait_until_done(slurm, job_id, 600)
    log = job_log(tmp_path / f"slurm-{job_id}.out")
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert state["Restarts"] == "1", log[-3000:]

    steps = logged_steps(run_dir)
    stopped_at = int(log.split("stopped by SIGUSR2 after step ")[1].split(";")[0])
    assert 3 <= stopped_at < 300
    assert steps == list(range(1, 301)), "the requeued job went on from its checkpoint, not from step 0"
    assert re.search(rf"resumed from \S*/step_{stopped_at:08d}/\S* at step {stopped_at}\n", log), log[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["train/steps"] == 300
    # Both starts wrote into one W&B run.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_a_submitit_multirun_sends_each_sweep_point_to_slurm_as_its_own_job(slurm, tiny, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = ("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=1",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep_dir}")
    proc = run_cli(["-m", *launcher, *overrides(tiny, tmp_path, "loss.temperature=1.0,2.0")],
                   env={**slurm, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert_ok(proc)
    # One SLURM job per point: submitit submits them as the tasks <array id>_0 and _1 of one array.
    array_tasks = {path.name for path in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", path.name)}
    assert len(array_tasks) == 2, array_tasks
    for point, temperature in (("0", 1.0), ("1", 2.0)):
        config = yaml.safe_load((sweep_dir / point / ".hydra" / "config.yaml").read_text())
        assert config["loss"]["temperature"] == temperature
        summary = json.loads((sweep_dir / point / "summary.json").read_text())
        assert summary["train/steps"] == 4


def test_a_signalled_submitit_job_is_resubmitted_by_submitit_and_resumes(slurm, tiny, tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = ("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=2",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={sweep_dir}")
    command = [sys.executable, "-m", "trainer", "-m", *launcher, *overrides(tiny, tmp_path, "train.max_steps=300")]
    sweep = subprocess.Popen(command, cwd=REPO, env=job_env(**slurm), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    run_dir = sweep_dir / "0"
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, 300, "three logged steps")
    (job_id,) = [p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+(_0)?", p.name)]
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm, check=True)
    while sweep.poll() is None:  # the sweep waits for its job, resubmitted by submitit
        release_if_held(slurm, job_id)
        time.sleep(1)
    output = sweep.stdout.read()
    assert sweep.returncode == 0, output[-3000:]
    assert job_state(slurm, job_id)["Restarts"] == "1"
    assert logged_steps(run_dir) == list(range(1, 301))
    task_log = job_log(sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out")
    assert re.search(r"resumed from \S*/step_\d{8}/\S* at step \d+\n", task_log), task_log[-3000:]


# -------------------------------------------------------------------------------------- Optuna
def test_an_optuna_sweep_of_three_trials_reports_its_best_trial(tiny, tmp_path):
    sweep_dir = tmp_path / "optuna"
    proc = run_cli(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep_dir}",
                    *overrides(tiny, tmp_path, "logger=wandb")], env={"WANDB_MODE": "offline"}, timeout=900)
    assert_ok(proc)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"train.lr", "loss.temperature", "loss.kind", "loss.ce_weight"}
    trial_values = [json.loads((sweep_dir / str(n) / "summary.json").read_text())["eval/kl_to_teacher"] for n in range(3)]
    assert results["best_value"] == pytest.approx(min(trial_values))
    assert "Best parameters" in proc.stdout + proc.stderr
    # The trials share one W&B group, named after the sweep (read from the offline runs' record files).
    for n in range(3):
        (record,) = (sweep_dir / str(n) / "wandb").glob("offline-run-*/run-*.wandb")
        assert f"sweep {sweep_dir}".encode() in record.read_bytes()

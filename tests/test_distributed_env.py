"""Who a process is under each launcher: torchrun's variables, SLURM's (one task per GPU), or none."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from trainer.cli import _slurm_run_dir
from trainer.distributed import fill_launcher_env

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher or SLURM variables during the test, and the whole environment as it was after:
    fill_launcher_env writes os.environ itself, and a RANK or WORLD_SIZE left behind would make every
    later job in this pytest process wait for ranks that never come."""
    with mock.patch.dict(os.environ):
        for name in [*LAUNCHER_VARS, *(n for n in os.environ if n.startswith("SLURM_"))]:
            monkeypatch.delenv(name, raising=False)
        yield monkeypatch


def test_an_srun_task_takes_its_rank_from_slurm_and_a_port_from_the_job_id(clean_env):
    for name, value in dict(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_LOCALID="1",
                            SLURM_STEP_NUM_TASKS="8", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_NTASKS="8",
                            MASTER_ADDR="node07").items():
        clean_env.setenv(name, value)
    fill_launcher_env()
    assert {n: os.environ[n] for n in LAUNCHER_VARS} == dict(
        RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", MASTER_ADDR="node07", MASTER_PORT="24242")
    assert _slurm_run_dir() == "outputs/slurm-4242.0"


def test_a_batch_script_running_python_itself_is_one_process_whatever_the_allocation(clean_env):
    for name, value in dict(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="16").items():
        clean_env.setenv(name, value)
    fill_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert _slurm_run_dir() == "outputs/slurm-7.batch"


def test_torchrun_variables_win_over_slurm_ones(clean_env):
    for name, value in dict(RANK="3", WORLD_SIZE="4", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2").items():
        clean_env.setenv(name, value)
    fill_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


def test_outside_slurm_there_is_no_slurm_run_directory(clean_env):
    assert _slurm_run_dir() is None

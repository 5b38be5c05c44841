"""Who a process is under each launcher: torchrun's variables, SLURM's (one task per GPU), or none."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from conftest import LAUNCHER_VARIABLES, outside_any_launcher

from trainer.launch.cli import _slurm_run_dir
from trainer.launch.distributed import fill_launcher_env


@pytest.fixture
def clean_env():
    """No launcher or SLURM variables during the test, and the whole environment as it was after:
    fill_launcher_env writes os.environ itself, and a RANK or WORLD_SIZE left behind would make every
    later job in this pytest process wait for ranks that never come."""
    with mock.patch.dict(os.environ, outside_any_launcher(os.environ), clear=True):
        yield os.environ


def test_an_srun_task_takes_its_rank_from_slurm_and_a_port_from_the_job_id(clean_env):
    clean_env.update(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_PROCID="5", SLURM_LOCALID="1",
                     SLURM_STEP_NUM_TASKS="8", SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_NTASKS="8",
                     MASTER_ADDR="node07")
    fill_launcher_env()
    assert {n: os.environ[n] for n in LAUNCHER_VARIABLES} == dict(
        RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_WORLD_SIZE="4", MASTER_ADDR="node07", MASTER_PORT="24242")
    assert _slurm_run_dir() == "outputs/slurm-4242.0"


def test_a_batch_script_running_python_itself_is_one_process_whatever_the_allocation(clean_env):
    clean_env.update(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="16")
    fill_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert _slurm_run_dir() == "outputs/slurm-7.batch"


def test_torchrun_variables_win_over_slurm_ones(clean_env):
    clean_env.update(RANK="3", WORLD_SIZE="4", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2")
    fill_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "4")


def test_outside_slurm_there_is_no_slurm_run_directory(clean_env):
    assert _slurm_run_dir() is None

"""Process-group setup shared by 1 and N ranks.

`python -m trainer`, `torchrun ... -m trainer` and `srun python -m trainer` take the same path:
every process gets the environment torchrun would have given it (from SLURM's variables under
srun; rank 0 of 1 on a free loopback port alone), so no code below here asks "am I distributed?".
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import socket
import subprocess

import torch
import torch.distributed as dist

from trainer.launch.cpu_memory import keep_freed_cpu_memory
from trainer.ranks import RankInfo


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill_launcher_env() -> None:
    """Give every launch the variables torchrun sets: from SLURM's when srun (or submitit) started
    one task per GPU, else those of a single process. torchrun's own always win. Idempotent."""
    if "RANK" in os.environ:
        return
    if _slurm_tasks() > 1:
        _fill_from_slurm()
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())


def _slurm_tasks() -> int:
    """Tasks in this srun step. SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script's own shell
    sees the allocation's task count too, but it is one process, not a rank of a job."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))


def _fill_from_slurm() -> None:
    env = os.environ
    env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env["SLURM_LOCALID"], WORLD_SIZE=str(_slurm_tasks()))
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_slurm_host()
    # Every task must agree on the port without talking first: derive it from the job id, so
    # that the jobs of a sweep sharing a node use different ports.
    env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def init_distributed() -> RankInfo:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPU. Idempotent."""
    fill_launcher_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # SLURM's --gpus-per-task shows each task only its own GPU.
        device = torch.device("cuda", local_rank if torch.cuda.device_count() > 1 else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_cpu_memory()
    if not dist.is_initialized():
        _import_what_would_pin_the_group()
        import deepspeed  # imported late: it prints accelerator banners at import time

        from trainer.launch.console import announce_comm_op_build, prints_to_log

        backend = "nccl" if device.type == "cuda" else "gloo"
        if _restarted_by_torchrun_on_its_store():
            _join_on_this_attempts_keys(backend, device)
        announce_comm_op_build(device.type)
        with prints_to_log("deepspeed.comm"):  # "... built successfully" belongs in the log file
            deepspeed.init_distributed(dist_backend=backend)  # adopts the group when it already exists
        # One group for the life of the process: DeepSpeed caches its groups at module level,
        # so the jobs of a sequential sweep share this one rather than re-creating it.
        atexit.register(_destroy_at_exit)
    return RankInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _import_what_would_pin_the_group() -> None:
    """`torch.distributed.nn.functional` takes `group=group.WORLD` as a default argument, evaluated
    when it is first imported (by `transformers.modeling_utils`, through torch.distributed._shard).
    Imported after the group exists, those defaults hold it: destroy_process_group() then leaves its
    gloo threads running, and the interpreter's teardown, freeing the group late, sometimes aborts
    the process (SIGABRT, "terminate called without an active exception": seen in CI, a job's exit
    status 2 turned into -6). Imported first, the defaults hold the no-group sentinel."""
    importlib.import_module("torch.distributed.nn.functional")


def _restarted_by_torchrun_on_its_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "TORCHELASTIC_RESTART_COUNT" in os.environ


def _join_on_this_attempts_keys(backend: str, device: torch.device) -> None:
    """torchrun keeps one store for every restart of its workers (rendezvous store sharing) and
    the workers' keys carry no attempt number, so restarted workers can read the addresses the
    dead ones published and fail with "Connection refused" (seen in a full test run here). Prefixing
    every key with the attempt keeps each attempt's keys its own."""
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=30))
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    dist.init_process_group(backend, store=dist.PrefixStore(f"distill/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            device_id=device if device.type == "cuda" else None)


def finish_together() -> None:
    """Every rank reaches the end of the job before any returns to its launcher."""
    if dist.is_initialized():
        dist.barrier()


def _destroy_at_exit() -> None:
    """Every group destroyed while the interpreter is whole. destroy_process_group() forgets them,
    but a group object someone still holds keeps its gloo threads running until the interpreter's
    teardown frees it, which sometimes aborts the process (see _import_what_would_pin_the_group).
    DeepSpeed's own destroy also drops the groups it keeps in module globals."""
    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    gc.collect()  # engines and optimizers left in reference cycles hold groups too

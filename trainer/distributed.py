"""Process-group setup shared by 1 and N ranks.

`python -m trainer` and `torchrun ... -m trainer` take the same path: a single process gets the
environment torchrun would have given it (rank 0 of 1, a free loopback port), so no code below
here ever asks "am I distributed?".
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_single_process_env() -> None:
    """Give a plain `python -m trainer` the variables torchrun sets."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())


def init_distributed() -> RankInfo:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPU. Idempotent."""
    _fill_single_process_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import deepspeed  # imported late: it prints accelerator banners at import time

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        # One group for the life of the process: DeepSpeed caches its groups at module level,
        # so the jobs of a sequential sweep share this one rather than re-creating it.
        atexit.register(_destroy_at_exit)
    return RankInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def finish_together() -> None:
    """Every rank reaches the end of the job before any returns to its launcher."""
    if dist.is_initialized():
        dist.barrier()


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value, src: int = 0):
    """Rank `src`'s value on every rank (e.g. the run directory it chose)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor of counters over ranks, on whatever device gloo/NCCL needs."""
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values)
    return values.cpu()


def in_lockstep(items: list, run, filler, collective: bool) -> None:
    """`run(item)` for each of this rank's items.

    When the model's forwards are collective (a ZeRO-3 teacher gathers each layer from every rank),
    a rank that finished its own items keeps calling `filler()` until the busiest rank is done, or
    the others would wait for it forever."""
    count = len(items)
    if collective:
        total = torch.tensor([count], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        count = int(total.item())
    for index in range(count):
        if index < len(items):
            run(items[index])
        else:
            filler()

"""What ranks know about themselves and do together: `RankInfo`, broadcasts, sums, lockstep loops."""

from __future__ import annotations

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


def broadcast_object(value, src: int = 0):
    """Rank `src`'s value on every rank (e.g. the run directory it chose)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _for_backend(values: torch.Tensor) -> torch.Tensor:
    """`values` where the process group communicates: the GPU under NCCL, as they are under gloo."""
    return values.cuda() if dist.get_backend() == "nccl" else values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor of counters over ranks, on whatever device gloo/NCCL needs."""
    values = _for_backend(values)
    dist.all_reduce(values)
    return values.cpu()


def max_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The elementwise max of `values` over ranks, in place; alone, `values` as they are, with no
    collective. Left on the device under NCCL: asynchronous to the host."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            values = values.cuda()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_floats(value: float) -> list[float]:
    """One float from every rank, in rank order."""
    values = _for_backend(torch.tensor([value], dtype=torch.float64))
    gathered = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values)
    return [float(v) for v in gathered]


def in_lockstep(items: list, run, filler, collective: bool) -> None:
    """`run(item)` for each of this rank's items.

    When the model's forwards are collective (a ZeRO-3 teacher gathers each layer from every rank),
    a rank that finished its own items keeps calling `filler()` until the busiest rank is done, or
    the others would wait for it forever."""
    count = len(items)
    if collective:
        total = _for_backend(torch.tensor([count], dtype=torch.int64))
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        count = int(total.item())
    for index in range(count):
        if index < len(items):
            run(items[index])
        else:
            filler()

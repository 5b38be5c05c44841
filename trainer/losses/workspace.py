"""``[C, V]`` buffers that every chunk of one fused-loss call writes into, instead of fresh ones.

A chunk's logits, softmaxes and gradient are each one ``[C, V]`` tensor, allocated anew for every
chunk of every step. On CPU that is costly in a way no profiler of operators shows: glibc hands
out blocks of more than 32 MiB (the default chunk at V = 32k is exactly 32 MiB in float32) as
fresh ``mmap``s, so every chunk zero-fills its pages again; the end-to-end benchmark spent up to a
third of its CPU time in the kernel, on page faults. Reusing one set of buffers across a call's
chunks leaves one fault per page per step, and none once the CPU rank keeps what a step frees
(:mod:`trainer.launch.cpu_memory`, for buffers under 32 MiB). On GPU the caching allocator already reuses memory;
sharing buffers there only keeps the footprint flat.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkWorkspace:
    """Named buffers of at most ``chunk_rows`` rows, reused by each chunk of one call.

    A buffer holds its values only until the next chunk takes it again: callers must be done with a
    chunk's tensors (sums and gradients moved into accumulators) before asking for the next one."""

    def __init__(self, chunk_rows: int):
        self.chunk_rows = chunk_rows
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised ``[rows, columns]`` view of the buffer ``name`` (contiguous: leading rows)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[1] != columns or buffer.dtype != dtype or buffer.shape[0] < rows:
            buffer = torch.empty((max(rows, self.chunk_rows), columns), dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:rows]

    def like(self, name: str, tensor: Tensor) -> Tensor:
        """A buffer of ``tensor``'s ``[rows, columns]`` shape, dtype and device."""
        return self.take(name, tensor.shape[0], tensor.shape[1], tensor.dtype, tensor.device)

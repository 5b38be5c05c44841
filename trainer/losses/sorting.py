"""Rows sorted in descending order, fast on CPU: the exact sorts of the cross-tokenizer losses.

PyTorch's CPU sort of a 2-D float tensor is a comparison sort that moves each value with its index.
NumPy's (2.x) is a quicksort, vectorised on x86 CPUs with AVX2 or AVX-512 (x86-simd-sort), and
where the columns are wanted too, one integer sort gives both: each float32 value's order-preserving
integer (its bit pattern, the bits after the sign flipped where the sign is set) in the high half of
an int64, its column in the low half. So CPU rows go to NumPy, which reads the tensor's memory in
place, a block of rows to each of PyTorch's intra-op threads (NumPy's sorts release the GIL). On a
2-core x86 CPU, ``[128, 151937]`` float32 probabilities (median of 5, 2 threads):
``sort(descending=True)`` 0.69 s, :func:`sort_descending` 0.13 s, :func:`sorted_descending` (values
only) 0.058 s; on 1 thread 1.35, 0.25 and 0.10 s. GPUs' sorts are radix sorts already and keep
``torch.sort``.

The values are the same as ``sort``'s; among equal values (+0 and −0 too) the order may differ:
none of the losses depends on it, equal values compare alike wherever they sit. NaN has no place
in a probability and none is promised here.
"""

from __future__ import annotations

import functools
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import Tensor

# The halves of an int64 as two int32s: its column in the low one, its sort key in the high one.
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)
# Below this many values a thread's start (about 0.1 ms) costs more than the sort it would share.
MIN_VALUES_PER_THREAD = 1 << 16


def sort_descending(values: Tensor) -> tuple[Tensor, Tensor]:
    """``values.sort(dim=-1, descending=True)`` of a ``[N, V]`` float tensor: its rows sorted
    descending ``[N, V]`` and the columns each value came from ``[N, V]`` int64. Differentiable in
    ``values`` like ``sort`` (the sorted values are gathered from it)."""
    if not _numpy_sort_applies(values):
        return values.sort(dim=-1, descending=True)
    ordered = torch.empty_like(values, memory_format=torch.contiguous_format)
    columns = torch.empty(values.shape, dtype=torch.long)
    target_values, target_columns = ordered.detach().numpy(), columns.numpy()
    sort_row = _sort_packed_row if values.dtype == torch.float32 else _sort_row_by_argsort
    _each_row(values.detach(), lambda row, source: sort_row(source, target_values[row], target_columns[row]))
    return (values.gather(-1, columns) if values.requires_grad else ordered), columns


def sorted_descending(values: Tensor, *, width: int | None = None) -> Tensor:
    """The first of :func:`sort_descending`'s results only, ``[N, V]``, or zero-padded on the right
    to ``[N, width]``; without the ``[N, V]`` int64 columns where ``values`` needs no gradient."""
    padding = (width or values.shape[-1]) - values.shape[-1]
    if values.requires_grad or not _numpy_sort_applies(values):
        ordered = sort_descending(values)[0]
        return torch.nn.functional.pad(ordered, (0, padding)) if padding else ordered
    ordered = values.new_empty(values.shape[0], values.shape[-1] + padding)
    ordered[:, values.shape[-1]:] = 0
    target = ordered.numpy()
    _each_row(values, lambda row, source: np.copyto(target[row, :source.shape[0]], np.sort(source)[::-1]))
    return ordered


def _numpy_sort_applies(values: Tensor) -> bool:
    # float32 and float64 only: NumPy has no bfloat16, and the losses sort in float32 or wider.
    return values.device.type == "cpu" and values.dim() == 2 and values.dtype in (torch.float32, torch.float64)


def _sort_packed_row(source: np.ndarray, values: np.ndarray, columns: np.ndarray) -> None:
    """One float32 row sorted descending into ``values`` and ``columns``, by one int64 sort of its
    order-preserving integers (high half) beside their columns (low half)."""
    bits = source.view(np.int32)
    # Without negative numbers (probabilities) the bit patterns order as the floats do already; a −0
    # among them reads as the least integer and so sorts last, beside the +0s it equals.
    negatives = source.size > 0 and source.min() < 0
    pairs = np.empty((source.shape[0], 2), dtype=np.int32)
    pairs[:, _LOW] = _columns(source.shape[0])
    pairs[:, _HIGH] = _order_preserving(bits) if negatives else bits
    pairs.view(np.int64).sort(axis=0)
    descending = pairs[::-1]
    columns[:] = descending[:, _LOW]
    values.view(np.int32)[:] = _order_preserving(descending[:, _HIGH]) if negatives else descending[:, _HIGH]


@functools.lru_cache(maxsize=8)
def _columns(width: int) -> np.ndarray:
    return np.arange(width, dtype=np.int32)


def _sort_row_by_argsort(source: np.ndarray, values: np.ndarray, columns: np.ndarray) -> None:
    columns[:] = np.argsort(source)[::-1]
    np.take(source, columns, out=values)


def _order_preserving(bits: np.ndarray) -> np.ndarray:
    """Integers that order as the floats whose bit patterns ``bits`` holds: the bits after the sign
    flipped in negative numbers (whose patterns grow as the numbers fall). Its own inverse."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


def _each_row(values: Tensor, sort_row: Callable[[int, np.ndarray], None]) -> None:
    """``sort_row(i, values[i])`` for each row (as NumPy), the rows split into one block per thread.
    Row by row, so a thread's scratch is one row's, not a block's."""
    source = values.contiguous().numpy()

    def sort_block(rows: range) -> None:
        for row in rows:
            sort_row(row, source[row])

    blocks = _row_blocks(values.shape[0], max(1, min(torch.get_num_threads(), values.numel() // MIN_VALUES_PER_THREAD)))
    if len(blocks) == 1:
        sort_block(blocks[0])
        return
    with ThreadPoolExecutor(max_workers=len(blocks) - 1) as pool:
        others = [pool.submit(sort_block, rows) for rows in blocks[1:]]
        sort_block(blocks[0])
        for block in others:
            block.result()  # re-raises a thread's error here


def _row_blocks(rows: int, threads: int) -> list[range]:
    """``rows`` split into at most ``threads`` contiguous blocks of near-equal size (one, empty, for no rows)."""
    threads = max(1, min(threads, rows))
    bounds = [rows * i // threads for i in range(threads + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(threads)]

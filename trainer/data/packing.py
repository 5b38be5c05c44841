"""Packed sequences: several training rows in one, with no attention across them.

Rows padded to the longest of their batch waste the compute spent on padding; with rows of mixed
length that is often a third or more. `data.pack=true` fills rows of up to `train.seq_len` tokens
with whole documents (best fit, longest first) once, before training.

What keeps documents apart: position ids restart at 0 at each document, and the model is called
with them and without a padding mask, which is transformers' packed-sequence format: its mask
builders then let each token attend only within its own document (eager, SDPA, flex), and
FlashAttention-2 runs variable-length kernels. `check_documents_stay_apart` proves it on each
model at start-up. A document's first token is never a target of the previous document's last one:
its label is ignored.
"""

from __future__ import annotations

import torch

from trainer.data.batching import collate
from trainer.losses.settings import IGNORE_INDEX


class PackedRow:
    """Documents laid end to end: `input_ids` and `labels` as in a TokenizedRow, plus each document's length."""

    __slots__ = ("input_ids", "labels", "doc_lengths", "index", "truncated")

    def __init__(self, documents: list):
        self.input_ids = [token for doc in documents for token in doc.input_ids]
        self.labels = []
        for doc in documents:
            self.labels += [IGNORE_INDEX] + list(doc.labels[1:])
        self.doc_lengths = [len(doc.input_ids) for doc in documents]
        self.index = -1  # no single source row: a teacher cache cannot be read for it
        self.truncated = any(doc.truncated for doc in documents)


def pack_rows(rows: list, seq_len: int) -> list[PackedRow]:
    """Best fit, longest first: each row goes to the fullest packed row it still fits in.

    Deterministic for the same rows. Free space is kept in buckets by size, so placing a row scans
    at most `seq_len` buckets, not every packed row."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    bins: list[list] = []
    free_by_size: list[list[int]] = [[] for _ in range(seq_len + 1)]  # free tokens -> packed row numbers
    for i in order:
        length = len(rows[i].input_ids)
        size = next((s for s in range(length, seq_len + 1) if free_by_size[s]), None)
        if size is None:
            bins.append([])
            target, free = len(bins) - 1, seq_len
        else:
            target, free = free_by_size[size].pop(), size
        bins[target].append(rows[i])
        free_by_size[free - length].append(target)
    return [PackedRow(documents) for documents in bins]


def collate_packed(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate`, plus `position_ids` that restart at 0 at each document (and for the padding)."""
    batch = collate(rows, pad_id)
    positions = torch.zeros_like(batch["input_ids"])
    for r, row in enumerate(rows):
        start = 0
        for length in row.doc_lengths:
            positions[r, start:start + length] = torch.arange(length)
            start += length
        positions[r, start:] = torch.arange(positions.shape[1] - start)
    batch["position_ids"] = positions
    return batch


def document_lengths(batch: dict) -> list[int]:
    """Every document's length in a collated batch, packed (from its position ids) or not (its rows)."""
    real = batch["attention_mask"].sum(dim=1).tolist()
    if "position_ids" not in batch:
        return real
    lengths = []
    for positions, length in zip(batch["position_ids"], real):
        starts = (positions[:length] == 0).nonzero().squeeze(1).tolist() + [length]
        lengths += [end - start for start, end in zip(starts, starts[1:])]
    return lengths

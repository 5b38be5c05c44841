"""Which rows each rank trains on at each step.

The rows of optimizer step `s` depend only on the seed and the global batch size, never on how
they are split: one rank with micro-batch 4 sees the same four rows as two ranks with micro-batch
2. Step `s` is computed directly (no iterator state), so resuming at step `s` needs no replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow
from trainer.losses.settings import IGNORE_INDEX


def collate(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `rows` to the longest one.

    Returns LongTensors `input_ids`, `attention_mask` (1 real, 0 pad) and `labels`
    (IGNORE_INDEX at pads, not shifted), each `[B, T]` with T the longest row, and `row_index`
    `[B]`, each row's position in its source (-1 for rows that never came from one).
    """
    if pad_id is None:
        raise DataError("the tokenizer has no pad token; add a \"pad_token\" to the model folder's tokenizer_config.json "
                        "(any token will do: padding is masked out), or load it with trainer.models.load_tokenizer")
    longest = max((len(row.input_ids) for row in rows), default=0)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        input_ids[index, :length] = torch.tensor(row.input_ids, dtype=torch.long)
        attention_mask[index, :length] = 1
        labels[index, :length] = torch.tensor(row.labels, dtype=torch.long)
    row_index = torch.tensor([row.index for row in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "row_index": row_index}


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on `device`, copied without making the host wait where it can."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def epoch_order(num_rows: int, epoch: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def step_row_ids(step: int, num_rows: int, rows_per_step: int, seed: int) -> list[int]:
    """The `rows_per_step` row indices of optimizer step `step`, walking shuffled epochs."""
    start = step * rows_per_step
    ids = []
    while len(ids) < rows_per_step:
        epoch, offset = divmod(start + len(ids), num_rows)
        order = epoch_order(num_rows, epoch, seed)
        ids.extend(order[offset : offset + rows_per_step - len(ids)])
    return ids


def micro_batches_for_step(step: int, rows: list, rank: int, world_size: int, micro_batch_size: int,
                           grad_accum: int, seed: int, pad_id: int, collate_rows=collate) -> list[dict]:
    """This rank's `grad_accum` collated micro-batches for optimizer step `step` (see
    :func:`micro_batch_rows_for_step`)."""
    return [collate_rows(slot_rows, pad_id) for _, slot_rows in
            micro_batch_rows_for_step(step, rows, rank, world_size, micro_batch_size, grad_accum, seed)]


def micro_batch_rows_for_step(step: int, rows: list, rank: int, world_size: int, micro_batch_size: int,
                              grad_accum: int, seed: int) -> list[tuple[list[int], list]]:
    """This rank's `grad_accum` micro-batches of step `step`, uncollated: each one's rows and their
    positions among the step's rows.

    Micro-batch k of the step covers global positions [k·W·B, (k+1)·W·B); rank r takes its
    B-row slice of that, so the rows of one accumulation slot are the same for any W×B split, and
    a row's position names it in the step whatever the split."""
    per_slot = world_size * micro_batch_size
    ids = step_row_ids(step, len(rows), per_slot * grad_accum, seed)
    slots = []
    for slot in range(grad_accum):
        first = slot * per_slot + rank * micro_batch_size
        positions = list(range(first, first + micro_batch_size))
        slots.append((positions, [rows[ids[i]] for i in positions]))
    return slots


def eval_batches(rows: list, rank: int, world_size: int, batch_size: int, pad_id: int,
                 collate_rows=collate) -> list[dict]:
    """This rank's share of the held-out rows, padded with fully masked rows so that every rank
    runs the same number of forwards (ZeRO-3 gathers are collective: a rank that stops early
    would hang the others). `collate_rows(rows, pad_id)`: how a batch is collated."""
    mine = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)
    filler = _masked_copy(rows[0])
    mine = mine + [filler] * (per_rank - len(mine))
    return [collate_rows(mine[i : i + batch_size], pad_id) for i in range(0, per_rank, batch_size)]


def _masked_copy(row):
    """A row that adds nothing to any sum: no label, and (across tokenizers) no span."""
    from dataclasses import replace

    # A teacher's spans are its mask across tokenizers: the filler keeps the teacher's ids, not its spans.
    teacher = None if row.teacher is None else replace(row.teacher, spans=[])
    return replace(row, labels=[IGNORE_INDEX] * len(row.labels), teacher=teacher)

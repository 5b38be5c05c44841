"""A teacher cache for distillation across tokenizers: built once, it serves students of any tokenizer.

Built with `python -m trainer.cache loss.cross_tokenizer=gold` (or `uld`: the method does not
matter to the cache). Each row is tokenised the way the teacher's side of every pairing tokenises
it (`teacher_side_row` in trainer/data/pairing.py: its own bos/eos, its own chat template), which
depends on the teacher alone; the teacher runs over those rows and, at each position that predicts
a supervised teacher token, its top-k is stored beside the token's index in the row, its id and the
characters it covers in the teacher's text (trainer/cache/store.py). The folder keeps the teacher's
tokenizer, so a job needs no teacher folder at all (`teacher.path=null`).

A student job aligns its own tokens with the teacher's by character offsets, as it does with a live
teacher (trainer/data/pairing.py), and its spans name teacher positions; :class:`CrossCachedTeacher`
finds each of them in the cache by its row and token index, checks that the cached token is the
one the pairing has there (the same tokenizer and data), and hands the loss a
:class:`~trainer.losses.topk_teacher.TopKTeacher`, whose rows it rebuilds from the top-k. The
stored offsets make the cache readable without the tokenizer too: each entry says which characters
of the text its distribution is about.
"""

from __future__ import annotations

import contextlib

import torch

from trainer.cache.store import CacheError, CacheReader, RowTopK
from trainer.data.pairing import TeacherSideRow, teacher_side_row
from trainer.data.sources import read_rows
from trainer.data.tokenize import special_ids
from trainer.losses.settings import IGNORE_INDEX
from trainer.losses.topk_teacher import TopKTeacher
from trainer.models.teacher import Teacher

TOKENIZER_FOLDER = "tokenizer"
"""Where a cross-tokenizer cache keeps the teacher's tokenizer, inside its folder."""


def teacher_side_splits(sources: dict, tokenizer, seq_len: int) -> dict[str, list[TeacherSideRow]]:
    """Each split's rows as the teacher's side of a pairing holds them, in source order."""
    specials = special_ids(tokenizer)
    return {name: [teacher_side_row(row, tokenizer, seq_len, origin, specials=specials)
                   for origin, row in read_rows(source, key=f"data.{name}")]
            for name, source in sources.items()}


def with_positions(entries: RowTopK, side: TeacherSideRow) -> RowTopK:
    """A row's cached top-k with what locates each position: the token it predicts (index, id) and
    that token's characters in the teacher's text."""
    ids, labels = side.row.input_ids, side.row.labels
    predicted = [index for index in range(1, len(ids)) if labels[index] != IGNORE_INDEX]
    if len(predicted) != entries.ids.shape[0]:
        raise ValueError(f"{entries.ids.shape[0]} cached positions for {len(predicted)} supervised teacher tokens; "
                         "batch_top_k and the row disagree.")
    return RowTopK(entries.logprobs, entries.ids, entries.target_logprobs,
                   token_positions=torch.tensor(predicted, dtype=torch.int32),
                   token_ids=torch.tensor([ids[index] for index in predicted], dtype=torch.int32),
                   char_offsets=torch.tensor([side.offsets[index] for index in predicted],
                                             dtype=torch.int32).reshape(-1, 2))


class CrossCachedTeacher(Teacher):
    """The teacher of one data split, read from a cross-tokenizer cache at the teacher positions a
    pair batch's spans name. No model runs. `reading`: the context each read runs in (the step's is
    the data-loading stopwatch, as for :class:`~trainer.cache.teacher.CachedTeacher`)."""

    def __init__(self, reader: CacheReader, split: str, device: torch.device, reading=None):
        if not reader.cross_tokenizer:
            raise CacheError(f"the teacher cache in {reader.folder} was built for the teacher's tokenizer only; build "
                             "one with python -m trainer.cache loss.cross_tokenizer=gold (any method) for this job.")
        self.reader, self.split, self.device = reader, split, device
        self.reading = reading if reading is not None else contextlib.nullcontext()

    def states(self, batch: dict, host_batch: dict) -> TopKTeacher:
        """The batch's cached teacher over its ``B·T_t`` flat teacher positions, on the device."""
        with self.reading:
            return self.read(host_batch).to(self.device)

    def read(self, host_batch: dict) -> TopKTeacher:
        """Every cached position of the batch's rows laid out at ``r·T_t + (token index − 1)``; the
        spans' positions checked to be there and to predict the pairing's tokens."""
        teacher_ids = host_batch["teacher_input_ids"].cpu()
        batch_size, width = teacher_ids.shape
        top_k = self.reader.top_k
        logprobs = torch.zeros(batch_size * width, top_k, dtype=getattr(torch, self.reader.manifest.dtype))
        ids = torch.full((batch_size * width, top_k), -1, dtype=torch.long)
        target_ids = torch.full((batch_size * width,), -1, dtype=torch.long)
        target_logprobs = torch.zeros(batch_size * width, dtype=torch.float32)
        for b, index in enumerate(host_batch["row_index"].cpu().tolist()):
            if index < 0:  # a filler row: nothing of it is read
                continue
            row = self.reader.row(self.split, index)
            predicted = row.token_positions.long()
            inside = predicted < width
            flat = b * width + predicted[inside] - 1
            logprobs[flat], ids[flat] = row.logprobs[inside], row.ids[inside].long()
            target_ids[flat], target_logprobs[flat] = row.token_ids[inside].long(), row.target_logprobs[inside]
        self._check_spans(host_batch["spans"], teacher_ids.reshape(-1), target_ids, host_batch["row_index"], width)
        return TopKTeacher(logprobs, ids, target_ids, target_logprobs, self.reader.manifest.vocab_size)

    def _check_spans(self, spans, teacher_ids: torch.Tensor, target_ids: torch.Tensor, row_index, width: int) -> None:
        needed = torch.cat([spans.teacher_first, spans.teacher_inner])
        if needed.numel() == 0:
            return
        expected = teacher_ids.index_select(0, needed + 1)
        wrong = (target_ids.index_select(0, needed) != expected).nonzero()
        if wrong.numel():
            position = int(needed[wrong[0, 0]])
            row = int(row_index[position // width])
            raise CacheError(
                f"row {row} of the {self.split} data: the teacher cache in {self.reader.folder} has no entry for the "
                f"teacher's token {position % width + 1} as this job tokenises the row (another teacher tokenizer, "
                "data or train.seq_len); rebuild it with python -m trainer.cache and this job's overrides.")

    def evaluation_terms(self, batch: dict, host_batch: dict):
        raise NotImplementedError("across tokenizers the evaluation reads states() over the aligned spans "
                                  "(trainer/train/cross_tokenizer.py)")

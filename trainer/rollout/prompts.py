"""Rows for on-policy distillation: a tokenised row's prompt, the row rewritten with the student's
rollout as its response, and which rows of a step are rewritten with which seed.

Which rows and which seeds are drawn from (seed, step, row) by a hash, not from a stateful RNG: every
rank and every micro-batching asks about its own rows and gets the answer a single process would,
and a resumed run regenerates the same rollouts.
"""

from __future__ import annotations

import hashlib

from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow
from trainer.losses.settings import IGNORE_INDEX

# Different tags keep the draw that picks a row apart from the seed of its rollout.
_PICK, _SEED = b"onpolicy-row", b"onpolicy-seed"


def prompt_of(row: TokenizedRow) -> list[int]:
    """The tokens before the row's response: the prompt of a prompt/response row; for a messages
    row everything before its last assistant turn (earlier assistant turns stay as context); a row
    with no supervised token is a prompt as a whole.

    A row supervised from its second token on (a text row; position 0 is never supervised since
    nothing predicts it) has no prompt to write a response to.
    """
    start = _last_supervised_span_start(row.labels)
    if start is None:
        return list(row.input_ids)
    if start <= 1:
        raise no_prompt_error(str(row.index))
    return list(row.input_ids[:start])


def has_prompt(row: TokenizedRow) -> bool:
    """Whether :func:`prompt_of` finds a prompt in `row` (not a text row)."""
    start = _last_supervised_span_start(row.labels)
    return start is None or start > 1


def no_prompt_error(name: str) -> DataError:
    """The refusal of a row without a prompt; `name` is its file and line where known, else its index."""
    return DataError(f"data row {name} has no prompt (every token is supervised, as in a text row), so the "
                     "student cannot write its response; use prompt/response or messages rows, or onpolicy.fraction=0")


def _last_supervised_span_start(labels: list[int]) -> int | None:
    """Where the last run of supervised labels starts, or None when no label is supervised.

    The run is found with `list.index` on the reversed labels (a C loop): start-up asks this of every
    training row under on-policy distillation, and a Python loop over each response took a minute or
    more per million rows."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:  # trailing unsupervised tokens: usually none
        end -= 1
    if end == 0:
        return None
    try:
        return end - labels[end - 1::-1].index(IGNORE_INDEX)
    except ValueError:  # supervised from the very first token
        return 0


def rewritten(row: TokenizedRow, generated: list[int], seq_len: int) -> TokenizedRow:
    """`row` with `generated` as its response: the prompt unsupervised, the generated tokens
    supervised, cut to `seq_len` as `trainer.data.tokenize` cuts rows (labels aligned, not shifted)."""
    prompt = prompt_of(row)
    ids = prompt + list(generated)
    labels = [IGNORE_INDEX] * len(prompt) + list(generated)
    return TokenizedRow(ids[:seq_len], labels[:seq_len], truncated=len(ids) > seq_len, index=row.index)


def rollout_rows(step: int, row_ids: list[int], fraction: float, seed: int) -> list[bool]:
    """For each row id (its index in the training rows), whether its response is the student's at
    `step`: each row independently with probability `fraction` (0: none, 1: all)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction is {fraction}; set it in [0, 1]")
    return [_uniform(_PICK, seed, step, row_id) < fraction for row_id in row_ids]


def rollout_seed(seed: int, step: int, row_index: int) -> int:
    """The seed of the generator that samples row `row_index`'s rollout at `step` (63 bits)."""
    return _hashed(_SEED, seed, step, row_index) >> 1


def _uniform(tag: bytes, seed: int, step: int, row: int) -> float:
    """A number in [0, 1) drawn from the inputs alone."""
    return _hashed(tag, seed, step, row) / 2**64


def _hashed(tag: bytes, seed: int, step: int, row: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=8, person=tag).digest()
    return int.from_bytes(digest, "big")

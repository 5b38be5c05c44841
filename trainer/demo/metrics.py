"""The demo's exact-match score, for a plain model and {"prompt", "response"} rows."""

from __future__ import annotations

import torch

from trainer.data.batching import collate
from trainer.data.tokenize import tokenize_row
from trainer.losses.objective import solved_rows

# Demo rows are ~50 tokens; this only bounds the encoder.
_DEMO_SEQ_LEN = 512


def encode_rows(rows: list[dict], tokenizer) -> list:
    """Tokenised exactly as the trainer tokenises them (`<s> prompt response </s>`, loss on the response)."""
    return [tokenize_row(row, tokenizer, _DEMO_SEQ_LEN, origin=f"demo row {i}") for i, row in enumerate(rows)]


@torch.no_grad()
def exact_match_rate(model, rows: list[dict], tokenizer, batch_size: int = 64) -> float:
    """Fraction of rows the model solves exactly (see `trainer.train.evaluation.solved_rows`)."""
    was_training = model.training
    model.eval()
    solved = 0
    for start in range(0, len(rows), batch_size):
        batch = collate(encode_rows(rows[start : start + batch_size], tokenizer), tokenizer.pad_token_id)
        # Right padding under a causal mask never reaches real tokens, so no mask is needed.
        logits = model(input_ids=batch["input_ids"]).logits
        solved += int(solved_rows(logits[:, :-1], batch["labels"][:, 1:]).sum())
    model.train(was_training)
    return solved / max(len(rows), 1)

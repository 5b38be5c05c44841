"""Encoding prompt/response rows for the demo models, and the exact-match score."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def encode_row(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """`<s> prompt response </s>` as ids, and labels that supervise only `response </s>`.

    Labels are aligned with the ids (the model shifts them), so position i of `labels` is the
    token the model must predict after reading ids[:i].
    """
    prompt = tokenizer(row["prompt"], add_special_tokens=True).input_ids
    response = tokenizer(row["response"], add_special_tokens=False).input_ids
    input_ids = prompt + response + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]
    return input_ids, labels


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, labels, attention_mask, each [batch, longest]."""
    longest = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(row_labels)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def solved_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which rows the model gets entirely right under teacher forcing.

    logits: [batch, seq, vocab]; labels: [batch, seq], aligned with the inputs.
    Returns a bool tensor [batch]. Every supervised argmax matching its target is the same
    event as greedy decoding reproducing the whole response and </s>.
    """
    predictions = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    return ((predictions == targets) | ~supervised).all(dim=-1)


@torch.no_grad()
def exact_match_rate(model, rows: list[dict], tokenizer, batch_size: int = 64) -> float:
    """Fraction of {"prompt", "response"} rows the model solves exactly (see `solved_rows`)."""
    was_training = model.training
    model.eval()
    solved = 0
    for start in range(0, len(rows), batch_size):
        encoded = [encode_row(row, tokenizer) for row in rows[start : start + batch_size]]
        batch = collate(encoded, tokenizer.pad_token_id)
        # Right padding under a causal mask never reaches real tokens, so no mask is needed.
        logits = model(input_ids=batch["input_ids"]).logits
        solved += int(solved_rows(logits, batch["labels"]).sum())
    model.train(was_training)
    return solved / max(len(rows), 1)

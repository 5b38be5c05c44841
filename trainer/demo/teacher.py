"""The demo teacher: a small Llama trained from scratch on the addition task."""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.data.batching import collate
from trainer.losses.settings import IGNORE_INDEX
from trainer.demo.metrics import encode_rows
from trainer.demo.recipe import DemoRecipe
from trainer.models.engines import warmup_cosine


def teacher_config(recipe: DemoRecipe, tokenizer) -> LlamaConfig:
    """A Llama shaped by the recipe, over the demo tokenizer's vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=128,  # the longest demo row is ~50 tokens; chat rows add ~20
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Measured on a 2-core CPU at this size: eager is as fast as sdpa or a little faster.
        attn_implementation="eager",
    )


def shuffled_batches(encoded: list, batch_size: int, rng: random.Random):
    """Endless batches, each epoch a fresh shuffle, so every row is seen once per epoch."""
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [encoded[i] for i in order[start : start + batch_size]]


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions.

    logits: [batch, seq, vocab]; labels: [batch, seq], aligned with the inputs.
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
    )


def train_teacher(recipe: DemoRecipe, tokenizer, rows: list[dict], *, seed: int, log=print):
    """A fresh teacher trained on `rows`; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(teacher_config(recipe, tokenizer))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.teacher_lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, warmup=recipe.teacher_warmup_steps, total=recipe.teacher_steps
        ),
    )
    encoded = encode_rows(rows, tokenizer)
    batches = shuffled_batches(encoded, recipe.teacher_batch_size, random.Random(seed))
    model.train()
    started = time.perf_counter()
    for step in range(recipe.teacher_steps):
        batch = collate(next(batches), tokenizer.pad_token_id)
        # Rows are right-padded and attention is causal, so padding never reaches a real
        # token; leaving out the mask keeps attention on its fast path.
        logits = model(input_ids=batch["input_ids"]).logits
        loss = response_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(recipe.teacher_steps // 10, 1) == 0:
            elapsed = time.perf_counter() - started
            log(f"teacher step {step + 1}/{recipe.teacher_steps}: loss {loss.item():.4f} ({elapsed:.0f} s)")
    model.eval()
    return model


@torch.no_grad()
def soften(model: LlamaForCausalLM, temperature: float) -> LlamaForCausalLM:
    """Divide the model's logits by `temperature`, in place, by scaling its final norm.

    The LM head is linear with no bias and reads only the final RMSNorm's output, so scaling
    that norm's weight scales every logit exactly; the argmax, and so accuracy, is unchanged.
    The head itself cannot carry the factor: it shares its weight with the input embedding.
    """
    model.model.norm.weight.div_(temperature)
    return model

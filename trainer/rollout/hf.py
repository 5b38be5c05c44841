"""The rollout engine on a Hugging Face causal LM (a bare model, a DeepSpeed engine or its `.module`).

The prompts are decoded together: left-padded into one batch, with an attention mask and position
ids that start at each prompt's first real token, and a KV cache, so each step feeds one new token
per row. Each row samples from its own `torch.Generator` seeded with its seed, so its tokens do not
depend on the rows beside it nor on the global RNG (which exact resume replays and which the call
leaves untouched).

What is exact and what is not:

- greedy decoding (temperature 0) is `model.generate(do_sample=False)` on the same padded batch token
  for token: the same inputs, positions, cache and float32 argmax;
- a row's rollout alone and inside a batch see the same seed, the same draws and the same logits up
  to the last float bits: padded attention sums over a different length, so a draw that falls
  within those bits of a boundary between two tokens (or a greedy near-tie) can differ. The tests
  check equality on seeds and lengths where it holds;
- sampling draws from the distribution `model.generate(do_sample=True, temperature, top_p)` samples
  (temperature, then the nucleus cut as transformers' `TopPLogitsWarper` makes it), but not the
  same tokens: transformers draws every row from the one global generator.

A ZeRO-3-partitioned model decodes the same tokens, gathered or in lockstep (`zero3.py` says how and
when); `generate` is then a collective that every rank calls once per rollout phase.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

import torch

from trainer.models.loading import ModelError, eval_mode
from trainer.rollout import zero3
from trainer.rollout.engine import RolloutEngine, Rollouts, RolloutSettings


class HFRolloutEngine(RolloutEngine):
    """Rollouts from `model`, stopping each row at any of `eos_ids` or `max_new_tokens`. With
    `vocab_size`, only the first `vocab_size` ids are ever written: a model's embedding is often
    padded beyond its tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens), and an id past the
    tokenizer's is no token the teacher or the loss knows."""

    def __init__(self, model, eos_ids: Sequence[int], pad_id: int, zero3_mode: str = "auto",
                 vocab_size: int | None = None):
        if not eos_ids:
            raise ModelError("the student has no EOS token, so a rollout could never stop; "
                             "set eos_token in its tokenizer_config.json")
        self.model = model
        self.eos_ids = sorted(set(eos_ids))
        self.pad_id = pad_id
        self.zero3_mode = zero3.check_mode(zero3_mode)
        """A ZeRO-3 student's rollout: "gathered", "synced" or "auto" (gathered where it fits)."""
        self.vocab_size = vocab_size

    @classmethod
    def for_tokenizer(cls, model, tokenizer, zero3_mode: str = "auto", vocab_size: int | None = None
                      ) -> "HFRolloutEngine":
        """An engine that stops at the tokenizer's EOS, and at the other end-of-turn ids the model's
        generation config lists (Llama 3 ends a chat turn with <|eot_id|>, not its EOS)."""
        eos_ids = set(_as_list(tokenizer.eos_token_id))
        generation_config = getattr(getattr(model, "module", model), "generation_config", None)
        eos_ids |= set(_as_list(getattr(generation_config, "eos_token_id", None)))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, sorted(eos_ids), pad_id if pad_id is not None else 0, zero3_mode, vocab_size)

    def generate(self, prompts: list[list[int]], seeds: list[int], settings: RolloutSettings) -> Rollouts:
        """See `RolloutEngine.generate`. With a ZeRO-3-partitioned model this is a collective: every
        rank calls it once per rollout phase, with however many prompts it has (none included), and
        it returns once every rank is done (see `trainer.rollout.zero3`)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if any(not prompt for prompt in prompts):
            raise ValueError("an empty prompt has nothing to continue; give every prompt at least one token")
        start = time.perf_counter()
        module = getattr(self.model, "module", self.model)
        partitioned = zero3.is_partitioned(module)
        if not prompts and not partitioned:
            return Rollouts(tokens=[], stopped_at_eos=[], seconds=0.0)
        with torch.no_grad(), eval_mode(self.model):
            batch = _Batch(self, module, prompts, seeds, settings) if prompts else None
            if not partitioned:
                _decode_alone(batch)
            elif zero3.choose_mode(module, self.zero3_mode) == "gathered":
                with zero3.gathered_weights(module):
                    _decode_alone(batch)
            else:
                _decode_in_lockstep(batch, module, self.pad_id)
        tokens, stopped = batch.result() if batch else ([], [])
        return Rollouts(tokens=tokens, stopped_at_eos=stopped, seconds=time.perf_counter() - start)


class _Batch:
    """One call's prompts decoded together: `[B, P]` left-padded prompts prefilled once, then one
    `[B, 1]` token per step from the KV cache, one `step` (one forward) at a time."""

    def __init__(self, engine: HFRolloutEngine, module, prompts, seeds, settings: RolloutSettings):
        self.module, self.settings, self.pad_id, self.vocab_size = module, settings, engine.pad_id, engine.vocab_size
        device = next(module.parameters()).device
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.input_ids, self.attention_mask = _left_padded(prompts, engine.pad_id, device)
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).masked_fill(self.attention_mask == 0, 0)
        self.eos = torch.tensor(engine.eos_ids, device=device)
        self.written = [[] for _ in prompts]
        self.done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.past, self.last_only = None, _last_logits_only(module)
        self.steps, self.busy = 0, True

    def step(self) -> None:
        """One forward: the next token of every row; `busy` turns False once every row wrote an
        EOS or `max_new_tokens` are written."""
        outputs = self.module(input_ids=self.input_ids, attention_mask=self.attention_mask,
                              position_ids=self.position_ids, past_key_values=self.past, use_cache=True,
                              **self.last_only)
        self.past = outputs.past_key_values
        logits = outputs.logits[:, -1, :self.vocab_size].to(dtype=torch.float32)
        next_ids = next_tokens(logits, self.generators, self.settings, self.done)
        for row, (token, finished) in enumerate(zip(next_ids.tolist(), self.done.tolist())):
            if not finished:
                self.written[row].append(token)
        self.done |= torch.isin(next_ids, self.eos)
        self.steps += 1
        self.busy = self.steps < self.settings.max_new_tokens and not bool(self.done.all())
        # A finished row keeps decoding pad (its outputs are discarded), as `generate` does.
        self.input_ids = next_ids.masked_fill(self.done, self.pad_id)[:, None]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(next_ids), 1)], dim=1)
        self.position_ids = self.position_ids[:, -1:] + 1

    def result(self) -> tuple[list[list[int]], list[bool]]:
        """Each row's tokens up to its EOS, and whether it wrote one."""
        return self.written, self.done.tolist()


def _decode_alone(batch: _Batch | None) -> None:
    """Decode with no other rank involved (an unpartitioned model, or a gathered one)."""
    while batch is not None and batch.busy:
        batch.step()


def _decode_in_lockstep(batch: _Batch | None, module, pad_id: int) -> None:
    """Every rank forwards once per round, its own batch while it has rows to decode and a one-token
    dummy afterwards (or throughout, with no prompts), so each of ZeRO-3's per-layer all-gathers
    finds every rank; rounds go on until no rank is busy."""
    device = next(module.parameters()).device
    dummy = torch.full((1, 1), pad_id, device=device)
    while zero3.any_rank_busy(batch is not None and batch.busy, device):
        if batch is not None and batch.busy:
            batch.step()
        else:
            module(input_ids=dummy, use_cache=False)


def _left_padded(prompts, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, P]` ids and mask, every prompt ending at the last column where generation starts."""
    longest = max(len(prompt) for prompt in prompts)
    ids = [[pad_id] * (longest - len(prompt)) + prompt for prompt in prompts]
    mask = [[0] * (longest - len(prompt)) + [1] * len(prompt) for prompt in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def next_tokens(logits: torch.Tensor, generators: list[torch.Generator], settings: RolloutSettings,
                done: torch.Tensor) -> torch.Tensor:
    """The next id of each row `[B]` from its last logits `[B, V]` (float32).

    Greedy rows take the argmax. Sampled rows draw from their own generator, one draw per step while
    unfinished, so a row's draws are the same whichever rows share its batch.
    """
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = top_p_filtered(logits / settings.temperature, settings.top_p).softmax(dim=-1)
    chosen = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    rows = (~done).nonzero().flatten()
    if len(rows):
        chosen[rows] = inverse_cdf_draws(probs[rows], [generators[row] for row in rows.tolist()])
    return chosen


# Probabilities as integers in units of 2^-52 (float64's spacing at 1). Their running sums are exact,
# so a draw is the same on every device and in any summation order. A row's total stays near 2^52,
# far below int64's 2^63; each id loses under 2^-52 of its mass, under 4e-11 a row at V=152k.
FIXED_POINT_ONE = 2**52


def fixed_point(probs: torch.Tensor) -> torch.Tensor:
    """`probs` `[..., V]` in [0, 1] as int64 multiples of 2^-52, rounded down."""
    # Scaling by a power of two is exact in float32 as in float64, so float32 needs no float64 copy;
    # float16 would overflow at 2^52, and widens.
    wide = probs if probs.dtype in (torch.float32, torch.float64) else probs.float()
    return (wide * FIXED_POINT_ONE).long()


def inverse_cdf_draws(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One id per row of `probs` `[B, V]`, row `i` drawn with one uniform from `generators[i]`: the
    first id whose cumulative probability exceeds it. `torch.multinomial` (one row at a time, as
    each row has its own generator) draws an exponential per vocabulary entry instead: at V=32k on
    a CPU that was a quarter of a rollout's time, more than the student's forward's head.
    The sums are exact, in fixed point (`FIXED_POINT_ONE`), so an id of no mass is never drawn."""
    cumulative = fixed_point(probs).cumsum_(dim=-1)  # in place: a second [B, V] int64 buffer cost a third more time
    total = cumulative[:, -1]
    uniforms = torch.cat([torch.rand(1, dtype=torch.float64, device=probs.device, generator=generator)
                          for generator in generators])
    # u ≤ 1 − 2^-53 and a softmax row's total is near 2^52, so the correctly rounded u·total stays below
    # total; the cap is a guard for a row of no mass, which a softmax never gives.
    targets = torch.minimum((uniforms * total.double()).long(), total - 1)
    return torch.searchsorted(cumulative, targets[:, None], right=True)[:, 0]


def top_p_filtered(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` `[B, V]` with the tokens outside the nucleus set to -inf, as transformers'
    `TopPLogitsWarper` does: sorted ascending, drop those whose cumulative probability stays at or
    below 1 - top_p, and always keep the most likely token."""
    if top_p >= 1:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    remove_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def _last_logits_only(module) -> dict:
    """Ask for the last position's logits only where the model can (`[B, 1, V]`, not `[B, P, V]`
    over a long prompt); the values are the same. A PEFT model's forward takes `**kwargs` and
    hands them to its base model, so the base model's signature is the one that says."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    takes = "logits_to_keep" in inspect.signature(base.forward).parameters
    return {"logits_to_keep": 1} if takes else {}


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)

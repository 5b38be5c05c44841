"""A cache entry budget split between the teacher's exact top tokens and samples of its tail.

A top-k cache drops everything outside the top k: the student learns the tail's total mass but
never how the teacher spreads it across tokens, and forward KL on ``k + 1`` outcomes is a biased
stand-in for forward KL on the full vocabulary. A constant share of the remaining KL comes from
there (docs/benchmarks.md: 0.015–0.020 nats at top-64 mass 0.94).

``teacher.tail_samples = s`` spends ``s`` of the ``k`` entries differently: the top ``k − s``
tokens keep their exact log-probabilities, and ``s`` tokens are drawn with replacement from the
teacher's tail ``p_v / P_tail``. A token drawn ``c`` times is stored once with the mass
``P_tail · c / s``. The listed masses then sum to 1 and their expectation over the draw is the
teacher's full distribution ``p``, so forward KL against them has the gradient ``q − p̂`` with
``E[p̂] = p``: unbiased, like online training, at the same storage. The price is noise on the tail
(``s`` draws per position) and that the listed values of sampled tokens are estimated masses, not
the teacher's log-probabilities; reverse KL against such a target is unbounded (`trainer.cache`
refuses ``loss.kind=rkl`` on it).

Draws are seeded by their place in the cache (split, shard, batch), so a resumed or re-run build
writes the same files.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from trainer.losses import PADDING_ID


def draw_seed(split: str, shard: int, batch: int) -> int:
    """A seed that depends only on where a batch sits in the cache, never on which rank computes it."""
    return zlib.crc32(f"{split}/{shard}/{batch}".encode())


def top_and_sampled_tail(logprobs: Tensor, entries: int, samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``[C, V]`` teacher log-probabilities -> ``[C, entries]`` stored values and ids.

    The first ``entries − samples`` columns are the exact top tokens; the rest are the distinct
    tail tokens drawn, with log(estimated mass), padded with id ``-1`` where draws repeated."""
    exact = entries - samples
    top = logprobs.topk(exact, dim=-1)
    tail = logprobs.exp().scatter_(-1, top.indices, 0.0)
    tail_mass = tail.sum(dim=-1, keepdim=True)
    has_tail = tail_mass > 0
    # A row whose top tokens hold all the mass has nothing to draw; draw anything and drop it.
    drawable = torch.where(has_tail, tail, 1.0)
    draws = torch.multinomial(drawable, samples, replacement=True, generator=generator)
    counts = torch.zeros_like(tail).scatter_add_(-1, draws, torch.ones_like(draws, dtype=tail.dtype))
    drawn = counts.topk(samples, dim=-1)  # the distinct draws first, then zero counts (padding)
    kept = (drawn.values > 0) & has_tail
    values = torch.where(kept, (tail_mass * drawn.values / samples).clamp(min=1e-38).log(), 0.0)
    ids = torch.where(kept, drawn.indices, PADDING_ID)
    return torch.cat([top.values, values], dim=-1), torch.cat([top.indices, ids], dim=-1)

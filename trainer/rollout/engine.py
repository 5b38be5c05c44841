"""The one rollout interface: prompts (token ids), one seed per prompt and the sampling settings in;
the generated token ids, how each rollout ended, and what it cost out.

Every engine (Hugging Face's `hf.py` today, vLLM later) implements `RolloutEngine.generate`, and the
caller reads nothing else, so adding an engine is one new file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RolloutSettings:
    """How a rollout samples: `onpolicy.max_new_tokens`, `onpolicy.temperature`, `onpolicy.top_p`."""

    max_new_tokens: int
    temperature: float = 1.0
    """0 is greedy decoding (argmax); otherwise the logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p`; 1 keeps all."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; set it to 1 or more")
        if self.temperature < 0:
            raise ValueError(f"temperature is {self.temperature}; set it to 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}; set it in (0, 1] (1 keeps every token)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def within(self, seq_len: int, prompts: list[list[int]]) -> "RolloutSettings":
        """These settings with no more new tokens than the shortest of `prompts` leaves room for in
        `seq_len`: rows are cut to `seq_len`, so whatever is generated beyond is cut from every row
        (and a row's first tokens do not depend on where it stops)."""
        if not prompts:
            return self
        room = max(seq_len - min(len(prompt) for prompt in prompts), 1)
        return replace(self, max_new_tokens=min(self.max_new_tokens, room))


@dataclass(frozen=True)
class Rollouts:
    """What one `generate` call wrote, in the order of its prompts."""

    tokens: list[list[int]]
    """Per prompt, the generated ids without the prompt; an EOS that stopped the row is kept (the
    student must learn to stop) and nothing follows it."""
    stopped_at_eos: list[bool]
    """Per prompt, True if it ended with an EOS id, False if `max_new_tokens` cut it (truncated)."""
    seconds: float
    """Wall time of the whole call."""

    @property
    def generated_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.tokens)

    @property
    def truncated(self) -> int:
        """How many rollouts `max_new_tokens` cut before they wrote an EOS."""
        return self.stopped_at_eos.count(False)


class RolloutEngine(ABC):
    """Writes a response to each prompt with the model it wraps."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], seeds: list[int], settings: RolloutSettings) -> Rollouts:
        """One rollout per prompt. Row `i` is sampled from a generator seeded with `seeds[i]` alone, so
        its tokens do not depend on the other prompts in the call nor on the global RNG, which the
        call leaves as it found it."""

"""On-policy steps: before a step's forwards, the rows drawn for it get the student's own response.

Each micro-batch's rows are chosen (`onpolicy.fraction`) and seeded by their position in the step,
which is the same on any number of ranks and any micro-batching (trainer/data/batching.py), so a
resumed run redraws the same rows and regenerates the same rollouts. The rollouts are sampled with
no gradient (as in GKD); the step then trains on the rewritten rows like on any others: teacher and
student forward, the loss over the generated tokens, whatever `loss.kind`.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.tokenize import TokenizedRow
from trainer.rollout.engine import RolloutEngine, RolloutSettings
from trainer.rollout.prompts import prompt_of, rewritten, rollout_rows, rollout_seed
from trainer.rollout.retokenize import RolloutPairing
from trainer.train.throughput import ModelCost


@dataclass
class RolloutWork:
    """What the rollouts of some steps did on one rank (or on all, once summed)."""

    rollouts: float = 0.0
    generated_tokens: float = 0.0
    truncated: float = 0.0
    """Rollouts that `max_new_tokens` cut before they wrote an EOS."""
    seconds: float = 0.0
    """Wall time spent generating (summed over ranks once summed)."""
    flops: float = 0.0
    """Model FLOPs of the student's forwards while generating."""

    FIELDS = ("rollouts", "generated_tokens", "truncated", "seconds", "flops")

    def as_list(self) -> list[float]:
        return [getattr(self, name) for name in self.FIELDS]

    @classmethod
    def from_list(cls, values) -> "RolloutWork":
        return cls(*[float(value) for value in values])

    def __add__(self, other: "RolloutWork") -> "RolloutWork":
        return RolloutWork.from_list([a + b for a, b in zip(self.as_list(), other.as_list())])

    def rates(self, window_seconds: float, world_size: int) -> dict:
        """The rollouts' speed and shape, all ranks: generated tokens per second of generation
        (each rank's generation time averaged), the share of the wall time spent generating, the
        mean rollout length and the share of rollouts cut by `max_new_tokens`."""
        per_rank_seconds = self.seconds / world_size
        rollouts = max(self.rollouts, 1.0)
        return {
            "rollout_tokens_per_s": self.generated_tokens / max(per_rank_seconds, 1e-9),
            "rollout_share": per_rank_seconds / max(window_seconds, 1e-9),
            "rollout_mean_length": self.generated_tokens / rollouts,
            "rollout_truncation_rate": self.truncated / rollouts,
            "rollout_rows": self.rollouts,
        }


def rollout_settings(onpolicy_cfg) -> RolloutSettings:
    """How the student samples, training rollouts and the on-policy evaluation's alike."""
    return RolloutSettings(onpolicy_cfg.max_new_tokens, onpolicy_cfg.temperature, onpolicy_cfg.top_p)


class OnPolicyRows:
    """Rewrites the rows a step draws for rollouts, one rollout call per micro-batch (every rank
    makes the same number of calls: under ZeRO-3 a rollout is collective)."""

    def __init__(self, onpolicy_cfg, seed: int, seq_len: int, engine: RolloutEngine, forward_cost: ModelCost,
                 pairing: RolloutPairing | None = None):
        """`forward_cost`: the student's forward FLOPs per token, for the FLOP account of generation.
        `pairing`: across tokenizers, re-tokenises each rollout for the teacher; None with one tokenizer."""
        self.fraction, self.seed, self.seq_len, self.engine = onpolicy_cfg.fraction, seed, seq_len, engine
        self.settings = rollout_settings(onpolicy_cfg)
        self.forward_cost = forward_cost
        self.pairing = pairing

    def rewrite(self, step: int, positions: list[int], rows: list[TokenizedRow]) -> tuple[list[TokenizedRow],
                                                                                          RolloutWork]:
        """`rows` of one micro-batch at these `positions` in step `step`'s rows, with the drawn ones'
        responses written by the student; what generating them did."""
        chosen = [i for i, picked in enumerate(rollout_rows(step, positions, self.fraction, self.seed)) if picked]
        prompts = [prompt_of(rows[i]) for i in chosen]
        settings = self.settings.within(self.seq_len, prompts)
        rollouts = self.engine.generate(prompts, [rollout_seed(self.seed, step, positions[i]) for i in chosen],
                                        settings)
        out = list(rows)
        for i, generated, stopped in zip(chosen, rollouts.tokens, rollouts.stopped_at_eos):
            out[i] = (rewritten(rows[i], generated, self.seq_len) if self.pairing is None
                      else self.pairing(rows[i], generated, stopped))
        lengths = [len(prompt) + len(generated) for prompt, generated in zip(prompts, rollouts.tokens)]
        work = RolloutWork(rollouts=len(chosen), generated_tokens=rollouts.generated_tokens,
                           truncated=rollouts.truncated, seconds=rollouts.seconds,
                           flops=self.forward_cost.of_rows(lengths))
        return out, work


"""On-policy distillation's rollouts: the student writes the responses that the teacher then scores.

- `engine.py`: the one rollout interface (`RolloutEngine`: prompts, seeds and `RolloutSettings` in,
  `Rollouts` out), so that another engine (vLLM) is one new file.
- `hf.py`: `HFRolloutEngine`, the engine on a Hugging Face causal LM: batched, with a KV cache, each
  row sampled from its own seeded generator.
- `zero3.py`: rollouts from a ZeRO-3 student: its weights gathered for the rollout phase where they
  fit, else every rank forwarding in lockstep until all are done.
- `prompts.py`: a tokenised row's prompt, the row rewritten with a rollout as its response, and which
  rows of a step are rewritten with which seed (a hash of seed, step and row: the same on any ranks).
- `retokenize.py`: a rollout re-tokenised for a teacher with another tokenizer: the decoded response
  in the teacher's tokens after its side of the prompt, and the spans (on-policy across tokenizers).
"""

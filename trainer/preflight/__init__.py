"""Everything checked before any weights load, for every entry point (train, cache, generate).

- `sequence.py`: the one start-up sequence (:func:`check`) and what it resolved (:class:`Preflight`).
- `demo_assets.py`: `demo://` values swapped for the demo's models and data.
- `splits.py`: the data splits' sources, tokenized rows and fingerprints; a training job's rows.
- `cross_tokenizer.py`: distilling across tokenizers: both tokenizers checked, the shared ids, the alignment report.
- `onpolicy.py`: on-policy distillation's checks: a student that can stop, rows with prompts, prompt-only
  rows only with onpolicy.fraction=1.
- `licence_check.py`: reads a teacher's licence and decides whether it may be distilled;
  `licences.py` is the table of known licences (pure, no I/O).
"""

from trainer.preflight.sequence import Preflight, check

__all__ = ["Preflight", "check"]

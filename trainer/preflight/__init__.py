"""Everything checked before any weights load, for every entry point (train, cache, generate).

- `inputs.py`: the demo's assets when asked for, the tokenised splits.
- `licence_check.py`: reads a teacher's licence and decides whether it may be distilled;
  `licences.py` is the table of known licences (pure, no I/O).
"""

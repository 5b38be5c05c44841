"""Whether a teacher may be distilled, and what a run leaves behind to show what it was made of.

- `licences`: the table of teacher licences and the decision for one teacher (pure, no I/O).
- `gate`: reads the licence (config, model card, cache manifest), decides, logs; the entry points call it
  before any weights load.
- `record`: `provenance.json` (hashes, data, config, code, packages, metrics, the licence decision),
  sealed with a sha256 of its own canonical JSON.
- `card`: the adapter's (or model's) README.md, a Hugging Face model card.
"""

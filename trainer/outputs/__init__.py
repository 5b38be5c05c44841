"""What a run leaves behind: metrics, the exported student, provenance and its model card.

- `tracking.py`: `metrics.jsonl`, W&B, the progress bar, `summary.json`.
- `export.py`: `adapter/`, `model/`, `merged/`, saved with `save_pretrained`.
- `record.py`: `provenance.json` (hashes, data, on-policy settings, config, code, packages, metrics, the licence
  decision), sealed with a sha256 of its own canonical JSON. `card.py`: the model card.
- `provenance.py`: writes both at the end of a run.
- `finish.py`: the end of a run: export, `summary.json`, provenance, the report, in that order.
"""

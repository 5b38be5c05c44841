"""distill: distil a frozen teacher language model into a LoRA student.

`python -m trainer` (`__main__.py`) runs one job; the sub-packages are its parts, in the order a
job meets them: `launch/` (start), `preflight/` (checks), `data/`, `models/`, `losses/`, `train/`
(the job), `outputs/` (what it leaves), and beside them `cache/`, `generate/`, `demo/`, `report/`.
The modules here are what every part may read (they import none of the parts that run a job):

- `config.py`: the typed schema of every config key, its defaults, and `validate`.
- `errors.py`: `UserError`, the base of every error whose one-line message the user acts on.
- `secrets.py`: which environment variables hold tokens, kept out of everything a run writes.
- `files.py`: atomic writes with the umask's modes.
- `ranks.py`: what a rank knows about itself, and the few collectives every part uses.
- `metric_names.py`: the numbers a job writes to `summary.json`, which `train.metric` may name.
"""

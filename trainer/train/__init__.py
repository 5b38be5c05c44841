"""The training job: setup, the step, the loop, evaluation and checkpoints.

- `job.py`: one job on any number of ranks (setup, step, loop, finish).
- `progress.py`: the loop's account: the open log window, the run's speed, skipped updates.
- `evaluation.py`: held-out metrics. `checkpoints.py`: atomic, resumable checkpoints.
- `resume.py`: which checkpoint a job continues from, verified before any weights load.
- `nonfinite.py`: stopping after too many NaN/Inf steps. `throughput.py`: FLOPs, MFU, peak memory.
"""

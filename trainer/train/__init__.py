"""The training job: setup, the step, the loop, evaluation and checkpoints.

- `job.py`: one job on any number of ranks (setup, step, loop, finish).
- `evaluation.py`: held-out metrics. `checkpoints.py`: atomic, resumable checkpoints.
- `resume.py`: which checkpoint a job continues from, verified before any weights load.
- `nonfinite.py`: stopping after too many NaN/Inf steps. `throughput.py`: FLOPs, MFU, peak memory.
"""

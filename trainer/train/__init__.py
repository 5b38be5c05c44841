"""The training job: setup, the step, the loop, evaluation and checkpoints.

- `job.py`: one job on any number of ranks: `DistillJob`'s setup, step (`train_step`), loop
  (`train`), evaluation and finish, and `run`, the whole job.
- `setup.py`: what the loop reads (`JobParts`): both models and their engines, the teacher as a
  model or a cache, scorers, the student's rollout engine, rows, the step's cost.
- `onpolicy.py`: on-policy steps: the rows a micro-batch draws rewritten with the student's
  rollouts (across tokenizers re-tokenised for the teacher), and what generating them did (`RolloutWork`).
- `cross_tokenizer.py`: a job distilling across tokenizers: its collate, its step's sums over aligned
  spans (`CrossTokenizer`), and its held-out evaluation.
- `progress.py`: the loop's account: the open log window, the run's speed, skipped updates.
- `evaluation.py`: held-out metrics, teacher-forced and on the student's own rollouts. `checkpoints.py`:
  atomic, resumable checkpoints.
- `resume.py`: which checkpoint a job continues from, verified before any weights load, and what
  makes a checkpoint this run's.
- `nonfinite.py`: stopping after too many NaN/Inf steps. `throughput.py`: FLOPs, MFU, peak memory.
"""

"""Starting a job: the command line, ranks from torchrun or SLURM, the run directory, stop signals.

- `cli.py`: what the entry points share (argv checks, one run directory, one-line errors, the
  CACHE/DATASET line; train/job.py prints the RESULT line).
- `distributed.py`: the process group, from torchrun's or SLURM's environment.
- `cpu_memory.py`: on CPU ranks, glibc reuses what a step frees rather than faulting in fresh pages.
- `determinism.py`: `train.deterministic`, the same bits every run on a GPU too (strict kernels).
- `rundir.py`: one job per run directory (a lock), and the Hydra record written once inputs pass.
- `preemption.py`: SIGTERM/SIGUSR1 become a checkpoint and a requeue.
- `console.py`: what the terminal shows, what only the log file keeps.
- `secrets.py`: tokens kept out of logs. `help.py`: the `--help` key table.
"""

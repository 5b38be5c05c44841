"""`python -m mode_watch [overrides]`: `python -m trainer`, printing the train/eval mode of every
submodule of both models at each stage, as one line `MODES {"stage": {"role": [flags seen]}}`.

Stages: `setup` (the teacher, after the start-up probes), `evaluate` (while the evaluation scores a batch) and
`step` (while a training step computes its loss). Before training, the student is put back in
eval mode, as a resumed job (which runs no evaluation first) would find it.
"""

from __future__ import annotations

import json
from collections import defaultdict

from trainer.train import evaluation, job

seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))


def _record(stage: str, **engines) -> None:
    for role, engine in engines.items():
        module = getattr(engine, "module", None)
        if module is not None:
            seen[stage][role].update(submodule.training for submodule in module.modules())


def _watch() -> None:
    setup, train, micro_batch_sums = job.DistillJob.setup, job.DistillJob.train, job.DistillJob._micro_batch_sums
    finish, batch_counters = job.DistillJob.finish, evaluation._batch_counters

    def watched_setup(self):
        setup(self)
        # The student's mode here is whatever from_pretrained and peft left (peft adds its layers in
        # train mode to a model in eval mode); the probes' own test checks they leave it as found.
        _record("setup", teacher=self.parts.teacher)
        evaluation._batch_counters = watched_batch_counters(self)

    def watched_batch_counters(distill_job):
        def counters(*args, **kwargs):
            _record("evaluate", teacher=distill_job.parts.teacher, student=distill_job.parts.student)
            return batch_counters(*args, **kwargs)
        return counters

    def watched_train(self, watch):
        self.parts.student.module.eval()
        return train(self, watch)

    def watched_sums(self, *args, **kwargs):
        _record("step", teacher=self.parts.teacher, student=self.parts.student)
        return micro_batch_sums(self, *args, **kwargs)

    def watched_finish(self, *args, **kwargs):
        print("MODES " + json.dumps({stage: {role: sorted(flags) for role, flags in roles.items()}
                                     for stage, roles in seen.items()}), flush=True)
        return finish(self, *args, **kwargs)

    job.DistillJob.setup, job.DistillJob.train = watched_setup, watched_train
    job.DistillJob._micro_batch_sums, job.DistillJob.finish = watched_sums, watched_finish


if __name__ == "__main__":
    _watch()
    import runpy

    # Run as `python -m trainer` would: Hydra finds conf/ relative to trainer/__main__.py.
    runpy.run_module("trainer", run_name="__main__", alter_sys=True)

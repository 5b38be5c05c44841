"""The cached teacher's disk reads run inside the context it was given: in training, the job's
data-loading stopwatch, so a step need not ask which teacher it has to time them as data loading."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from trainer.cache.teacher import CachedTeacher
from trainer.losses import PADDING_ID, SparseTeacher


class Reading:
    """A context manager that says whether it is open."""

    def __init__(self):
        self.open, self.entered = False, 0

    def __enter__(self):
        self.open, self.entered = True, self.entered + 1

    def __exit__(self, *exc):
        self.open = False
        return False


class Reader:
    """A cache of two ids per position; records whether each read ran inside `reading`."""

    manifest = SimpleNamespace(vocab_size=5)

    def __init__(self, reading: Reading):
        self.reading, self.reads_inside = reading, []

    def batch(self, split, row_index, labels):
        self.reads_inside.append(self.reading.open)
        ids = torch.full((*labels.shape, 2), PADDING_ID)
        ids[..., 0], ids[..., 1] = 1, 3
        return SparseTeacher(torch.log(torch.full(ids.shape, 0.4)), ids), torch.zeros(labels.shape)


def _host_batch() -> dict:
    return {"labels": torch.tensor([[-100, 1, 3]]), "row_index": torch.tensor([0])}


def test_the_step_teachers_reads_are_timed_as_data_loading():
    reading = Reading()
    reader = Reader(reading)
    teacher = CachedTeacher(reader, "train", torch.device("cpu"), reading=reading)

    sparse = teacher.states(_host_batch(), _host_batch())
    teacher.evaluation_terms(_host_batch(), _host_batch())

    assert isinstance(sparse, SparseTeacher) and sparse.ids.shape == (1, 3, 2)
    assert reader.reads_inside == [True, True] and reading.entered == 2 and not reading.open


def test_without_a_stopwatch_reads_are_untimed():
    reading = Reading()
    reader = Reader(reading)
    CachedTeacher(reader, "eval", torch.device("cpu")).states(_host_batch(), _host_batch())
    assert reader.reads_inside == [False] and reading.entered == 0

"""The frozen teacher: its DeepSpeed engine, and the one interface the step and the evaluation use.

:class:`Teacher` is what a training step and an evaluation ask of a teacher, whether a model runs
(:class:`ModelTeacher`, here) or its top-k is read from a cache
(:class:`~trainer.cache.teacher.CachedTeacher`): neither asks which one it has.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.losses.objective import DenseTeacher
from trainer.models import engines, loading
from trainer.models.heads import Scorer
from trainer.ranks import RankInfo

log = logging.getLogger(__name__)

ChunkTerms = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""One chunk of a batch's flat positions: (index ``[C]``, the student's float32 logits ``[C, V]``,
its log-probabilities ``[C, V]``, the targets ``[C]``) -> (Σ KL(teacher ‖ student), Σ teacher CE,
the teacher's top-1 ids ``[C]``)."""

ChunkLogProbs = Callable[[torch.Tensor], torch.Tensor]
"""One chunk of a batch's flat positions: index ``[C]`` -> the teacher's float32 log-probabilities
over the full vocabulary ``[C, V]``."""


class Teacher(ABC):
    """The teacher of a batch, as the loss and the evaluation take it."""

    engine = None
    """The teacher model's engine, or None where no model runs."""

    @abstractmethod
    def states(self, batch: dict, host_batch: dict):
        """The teacher of one training micro-batch, as the loss takes it: a :class:`DenseTeacher`
        (hidden states ``[B, T, H]`` and head, fused), logits ``[B, T, V']`` (plain), or a
        :class:`~trainer.losses.SparseTeacher` ``[B, T, k]`` aligned with
        :func:`~trainer.losses.objective.targets_at_each_position`. `batch` is on the device,
        `host_batch` the same rows on the host. No gradient."""

    @abstractmethod
    def evaluation_terms(self, batch: dict, host_batch: dict) -> ChunkTerms:
        """The evaluation's teacher terms for one held-out batch, chunk by chunk (see ChunkTerms);
        called inside :meth:`gathered`."""

    scores_new_text = False
    """Whether :meth:`log_probs_of` can score any text, such as the student's own rollouts. A cache
    holds the teacher only on the rows it was built from."""

    def log_probs_of(self, batch: dict, host_batch: dict) -> ChunkLogProbs:
        """The teacher's full distribution at a batch's positions, chunk by chunk (see ChunkLogProbs):
        the forward runs here, the chunks are read inside :meth:`gathered`. Only where
        :attr:`scores_new_text`."""
        raise NotImplementedError(f"{type(self).__name__} cannot score new text; check scores_new_text first")

    def gathered(self):
        """The teacher's head whole on every rank while the loss or the evaluation reads it."""
        return contextlib.nullcontext()


class ModelTeacher(Teacher):
    """The teacher model run on every batch, behind its :class:`~trainer.models.heads.Scorer`."""

    scores_new_text = True

    def __init__(self, scorer: Scorer):
        self.scorer, self.engine = scorer, scorer.engine

    def states(self, batch: dict, host_batch: dict):
        with torch.no_grad():
            states = self.scorer.states(batch)
        return DenseTeacher(states, self.scorer.head) if self.scorer.fused else states

    def log_probs_of(self, batch: dict, host_batch: dict) -> ChunkLogProbs:
        states = self.scorer.states(batch)
        rows = states.reshape(-1, states.shape[-1])
        return lambda index: F.log_softmax(self.scorer.logits_of(rows.index_select(0, index)), dim=-1)

    def evaluation_terms(self, batch: dict, host_batch: dict) -> ChunkTerms:
        log_probs = self.log_probs_of(batch, host_batch)

        def terms(index, student_logits, student_logp, targets):
            teacher_logp = log_probs(index)
            kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
            return kl, F.nll_loss(teacher_logp, targets, reduction="sum"), teacher_logp.argmax(-1)

        return terms

    def gathered(self):
        return self.scorer.gathered()


def load_teacher(teacher_cfg, configs: engines.EngineConfigs, precision: engines.Precision, rank: RankInfo):
    """The teacher's inference engine, and what it holds per rank (for summary.json)."""
    sharded = configs.teacher_sharded
    dtype = precision.model_dtype(teacher_cfg.dtype)
    teacher = loading.freeze(loading.load_model("teacher", teacher_cfg, dtype, configs.teacher if sharded else None))
    return engines.build_teacher_engine(teacher, configs.teacher), _bytes_held(teacher, sharded, rank)


def _bytes_held(teacher, sharded: bool, rank: RankInfo) -> dict:
    per_rank = [None] * rank.world_size
    dist.all_gather_object(per_rank, engines.param_bytes_on_rank(teacher))
    full = engines.param_bytes_full(teacher)
    log.info("teacher parameters held per rank: %s bytes of %d (%s)", per_rank, full,
             "partitioned with ZeRO-3" if sharded else "replicated")
    return {"teacher/param_bytes_per_rank": per_rank, "teacher/param_bytes_full": full, "teacher/sharded": sharded}

"""The distillation loss fused with both LM heads: chunks of tokens, never ``[N, V]`` logits.

With a 152k vocabulary and 16k tokens, one model's float32 logits are ~10 GB, before softmax
copies and gradients. Here the student's and teacher's heads are applied to ``chunk_size`` tokens
at a time; each chunk's divergence and cross-entropy are computed, and their gradients with respect
to that chunk's logits are turned at once into gradients for the student's hidden states and head
weight. Backward then only scales those stored gradients, so nothing is recomputed and at most one
chunk of logits (and its softmax intermediates) is alive at any moment.

Only supervised positions are computed at all: prompt and padding tokens cost nothing.

Values and gradients match ``distill_loss`` on full logits up to float summation order. For
forward and reverse KL and for cross-entropy alone, a chunk's logit gradient is written out in
closed form (:mod:`trainer.losses.dense_chunk`); the other kinds run the dense path's own functions
under autograd. Against a sparse teacher the logit gradient is written out too
(:mod:`trainer.losses.sparse_chunk`); the divergence on its ``k + 1`` outcomes is still autograd's.
Every chunk of a call writes into the same buffers (:mod:`trainer.losses.workspace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.dense_chunk import CLOSED_FORM_KINDS, closed_form_chunk
from trainer.losses.divergence import (
    compute_dtype,
    divergence_from_log_probs,
    supervised_count,
    tempered_log_probs,
    validate_divergence_params,
)
from trainer.losses.head import LMHead
from trainer.losses.settings import IGNORE_INDEX, LossSettings
from trainer.losses.sparse import SparseTeacher, check_sparse_teacher
from trainer.losses.sparse_chunk import sparse_chunk
from trainer.losses.workspace import ChunkWorkspace

# Elements of one chunk's [C, V] logits. Four float32 tensors of this size are alive while a chunk of
# forward or reverse KL is processed (both models' logits and softmaxes), ~10 for the kinds that run
# autograd (log-softmax, exp, products and their gradients): 0.13-0.3 GB at 2**23.
CHUNK_ELEMENTS = 2**23
# Each chunk streams both head weights and the [V, H] weight gradient through memory once, so too
# few tokens per chunk leaves the matmuls memory-bound: at V=128k, 64 tokens per chunk ran 1.4x
# slower than full logits on the benchmark CPU, 256 tokens 1.04x (docs/benchmarks.md).
MIN_CHUNK_TOKENS = 256


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: one chunk's logits near 2**23 elements, but never fewer than 256 tokens."""
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_size)


@dataclass
class FusedSums:
    objective: Tensor
    """Σ over supervised tokens of ``kd_weight·divergence + ce_weight·CE``; carries the gradient."""
    kd: Tensor
    """Σ of the divergence (detached); NaN when there is no teacher."""
    ce: Tensor
    """Σ of the student's cross-entropy on its targets at temperature 1 (detached)."""


@dataclass
class _Plan:
    """Everything the autograd function needs besides the tensors it differentiates."""

    head: LMHead
    teacher: "LMHead | SparseTeacher | None"
    teacher_hidden: Tensor | None
    targets: Tensor
    settings: LossSettings
    kd_weight: float
    ce_weight: float
    chunk_size: int
    supervised: Tensor | None


def fused_token_sums(
    student_hidden: Tensor,
    student_head: LMHead,
    targets: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: LMHead | None = None,
    sparse_teacher: SparseTeacher | None = None,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    supervised: Tensor | None = None,
) -> FusedSums:
    """Sums of the training objective over supervised tokens, with the heads applied chunk by chunk.

    Args:
        student_hidden: ``[..., H]`` last hidden states (the input of the student's head).
        student_head: the student's head; gradients flow to ``student_hidden`` and, when they
            require it, to ``student_head.weight`` and ``student_head.bias``.
        targets: ``[...]`` next-token ids aligned with the hidden states; ``ignore_index`` masks.
        teacher_hidden, teacher_head: a dense teacher (``[..., H_t]`` and its head), or
        sparse_teacher: top-k ``[..., k]``; or neither, for cross-entropy only (``kd`` is NaN).
        kd_weight, ce_weight: the objective is ``kd_weight·Σ divergence + ce_weight·Σ CE``.
        supervised: the flat positions whose target is not ``ignore_index``, when the caller knows
            them already (found on the host before the batch moved to the GPU): finding them here
            makes the host wait for the device.

    Returns:
        :class:`FusedSums` of float32 scalars (float64 for float64 inputs).
    """
    return token_sums(
        student_hidden, student_head, targets, LossSettings(kind, temperature, beta, skew, ignore_index),
        teacher_hidden=teacher_hidden, teacher_head=teacher_head, sparse_teacher=sparse_teacher,
        kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=chunk_size, supervised=supervised,
    )


def token_sums(
    student_hidden: Tensor,
    student_head: LMHead,
    targets: Tensor,
    settings: LossSettings,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_head: LMHead | None = None,
    sparse_teacher: SparseTeacher | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    supervised: Tensor | None = None,
) -> FusedSums:
    """:func:`fused_token_sums` with the divergence's settings in one object (what the trainer calls)."""
    dense = teacher_head is not None
    if dense != (teacher_hidden is not None) or (dense and sparse_teacher is not None):
        raise ValueError("pass a dense teacher (teacher_hidden and teacher_head) or a sparse_teacher, not both.")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    if flat_targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"student_hidden has {hidden.shape[0]} positions but targets {flat_targets.shape[0]}; "
            "shift both the same way before calling."
        )
    teacher = teacher_head if dense else sparse_teacher
    if teacher is not None:
        validate_divergence_params(settings)
    if sparse_teacher is not None:
        if not sparse_teacher.checked:
            check_sparse_teacher(sparse_teacher, student_head.rows, targets.shape)
        teacher = sparse_teacher.flatten()
    if dense:
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if teacher_head.rows != student_head.rows:
            raise ValueError(
                f"the student scores {student_head.rows} ids and the teacher {teacher_head.rows}; "
                "set vocab_size on both heads to the shared tokenizer's size."
            )
    plan = _Plan(
        head=student_head, teacher=teacher, teacher_hidden=teacher_hidden, targets=flat_targets,
        settings=settings, kd_weight=kd_weight, ce_weight=ce_weight,
        chunk_size=chunk_size or default_chunk_size(student_head.rows), supervised=supervised,
    )
    objective, kd, ce = _FusedHeadLoss.apply(hidden, student_head.weight, student_head.bias, plan)
    return FusedSums(objective, kd, ce)


def fused_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:
    """``distill_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, labels)``
    without ever holding the ``[N, V]`` logits of either model.

    Args:
        student_hidden: ``[..., H_s]``; student_weight: ``[V, H_s]``.
        teacher_hidden: ``[..., H_t]``; teacher_weight: ``[V, H_t]`` (frozen: no gradient).
        labels: ``[...]``, used only as a mask.
        chunk_size: tokens per chunk; default :func:`default_chunk_size`.

    Returns:
        The mean divergence over unmasked positions: a scalar, 0 when all are masked.
    """
    settings = LossSettings(kind, temperature, beta, skew, ignore_index)
    sums = token_sums(
        student_hidden, LMHead(student_weight), labels, settings, teacher_hidden=teacher_hidden,
        teacher_head=LMHead(teacher_weight.detach()), chunk_size=chunk_size,
    )
    return sums.objective / supervised_count(labels, ignore_index)


def fused_sparse_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: SparseTeacher,
    labels: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:
    """``sparse_distill_loss(student_hidden @ student_weight.T, teacher, labels)``, chunked the same way."""
    settings = LossSettings(kind, temperature, beta, skew, ignore_index)
    sums = token_sums(student_hidden, LMHead(student_weight), labels, settings, sparse_teacher=teacher,
                      chunk_size=chunk_size)
    return sums.objective / supervised_count(labels, ignore_index)


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the sums and, chunk by chunk, the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan):
        wants = ctx.needs_input_grad[:3]
        accumulator = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.zeros(hidden.shape, dtype=accumulator, device=hidden.device) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulator, device=weight.device) if wants[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulator, device=bias.device) if wants[2] else None
        kd_total = torch.zeros((), dtype=accumulator, device=hidden.device)
        ce_total = torch.zeros((), dtype=accumulator, device=hidden.device)
        supervised = plan.supervised
        if supervised is None:
            supervised = (plan.targets != plan.settings.ignore_index).nonzero().squeeze(1)
        workspace = ChunkWorkspace(min(plan.chunk_size, max(1, supervised.numel())))
        for start in range(0, supervised.numel(), plan.chunk_size):
            index = supervised[start:start + plan.chunk_size]
            rows = hidden.index_select(0, index)
            buffer = workspace.take("student_logits", index.numel(), plan.head.rows, weight.dtype, weight.device)
            projected = plan.head.projection(rows, weight, bias, out=buffer)
            if isinstance(plan.teacher, SparseTeacher):
                kd, ce, grad_logits = _sparse_chunk_sums(projected.detach().requires_grad_(any(wants)), index, plan)
            elif plan.teacher is None or plan.settings.kind in CLOSED_FORM_KINDS:
                kd, ce, grad_logits = _closed_form_chunk_sums(projected, index, plan, workspace, any(wants))
            else:
                kd, ce, grad_logits = _autograd_chunk_sums(projected, index, plan, workspace, any(wants))
            if any(wants):
                _accumulate(grad_logits, rows, index, weight, plan.head.rows, grad_hidden, grad_weight, grad_bias)
            ce_total += ce.detach()
            if kd is not None:
                kd_total += kd.detach()
        if plan.teacher is None:
            kd_total.fill_(float("nan"))
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.wants = wants
        ctx.used = False
        objective_total = plan.ce_weight * ce_total + (plan.kd_weight * kd_total if plan.teacher is not None else 0.0)
        ctx.mark_non_differentiable(kd_total, ce_total)
        return objective_total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_objective: Tensor, _grad_kd, _grad_ce):
        if ctx.used:
            raise RuntimeError("fused_distill_loss supports one backward pass per forward; recompute the loss instead of retain_graph=True.")
        ctx.used = True
        grads = []
        for wanted, stored, dtype in zip(ctx.wants, ctx.saved_tensors, ctx.dtypes):
            # In place: the stored gradient is used once, and a [V, H] copy is the largest tensor here.
            grads.append(stored.mul_(grad_objective).to(dtype) if wanted else None)
        return (*grads, None)


def _sparse_chunk_sums(logits: Tensor, index: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor | None]:
    """Σ divergence, Σ CE and their objective's gradient for one chunk, against a sparse teacher."""
    with torch.enable_grad():
        student = plan.head.finish(logits)
    kd, ce, grad = sparse_chunk(
        student.detach(), plan.teacher.rows(index), plan.targets.index_select(0, index), plan.settings,
        kd_weight=plan.kd_weight, ce_weight=plan.ce_weight, want_grad=logits.requires_grad,
    )
    if grad is not None and student is not logits:  # back through the head's scaling or soft-capping
        (grad,) = torch.autograd.grad(student, logits, grad)
    return kd, ce, grad


def _closed_form_chunk_sums(projected, index, plan, workspace, want_grad) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Σ divergence, Σ CE and their objective's gradient for one chunk, written out
    (:mod:`trainer.losses.dense_chunk`); autograd runs only through the head's quirks, if any."""
    head = plan.head
    quirks = head.has_quirks
    raw = projected.detach().requires_grad_(want_grad and quirks)
    with torch.enable_grad():
        student = head.finish(raw)
    teacher = _teacher_logits(index, plan, workspace) if plan.teacher is not None else None
    dtype = compute_dtype(student, teacher) if teacher is not None else student.dtype
    # Overwritten in place from here on: the projection's buffer, or finish()'s own new tensor.
    values = student.detach().to(dtype)
    kd, ce, grad = closed_form_chunk(
        values, teacher.to(dtype) if teacher is not None else None, plan.targets.index_select(0, index),
        plan.settings, kd_weight=plan.kd_weight, ce_weight=plan.ce_weight,
        want_grad=want_grad, workspace=workspace,
    )
    if grad is not None and quirks:  # back through the head's scaling or soft-capping
        (grad,) = torch.autograd.grad(student, raw, grad)
    return kd, ce, grad


def _autograd_chunk_sums(projected, index, plan, workspace, want_grad) -> tuple[Tensor, Tensor, Tensor | None]:
    """The same for the kinds without a closed form: autograd over the chunk's ``[C, V]`` graph."""
    logits = projected.detach().requires_grad_(want_grad)
    with torch.enable_grad():
        kd, ce = _chunk_sums(logits, _teacher_logits(index, plan, workspace), index, plan)
        objective = plan.ce_weight * ce + plan.kd_weight * kd
    grad = torch.autograd.grad(objective, logits)[0] if want_grad else None
    return kd, ce, grad


def _teacher_logits(index: Tensor, plan: _Plan, workspace: ChunkWorkspace) -> Tensor:
    """``[C, V]`` finished teacher logits of one chunk, projected into the workspace."""
    head = plan.teacher
    with torch.no_grad():
        buffer = workspace.take("teacher_logits", index.numel(), head.rows, head.weight.dtype, head.weight.device)
        return head.finish(head.projection(plan.teacher_hidden.index_select(0, index), out=buffer))


def _chunk_sums(logits: Tensor, teacher: Tensor, index: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """Σ divergence and Σ CE over one chunk of projected student logits ``[C, V]`` (autograd's path)."""
    student = plan.head.finish(logits)
    targets = plan.targets.index_select(0, index)
    temperature = plan.settings.temperature
    with torch.no_grad():
        log_p = tempered_log_probs(teacher, temperature, compute_dtype(student, teacher))
    log_q = tempered_log_probs(student, temperature, log_p.dtype)
    divergence = divergence_from_log_probs(plan.settings, log_p, log_q)
    if temperature == 1.0:
        # The student's log-softmax at T=1 is already there: CE is one gather, not another pass.
        ce = -log_q.gather(1, targets.unsqueeze(1)).sum()
    else:
        ce = F.cross_entropy(student, targets, reduction="sum")
    return divergence.sum(), ce


def _accumulate(grad_logits, rows, index, weight, vocab_rows, grad_hidden, grad_weight, grad_bias) -> None:
    """Chain one chunk's ``[C, V]`` logit gradient through ``rows @ weight[:V].T + bias[:V]``."""
    # The matmuls run in the weight's dtype, as autograd would run the head's own backward.
    grad_logits = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, index, (grad_logits @ weight[:vocab_rows]).to(grad_hidden.dtype))
    if grad_weight is not None and grad_weight.dtype == weight.dtype:
        grad_weight[:vocab_rows].addmm_(grad_logits.T, rows.to(weight.dtype))  # no [V, H] product per chunk
    elif grad_weight is not None:
        grad_weight[:vocab_rows].add_(grad_logits.T @ rows.to(weight.dtype))
    if grad_bias is not None:
        grad_bias[:vocab_rows].add_(grad_logits.sum(dim=0))

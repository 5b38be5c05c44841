"""One chunk of the fused loss against a dense teacher, with its logit gradient written out.

For forward and reverse KL (and for cross-entropy alone) the gradient with respect to the
student's logits has a closed form, so autograd over ``[C, V]`` is not needed: it kept a graph of
about ten ``[C, V]`` tensors per chunk (tempering, clamps, exp, products and each one's backward)
and made the loss the bulk of a step. Here each chunk is a few in-place passes over four buffers.

With ``s = z / T``, ``q = softmax(s)``, ``p = softmax(t / T)`` and ``d = log q − log p``:

- forward KL ``Σ p·(log p − log q)``: ``∂/∂z = (q − p) / T``;
- reverse KL ``Σ q·d``: ``∂/∂z = q·(d − KL) / T``, with ``KL`` the row's own value;
- cross-entropy at temperature 1, ``−log softmax(z)_y``: ``∂/∂z = softmax(z) − onehot(y)``.

Log-probabilities are clamped to the dtype's most negative finite value, as in
:func:`~trainer.losses.divergence.tempered_log_probs`, so a ``-inf`` logit contributes exactly 0.
The other kinds keep autograd (their log-space mixtures have no short closed form).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.losses.settings import LossSettings
from trainer.losses.workspace import ChunkWorkspace

CLOSED_FORM_KINDS = ("fkl", "rkl")


def closed_form_chunk(
    student: Tensor,
    teacher: Tensor | None,
    targets: Tensor,
    settings: LossSettings,
    *,
    kd_weight: float,
    ce_weight: float,
    want_grad: bool,
    workspace: ChunkWorkspace,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Σ divergence (None without a teacher), Σ CE and the gradient of ``kd_weight·Σ div + ce_weight·Σ CE``.

    student: ``[C, V]`` finished logits in the compute dtype, **overwritten**; teacher: the same
    shape and dtype, overwritten, or None for cross-entropy alone; targets: ``[C]``.
    The gradient is ``[C, V]`` in one of the workspace's buffers, or None when ``want_grad`` is False."""
    kind, temperature = settings.kind, settings.temperature
    tempered = teacher is not None and temperature != 1.0
    ce, ce_grad = None, None
    if tempered:  # the CE is at temperature 1: take it before the logits are divided
        weight = ce_weight if want_grad else 0.0
        ce, ce_grad = cross_entropy_at_one(student, targets, weight, workspace.like("untempered_probs", student))
        student.div_(temperature)
    log_q, student_probs = _log_softmax_(student, workspace.like("student_log_probs", student))
    if ce is None:
        ce = -log_q.gather(1, targets.unsqueeze(1)).sum()
    if teacher is None:
        return None, ce, _cross_entropy_gradient(student_probs, targets, ce_weight) if want_grad else None
    if tempered:
        teacher.div_(temperature)
    log_p, teacher_probs = _log_softmax_(teacher, workspace.like("teacher_log_probs", teacher))
    # At T = 1 the CE's gradient, softmax(z) − onehot, shares the student's probabilities.
    ce_here = 0.0 if tempered else ce_weight
    if kind == "fkl":
        kd, grad = _forward_kl(log_p, teacher_probs, log_q, student_probs, kd_weight / temperature, ce_here, want_grad)
    elif kind == "rkl":
        kd, grad = _reverse_kl(log_p, log_q, student_probs, kd_weight / temperature, ce_here, want_grad)
    else:
        raise AssertionError(f"kind {kind!r} has no closed form here; check CLOSED_FORM_KINDS.")
    if grad is not None and ce_here:
        subtract_at_targets(grad, targets, ce_here)
    if grad is not None and ce_grad is not None:
        grad.add_(ce_grad)
    return kd, ce, grad


def _log_softmax_(logits: Tensor, spare: Tensor) -> tuple[Tensor, Tensor]:
    """``[C, V]`` log-softmax (clamped to the most negative finite value) and softmax of ``logits``:
    the first written into ``spare``, the second over ``logits``.

    torch's own log-softmax makes one blocked pass over each row where a max, a shift, an exp, a
    sum and a division in turn made five over the whole chunk (and five kernels, on a GPU); the
    probabilities are its exponential."""
    log_probs = torch.log_softmax(logits, dim=-1, out=spare)
    probs = torch.exp(log_probs, out=logits)
    return log_probs.clamp_(min=torch.finfo(log_probs.dtype).min), probs


def _forward_kl(log_p, p, log_q, q, kd_scale, ce_weight, want_grad) -> tuple[Tensor, Tensor | None]:
    """``Σ p·(log p − log q)`` and ``kd_scale·(q − p) + ce_weight·q``, the latter written over ``q``."""
    # The product in place and torch's own sum: a BLAS dot over C·V floats accumulates in float32
    # and was off by 1e-4 relative at C·V = 8M (the sum's blocked reduction is as exact as before).
    kd = log_p.sub_(log_q).mul_(p).sum()
    if not want_grad:
        return kd, None
    return kd, q.mul_(kd_scale + ce_weight).add_(p, alpha=-kd_scale)


def _reverse_kl(log_p, log_q, q, kd_scale, ce_weight, want_grad) -> tuple[Tensor, Tensor | None]:
    """``Σ q·d`` with ``d = log q − log p``, and ``kd_scale·q·(d − KL_row) + ce_weight·q`` over ``q``."""
    weighted = log_p.sub_(log_q).neg_().mul_(q)  # q·d
    per_row = weighted.sum(dim=-1, keepdim=True)
    kd = per_row.sum()
    if not want_grad:
        return kd, None
    return kd, q.mul_(ce_weight - kd_scale * per_row).add_(weighted, alpha=kd_scale)


def _cross_entropy_gradient(probs: Tensor, targets: Tensor, ce_weight: float) -> Tensor:
    """``ce_weight·(softmax(z) − onehot(y))``, written over ``probs``."""
    return subtract_at_targets(probs.mul_(ce_weight), targets, ce_weight)


def subtract_at_targets(grad: Tensor, targets: Tensor, amount: float) -> Tensor:
    """``grad[c, targets[c]] −= amount`` for every row: the one-hot part of a CE gradient."""
    return grad.scatter_add_(1, targets.unsqueeze(1), grad.new_full((targets.shape[0], 1), -amount))


def cross_entropy_at_one(logits: Tensor, targets: Tensor, ce_weight: float, probs: Tensor) -> tuple[Tensor, Tensor | None]:
    """Σ CE of ``[C, V]`` logits at temperature 1 and, when ``ce_weight`` is set, its weighted gradient,
    written into ``probs`` (a ``[C, V]`` buffer); ``logits`` are left as they are. For a loss whose
    softmax was tempered, so the CE's own softmax is not already there."""
    row_max = logits.amax(dim=-1, keepdim=True)
    torch.sub(logits, row_max, out=probs).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    ce = (row_max + total.log() - logits.gather(1, targets.unsqueeze(1))).sum()
    if not ce_weight:
        return ce, None
    return ce, _cross_entropy_gradient(probs.div_(total), targets, ce_weight)

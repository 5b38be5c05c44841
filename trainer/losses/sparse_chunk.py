"""One chunk of the fused loss against a sparse teacher, with its logit gradient written out.

The divergence itself lives on ``k + 1`` outcomes (:mod:`trainer.losses.sparse`), so only the
student's side touches ``[C, V]``: its softmax, its top-k and its tail. Autograd through that side
(pad, gather, scatter, logsumexp and a second log-softmax for the cross-entropy, each with its
backward) made the sparse
chunk slower than a dense one with a whole teacher head in it. Here the ``[C, V]`` work is a
handful of passes over one buffer, and autograd runs only on the small ``[C, k + 1]`` tensors, so
every divergence kind keeps the exact arithmetic of :func:`divergence_from_log_probs`.

The chain rule used: with ``q = softmax(z / T)`` and outcome masses ``Q_j = Σ_{v∈j} q_v``,
``∂ log Q_j / ∂z_v = ([v ∈ j] q_v / Q_j − q_v) / T``. Given ``g_j = ∂L / ∂ log Q_j`` and
``G = Σ_j g_j``, a top-k token ``v_j`` gets ``(g_j − q_v G) / T`` and a tail token
``q_v (g_tail / Q_tail − G) / T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.losses.dense_chunk import cross_entropy_at_one, subtract_at_targets
from trainer.losses.divergence import compute_dtype, divergence_from_log_probs
from trainer.losses.settings import LossSettings
from trainer.losses.sparse import PADDING_ID, SparseTeacher, teacher_coarse_log_probs


def sparse_chunk(
    logits: Tensor,
    teacher: SparseTeacher,
    targets: Tensor,
    settings: LossSettings,
    *,
    kd_weight: float,
    ce_weight: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Σ divergence, Σ CE and the gradient of ``kd_weight·Σ divergence + ce_weight·Σ CE``.

    logits: ``[C, V]`` finished student logits (detached); teacher: ``[C, k]``; targets: ``[C]``.
    The gradient is ``[C, V]`` in the compute dtype, or None when ``want_grad`` is False."""
    temperature = settings.temperature
    dtype = compute_dtype(logits, teacher.logprobs)
    vocab = logits.shape[-1]
    padding = teacher.ids == PADDING_ID
    ids = _harmless_ids(teacher.ids.long(), padding)
    scaled = logits.to(dtype) / temperature if temperature != 1.0 else logits.to(dtype)
    row_max = scaled.max(dim=-1, keepdim=True).values
    probs = torch.exp(scaled - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    log_total = total.log()
    floor = torch.finfo(dtype).min
    log_q_top = torch.where(padding, float("-inf"), scaled.gather(-1, ids) - row_max - log_total)
    listed = probs.gather(-1, ids)
    q_top = torch.where(padding, 0.0, listed)
    # Zero the listed tokens: probs becomes the student's tail, token by token. A row with no
    # listed token at all writes its own value back instead.
    probs.scatter_(-1, ids, torch.where(padding.all(dim=-1, keepdim=True), listed, 0.0))
    q_tail = probs.sum(dim=-1, keepdim=True)
    log_q = torch.cat([log_q_top, q_tail.log()], dim=-1).clamp(min=floor)
    # Every token listed means no tail outcome at all: the exact dense case.
    covers_vocab = (~padding).sum(dim=-1, keepdim=True) == vocab
    log_p = teacher_coarse_log_probs(teacher, padding, covers_vocab, temperature, dtype)

    log_q = log_q.detach().requires_grad_(want_grad)
    with torch.enable_grad():
        divergence = divergence_from_log_probs(settings, log_p, log_q).sum()
        weighted = divergence * kd_weight
    ce_grad = None
    if temperature == 1.0:  # the CE reuses the softmax's max and normaliser
        ce = (row_max + log_total - scaled.gather(-1, targets.unsqueeze(1))).sum()
    else:
        untempered = logits.to(dtype)
        weight = ce_weight if want_grad else 0.0
        ce, ce_grad = cross_entropy_at_one(untempered, targets, weight, torch.empty_like(untempered))
    if not want_grad:
        return divergence.detach(), ce, None
    (grad_log_q,) = torch.autograd.grad(weighted, log_q)
    grad_log_q = torch.where(log_q > floor, grad_log_q, 0.0)  # the clamp's own gradient
    # At T = 1 the CE's gradient, softmax(z) − onehot, shares the pass over the softmax.
    ce_here = ce_weight if temperature == 1.0 else 0.0
    grad = _logit_gradient(probs, q_top, q_tail, ids, grad_log_q, temperature, ce_here)
    if ce_here:
        subtract_at_targets(grad, targets, ce_weight)
    elif ce_grad is not None:
        grad.add_(ce_grad)
    return divergence.detach(), ce, grad


def _harmless_ids(ids: Tensor, padding: Tensor) -> Tensor:
    """Padding entries point at their row's first listed id, so scattering zeros through them changes
    nothing (at id 0 in a row of padding only); they carry no mass or gradient themselves."""
    first_listed = ids.gather(-1, (~padding).int().argmax(dim=-1, keepdim=True))
    return torch.where(padding, first_listed, ids).clamp(min=0)


def _logit_gradient(probs, q_top, q_tail, ids, grad_log_q, temperature, ce_weight) -> Tensor:
    """``[C, V]`` gradient from ``g = ∂L/∂ log Q`` ``[C, k + 1]``, written over ``probs`` (the tail),
    plus ``ce_weight·softmax(z)`` (the CE gradient's part that is not the one-hot, at T = 1)."""
    grad_top, grad_tail = grad_log_q[:, :-1], grad_log_q[:, -1:]
    total = grad_log_q.sum(dim=-1, keepdim=True) / temperature
    # A tail that underflowed to 0 has no token to pass its gradient to.
    tiny = torch.finfo(q_tail.dtype).tiny
    per_tail_mass = torch.where(q_tail > 0, grad_tail / q_tail.clamp(min=tiny), 0.0) / temperature
    grad = probs.mul_(per_tail_mass - total + ce_weight)
    grad.scatter_add_(-1, ids, grad_top / temperature + q_top * (ce_weight - total))
    return grad


"""Dense divergences: pure functions from aligned student/teacher logits to a divergence.

With ``p = softmax(teacher_logits / T)`` (teacher) and ``q = softmax(student_logits / T)``
(student), each kind is, per position (sums run over the vocabulary):

- ``fkl``  forward KL, ``KL(p‖q) = Σ p·log(p/q)``. Mean-seeking (mode-covering): the student is
  punished wherever the teacher has mass it lacks, so it spreads out to cover all of ``p``.
- ``rkl``  reverse KL, ``KL(q‖p)``. Mode-seeking: the student is punished for mass where the
  teacher has little, so it settles on the teacher's main modes.
- ``jsd``  generalised Jensen-Shannon, ``β·KL(p‖m) + (1−β)·KL(q‖m)`` with ``m = β·p + (1−β)·q``,
  ``0 < β < 1``. Bounded (by ``log 2`` at ``β = ½``, where it is symmetric); sits between the two.
- ``skl``  skew forward KL, ``KL(p ‖ α·p + (1−α)·q)`` with ``α = skew``, ``0 ≤ α < 1``.
  Mean-seeking like ``fkl`` but bounded by ``log(1/α)``, so a student that gives a teacher token
  almost no mass gets a large but finite loss and gradient. ``α = 0`` is exactly ``fkl``.
- ``srkl`` skew reverse KL, ``KL(q ‖ α·q + (1−α)·p)``. Mode-seeking like ``rkl``, bounded the
  same way. ``α = 0`` is exactly ``rkl``.
- ``tvd``  total variation distance, ``½·Σ|p−q|``, in ``[0, 1]``. Symmetric and bounded; its
  gradient does not grow with the log-ratio, so it is neither mode- nor mean-seeking.

There is no ``T²`` factor here: the trainer applies its own scaling. Normalisation also lives in
the trainer, which sums :func:`masked_sum` over accumulation steps and ranks and divides once by the
global token count; :func:`distill_loss` is the same thing for a single batch.

Numerics: everything runs in float32 or wider (bf16/fp16 are upcast, float64 stays float64), on
log-probabilities from ``log_softmax``; mixtures are formed in log space. Logits of ``-inf`` (a
masked or padded vocabulary entry) give probability 0 and contribute 0 to every kind, with finite
gradients. ``fkl`` and ``rkl`` are genuinely infinite when one side gives a token zero mass and
the other does not; expect a huge or infinite value there, or pick a bounded kind.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses.settings import IGNORE_INDEX, LossSettings

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")

# "sft" trains on hard labels only; it is a valid loss.kind for the trainer but has no divergence.
_VALID_KINDS = ("sft",) + KINDS


def validate_loss_params(kind: str, temperature: float, beta: float, skew: float) -> None:
    """Raise ``ValueError`` with a one-line fix if the ``loss.*`` settings cannot work together.

    ``beta`` is checked only for ``jsd`` and ``skew`` only for ``skl``/``srkl``, the kinds that
    read them, so unused defaults never block a run.
    """
    if kind not in _VALID_KINDS:
        raise ValueError(
            f"loss.kind={kind!r} is not a known loss: choose one of {', '.join(_VALID_KINDS)}; "
            "set loss.kind=fkl for example."
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"loss.temperature={temperature} is out of range: it must be a finite number > 0; "
            "set loss.temperature=1.0 for example."
        )
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(
            f"loss.beta={beta} is out of range: jsd needs 0 < beta < 1; "
            "set loss.beta=0.5 for example."
        )
    if kind in ("skl", "srkl") and not 0 <= skew < 1:
        raise ValueError(
            f"loss.skew={skew} is out of range: {kind} needs 0 <= skew < 1; "
            "set loss.skew=0.1 for example."
        )


def validate_divergence_params(settings: LossSettings) -> None:
    """:func:`validate_loss_params`, and ``kind`` must be a divergence (not ``sft``)."""
    kind = settings.kind
    validate_loss_params(kind, settings.temperature, settings.beta, settings.skew)
    if kind not in KINDS:
        raise ValueError(
            f"loss.kind={kind!r} uses hard labels only and has no divergence; use one of {', '.join(KINDS)}."
        )


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean divergence over the positions whose label is not ``ignore_index``.

    Args:
        student_logits: ``[..., V]``, aligned position by position with ``teacher_logits``.
        teacher_logits: ``[..., V]``.
        labels: ``[...]``, used only as a mask.

    Returns:
        A scalar in float32 (float64 for float64 inputs). Exactly 0, still attached to the graph,
        when every position is masked.
    """
    settings = LossSettings(kind, temperature, beta, skew, ignore_index)
    return masked_mean(dense_divergence(student_logits, teacher_logits, settings), labels, settings)


def masked_mean(divergence: Tensor, labels: Tensor, settings: LossSettings) -> Tensor:
    """``[...]`` per-position values -> their mean over the positions whose label is not masked (0 if none)."""
    return masked_sum(divergence, labels, settings.ignore_index) / supervised_count(labels, settings.ignore_index)


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Divergence of the student from the teacher at every position, with no masking.

    Every position is computed, so rows that the caller will mask must still hold numbers
    (any finite values, or ``-inf`` for some entries); a row of NaN would leak NaN into the
    gradient even though :func:`masked_sum` drops its value.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``, same shape.

    Returns:
        ``[...]`` in float32, or float64 if either input is float64.
    """
    return dense_divergence(student_logits, teacher_logits, LossSettings(kind, temperature, beta, skew))


def dense_divergence(student_logits: Tensor, teacher_logits: Tensor, settings: LossSettings) -> Tensor:
    """:func:`per_token_divergence` with its settings in one object: ``[..., V]`` twice -> ``[...]``."""
    validate_divergence_params(settings)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {list(student_logits.shape)} and teacher_logits "
            f"{list(teacher_logits.shape)} differ in shape; align positions and slice both to "
            "the shared vocabulary (logits[..., :V]) before calling."
        )
    dtype = compute_dtype(student_logits, teacher_logits)
    log_p = tempered_log_probs(teacher_logits, settings.temperature, dtype)
    log_q = tempered_log_probs(student_logits, settings.temperature, dtype)
    return divergence_from_log_probs(settings, log_p, log_q)


def supervised_count(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Positions that count, at least 1: an all-masked batch then gives 0 / 1, not 0 / 0 = NaN."""
    return (labels != ignore_index).sum().clamp(min=1)


def masked_sum(values: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Sum of ``values`` over positions whose label is not ``ignore_index``.

    Args:
        values: ``[...]``, e.g. from :func:`per_token_divergence`.
        labels: ``[...]``, same shape.

    Returns:
        A scalar of ``values``' dtype; 0 (attached to the graph) when everything is masked.
    """
    if values.shape != labels.shape:
        raise ValueError(
            f"values {list(values.shape)} and labels {list(labels.shape)} differ in shape; "
            "pass labels shifted the same way as the logits."
        )
    # where, not multiplication: a huge or inf value at a masked position times 0 would be NaN.
    return torch.where(labels != ignore_index, values, 0).sum()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 if any input is float64: bf16/fp16 are too coarse for log-ratios."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def tempered_log_probs(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """``[..., V]`` logits -> ``[..., V]`` log-probabilities in ``dtype``, never ``-inf``.

    A ``-inf`` log-probability turns ``0·log 0`` into NaN in the forward pass and
    ``logaddexp(-inf, -inf)`` into NaN in the backward pass (even with a zero upstream gradient).
    The most negative finite float has ``exp() == 0`` exactly, so those terms vanish instead and
    every gradient stays finite.
    """
    # Upcast before dividing: dividing bf16 logits by T would round them a second time. At T = 1
    # no division: it would only copy a [C, V] chunk.
    logits = logits.to(dtype)
    log_probs = F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    return log_probs.clamp(min=torch.finfo(dtype).min)


def divergence_from_log_probs(settings: LossSettings, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-position divergence of ``settings.kind`` from ``[..., V]`` teacher/student log-probs -> ``[...]``
    (already tempered: ``settings.temperature`` is not read here)."""
    kind, beta, skew = settings.kind, settings.beta, settings.skew
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == "skl":
        return _kl(log_p, _log_mixture(log_p, log_q, skew))
    if kind == "srkl":
        return _kl(log_q, _log_mixture(log_q, log_p, skew))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    raise AssertionError(f"unhandled kind {kind!r}; add it to divergence_from_log_probs.")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a‖b) = Σ a·(log a − log b)`` from ``[..., V]`` log-probs -> ``[...]``."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` from ``[..., V]`` log-probs, computed in log space -> ``[..., V]``."""
    if weight_a == 0:
        # log(0) = -inf would reach logaddexp; the mixture is just b, and skew 0 is then exact KL.
        return log_b
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))

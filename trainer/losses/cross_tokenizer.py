"""Losses across tokenizers: ULD and GOLD on positions already aligned, as pure functions.

The caller aligns the two tokenisations (character offsets into spans, elsewhere) and passes, for
each of ``N`` aligned spans, the student's logits ``[N, V_s]`` and the teacher's ``[N, V_t]`` at the
position that predicts the span's first token. Everything here is a sum over those ``N``
positions: the objective divides once per step, as for the other losses. Gradients flow to the
student only. Both sides are divided by ``temperature`` before every softmax, including the
continuation probabilities below.

**ULD** (Boizard et al., 2024), per position: sort ``q = softmax(s/T)`` and ``p = softmax(t/T)``
descending, pad the shorter with zeros, ``Σ_j |q_(j) − p_(j)|``: the Wasserstein-1 distance between
the two sorted distributions, which needs no mapping between vocabularies. In ``[0, 2]``.

**GOLD** (after TRL's gold trainer), per position, given the ids whose strings match exactly
(:class:`SharedVocab`: student id ``a_i`` ↔ teacher id ``b_i``, ``i < S``):

- the *coarse* distributions: the ``S`` shared ids, each its own outcome, plus one *bucket*
  outcome that holds all the mass on ids the other side lacks: ``p_c = (p[b_1..b_S], P_U)``,
  ``q_c = (q[a_1..a_S], Q_U)``, with ``P_U``/``Q_U`` each side's mass on its unshared ids;
- ``GOLD = KL(p_c ‖ q_c) + uld_weight · ULD(p[unshared_t], q[unshared_s])``, the ULD term on the
  raw (not renormalised) unshared probabilities, sorted and zero-padded. ``kind`` swaps the KL for
  any other of ``distill_loss``'s divergences on the same coarse distributions (TRL uses JSD).

How the shared ids are renormalised, and why: by the chain rule,
``KL(p_c‖q_c) = KL_Bernoulli(P_S‖Q_S) + P_S · KL(p̃_S‖q̃_S)`` with ``p̃_S = p_S / P_S`` (and
``q̃_S`` alike) the distributions renormalised over the shared ids. The renormalised KL alone would
say nothing about how much mass the student keeps on ids the teacher lacks: it is unchanged when
the student moves any share of its mass there, which is the drift the issue warns about. The
Bernoulli term pins the student's unshared mass ``Q_U`` to the teacher's ``P_U``;
:func:`unshared_mass` reports ``Q_U`` for evaluation. With one vocabulary and every id shared, the
bucket is empty on both sides, the ULD term is over no ids, and GOLD is exactly forward KL
(``distill_loss(kind="fkl")`` at the same temperature).

One case has no bucket: a student whose every id is shared, at a one-token span, cannot put mass
on an id the teacher lacks, so ``Q_U = 0`` and ``KL`` would be infinite whenever ``P_U > 0``. There
the teacher's shared probabilities are renormalised instead (``p̃_S`` against ``q_S``) and its
bucket is dropped: the student is taught the teacher's distribution given a shared id.

**Spans of m student tokens against n teacher tokens** (chain rule on span probabilities). Let a
span's student tokens be ``x_1..x_m``, and ``q_j`` the student's distribution at the position that
*predicts* ``x_j`` (the position before it, so ``q_1`` sits at the last position before the span).
The span is scored as the merged vector ``q̂(y) = q_1(y) · Π_{j=2..m} q_j(x_j)``: at ``y = x_1`` it
is the student's exact probability of the whole span; for ``y ≠ x_1`` it assumes the continuation
would have been as likely (the student was never run on ``y``), TRL's approximation. Its mass
``Z_s = Π_{j≥2} q_j(x_j)`` is below 1; the missing ``1 − Z_s`` ("the first token, then another
continuation") has no id on the other side, so it joins the bucket: ``B_s = Z_s·Q_U + (1 − Z_s)``.
The teacher's ``n`` tokens are merged the same way. Then GOLD is as above on
``(q̂_S, B_s)`` against ``(p̂_S, B_t)``, both summing to 1, and ULD on the merged unshared
probabilities. Pass ``log Z`` as ``student_continuation``/``teacher_continuation`` (``[N]``, 0 at
one-token spans; :func:`token_log_probs` and :func:`span_continuation` build it): it carries
gradient to the student positions inside the span. At one-token spans on both sides this is the
1:1 definition exactly.

**Remainder.** Both ULD and GOLD's ULD part compare a multi-token span's merged probabilities
with the remainder ``1 − Z`` as one more outcome, on each side: ``sort(q̂, 1 − Z_s)`` against
``sort(p̂, 1 − Z_t)``. Without it the two sorted vectors would hold ``Z_s`` and ``Z_t`` of mass, and
at a span of one student token against two teacher tokens (``Z_s = 1``, ``Z_t ≈ p(second token)``)
no student could bring the L1 below ``1 − Z_t``: a floor the loss cannot train away, and one that
fights GOLD's own bucket (which asks the student for that very mass on its unshared ids, a
two-character token say). With it, a student whose one token carries the mass the teacher spreads
over its continuation matches it. At one-token spans ``Z = 1`` and the remainder is 0: nothing
changes there.

Worked example: the student splits ``" hello"`` as ``" hel" | "lo"`` (m = 2), the teacher keeps
``" hello"`` (n = 1). The student rows are its position ``i`` (the one predicting ``" hel"``) and
``i + 1`` (predicting ``"lo"``): it passes ``student_logits = s[i]`` and
``student_continuation = log softmax(s[i+1]/T)["lo"]``. The teacher passes its position ``j``
predicting ``" hello"`` and continuation 0. If ``q_{i+1}("lo") = 0.9``, the student's ``q̂`` is
``0.9 · q_i`` and its bucket gains ``0.1``; the teacher's bucket is its ``P_U`` alone.

**Cost, and where the time goes.** Both losses run a chunk of positions at a time (never more than
``chunk_size`` rows of either side's ``[·, V]`` tensors); each chunk's gradient is taken at once and
backward only scales it. :func:`uld_loss`/:func:`gold_loss` take logits the caller already holds;
:func:`fused_cross_tokenizer_loss` takes hidden states and both heads and projects one chunk at a
time, so neither model's ``[N, V]`` logits exist (the path the trainer should run). It differentiates
a chunk only down to the student's logits and chains that gradient through the head by hand, as
:mod:`trainer.losses.fused` does: the weight's gradient is added in place into one accumulator, so
the loss holds no ``[V_s, H]`` tensor besides it (for a float32 weight; a bf16 weight's chunk
product is a bf16 ``[V_s, H]`` before its float32 add, as there). The softmax is ``O(V)`` per row, but sorting the
full vocabulary is ``O(V log V)``, with a value and an int64 index per element: the sorts set a
chunk's memory, and so its default rows (:data:`MIN_CHUNK_ROWS`); the head matmuls want many rows.
ULD and GOLD with forward KL (the default ``kind``) take their gradients in closed form in the
forward pass (:class:`_GradientInForward`), so autograd records no ``[C, V_s]`` graph for them; GOLD's
other kinds go through autograd. On CPU, rows are sorted by NumPy (:mod:`trainer.losses.sorting`,
five times faster than ``sort``), and the sorted comparison writes its differences and signs into
the sorts' own outputs. Measured on a quiet 2-core CPU (V_s = 152k, V_t = 131k, H = 1024, N = 8192,
128-row chunks; GPU not measured), per token against the same-tokenizer fused loss: ULD 1.6× its
time with the exact sort (25% of a chunk is sorting), 1.3× at ``top_k=1024``; GOLD 1.7× exact
(sorts 8%), 1.6× at ``top_k=1024``; peak extra memory 0.9–1.1× (docs/benchmarks.md). 256-row chunks
were at most 9% faster (before NumPy's sorts) and put the exact sorts at 1.8–2.0× its memory.
``top_k`` replaces the two sorts by two ``topk``: the first ``k`` sorted values are compared
exactly and the rest by their masses, ``|tail_q − tail_p|``. That is a lower bound of the exact
ULD (triangle inequality), equal to it when one tail lies wholly above the other, and at
``k ≥ V`` exact; at ``k ≪ V`` a ``topk`` costs ``O(V)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from trainer.losses.divergence import (
    compute_dtype,
    divergence_from_log_probs,
    tempered_log_probs,
    validate_divergence_params,
)
from trainer.losses.fused import _accumulate as accumulate_head_grads
from trainer.losses.head import LMHead
from trainer.losses.settings import LossSettings
from trainer.losses.sorting import sort_descending, sorted_descending
from trainer.losses.workspace import ChunkWorkspace

# Elements of one chunk's [C, V] rows at small vocabularies. A chunk holds, per side, the
# log-softmax, the probabilities, the sorted values and their int64 indices, and autograd's copies
# of them: ~40 bytes an element, ~170 MB at 2**22.
CHUNK_ELEMENTS = 2**22
# Each chunk streams both [V, H] head weights and the weight-gradient accumulator through memory
# once, so few rows leave the head matmuls memory-bound: at V_s=152k, V_t=131k, 27 rows ran at
# 2.6-3.6x the same-tokenizer loss's time per token, 128 rows at most 1.9x; 256 rows were at most
# 9% faster than 128 but their exact sorts took 1.8-2.0x its peak memory, 128 rows at most 1.27x
# (docs/benchmarks.md).
MIN_CHUNK_ROWS = 128


def default_chunk_size(student_vocab: int, teacher_vocab: int) -> int:
    """Rows per chunk: :data:`MIN_CHUNK_ROWS`, or more where the larger vocabulary is so small that
    a chunk of :data:`CHUNK_ELEMENTS` elements holds more rows."""
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(student_vocab, teacher_vocab))


@dataclass(frozen=True)
class SharedVocab:
    """The ids whose strings match exactly in both vocabularies, paired, and each side's rest."""

    student_ids: Tensor
    """``[S]`` student ids; ``student_ids[i]`` is the same string as ``teacher_ids[i]``."""
    teacher_ids: Tensor
    """``[S]`` teacher ids."""
    student_only: Tensor
    """``[V_s − S]`` the student's ids that the teacher lacks."""
    teacher_only: Tensor
    """``[V_t − S]`` the teacher's ids that the student lacks."""

    @property
    def student_size(self) -> int:
        return self.student_ids.numel() + self.student_only.numel()

    @property
    def teacher_size(self) -> int:
        return self.teacher_ids.numel() + self.teacher_only.numel()

    def to(self, device) -> "SharedVocab":
        return SharedVocab(*(t.to(device) for t in (self.student_ids, self.teacher_ids, self.student_only, self.teacher_only)))


def shared_vocab(student_ids: Tensor, teacher_ids: Tensor, student_size: int, teacher_size: int) -> SharedVocab:
    """A :class:`SharedVocab` from paired ``[S]`` id tensors and each vocabulary's size (logit rows).

    Each id may appear once per side: an exact string match pairs one id with one id."""
    student_ids = torch.as_tensor(student_ids, dtype=torch.long).reshape(-1)
    teacher_ids = torch.as_tensor(teacher_ids, dtype=torch.long).reshape(-1)
    if student_ids.numel() != teacher_ids.numel():
        raise ValueError(
            f"{student_ids.numel()} student ids but {teacher_ids.numel()} teacher ids; pass one teacher id per shared student id."
        )
    for side, ids, size in (("student", student_ids, student_size), ("teacher", teacher_ids, teacher_size)):
        if ids.numel() and (ids.min() < 0 or ids.max() >= size):
            raise ValueError(f"a shared {side} id is outside 0..{size - 1}; pass ids of the {side}'s vocabulary.")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"a shared {side} id appears twice; pair each id at most once (exact string matches).")
    return SharedVocab(student_ids, teacher_ids, _complement(student_ids, student_size), _complement(teacher_ids, teacher_size))


def match_vocabularies(student_vocab: dict[str, int], teacher_vocab: dict[str, int],
                       student_size: int | None = None, teacher_size: int | None = None) -> SharedVocab:
    """The :class:`SharedVocab` of two ``{token string: id}`` maps (a tokenizer's ``get_vocab()``).

    ``student_size``/``teacher_size`` are the logit rows, when a head has more rows than the
    tokenizer has strings (padded vocabularies): those extra rows are unshared."""
    pairs = sorted((student_vocab[s], teacher_id) for s, teacher_id in teacher_vocab.items() if s in student_vocab)
    student_ids = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return shared_vocab(student_ids, teacher_ids, student_size or max(student_vocab.values()) + 1,
                        teacher_size or max(teacher_vocab.values()) + 1)


def _complement(ids: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


# --- per position --------------------------------------------------------------------------------


def uld_per_position(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                     top_k: int | None = None, student_continuation: Tensor | None = None,
                     teacher_continuation: Tensor | None = None) -> Tensor:
    """ULD at every position, unchunked (autograd holds every row): ``[N, V_s]``, ``[N, V_t]`` -> ``[N]``.

    The continuations (``[N]`` log-masses, default 0) scale each side's probabilities (see the
    module docstring on spans)."""
    _check_rows(student_logits, teacher_logits, student_continuation, teacher_continuation)
    _check_extras(0.0, top_k)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature} must be a finite number > 0; pass 1.0 for example.")
    dtype = compute_dtype(student_logits, teacher_logits)
    teacher_side = _merged_with_remainder(teacher_logits, teacher_continuation, temperature, dtype)
    if _wants_gradient(student_logits, student_continuation):
        compute = functools.partial(_uld_and_gradient, teacher_side=teacher_side, temperature=temperature, top_k=top_k,
                                    with_remainder=student_continuation is not None)
        return _GradientInForward.apply(compute, student_logits, _continuation(student_continuation, teacher_side))
    student_side = _merged_with_remainder(student_logits, student_continuation, temperature, dtype)
    return sorted_l1(student_side, teacher_side, top_k)


def gold_per_position(student_logits: Tensor, teacher_logits: Tensor, vocab: SharedVocab, *,
                      temperature: float = 1.0, uld_weight: float = 1.0, top_k: int | None = None,
                      kind: str = "fkl", beta: float = 0.5, skew: float = 0.1,
                      student_continuation: Tensor | None = None,
                      teacher_continuation: Tensor | None = None) -> Tensor:
    """GOLD at every position, unchunked: ``[N, V_s]``, ``[N, V_t]`` -> ``[N]`` (module docstring).

    ``kind`` (with ``beta``, ``skew``): the divergence between the coarse distributions, any of
    ``distill_loss``'s; forward KL by default. Each is a divergence of two distributions over the
    same ``S + 1`` outcomes, so each pins the bucket, and each equals ``distill_loss`` of that kind
    when every id is shared."""
    settings = LossSettings(kind, temperature, beta, skew)
    validate_divergence_params(settings)
    _check_rows(student_logits, teacher_logits, student_continuation, teacher_continuation)
    _check_extras(uld_weight, top_k)
    _check_vocab(vocab, student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = compute_dtype(student_logits, teacher_logits)
    # The continuation scales the selected columns only, not the whole [N, V] rows (one copy fewer
    # per side, and its backward): log q̂ = log q + log Z column by column, so the values are the same.
    log_p = tempered_log_probs(teacher_logits, temperature, dtype)
    c_p = _continuation(teacher_continuation, log_p)
    c_q = _continuation(student_continuation, log_p)
    log_p_coarse, log_p_unshared = _coarse(log_p, c_p, vocab.teacher_ids, vocab.teacher_only)
    if vocab.student_only.numel() == 0:
        log_p_coarse = _conditioned_where_no_bucket(log_p_coarse, c_q == 0)
    teacher_rest = _with_remainder(log_p_unshared.exp(), teacher_continuation) if uld_weight else None
    if kind == "fkl" and _wants_gradient(student_logits, student_continuation):
        compute = functools.partial(_gold_forward_kl_and_gradient, log_p_coarse=log_p_coarse, teacher_rest=teacher_rest,
                                    vocab=vocab, temperature=temperature, uld_weight=uld_weight, top_k=top_k,
                                    with_remainder=student_continuation is not None)
        return _GradientInForward.apply(compute, student_logits, c_q)
    log_q = tempered_log_probs(student_logits, temperature, dtype)
    log_q_coarse, log_q_unshared = _coarse(log_q, c_q, vocab.student_ids, vocab.student_only)
    shared_part = divergence_from_log_probs(settings, log_p_coarse, log_q_coarse)
    if uld_weight == 0:
        return shared_part
    rest = sorted_l1(_with_remainder(log_q_unshared.exp(), student_continuation), teacher_rest, top_k)
    return shared_part + uld_weight * rest


def _wants_gradient(student_logits: Tensor, student_continuation: Tensor | None) -> bool:
    wanted = student_logits.requires_grad or (student_continuation is not None and student_continuation.requires_grad)
    return torch.is_grad_enabled() and wanted


class _GradientInForward(torch.autograd.Function):
    """A per-position loss ``[C]`` whose gradients ``compute(student_logits, log_z)`` writes out in
    the forward pass, with the value: ``-> (value [C], d/d logits [C, V_s], d/d log Z [C])``. Autograd
    records no ``[C, V_s]`` graph for it (whose backward through softmax, column selections and
    sorts took 15–19% of a GOLD chunk; docs/benchmarks.md); backward only scales the stored
    gradients. GOLD with forward KL (:func:`_gold_forward_kl_and_gradient`) and ULD
    (:func:`_uld_and_gradient`) run through it; tests/losses/test_cross_tokenizer.py checks both
    against autograd on their definitions and by finite differences."""

    @staticmethod
    def forward(ctx, compute, student_logits, log_z):
        value, grad_logits, grad_log_z = compute(student_logits, log_z)
        ctx.save_for_backward(grad_logits.to(student_logits.dtype), grad_log_z)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grad_logits, grad_log_z = ctx.saved_tensors
        if not bool((grad_value == 1).all()):  # a plain sum (the chunked losses) needs no [C, V] pass
            grad_logits = grad_logits * grad_value.unsqueeze(-1).to(grad_logits.dtype)
        return None, grad_logits, grad_log_z * grad_value


def _gold_forward_kl_and_gradient(student_logits, log_z, log_p_coarse, teacher_rest, vocab, temperature, uld_weight,
                                  top_k, with_remainder) -> tuple[Tensor, Tensor, Tensor]:
    """GOLD with forward KL: ``[C]`` values, ``[C, V_s]`` gradient to the logits and ``[C]`` to ``log Z``.

    Per row, with ``q`` the student's tempered probabilities, ``Z = exp(c)``, ``B`` its bucket and
    ``p`` the teacher's coarse probabilities, the logits' gradient is ``(g − q·Σg)/T`` with ``g`` the
    gradient with respect to ``log q``: ``−p_i`` at shared id ``i``; at an unshared id ``v``,
    ``−p_B·Z·q_v/B`` from the bucket plus ``uld_weight·h_v·Z·q_v`` from the sorted part, ``h_v`` the
    sign of the difference at ``v``'s sorted place (the tail's sign past ``top_k``). The
    continuation's: ``−(1 − p_B) − p_B·d log B/d c`` plus the sorted part's ``Σ h_v·Z·q_v − h_R·Z``
    (``h_R`` the remainder's sign). At ``c = 0`` the remainder ``1 − Z`` is a constant in the
    bucket, as autograd sees it through :func:`_coarse`."""
    log_q = tempered_log_probs(student_logits, temperature, log_p_coarse.dtype)
    log_q_coarse, log_q_unshared = _coarse(log_q, log_z, vocab.student_ids, vocab.student_only)
    p_coarse = log_p_coarse.exp()
    value = (p_coarse * (log_p_coarse - log_q_coarse)).sum(-1)
    p_bucket, log_bucket = p_coarse[:, -1], log_q_coarse[:, -1]
    # 1/B, Z/B and Z·Q_U/B from logs, clamped: B can be far below 1 where the student holds
    # little outside the shared ids, and is 0 where the teacher's bucket is dropped (p_B = 0).
    log_max = math.log(torch.finfo(log_z.dtype).max) - 1
    bucket_weight = torch.where(p_bucket > 0, p_bucket * torch.exp((-log_bucket).clamp(max=log_max)), 0.0)
    z_over_bucket = torch.exp((log_z - log_bucket).clamp(max=log_max))
    unshared_share = torch.exp(torch.logsumexp(log_q_unshared, -1) - log_bucket) if log_q_unshared.shape[-1] else \
        torch.zeros_like(log_z)
    merged_unshared = log_q_unshared.exp()  # Z·q_v, whose log-derivative is itself
    grad_unshared = merged_unshared * -bucket_weight.unsqueeze(-1)  # −p_B·Z·q_v/B
    # d log B / d c: Z·(Q_U − 1)/B below Z = 1; at Z = 1 the remainder is a constant (as in _coarse).
    bucket_slope = unshared_share - torch.where(log_z < 0, z_over_bucket, 0.0)
    grad_log_z = -p_coarse[:, :-1].sum(-1) - torch.where(p_bucket > 0, p_bucket * bucket_slope, 0.0)
    if uld_weight:
        student_rest = _with_remainder(merged_unshared, log_z if with_remainder else None)
        rest, signs = _sorted_l1_with_signs(student_rest, teacher_rest, top_k)
        value = value + uld_weight * rest
        weighted = signs[:, :merged_unshared.shape[-1]].mul_(merged_unshared)  # the remainder's sign stays last
        grad_unshared.add_(weighted, alpha=uld_weight)
        grad_log_z = grad_log_z + uld_weight * weighted.sum(-1)
        if with_remainder:
            grad_log_z = grad_log_z - uld_weight * signs[:, -1] * log_z.exp()
    # Shared and unshared ids partition the vocabulary: two column copies fill the whole gradient.
    grad = torch.empty_like(log_q)
    grad.index_copy_(1, vocab.student_ids, -p_coarse[:, :-1])
    grad.index_copy_(1, vocab.student_only, grad_unshared)
    total = grad_unshared.sum(-1) - p_coarse[:, :-1].sum(-1)
    grad.addcmul_(log_q.exp_(), total.unsqueeze(-1), value=-1)
    if temperature != 1.0:
        grad.div_(temperature)
    return value, grad, grad_log_z


def _uld_and_gradient(student_logits, log_z, teacher_side, temperature, top_k, with_remainder
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """ULD: ``[C]`` values, ``[C, V_s]`` gradient to the logits and ``[C]`` to ``log Z``.

    Per row, with ``q = softmax(s/T)``, ``Z = exp(c)`` and ``h_v`` the sign of the difference at
    ``q̂_v = Z·q_v``'s sorted place (the tail's sign past ``top_k``), ``h_R`` the remainder's: the
    logits' gradient is ``Z·q·(h − Σ h·q)/T``, the continuation's ``Z·Σ h·q − h_R·Z`` (the remainder
    ``1 − Z`` falls as ``c`` grows)."""
    q = _tempered_probs(student_logits, temperature, teacher_side.dtype)
    z = log_z.exp().unsqueeze(-1)
    value, signs = _sorted_l1_with_signs(_scaled_with_remainder(q, log_z) if with_remainder else q, teacher_side, top_k)
    grad = torch.mul(signs[:, :q.shape[-1]], q)  # h·q, in a tensor of its own: the head's matmuls want it contiguous
    signed_mass = grad.sum(-1)
    grad.addcmul_(q, signed_mass.unsqueeze(-1), value=-1)
    grad_log_z = z.squeeze(-1) * signed_mass
    if with_remainder:
        grad_log_z = grad_log_z - signs[:, -1] * z.squeeze(-1)
        grad.mul_(z)
    if temperature != 1.0:
        grad.div_(temperature)
    return value, grad, grad_log_z


def _sorted_l1_with_signs(a: Tensor, b: Tensor, top_k: int | None) -> tuple[Tensor, Tensor]:
    """:func:`sorted_l1` ``[C]`` and its gradient with respect to ``a`` ``[C, V_a]``: the sign of the
    difference at each value's sorted place, and past ``top_k`` the sign of the tails' difference.
    For the written-out gradients: no autograd through ``a`` or ``b``."""
    difference, tails, where_in_a = _compared(a, b, top_k)
    value = _l1_of(difference, tails)
    compared_signs = difference[:, :where_in_a.shape[-1]].sign_()
    if tails is None:
        signs = torch.empty_like(a)
    else:
        signs = tails.sign().unsqueeze(-1).expand_as(a).clone()
    return value, signs.scatter_(-1, where_in_a, compared_signs)


def _merged_with_remainder(logits: Tensor, continuation: Tensor | None, temperature: float, dtype) -> Tensor:
    """What ULD sorts of one side: ``softmax(logits/T)·Z`` and the remainder ``1 − Z``, ``[N, V] ->
    [N, V + 1]`` (``[N, V]``, the probabilities alone, without a continuation)."""
    probs = _tempered_probs(logits, temperature, dtype)
    return probs if continuation is None else _scaled_with_remainder(probs, continuation)


def _scaled_with_remainder(probs: Tensor, continuation: Tensor) -> Tensor:
    """``_with_remainder(probs · Z, continuation)`` ``[N, V + 1]``, the product written straight into
    it: one ``[N, V]`` pass and tensor fewer (``out=`` records no autograd, so not where it would)."""
    if probs.requires_grad or continuation.requires_grad:
        return _with_remainder(probs * continuation.to(probs.dtype).exp().unsqueeze(-1), continuation)
    merged = probs.new_empty(probs.shape[0], probs.shape[1] + 1)
    torch.mul(probs, continuation.to(probs.dtype).exp().unsqueeze(-1), out=merged[:, :-1])
    merged[:, -1] = _remainder(continuation, probs.dtype)
    return merged


def _with_remainder(merged: Tensor, continuation: Tensor | None) -> Tensor:
    """``[N, V]`` merged probabilities (scaled by ``Z``) and one more outcome, the span's remainder
    ``1 − Z`` ("its first token, then another continuation"): what the sorted comparison sees of a
    multi-token span, so both sides sum to what their bucket holds (module docstring, "Remainder")."""
    if continuation is None:
        return merged
    return torch.cat([merged, _remainder(continuation, merged.dtype).unsqueeze(-1)], dim=-1)


def _remainder(continuation: Tensor, dtype) -> Tensor:
    """A span's remainder ``1 − Z`` ``[N]`` from its continuation ``log Z``, never below 0."""
    return (-torch.expm1(continuation.to(dtype))).clamp(min=0)


def _check_extras(uld_weight: float, top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1; pass None to sort the whole vocabulary.")
    if not uld_weight >= 0:
        raise ValueError(f"uld_weight={uld_weight} must be >= 0; pass 1.0 to weigh both parts alike.")


def _conditioned_where_no_bucket(log_p_coarse: Tensor, no_bucket: Tensor) -> Tensor:
    """Where the student's bucket is empty (every student id shared, a one-token span), the
    teacher's coarse ``[N, S + 1]`` log-probs conditioned on its shared ids, bucket dropped: the
    student is not asked for mass it cannot hold (module docstring)."""
    shared = log_p_coarse[:, :-1]
    conditioned = torch.cat([shared - torch.logsumexp(shared, -1, keepdim=True),
                             torch.full_like(log_p_coarse[:, -1:], torch.finfo(log_p_coarse.dtype).min)], dim=-1)
    return torch.where(no_bucket.unsqueeze(-1), conditioned, log_p_coarse)


def unshared_mass(logits: Tensor, shared_ids: Tensor, *, temperature: float = 1.0,
                  chunk_size: int | None = None) -> Tensor:
    """Each position's probability mass on the ids outside ``shared_ids``: ``[N, V]`` -> ``[N]``.

    For evaluation: with the student's logits and :attr:`SharedVocab.student_ids`, the mass the
    student puts on ids the teacher lacks (GOLD pins it to the teacher's; a drifting student shows
    here first). Computed ``chunk_size`` rows at a time, without gradient."""
    logits = logits.reshape(-1, logits.shape[-1])
    only = _complement(torch.as_tensor(shared_ids, dtype=torch.long).cpu(), logits.shape[-1]).to(logits.device)
    dtype = compute_dtype(logits)
    step = chunk_size or default_chunk_size(logits.shape[-1], 1)
    masses = []
    with torch.no_grad():
        for start in range(0, logits.shape[0], step):
            log_q = tempered_log_probs(logits[start:start + step], temperature, dtype)
            masses.append(torch.logsumexp(log_q.index_select(-1, only), -1).exp())
    return torch.cat(masses) if masses else logits.new_zeros(0, dtype=dtype)


def sorted_l1(a: Tensor, b: Tensor, top_k: int | None = None) -> Tensor:
    """``Σ_j |a_(j) − b_(j)|`` of ``[N, V_a]`` and ``[N, V_b]`` nonnegative rows, each sorted descending,
    the shorter zero-padded -> ``[N]``. With ``top_k``: the first ``k`` sorted values of each, plus
    ``|tail_a − tail_b|`` for the rest (a lower bound; exact at ``k ≥ V``)."""
    difference, tails, _ = _compared(a, b, top_k)
    return _l1_of(difference, tails)


def _compared(a: Tensor, b: Tensor, top_k: int | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """The values :func:`sorted_l1` compares: ``a``'s sorted (or top-``k``) values minus ``b``'s, both
    zero-padded to one width ``[N, W]``; the tails' difference ``[N]`` past ``top_k`` (None when the
    sort is exact); and the columns of ``a`` the first ``W_a ≤ W`` compared values came from."""
    width = max(a.shape[-1], b.shape[-1])
    if top_k is None or top_k >= width:
        ordered, where_in_a = sort_descending(a)
        return _padded_difference(ordered, sorted_descending(b, width=width)), None, where_in_a
    top_a, where_in_a = a.topk(min(top_k, a.shape[-1]), dim=-1)
    top_b = _top_padded(b, top_k)
    tails = (a.sum(-1) - top_a.sum(-1)) - (b.sum(-1) - top_b.sum(-1))
    return torch.nn.functional.pad(top_a, (0, top_k - top_a.shape[-1])) - top_b, tails, where_in_a


def _l1_of(difference: Tensor, tails: Tensor | None) -> Tensor:
    total = torch.linalg.vector_norm(difference, 1, dim=-1)  # Σ|d| without a [N, W] |d|
    return total if tails is None else total + tails.abs()


def _padded_difference(ordered: Tensor, other: Tensor) -> Tensor:
    """``ordered`` zero-padded to ``other``'s width, minus ``other``: in ``ordered``'s own memory
    where it is as wide and no gradient flows through it (the sort's fresh output)."""
    if ordered.shape[-1] == other.shape[-1] and not ordered.requires_grad:
        return ordered.sub_(other)
    return torch.nn.functional.pad(ordered, (0, other.shape[-1] - ordered.shape[-1])) - other


def _top_padded(values: Tensor, k: int) -> Tensor:
    top = values.topk(min(k, values.shape[-1]), dim=-1).values
    return torch.nn.functional.pad(top, (0, k - top.shape[-1]))


def _tempered_probs(logits: Tensor, temperature: float, dtype) -> Tensor:
    """``softmax(logits/T)`` ``[N, V]`` in ``dtype``. A softmax, not ``exp(log_softmax)``: one
    ``[N, V]`` pass (and its backward) fewer, for ULD, which reads probabilities only."""
    logits = logits.to(dtype)
    return torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _continuation(continuation: Tensor | None, like: Tensor) -> Tensor:
    if continuation is None:
        return like.new_zeros(like.shape[:-1])
    return continuation.to(like.dtype)


def _coarse(log_probs: Tensor, log_z: Tensor, shared: Tensor, only: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, V]`` log-probs and ``[N]`` continuations ``log Z`` -> the merged coarse log-probs
    ``[N, S + 1]`` (the shared ids' and the bucket's log-mass, ``log(Z·M_U + 1 − Z)``) and the merged
    unshared log-probs ``[N, V − S]`` (for the ULD part). The bucket is computed without
    ``1 − Σ shared`` (which cancels to noise when the unshared mass is tiny) and with finite
    gradients at ``Z = 1`` and at an empty side."""
    dtype_min = torch.finfo(log_probs.dtype).min
    unshared = log_probs.index_select(-1, only) + log_z.unsqueeze(-1)
    if only.numel():
        log_unshared = torch.logsumexp(unshared, -1)
    else:
        log_unshared = torch.full_like(log_z, dtype_min)
    # log(1 − Z) via a where on both sides: at Z = 1 its gradient would be 0·inf = NaN.
    below_one = log_z < 0
    safe = torch.where(below_one, log_z, torch.full_like(log_z, -1.0))
    log_rest = torch.where(below_one, torch.log(-torch.expm1(safe)), torch.full_like(log_z, dtype_min))
    bucket = torch.logaddexp(log_unshared, log_rest).clamp(min=dtype_min)
    merged_shared = log_probs.index_select(-1, shared) + log_z.unsqueeze(-1)
    return torch.cat([merged_shared, bucket.unsqueeze(-1)], dim=-1), unshared


def _check_rows(student: Tensor, teacher: Tensor, student_continuation, teacher_continuation) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student_logits {list(student.shape)} and teacher_logits {list(teacher.shape)} must be "
            "[N, V_s] and [N, V_t] with the same N: pass the rows of the aligned positions only."
        )
    _check_continuations(student.shape[0], student_continuation, teacher_continuation)


def _check_continuations(rows: int, student_continuation, teacher_continuation) -> None:
    for side, continuation in (("student", student_continuation), ("teacher", teacher_continuation)):
        if continuation is not None and continuation.shape != (rows,):
            raise ValueError(
                f"{side}_continuation has shape {list(continuation.shape)}; pass one log-probability "
                f"per aligned position, [{rows}] (0 for one-token spans)."
            )


def _check_vocab(vocab: SharedVocab, student_size: int, teacher_size: int) -> None:
    if (vocab.student_size, vocab.teacher_size) != (student_size, teacher_size):
        raise ValueError(
            f"the shared vocabulary was built for {vocab.student_size} student and {vocab.teacher_size} "
            f"teacher ids but the logits have {student_size} and {teacher_size}; build it with the heads' row counts."
        )


# --- spans ---------------------------------------------------------------------------------------


def token_log_probs(logits: Tensor, token_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits/T)[token]`` at every row: ``[L, V]`` logits at the positions that predict
    ``token_ids`` ``[L]`` -> ``[L]``, differentiable. Row ``j`` must be the position *before* token ``j``."""
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"logits {list(logits.shape)} and token_ids {list(token_ids.shape)} disagree; pass one row "
            "per token, the row of the position that predicts it."
        )
    scaled = logits.to(compute_dtype(logits)) / temperature
    return scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def span_continuation(log_probs: Tensor, span_starts: Tensor, span_lengths: Tensor) -> Tensor:
    """``log Z`` of each span: ``Σ_{j=start+1}^{start+len−1} log_probs[j]`` -> ``[K]`` (0 for one token).

    log_probs: ``[L]`` from :func:`token_log_probs`; span_starts, span_lengths: ``[K]`` rows of
    each span's first token and its token count (≥ 1). Summed exactly (no cumulative sums)."""
    if span_lengths.numel() and int(span_lengths.min()) < 1:
        raise ValueError("a span has no tokens; pass spans of at least one token on each side.")
    if span_lengths.numel() and int((span_starts + span_lengths).max()) > log_probs.shape[0]:
        raise ValueError(f"a span runs past the {log_probs.shape[0]} token rows; check span_starts and span_lengths.")
    inner = span_lengths - 1
    owner = torch.repeat_interleave(torch.arange(span_starts.numel(), device=log_probs.device), inner)
    first = torch.repeat_interleave(span_starts + 1, inner)
    offset = torch.arange(owner.numel(), device=log_probs.device) - torch.repeat_interleave(inner.cumsum(0) - inner, inner)
    rows = first + offset
    total = log_probs.new_zeros(span_starts.numel())
    return total.index_add(0, owner, log_probs.index_select(0, rows))


# --- chunked sums --------------------------------------------------------------------------------

METHODS = ("uld", "gold")


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
             top_k: int | None = None, student_continuation: Tensor | None = None,
             teacher_continuation: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Σ over the ``N`` aligned positions of :func:`uld_per_position`, ``chunk_size`` rows at a time.

    student_logits: ``[N, V_s]``; teacher_logits: ``[N, V_t]`` (no gradient reaches it).
    Returns a scalar in float32 (float64 for float64 inputs)."""
    return _logits_sum("uld", student_logits, teacher_logits, None, dict(temperature=temperature, top_k=top_k),
                       student_continuation, teacher_continuation, chunk_size)


def gold_loss(student_logits: Tensor, teacher_logits: Tensor, vocab: SharedVocab, *, temperature: float = 1.0,
              uld_weight: float = 1.0, top_k: int | None = None, kind: str = "fkl", beta: float = 0.5,
              skew: float = 0.1, student_continuation: Tensor | None = None,
              teacher_continuation: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Σ over the ``N`` aligned positions of :func:`gold_per_position`, ``chunk_size`` rows at a time."""
    settings = dict(temperature=temperature, uld_weight=uld_weight, top_k=top_k, kind=kind, beta=beta, skew=skew)
    return _logits_sum("gold", student_logits, teacher_logits, vocab, settings,
                       student_continuation, teacher_continuation, chunk_size)


def fused_cross_tokenizer_loss(student_hidden: Tensor, student_head: LMHead, teacher_hidden: Tensor,
                               teacher_head: LMHead, *, method: str, vocab: SharedVocab | None = None,
                               temperature: float = 1.0, uld_weight: float = 1.0, top_k: int | None = None,
                               kind: str = "fkl", beta: float = 0.5, skew: float = 0.1,
                               student_continuation: Tensor | None = None,
                               teacher_continuation: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """:func:`uld_loss` or :func:`gold_loss` of ``student_head.logits(student_hidden)`` against
    ``teacher_head.logits(teacher_hidden)``, each head applied to one chunk of rows at a time, so
    neither model's ``[N, V]`` logits ever exist.

    student_hidden: ``[N, H_s]`` at the aligned positions; gradients reach it, the head's weight and
    bias when they require one, and ``student_continuation``. teacher_hidden: ``[N, H_t]`` (frozen);
    or, with a cached teacher as ``teacher_head`` (:class:`~trainer.losses.topk_teacher.TopKTeacher`),
    ``[N]`` indices of its positions, whose rows it rebuilds a chunk at a time.
    The continuations are inputs here: a span's inner rows are scored by whoever built them."""
    settings = _method_settings(method, vocab, temperature=temperature, uld_weight=uld_weight, top_k=top_k,
                                kind=kind, beta=beta, skew=skew)
    if student_hidden.dim() != 2 or teacher_hidden.shape[:1] != student_hidden.shape[:1]:
        raise ValueError(
            f"student_hidden {list(student_hidden.shape)} and teacher_hidden {list(teacher_hidden.shape)} "
            "must be [N, H_s] and [N, H_t] with the same N: pass the aligned positions' hidden states."
        )
    _check_continuations(student_hidden.shape[0], student_continuation, teacher_continuation)
    if vocab is not None:
        _check_vocab(vocab, student_head.rows, teacher_head.rows)
        vocab = vocab.to(student_hidden.device)
    rows = _per_position(method, vocab, settings)

    def chunk_value(chunk, projected, continuation):
        with torch.no_grad():
            teacher = teacher_head.logits(teacher_hidden[chunk])
        return rows(student_head.finish(projected), teacher, continuation, _rows_of(teacher_continuation, chunk)).sum()

    step = chunk_size or default_chunk_size(student_head.rows, teacher_head.rows)
    continuation = _zeros_if_none(student_continuation, student_hidden)
    return _HeadChunks.apply(chunk_value, step, student_head, student_hidden, student_head.weight,
                             student_head.bias, continuation)


def _logits_sum(method, student, teacher, vocab, settings, student_continuation, teacher_continuation, chunk_size):
    """The chunked sum of ``method`` on given logits (what :func:`uld_loss` and :func:`gold_loss` run)."""
    _check_rows(student, teacher, student_continuation, teacher_continuation)
    if vocab is not None:
        _check_vocab(vocab, student.shape[-1], teacher.shape[-1])
        vocab = vocab.to(student.device)
    rows = _per_position(method, vocab, settings)
    teacher = teacher.detach()

    def chunk_value(chunk, student_rows, continuation):
        return rows(student_rows, teacher[chunk], continuation, _rows_of(teacher_continuation, chunk)).sum()

    step = chunk_size or default_chunk_size(student.shape[-1], teacher.shape[-1])
    return _ChunkedRows.apply(chunk_value, student.shape[0], step, (True, True), student,
                              _zeros_if_none(student_continuation, student))


def _method_settings(method: str, vocab, **settings) -> dict:
    """The keywords ``method``'s per-position function reads (ULD reads no divergence settings)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a cross-tokenizer loss: choose one of {', '.join(METHODS)}.")
    if method == "gold" and vocab is None:
        raise ValueError("method='gold' needs the shared vocabulary: pass vocab=match_vocabularies(...).")
    if method == "uld":
        return dict(temperature=settings["temperature"], top_k=settings["top_k"])
    return settings


def _per_position(method: str, vocab, settings: dict) -> Callable:
    """``(student [C, V_s], teacher [C, V_t], student_continuation, teacher_continuation) -> [C]``."""
    if method == "uld":
        return lambda s, t, cs, ct: uld_per_position(s, t, student_continuation=cs, teacher_continuation=ct, **settings)
    return lambda s, t, cs, ct: gold_per_position(s, t, vocab, student_continuation=cs, teacher_continuation=ct, **settings)


def _rows_of(tensor: Tensor | None, chunk: slice) -> Tensor | None:
    return None if tensor is None else tensor.detach()[chunk]


def _zeros_if_none(continuation: Tensor | None, like: Tensor) -> Tensor:
    return like.new_zeros(like.shape[0]) if continuation is None else continuation


class _ChunkedRows(torch.autograd.Function):
    """Forward sums ``chunk_value(chunk, *inputs)`` a chunk of rows at a time and takes each chunk's
    gradient at once, so no chunk's graph outlives it; backward scales the stored gradients.

    ``sliced[i]``: whether ``tensors[i]`` is indexed by row (its chunk is passed, and its gradient
    written there) or whole (a head's weight: passed whole, its gradient summed over chunks, in
    float32 or wider so a bf16 weight's gradient is not rounded once per chunk)."""

    @staticmethod
    def forward(ctx, chunk_value, rows, step, sliced, *tensors):
        wants = [wanted and tensor is not None for wanted, tensor in zip(ctx.needs_input_grad[4:], tensors)]
        grads = [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                 if wanted else None for t, wanted in zip(tensors, wants)]
        total = torch.zeros((), dtype=torch.promote_types(tensors[0].dtype, torch.float32), device=tensors[0].device)
        for start in range(0, rows, step):
            chunk = slice(start, start + step)
            inputs = [None if t is None else (t[chunk] if by_row else t).detach().requires_grad_(wanted)
                      for t, by_row, wanted in zip(tensors, sliced, wants)]
            with torch.enable_grad():
                value = chunk_value(chunk, *inputs)
            if any(wants):
                _add_chunk_grads(value, inputs, grads, sliced, chunk)
            total = total + value.detach()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.wants, ctx.dtypes = wants, [None if t is None else t.dtype for t in tensors]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [(stored * grad_total).to(dtype) if wanted else None
                 for stored, wanted, dtype in zip(ctx.saved_tensors, ctx.wants, ctx.dtypes)]
        return (None, None, None, None, *grads)


def _add_chunk_grads(value: Tensor, inputs: list, grads: list, sliced, chunk: slice) -> None:
    """One chunk's gradients into the accumulators: written at the chunk's rows, or summed."""
    wanted = [i for i, g in enumerate(grads) if g is not None]
    chunk_grads = torch.autograd.grad(value, [inputs[i] for i in wanted], allow_unused=True)
    for i, chunk_grad in zip(wanted, chunk_grads):
        if chunk_grad is None:
            continue
        if sliced[i]:
            grads[i][chunk] = chunk_grad
        else:
            grads[i] += chunk_grad


class _HeadChunks(torch.autograd.Function):
    """:func:`fused_cross_tokenizer_loss`'s sum, a chunk of rows at a time, with the student head's
    backward written out as :mod:`trainer.losses.fused` writes it.

    Each chunk's logits are projected outside autograd and ``chunk_value(chunk, projected [C, V_s],
    continuation [C])`` is differentiated to them (and the continuation) only; the logit gradient is
    then chained through the head by hand: the weight's gradient added in place into its accumulator
    (``addmm_``), the bias's summed, the hidden states' written at the chunk's rows. Autograd through
    the head itself would hand back a new ``[V_s, H]`` weight gradient per chunk, one more tensor the
    size of the weight at the peak (docs/benchmarks.md, across tokenizers)."""

    @staticmethod
    def forward(ctx, chunk_value, step, head, hidden, weight, bias, continuation):
        wants = [wanted and tensor is not None for wanted, tensor in
                 zip(ctx.needs_input_grad[3:], (hidden, weight, bias, continuation))]
        # Float32 or wider, so a bf16 weight's gradient is not rounded once per chunk.
        grads = [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                 if wanted else None for t, wanted in zip((hidden, weight, bias, continuation), wants)]
        wants_logits = any(wants[:3])
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        workspace = ChunkWorkspace(min(step, max(1, hidden.shape[0])))
        for start in range(0, hidden.shape[0], step):
            chunk = slice(start, start + step)
            rows = hidden[chunk]
            buffer = workspace.take("student_logits", rows.shape[0], head.rows, weight.dtype, weight.device)
            projected = head.projection(rows, weight, bias, out=buffer).detach().requires_grad_(wants_logits)
            chunk_continuation = continuation[chunk].detach().requires_grad_(wants[3])
            with torch.enable_grad():
                value = chunk_value(chunk, projected, chunk_continuation)
            if wants_logits or wants[3]:
                grad_logits, grad_continuation = _chunk_grads(value, projected, chunk_continuation)
                if grad_logits is not None:
                    index = torch.arange(start, start + rows.shape[0], device=hidden.device)
                    accumulate_head_grads(grad_logits, rows, index, weight, head.rows, *grads[:3])
                if grad_continuation is not None:
                    grads[3][chunk] = grad_continuation
            total += value.detach()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.wants, ctx.used = wants, False
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias, continuation)]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.used:
            raise RuntimeError("fused_cross_tokenizer_loss supports one backward pass per forward; "
                               "recompute the loss instead of retain_graph=True.")
        ctx.used = True
        # In place: each stored gradient is used once, and a [V, H] copy would be the largest tensor here.
        grads = [stored.mul_(grad_total).to(dtype) if wanted else None
                 for stored, wanted, dtype in zip(ctx.saved_tensors, ctx.wants, ctx.dtypes)]
        return (None, None, None, *grads)


def _chunk_grads(value: Tensor, projected: Tensor, continuation: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``d value / d projected`` ``[C, V_s]`` and ``d value / d continuation`` ``[C]``, each None if not wanted."""
    inputs = [t for t in (projected, continuation) if t.requires_grad]
    found = iter(torch.autograd.grad(value, inputs, allow_unused=True))
    return tuple(next(found) if t.requires_grad else None for t in (projected, continuation))

"""The cross-tokenizer loss of a whole micro-batch, read off both models' hidden states at the
spans of a :class:`~trainer.losses.spans.SpanBatch`, as sums; and its evaluation terms.

:func:`cross_tokenizer_sums` is to a cross-tokenizer step what
:func:`~trainer.losses.fused.token_sums` is to a same-tokenizer one: ``objective = kd_weight·kd +
ce_weight·ce``, with ``kd`` the Σ of ULD or GOLD over the ``N`` aligned spans
(:mod:`trainer.losses.cross_tokenizer`) and ``ce`` the Σ of the student's cross-entropy over its
supervised positions. Both are sums: the step divides once, by its supervised *student* token count.

Per span, three kinds of rows are read (flat positions ``r·T + t`` into ``hidden.reshape(-1, H)``):

- the *first* row of each side (``spans.student_first`` / ``teacher_first``): the full
  next-token distribution, scored by ULD/GOLD, chunk by chunk with the heads fused in;
- the *inner* rows (``spans.student_inner`` / ``teacher_inner``): only the log-probability of the
  token each predicts, at the loss's temperature; summed per span (``*_inner_span``) they are the
  span's continuation ``log Z`` (``[N]``, 0 at one-token spans), which scales the merged span
  distribution (cross_tokenizer.py, "Spans"). The student's carries gradient to its inner rows
  and head; the teacher's none;
- every supervised student position, for the CE: :func:`~trainer.losses.fused.token_sums` with
  no teacher, as the sft path runs it.

Worked example. Two rows, the student's ``T_s = 6`` positions, the teacher's ``T_t = 5``. In row 1
the student writes ``" hel" "lo"`` at tokens 3..4 (``[a, b) = [3, 5)``), the teacher ``" hello"``
at token 2 (``[c, d) = [2, 3)``), span ``k``. Then ``student_first[k] = 1·6 + 3 − 1 = 8`` (the
position predicting ``" hel"``), ``teacher_first[k] = 1·5 + 2 − 1 = 6``; the student has one inner
token, ``"lo"``, predicted at flat position ``9`` (``student_inner`` holds 9, ``student_inner_ids``
the id of ``"lo"``, ``student_inner_span`` holds ``k``), the teacher none. Span ``k``'s rows: the
student's hidden row 8 against the teacher's row 6, with ``student log Z[k] = log softmax(head(h_9)/T)["lo"]``
and ``teacher log Z[k] = 0``.

**The student's continuation, and why it is written out.** Its ``M`` inner rows need the full
softmax for a single log-probability each, ``log q(x) = z_x/T − logsumexp(z/T)``, whose gradient
is ``(onehot(x) − softmax(z/T))/T`` per unit of upstream gradient. Forward computes the values a
chunk at a time under ``no_grad``; backward recomputes each chunk's logits and writes that
gradient out (:class:`_InnerLogProbs`), softmax and gradient in one ``[C, V]`` buffer per chunk;
only the ``[M, H]`` inner hidden rows are saved. The upstream gradient is not known until the
ULD/GOLD term has been taken, so it cannot be folded in during forward as the fused loss does: the
recompute costs one more projection of the ``M`` inner rows (a share of the step's tokens), and
reads the student's head weight in backward: under ZeRO-3 the step keeps it gathered through the
backward already (trainer/train/job.py), for the fused loss's own gradient.
``torch.utils.checkpoint`` per chunk does the same work through autograd's graph of the chunk
(log-softmax, gather and their backward, a few ``[C, V]`` tensors). Measured on the shared 2-core
CPU here, M = 2048 inner rows, V = 32000, H = 256, chunk 256, fp32, one forward + backward (peak
RSS above the inputs, glibc made to return freed blocks; CPU seconds, as wall time was noise under
load 5): written out 96 MB and 7.2 s, checkpoint 158 MB and 9.1 s, unchunked autograd 1000 MB and
4.8 s (one projection fewer). GPU not measured.

:func:`cross_tokenizer_eval_sums` gives the held-out terms of the same spans, as sums for the
evaluation to divide: no gradient, temperature 1, a chunk of spans at a time.

Both take the teacher as a model's hidden states and head, or as a cache of its top-k
(:class:`~trainer.losses.topk_teacher.TopKTeacher` over the batch's ``B·T_t`` flat teacher
positions, ``teacher_hidden=None``): its rows are rebuilt a chunk at a time where a head would
project them, and a span's continuation reads the stored log-probability of each inner token.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from trainer.losses.cross_tokenizer import (
    SharedVocab,
    default_chunk_size,
    fused_cross_tokenizer_loss,
    gold_per_position,
    token_log_probs,
)
from trainer.losses.divergence import compute_dtype, tempered_log_probs
from trainer.losses.fused import _accumulate, token_sums
from trainer.losses.fused import default_chunk_size as token_chunk_size
from trainer.losses.head import LMHead
from trainer.losses.objective import TokenSums
from trainer.losses.settings import LossSettings
from trainer.losses.spans import SpanBatch
from trainer.losses.topk_teacher import TopKTeacher

# The keys of cross_tokenizer_eval_sums, in the order an evaluation may stack them to all-reduce.
EVAL_TERMS = ("kl", "unshared_mass", "spans", "one_to_one", "top1_agreement")


def cross_tokenizer_sums(student_hidden: Tensor, student_head: LMHead, teacher_hidden: Tensor,
                         teacher_head: LMHead, spans: SpanBatch, targets: Tensor, *, method: str,
                         vocab: SharedVocab | None, kd_weight: float, ce_weight: float, temperature: float = 1.0,
                         uld_weight: float = 1.0, top_k: int | None = None, kind: str = "fkl", beta: float = 0.5,
                         skew: float = 0.1, chunk_size: int | None = None,
                         supervised: Tensor | None = None) -> TokenSums:
    """One micro-batch's cross-tokenizer objective as sums (module docstring).

    Args:
        student_hidden: ``[B, T_s, H_s]`` the student head's input; gradients reach it and the
            head's weight and bias when they require one.
        teacher_hidden: ``[B, T_t, H_t]`` the teacher head's input (frozen, no gradient); None
            when ``teacher_head`` is a cached teacher (:class:`~trainer.losses.topk_teacher.TopKTeacher`)
            laid out over the ``B·T_t`` flat teacher positions, as the spans index them.
        spans: the micro-batch's ``N`` aligned spans, flat positions into both batches.
        targets: ``[B, T_s]`` the student's next-token targets
            (:func:`~trainer.losses.objective.targets_at_each_position`), for the CE.
        method: ``"uld"`` or ``"gold"``; vocab: the shared ids (GOLD needs them; ULD reads none, only checks their sizes).
        temperature, uld_weight, top_k, kind, beta, skew: ULD/GOLD's settings
            (:func:`~trainer.losses.cross_tokenizer.fused_cross_tokenizer_loss`); the CE is at
            temperature 1, as on the same-tokenizer path.
        chunk_size: rows per chunk of every pass (spans, inner tokens, CE); None: each's default.
        supervised: the flat student positions with a target, if already known (as for token_sums).

    Returns:
        :class:`~trainer.losses.objective.TokenSums`: ``objective = kd_weight·kd + ce_weight·ce``
        (carries the gradient), ``kd`` (0 with no spans, not NaN) and ``ce``, detached.
    """
    student_rows, teacher_rows = _flat(student_hidden, "student_hidden"), _teacher_rows(teacher_hidden, teacher_head)
    check_spans(spans, student_rows.shape[0], _positions(teacher_rows, teacher_head), student_head.rows,
                teacher_head.rows)
    student_continuation = student_log_z(student_rows, student_head, spans, temperature=temperature,
                                         chunk_size=chunk_size)
    teacher_continuation = teacher_log_z(teacher_rows, teacher_head, spans, temperature=temperature,
                                         chunk_size=chunk_size)
    kd = fused_cross_tokenizer_loss(
        student_rows.index_select(0, spans.student_first), student_head,
        _first_rows(teacher_rows, spans.teacher_first), teacher_head, method=method, vocab=vocab,
        temperature=temperature, uld_weight=uld_weight, top_k=top_k, kind=kind, beta=beta, skew=skew,
        student_continuation=student_continuation, teacher_continuation=teacher_continuation, chunk_size=chunk_size,
    )
    ce = _student_ce(student_hidden, student_head, targets, ce_weight, chunk_size, supervised)
    return TokenSums(kd_weight * kd + ce.objective, kd.detach(), ce.ce)


@torch.no_grad()
def cross_tokenizer_eval_sums(student_hidden: Tensor, student_head: LMHead, teacher_hidden: Tensor,
                              teacher_head: LMHead, spans: SpanBatch, vocab: SharedVocab, *,
                              chunk_size: int | None = None) -> dict[str, Tensor]:
    """The evaluation's terms over the ``N`` spans of one micro-batch, as sums, at temperature 1.

    student_hidden: ``[B, T_s, H_s]``; teacher_hidden: ``[B, T_t, H_t]`` (or None with a cached
    teacher as ``teacher_head``, as for :func:`cross_tokenizer_sums`); vocab: the shared ids.
    Returns float64 scalars on the hidden states' device (nothing read to the host), keyed:

    - ``kl``: Σ of GOLD's coarse forward KL(teacher ‖ student) over the shared ids and the bucket,
      with the spans' continuations (``gold`` with ``kind="fkl"``, ``uld_weight=0``);
    - ``unshared_mass``: Σ of the student's probability mass on ids the teacher lacks, at each
      span's first position (no continuation: the next-token distribution itself);
    - ``spans``: ``N``; ``one_to_one``: the spans of one token on each side;
    - ``top1_agreement``: the spans whose student argmax and teacher argmax (first position) are
      a shared pair.

    At most ``chunk_size`` rows of either model's logits exist at once."""
    student_rows, teacher_rows = _flat(student_hidden, "student_hidden"), _teacher_rows(teacher_hidden, teacher_head)
    check_spans(spans, student_rows.shape[0], _positions(teacher_rows, teacher_head), student_head.rows,
                teacher_head.rows)
    device = student_rows.device
    vocab = vocab.to(device)
    student_continuation = student_log_z(student_rows, student_head, spans, chunk_size=chunk_size)
    teacher_continuation = teacher_log_z(teacher_rows, teacher_head, spans, chunk_size=chunk_size)
    teacher_id_of = _teacher_id_of(vocab, student_head.rows)
    kl, unshared, agree = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
    step = chunk_size or default_chunk_size(student_head.rows, teacher_head.rows)
    for start in range(0, spans.count, step):
        chunk = slice(start, start + step)
        student = student_head.logits(student_rows.index_select(0, spans.student_first[chunk]))
        teacher = teacher_head.logits(_first_rows(teacher_rows, spans.teacher_first[chunk]))
        kl += gold_per_position(student, teacher, vocab, uld_weight=0.0, student_continuation=student_continuation[chunk],
                                teacher_continuation=teacher_continuation[chunk]).sum().double()
        unshared += _mass_on(student, vocab.student_only).sum().double()
        agree += (teacher_id_of.index_select(0, student.argmax(-1)) == teacher.argmax(-1)).sum().double()
    one_token = ((spans.student_tokens == 1) & (spans.teacher_tokens == 1)).sum().to(device, torch.float64)
    count = torch.tensor(float(spans.count), dtype=torch.float64, device=device)
    return dict(zip(EVAL_TERMS, (kl, unshared, count, one_token, agree)))


# --- continuations -------------------------------------------------------------------------------


def student_log_z(rows: Tensor, head: LMHead, spans: SpanBatch, *, temperature: float = 1.0,
                  chunk_size: int | None = None) -> Tensor:
    """Each span's student continuation ``log Z``: ``[B·T_s, H_s]`` flat rows -> ``[N]``, with
    gradient to ``rows`` and the head (module docstring, "The student's continuation")."""
    inner = rows.index_select(0, spans.student_inner)
    log_probs = _InnerLogProbs.apply(inner, head.weight, head.bias, spans.student_inner_ids, head, temperature,
                                     chunk_size or token_chunk_size(head.rows))
    return log_probs.new_zeros(spans.count).index_add(0, spans.student_inner_span, log_probs)


@torch.no_grad()
def teacher_log_z(rows: Tensor | None, head: LMHead | TopKTeacher, spans: SpanBatch, *, temperature: float = 1.0,
                  chunk_size: int | None = None) -> Tensor:
    """Each span's teacher continuation ``log Z``: ``[B·T_t, H_t]`` flat rows -> ``[N]``, no gradient
    (``rows`` None: a cached teacher reads its own positions)."""
    step = chunk_size or token_chunk_size(head.rows)
    if rows is None:
        log_probs = head.token_log_probs(spans.teacher_inner, spans.teacher_inner_ids, temperature=temperature,
                                         chunk_size=step)
    else:
        log_probs = _inner_log_probs(rows.index_select(0, spans.teacher_inner), head.weight, head.bias,
                                     spans.teacher_inner_ids, head, temperature, step)
    return log_probs.new_zeros(spans.count).index_add(0, spans.teacher_inner_span, log_probs)


def _teacher_rows(teacher_hidden: Tensor | None, teacher_head) -> Tensor | None:
    """The teacher's flat ``[B·T_t, H_t]`` rows, or None for a cached teacher (which holds its positions)."""
    if isinstance(teacher_head, TopKTeacher):
        if teacher_hidden is not None:
            raise ValueError("a cached teacher (TopKTeacher) holds its own positions; pass teacher_hidden=None.")
        return None
    return _flat(teacher_hidden, "teacher_hidden").detach()


def _positions(teacher_rows: Tensor | None, teacher_head) -> int:
    return teacher_head.positions if teacher_rows is None else teacher_rows.shape[0]


def _first_rows(teacher_rows: Tensor | None, first: Tensor) -> Tensor:
    """What the teacher's head reads at the spans' first positions: hidden rows, or (cached) the positions."""
    return first if teacher_rows is None else teacher_rows.index_select(0, first)


def _inner_log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, token_ids: Tensor, head: LMHead,
                     temperature: float, step: int) -> Tensor:
    """``log softmax(head(hidden)/T)[token]`` per row, ``step`` rows at a time: ``[M, H]`` -> ``[M]``."""
    values = [token_log_probs(head.finish(head.projection(hidden[start:start + step], weight, bias)),
                              token_ids[start:start + step], temperature=temperature)
              for start in range(0, hidden.shape[0], step)]
    if values:
        return torch.cat(values)
    return hidden.new_zeros(0, dtype=compute_dtype(hidden, weight))


class _InnerLogProbs(torch.autograd.Function):
    """:func:`_inner_log_probs` with a backward that recomputes each chunk's logits and writes the
    logit gradient ``g·(onehot − softmax(z/T))/T`` out (module docstring); autograd runs only
    through the head's scaling or soft-capping, if any."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, head, temperature, step):
        with torch.no_grad():
            values = _inner_log_probs(hidden, weight, bias, token_ids, head, temperature, step)
        ctx.save_for_backward(hidden, weight, bias, token_ids)
        ctx.head, ctx.temperature, ctx.step = head, temperature, step
        return values

    @staticmethod
    def backward(ctx, grad_values):
        hidden, weight, bias, token_ids = ctx.saved_tensors
        head, temperature, step = ctx.head, ctx.temperature, ctx.step
        wants = ctx.needs_input_grad[:3]
        grads = [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                 if wanted else None for t, wanted in zip((hidden, weight, bias), wants)]
        for start in range(0, hidden.shape[0], step):
            chunk = slice(start, start + step)
            rows = hidden[chunk]
            grad_logits = _log_prob_logit_grad(head, rows, weight, bias, token_ids[chunk], grad_values[chunk],
                                               temperature)
            index = torch.arange(start, start + rows.shape[0], device=hidden.device)
            _accumulate(grad_logits, rows, index, weight, head.rows, *grads)
        return (*(g.to(t.dtype) if g is not None else None for g, t in zip(grads, (hidden, weight, bias))),
                None, None, None, None)


def _log_prob_logit_grad(head: LMHead, rows: Tensor, weight: Tensor, bias: Tensor | None, token_ids: Tensor,
                         upstream: Tensor, temperature: float) -> Tensor:
    """``[C, V]`` gradient of ``Σ upstream · log softmax(head(rows)/T)[token]`` w.r.t. the projected logits."""
    dtype = compute_dtype(weight, upstream)
    with torch.no_grad():
        raw = head.projection(rows, weight, bias)
    if head.has_quirks:
        raw.requires_grad_(True)
        with torch.enable_grad():
            logits = head.finish(raw)
        grad = logits.detach().to(dtype, copy=True)  # tanh's backward reads its own output: not in place
    else:
        logits, grad = raw, raw.to(dtype)  # nothing else reads the projection: overwritten below
    # softmax(z/T) in place: one [C, V] buffer per chunk, which then becomes the gradient.
    grad.div_(temperature)
    grad.sub_(grad.amax(dim=-1, keepdim=True)).exp_()
    grad.div_(grad.sum(dim=-1, keepdim=True)).neg_()
    grad.scatter_add_(1, token_ids.unsqueeze(1), torch.ones_like(grad[:, :1]))
    grad.mul_((upstream.to(grad.dtype) / temperature).unsqueeze(1))
    if head.has_quirks:  # back through the head's scaling or soft-capping
        (grad,) = torch.autograd.grad(logits, raw, grad.to(logits.dtype))
    return grad


# --- the rest ------------------------------------------------------------------------------------


def _student_ce(student_hidden, student_head: LMHead, targets, ce_weight: float, chunk_size, supervised):
    """The student's CE on its targets, fused and chunked as on the sft path. At ``ce_weight == 0``
    it is reported, not trained: the inputs are detached so no gradient is computed for it."""
    if ce_weight == 0:
        student_hidden = student_hidden.detach()
        student_head = dataclasses.replace(
            student_head, weight=student_head.weight.detach(),
            bias=None if student_head.bias is None else student_head.bias.detach())
    return token_sums(student_hidden, student_head, targets, LossSettings("sft"), kd_weight=0.0,
                      ce_weight=ce_weight, chunk_size=chunk_size, supervised=supervised)


def _mass_on(logits: Tensor, ids: Tensor) -> Tensor:
    """Each row's probability mass on ``ids`` at temperature 1: ``[C, V]`` -> ``[C]`` (0 for no ids)."""
    if ids.numel() == 0:
        return logits.new_zeros(logits.shape[0])
    log_probs = tempered_log_probs(logits, 1.0, compute_dtype(logits))
    return torch.logsumexp(log_probs.index_select(-1, ids), -1).exp()


def _teacher_id_of(vocab: SharedVocab, student_rows: int) -> Tensor:
    """``[V_s]`` the teacher id paired with each student id, −1 where the teacher lacks it."""
    lookup = torch.full((student_rows,), -1, dtype=torch.long, device=vocab.student_ids.device)
    return lookup.index_copy_(0, vocab.student_ids, vocab.teacher_ids)


def _flat(hidden: Tensor, name: str) -> Tensor:
    if hidden.dim() != 3:
        raise ValueError(f"{name} has shape {list(hidden.shape)}; pass the [B, T, H] input of the model's head.")
    return hidden.reshape(-1, hidden.shape[-1])


def check_spans(spans: SpanBatch, student_positions: int, teacher_positions: int,
                student_vocab: int | None = None, teacher_vocab: int | None = None) -> None:
    """A one-line error for a :class:`SpanBatch` that does not fit the batches it indexes.

    Lengths are always checked; values only on the host (a device tensor's would make the host wait
    for the device; pairing.py builds spans on the host, so the check has run by then)."""
    count, inner = spans.count, (spans.student_inner.numel(), spans.teacher_inner.numel())
    for side, field in (("student", "tokens"), ("teacher", "first"), ("teacher", "tokens")):
        if getattr(spans, f"{side}_{field}").numel() != count:
            raise ValueError(f"spans.{side}_{field} has {getattr(spans, f'{side}_{field}').numel()} entries for "
                             f"{count} spans; build the SpanBatch with one per span.")
    for side, size in zip(("student", "teacher"), inner):
        for field in ("inner_ids", "inner_span"):
            if getattr(spans, f"{side}_{field}").numel() != size:
                raise ValueError(f"spans.{side}_{field} does not match spans.{side}_inner ({size} entries); "
                                 "build the SpanBatch with one per inner token.")
    if spans.student_first.device.type != "cpu":
        return
    for side, positions in (("student", student_positions), ("teacher", teacher_positions)):
        for field in ("first", "inner"):
            index = getattr(spans, f"{side}_{field}")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= positions):
                raise ValueError(f"spans.{side}_{field} points outside the {positions} {side} positions; "
                                 f"build the spans from this batch's [B, T] {side} tokens.")
        ids, vocab_size = getattr(spans, f"{side}_inner_ids"), student_vocab if side == "student" else teacher_vocab
        if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"spans.{side}_inner_ids has an id outside the {side} head's {vocab_size} ids; "
                             f"build the spans with the {side}'s tokenizer.")
        owner = getattr(spans, f"{side}_inner_span")
        if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= count):
            raise ValueError(f"spans.{side}_inner_span names a span outside 0..{count - 1}; number spans in order.")

"""ULD and GOLD across tokenizers against float64 references written out position by position."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.losses import KINDS, LMHead, distill_loss
from trainer.losses.cross_tokenizer import (
    CHUNK_ELEMENTS,
    MIN_CHUNK_ROWS,
    default_chunk_size,
    fused_cross_tokenizer_loss,
    gold_loss,
    gold_per_position,
    match_vocabularies,
    shared_vocab,
    sorted_l1,
    span_continuation,
    token_log_probs,
    uld_loss,
    uld_per_position,
    unshared_mass,
)

# (student vocabulary, teacher vocabulary): student larger, teacher larger, equal.
SIZES = [(7, 11), (11, 7), (9, 9)]


def logits(rows, vocab, *, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, vocab, generator=generator, dtype=torch.float64)


def some_shared(student_size, teacher_size, count, seed=0):
    """``count`` random pairs (student id, teacher id), each id used once per side."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randperm(student_size, generator=generator)[:count]
    teacher = torch.randperm(teacher_size, generator=generator)[:count]
    return shared_vocab(student, teacher, student_size, teacher_size)


def continuations(rows, seed):
    """log Z per position: some one-token spans (exactly 0), the others below 0."""
    generator = torch.Generator().manual_seed(seed)
    values = -torch.rand(rows, generator=generator, dtype=torch.float64) * 2
    values[::3] = 0.0
    return values


# --- references, in probability space, one position at a time --------------------------------


def sorted_l1_reference(a, b):
    a, b = sorted(a.tolist(), reverse=True), sorted(b.tolist(), reverse=True)
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def with_remainder(probabilities, z):
    """The merged probabilities and the span's remainder 1 − Z as one more outcome (a zero at Z = 1)."""
    return torch.cat([probabilities, torch.tensor([1 - z], dtype=probabilities.dtype)])


def uld_reference(student, teacher, temperature=1.0, cs=None, ct=None):
    values = []
    for n in range(student.shape[0]):
        zq = math.exp(cs[n]) if cs is not None else 1.0
        zp = math.exp(ct[n]) if ct is not None else 1.0
        q = torch.softmax(student[n] / temperature, -1) * zq
        p = torch.softmax(teacher[n] / temperature, -1) * zp
        values.append(sorted_l1_reference(with_remainder(q, zq), with_remainder(p, zp)))
    return torch.tensor(values, dtype=torch.float64)


def divergence_reference(p, q, kind, beta=0.5, skew=0.1):
    """distill_loss's divergences between two lists of probabilities, with 0·log 0 = 0."""
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    def mix(a, b, weight):
        return [weight * x + (1 - weight) * y for x, y in zip(a, b)]

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":
        m = mix(p, q, beta)
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skl":
        return kl(p, mix(p, q, skew))
    if kind == "srkl":
        return kl(q, mix(q, p, skew))
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def gold_reference(student, teacher, vocab, temperature=1.0, uld_weight=1.0, cs=None, ct=None, kind="fkl"):
    """The module docstring's definition, spelled out with Python sums."""
    values = []
    for n in range(student.shape[0]):
        zq = math.exp(cs[n]) if cs is not None else 1.0
        zp = math.exp(ct[n]) if ct is not None else 1.0
        q = torch.softmax(student[n] / temperature, -1) * zq
        p = torch.softmax(teacher[n] / temperature, -1) * zp
        q_shared = [q[i].item() for i in vocab.student_ids]
        p_shared = [p[i].item() for i in vocab.teacher_ids]
        q_rest, p_rest = q[vocab.student_only], p[vocab.teacher_only]
        q_bucket = q_rest.sum().item() + (1 - zq)
        p_bucket = p_rest.sum().item() + (1 - zp)
        if vocab.student_only.numel() == 0 and zq == 1.0:
            p_shared = [x / sum(p_shared) for x in p_shared]
            p_bucket = 0.0
        shared_part = divergence_reference(p_shared + [p_bucket], q_shared + [q_bucket], kind)
        values.append(shared_part + uld_weight * sorted_l1_reference(with_remainder(q_rest, zq), with_remainder(p_rest, zp)))
    return torch.tensor(values, dtype=torch.float64)


# --- ULD --------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_size,teacher_size", SIZES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_float64_reference(student_size, teacher_size, temperature):
    student, teacher = logits(6, student_size, seed=1), logits(6, teacher_size, seed=2)
    expected = uld_reference(student, teacher, temperature)
    torch.testing.assert_close(uld_per_position(student, teacher, temperature=temperature), expected, rtol=1e-12, atol=1e-12)
    total = uld_loss(student, teacher, temperature=temperature, chunk_size=4)
    torch.testing.assert_close(total, expected.sum(), rtol=1e-12, atol=1e-12)


def test_uld_of_identical_distributions_is_zero_and_ignores_vocabulary_order():
    student = logits(4, 9, seed=3)
    teacher = student[:, torch.randperm(9)]  # the same distributions, ids shuffled
    torch.testing.assert_close(uld_loss(student, teacher), torch.tensor(0.0, dtype=torch.float64), atol=1e-14, rtol=0)


def test_uld_top_k_is_exact_at_the_vocabulary_and_a_lower_bound_below_it():
    student, teacher = logits(8, 13, seed=4), logits(8, 10, seed=5)
    exact = uld_per_position(student, teacher)
    torch.testing.assert_close(uld_per_position(student, teacher, top_k=13), exact, rtol=1e-12, atol=1e-12)
    approx = uld_per_position(student, teacher, top_k=3)
    q, p = torch.softmax(student, -1), torch.softmax(teacher, -1)
    top_q, top_p = q.sort(-1, descending=True).values[:, :3], p.sort(-1, descending=True).values[:, :3]
    expected = (top_q - top_p).abs().sum(-1) + ((1 - top_q.sum(-1)) - (1 - top_p.sum(-1))).abs()
    torch.testing.assert_close(approx, expected, rtol=1e-10, atol=1e-12)
    assert (approx <= exact + 1e-12).all() and (approx < exact - 1e-6).any()


# --- GOLD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_size,teacher_size", SIZES)
@pytest.mark.parametrize("temperature,uld_weight", [(1.0, 1.0), (2.0, 0.5), (0.7, 0.0)])
def test_gold_matches_float64_reference(student_size, teacher_size, temperature, uld_weight):
    vocab = some_shared(student_size, teacher_size, 5)
    student, teacher = logits(6, student_size, seed=6), logits(6, teacher_size, seed=7)
    expected = gold_reference(student, teacher, vocab, temperature, uld_weight)
    got = gold_per_position(student, teacher, vocab, temperature=temperature, uld_weight=uld_weight)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    total = gold_loss(student, teacher, vocab, temperature=temperature, uld_weight=uld_weight, chunk_size=4)
    torch.testing.assert_close(total, expected.sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gold_of_a_partly_shared_vocabulary_matches_the_reference_for_every_kind(kind):
    vocab = some_shared(8, 10, 5, seed=2)
    student, teacher = logits(5, 8, seed=32), logits(5, 10, seed=33)
    cs, ct = continuations(5, seed=9), continuations(5, seed=10)
    expected = gold_reference(student, teacher, vocab, 1.5, 1.0, cs.tolist(), ct.tolist(), kind=kind)
    got = gold_loss(student, teacher, vocab, temperature=1.5, kind=kind, student_continuation=cs, teacher_continuation=ct)
    torch.testing.assert_close(got, expected.sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_gold_equals_distill_loss_when_every_id_is_shared(kind, temperature):
    student, teacher = logits(3 * 7, 13, seed=8).reshape(3, 7, 13), logits(3 * 7, 13, seed=9).reshape(3, 7, 13)
    labels = torch.zeros(3, 7, dtype=torch.long)
    expected = distill_loss(student, teacher, labels, kind=kind, temperature=temperature, beta=0.3, skew=0.2)
    settings = dict(temperature=temperature, kind=kind, beta=0.3, skew=0.2)
    identity = shared_vocab(torch.arange(13), torch.arange(13), 13, 13)
    got = gold_loss(student.reshape(-1, 13), teacher.reshape(-1, 13), identity, **settings) / 21
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    # The same vocabulary numbered differently on the teacher's side: still the same divergence.
    order = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    renumbered = shared_vocab(torch.arange(13), order, 13, 13)
    teacher_renumbered = torch.empty_like(teacher).index_copy_(-1, order, teacher)
    got = gold_loss(student.reshape(-1, 13), teacher_renumbered.reshape(-1, 13), renumbered, **settings) / 21
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


def test_gold_with_a_fully_shared_student_conditions_the_teacher_on_shared_ids():
    # Every student id exists in the teacher's vocabulary; the teacher also has 4 ids of its own.
    vocab = shared_vocab(torch.arange(6), torch.tensor([9, 0, 3, 5, 7, 1]), 6, 10)
    student, teacher = logits(5, 6, seed=10), logits(5, 10, seed=11)
    got = gold_per_position(student, teacher, vocab)
    p = torch.softmax(teacher, -1)[:, vocab.teacher_ids]
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(student, -1)
    rest = [sorted_l1_reference(torch.zeros(0), torch.softmax(teacher[n], -1)[vocab.teacher_only]) for n in range(5)]
    expected = (p * (p.log() - q.log())).sum(-1) + torch.tensor(rest, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(gold_loss(student, teacher, vocab))


# --- spans of m student tokens and n teacher tokens ------------------------------------------


def test_token_log_probs_and_span_continuation_read_each_token_at_its_predicting_row():
    rows = logits(9, 6, seed=12)
    tokens = torch.tensor([3, 0, 5, 5, 1, 2, 4, 0, 3])
    lp = token_log_probs(rows, tokens, temperature=1.5)
    expected = torch.stack([torch.log_softmax(rows[j] / 1.5, -1)[tokens[j]] for j in range(9)])
    torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-12)
    # Spans: rows 0 | 1-3 | 4-5 | 6 | 7-8. A span's continuation is its tokens after the first.
    starts, lengths = torch.tensor([0, 1, 4, 6, 7]), torch.tensor([1, 3, 2, 1, 2])
    got = span_continuation(lp, starts, lengths)
    expected = torch.stack([lp[s + 1:s + n].sum() for s, n in zip(starts.tolist(), lengths.tolist())])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


def test_gold_on_merged_spans_matches_the_chain_rule_reference():
    """Student spans 1,2,3,1 tokens; teacher spans 2,1,1,3: the merged vectors in probability space."""
    student_rows, teacher_rows = logits(7, 8, seed=13), logits(7, 10, seed=14)
    student_tokens, teacher_tokens = torch.tensor([1, 4, 2, 7, 0, 3, 5]), torch.tensor([2, 9, 0, 1, 6, 6, 3])
    student_starts, student_lengths = torch.tensor([0, 1, 3, 6]), torch.tensor([1, 2, 3, 1])
    teacher_starts, teacher_lengths = torch.tensor([0, 2, 3, 4]), torch.tensor([2, 1, 1, 3])
    vocab = some_shared(8, 10, 5, seed=1)
    temperature = 1.3

    def merged_loss(student_rows):
        cs = span_continuation(token_log_probs(student_rows, student_tokens, temperature=temperature), student_starts, student_lengths)
        ct = span_continuation(token_log_probs(teacher_rows, teacher_tokens, temperature=temperature), teacher_starts, teacher_lengths)
        return gold_loss(student_rows[student_starts], teacher_rows[teacher_starts], vocab, temperature=temperature,
                         student_continuation=cs, teacher_continuation=ct, chunk_size=3)

    # The reference builds q̂(y) = q_first(y) · Π_{later tokens} q_row(token) with plain products.
    def chain(rows, tokens, starts, lengths):
        probs = torch.softmax(rows / temperature, -1)
        return [math.log(math.prod(probs[j, tokens[j]].item() for j in range(s + 1, s + n)))
                for s, n in zip(starts.tolist(), lengths.tolist())]

    cs = chain(student_rows, student_tokens, student_starts, student_lengths)
    ct = chain(teacher_rows, teacher_tokens, teacher_starts, teacher_lengths)
    expected = gold_reference(student_rows[student_starts], teacher_rows[teacher_starts], vocab, temperature, 1.0, cs, ct)
    rows = student_rows.clone().requires_grad_(True)
    loss = merged_loss(rows)
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-10, atol=1e-12)
    loss.backward()
    # The gradient reaches the rows inside a span (here rows 2, 4, 5), not only each span's first row.
    assert (rows.grad[[2, 4, 5]].abs().sum(-1) > 0).all()
    assert torch.autograd.gradcheck(merged_loss, (student_rows.clone().requires_grad_(True),), fast_mode=True)


def test_uld_on_merged_spans_scales_each_side_by_its_continuation():
    student, teacher = logits(6, 7, seed=15), logits(6, 9, seed=16)
    cs, ct = continuations(6, seed=1), continuations(6, seed=2)
    expected = uld_reference(student, teacher, 1.0, cs.tolist(), ct.tolist())
    got = uld_loss(student, teacher, student_continuation=cs, teacher_continuation=ct, chunk_size=4)
    torch.testing.assert_close(got, expected.sum(), rtol=1e-12, atol=1e-12)


# --- chunks and gradients ---------------------------------------------------------------------


def loss_and_grads(fn, student, cs):
    student, cs = student.clone().requires_grad_(True), cs.clone().requires_grad_(True)
    value = fn(student, cs)
    value.backward()
    return value.detach(), student.grad, cs.grad


@pytest.mark.parametrize("method", ["uld", "gold"])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_equals_unchunked_in_value_and_gradient(method, chunk_size):
    student, teacher = logits(11, 9, seed=17), logits(11, 12, seed=18)
    cs, ct = continuations(11, seed=3), continuations(11, seed=4)
    vocab = some_shared(9, 12, 6)
    if method == "uld":
        def chunked(s, c):
            return uld_loss(s, teacher, temperature=1.5, student_continuation=c, teacher_continuation=ct, chunk_size=chunk_size)

        def whole(s, c):
            return uld_per_position(s, teacher, temperature=1.5, student_continuation=c, teacher_continuation=ct).sum()
    else:
        def chunked(s, c):
            return gold_loss(s, teacher, vocab, temperature=1.5, student_continuation=c, teacher_continuation=ct,
                             chunk_size=chunk_size)

        def whole(s, c):
            return gold_per_position(s, teacher, vocab, temperature=1.5, student_continuation=c,
                                     teacher_continuation=ct).sum()
    for got, expected in zip(loss_and_grads(chunked, student, cs), loss_and_grads(whole, student, cs)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("top_k", [None, 4])
def test_gradients_match_autograd_gradcheck(top_k):
    student, teacher = logits(5, 7, seed=19), logits(5, 9, seed=20)
    # log Z = 0 (a one-token span) is the edge of its domain, where a finite difference steps past
    # Z = 1; there it is a constant, with no gradient to take. Check strictly inside.
    cs, ct = continuations(5, seed=5).clamp(max=-0.1), continuations(5, seed=6)
    vocab = some_shared(7, 9, 4)
    inputs = (student.requires_grad_(True), cs.requires_grad_(True))
    assert torch.autograd.gradcheck(
        lambda s, c: uld_loss(s, teacher, temperature=1.5, top_k=top_k, student_continuation=c,
                              teacher_continuation=ct, chunk_size=2), inputs, fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda s, c: gold_loss(s, teacher, vocab, temperature=0.8, top_k=top_k, student_continuation=c,
                               teacher_continuation=ct, chunk_size=2), inputs, fast_mode=True)


def test_uld_differentiates_in_the_teachers_side_too():
    """The chunked losses detach the teacher; per position, a teacher that needs a gradient is
    differentiated through autograd (not through a product written with ``out=``)."""
    student = logits(5, 7, seed=21)
    teacher, ct = logits(5, 9, seed=22).requires_grad_(True), continuations(5, seed=7).clamp(max=-0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, c: uld_per_position(student, t, teacher_continuation=c).sum(),
                                    (teacher, ct), fast_mode=True)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("temperature,uld_weight", [(1.0, 1.0), (1.6, 0.5), (0.8, 0.0)])
@pytest.mark.parametrize("student_ids", ["partly shared", "all shared"])
def test_gold_forward_kl_written_out_equals_autograd_through_its_definition(top_k, temperature, uld_weight,
                                                                           student_ids):
    """GOLD with kind=fkl takes its gradient in closed form; skl with skew 0 is the same divergence
    (its mixture is the student itself) taken by autograd through every step."""
    if student_ids == "all shared":  # no student bucket: the teacher is conditioned at one-token spans
        vocab = shared_vocab(torch.arange(7), torch.tensor([9, 0, 3, 5, 7, 1, 2]), 7, 10)
    else:
        vocab = some_shared(7, 10, 4, seed=5)
    student, teacher = logits(9, 7, seed=40), logits(9, 10, seed=41)
    cs, ct = continuations(9, seed=11), continuations(9, seed=12)
    weights = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)  # an upstream gradient that is not all ones

    def loss(kind, s, c):
        rows = gold_per_position(s, teacher, vocab, kind=kind, skew=0.0, temperature=temperature,
                                 uld_weight=uld_weight, top_k=top_k, student_continuation=c, teacher_continuation=ct)
        return (rows * weights).sum()

    written_out = loss_and_grads(lambda s, c: loss("fkl", s, c), student, cs)
    by_autograd = loss_and_grads(lambda s, c: loss("skl", s, c), student, cs)
    for got, expected in zip(written_out, by_autograd):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def uld_by_its_definition(student, teacher, temperature, top_k, cs, ct):
    """ULD through autograd, built here from softmaxes and the public sorted_l1."""
    def side(logits, c):
        probs = torch.softmax(logits / temperature, -1)
        if c is None:
            return probs
        return torch.cat([probs * c.exp().unsqueeze(-1), (1 - c.exp()).clamp(min=0).unsqueeze(-1)], -1)
    return sorted_l1(side(student, cs), side(teacher, ct), top_k)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("temperature", [1.0, 1.6])
@pytest.mark.parametrize("spans", ["one-token", "multi-token"])
def test_uld_written_out_equals_autograd_through_its_definition(top_k, temperature, spans):
    student, teacher = logits(9, 7, seed=42), logits(9, 10, seed=43)
    cs, ct = (continuations(9, seed=13), continuations(9, seed=14)) if spans == "multi-token" else (None, None)
    weights = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)  # an upstream gradient that is not all ones

    def loss_and_grads_of(fn):
        s = student.clone().requires_grad_(True)
        c = None if cs is None else cs.clone().requires_grad_(True)
        value = (fn(s, c) * weights).sum()
        grads = torch.autograd.grad(value, [s] if c is None else [s, c])
        return value.detach(), *grads

    written_out = loss_and_grads_of(lambda s, c: uld_per_position(s, teacher, temperature=temperature, top_k=top_k,
                                                                  student_continuation=c, teacher_continuation=ct))
    by_autograd = loss_and_grads_of(lambda s, c: uld_by_its_definition(s, teacher, temperature, top_k, c, ct))
    for got, expected in zip(written_out, by_autograd, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_the_teacher_gets_no_gradient_and_a_backward_scales_the_stored_one():
    student = logits(4, 6, seed=21).requires_grad_(True)
    teacher = logits(4, 8, seed=22).requires_grad_(True)
    vocab = some_shared(6, 8, 3)
    (3.0 * gold_loss(student, teacher, vocab, chunk_size=3)).backward()
    assert teacher.grad is None
    expected = torch.autograd.grad(3.0 * gold_per_position(student, teacher.detach(), vocab).sum(), student)[0]
    torch.testing.assert_close(student.grad, expected, rtol=1e-12, atol=1e-13)


def test_float32_matches_float64_and_padded_teacher_rows_stay_finite():
    student, teacher = logits(6, 9, seed=23), logits(6, 12, seed=24)
    teacher[:, -2:] = float("-inf")  # a padded vocabulary: rows no token uses
    vocab = some_shared(9, 12, 6)
    expected = gold_loss(student, teacher, vocab)
    s32 = student.float().requires_grad_(True)
    got = gold_loss(s32, teacher.float(), vocab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.isfinite(s32.grad).all() and torch.isfinite(expected)
    torch.testing.assert_close(uld_loss(student.float(), teacher.float()).double(), uld_loss(student, teacher), rtol=1e-5, atol=1e-6)


class LargestFreshTensors(TorchDispatchMode):
    """The shapes of the new tensors (not views of an input) of more than ``size`` elements."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.shapes = size, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(tensor, torch.Tensor) and tensor.numel() > self.size
                    and tensor.untyped_storage().data_ptr() not in storages):
                self.shapes.add(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("method", ["uld", "gold"])
def test_no_tensor_beyond_one_chunk_but_the_students_own_gradient(method):
    tokens, chunk, student_size, teacher_size = 64, 4, 50, 60
    student = logits(tokens, student_size, seed=30).requires_grad_(True)
    teacher = logits(tokens, teacher_size, seed=31)
    vocab = some_shared(student_size, teacher_size, 30)
    with LargestFreshTensors(chunk * (teacher_size + 1)) as watch:
        if method == "uld":
            loss = uld_loss(student, teacher, chunk_size=chunk)
        else:
            loss = gold_loss(student, teacher, vocab, chunk_size=chunk)
        loss.backward()
    # The gradient of the [N, V_s] logits is that size by definition; nothing else may grow with N.
    assert watch.shapes <= {(tokens, student_size)}


def heads_and_hidden(tokens, *, seed):
    """Both models' hidden states and heads: the student's with a bias and soft-capping, the
    teacher's with padded rows past its vocabulary and a logit scale."""
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, 5, generator=generator, dtype=torch.float64)
    teacher_hidden = torch.randn(tokens, 4, generator=generator, dtype=torch.float64)
    student_head = LMHead(torch.randn(9, 5, generator=generator, dtype=torch.float64),
                          bias=torch.randn(9, generator=generator, dtype=torch.float64), softcap=4.0)
    teacher_head = LMHead(torch.randn(14, 4, generator=generator, dtype=torch.float64), scale=1.5, vocab_size=12)
    return student_hidden, student_head, teacher_hidden, teacher_head


@pytest.mark.parametrize("method", ["uld", "gold"])
def test_fused_heads_equal_the_loss_on_full_logits_in_value_and_gradient(method):
    tokens = 10
    student_hidden, student_head, teacher_hidden, teacher_head = heads_and_hidden(tokens, seed=40)
    vocab = some_shared(9, 12, 5)
    cs, ct = continuations(tokens, seed=7), continuations(tokens, seed=8)
    settings = dict(temperature=1.5, student_continuation=cs, teacher_continuation=ct)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (student_hidden, student_head.weight, student_head.bias, cs)]

    fused_inputs, full_inputs = leaves(), leaves()
    h, w, b, c = fused_inputs
    head = LMHead(w, bias=b, softcap=4.0)
    fused = fused_cross_tokenizer_loss(h, head, teacher_hidden, teacher_head, method=method,
                                       vocab=vocab if method == "gold" else None, chunk_size=3,
                                       **{**settings, "student_continuation": c})
    h, w, b, c = full_inputs
    student_logits, teacher_logits = LMHead(w, bias=b, softcap=4.0).logits(h), teacher_head.logits(teacher_hidden)
    if method == "gold":
        full = gold_loss(student_logits, teacher_logits, vocab, **{**settings, "student_continuation": c})
    else:
        full = uld_loss(student_logits, teacher_logits, **{**settings, "student_continuation": c})
    torch.testing.assert_close(fused, full, rtol=1e-12, atol=1e-13)
    fused.backward()
    full.backward()
    for got, expected in zip(fused_inputs, full_inputs):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12)


def test_fused_refuses_an_unknown_method_or_gold_without_a_vocabulary():
    student_hidden, student_head, teacher_hidden, teacher_head = heads_and_hidden(4, seed=41)
    with pytest.raises(ValueError, match="choose one of uld, gold"):
        fused_cross_tokenizer_loss(student_hidden, student_head, teacher_hidden, teacher_head, method="kl")
    with pytest.raises(ValueError, match="needs the shared vocabulary"):
        fused_cross_tokenizer_loss(student_hidden, student_head, teacher_hidden, teacher_head, method="gold")


def test_fused_holds_no_logits_beyond_one_chunk():
    tokens, chunk = 64, 4
    student_hidden, student_head, teacher_hidden, teacher_head = heads_and_hidden(tokens, seed=42)
    student_hidden.requires_grad_(True)
    student_head.weight.requires_grad_(True)
    # Smaller than the smaller model's [64, 9] logits, and 12x one chunk of the larger one's [4, 12].
    with LargestFreshTensors(tokens * 9 - 1) as watch:
        fused_cross_tokenizer_loss(student_hidden, student_head, teacher_hidden, teacher_head, method="gold",
                                   vocab=some_shared(9, 12, 5), chunk_size=chunk).backward()
    assert watch.shapes == set()


# --- ids only one side has --------------------------------------------------------------------


def test_unshared_mass_is_each_rows_mass_outside_the_shared_ids():
    rows = logits(7, 10, seed=25)
    shared = torch.tensor([0, 2, 3, 7, 9])
    expected = torch.softmax(rows / 2.0, -1)[:, [1, 4, 5, 6, 8]].sum(-1)
    torch.testing.assert_close(unshared_mass(rows, shared, temperature=2.0, chunk_size=3), expected, rtol=1e-12, atol=1e-13)


def shared_only_kl(student, teacher, vocab):
    """KL between the distributions renormalised over the shared ids: blind to unshared mass."""
    log_q = torch.log_softmax(student[:, vocab.student_ids], -1)
    log_p = torch.log_softmax(teacher[:, vocab.teacher_ids], -1)
    return (log_p.exp() * (log_p - log_q)).sum()


@pytest.mark.parametrize("start_mass,kind", [(0.05, "fkl"), (0.6, "fkl"), (0.6, "jsd")])
def test_training_with_gold_pins_the_students_mass_on_its_own_ids(start_mass, kind):
    """5 shared ids, 3 student-only, 2 teacher-only ids holding 10% of the teacher's mass. From any
    start, GOLD brings the student's own-id mass to the teacher's 10%; the KL renormalised over the
    shared ids alone leaves a student that starts at 60% far from it."""
    vocab = shared_vocab(torch.arange(5), torch.tensor([6, 0, 2, 4, 1]), 8, 7)
    teacher = logits(4, 7, seed=26, scale=1.0)
    teacher_only = torch.softmax(teacher, -1)[:, vocab.teacher_only].sum(-1, keepdim=True)
    teacher[:, vocab.teacher_only] += torch.log(0.1 / (1 - 0.1) * (1 - teacher_only) / teacher_only)  # 10% each row
    student = logits(4, 8, seed=27, scale=1.0)
    own = torch.softmax(student, -1)[:, 5:].sum(-1, keepdim=True)
    student[:, 5:] += torch.log(start_mass / (1 - start_mass) * (1 - own) / own)
    torch.testing.assert_close(unshared_mass(student, vocab.student_ids), torch.full((4,), start_mass, dtype=torch.float64))

    def trained(loss_fn):
        weights = student.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weights], lr=0.1)
        for _ in range(100):
            optimizer.zero_grad()
            loss_fn(weights).backward()
            optimizer.step()
        return unshared_mass(weights.detach(), vocab.student_ids)

    torch.testing.assert_close(trained(lambda s: gold_loss(s, teacher, vocab, kind=kind)),
                               torch.full((4,), 0.1, dtype=torch.float64), rtol=0, atol=0.01)
    if kind == "fkl" and start_mass > 0.1:  # the loss without the bucket never pulls the excess back
        assert (trained(lambda s: shared_only_kl(s, teacher, vocab)) > 0.4).all()


# --- building the shared vocabulary, bad input -----------------------------------------------


def test_match_vocabularies_pairs_exact_strings_and_counts_padded_rows_as_unshared():
    student = {"a": 0, "b": 1, "Ġc": 2, "d": 3}
    teacher = {"b": 4, "a": 2, "c": 0, "Ġc": 1, "e": 3}
    vocab = match_vocabularies(student, teacher, student_size=6)
    pairs = sorted(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist()))
    assert pairs == [(0, 2), (1, 4), (2, 1)]
    assert vocab.student_only.tolist() == [3, 4, 5] and vocab.teacher_only.tolist() == [0, 3]


@pytest.mark.parametrize("student_ids,teacher_ids,match", [
    ([0, 1], [2], "one teacher id per shared student id"),
    ([0, 0], [1, 2], "appears twice"),
    ([0, 9], [1, 2], "outside 0..4"),
])
def test_bad_shared_ids_are_one_line_errors(student_ids, teacher_ids, match):
    with pytest.raises(ValueError, match=match):
        shared_vocab(torch.tensor(student_ids), torch.tensor(teacher_ids), 5, 5)


def test_mismatched_rows_and_vocabularies_are_one_line_errors():
    vocab = some_shared(6, 8, 3)
    with pytest.raises(ValueError, match="same N"):
        uld_loss(logits(3, 6, seed=0), logits(4, 8, seed=0))
    with pytest.raises(ValueError, match="heads' row counts"):
        gold_loss(logits(3, 7, seed=0), logits(3, 8, seed=0), vocab)
    with pytest.raises(ValueError, match="one log-probability per aligned position"):
        gold_loss(logits(3, 6, seed=0), logits(3, 8, seed=0), vocab, student_continuation=torch.zeros(2))
    with pytest.raises(ValueError, match="top_k=0 must be at least 1"):
        uld_loss(logits(3, 6, seed=0), logits(3, 8, seed=0), top_k=0)
    with pytest.raises(ValueError, match="uld_weight=-1"):
        gold_loss(logits(3, 6, seed=0), logits(3, 8, seed=0), vocab, uld_weight=-1)
    with pytest.raises(ValueError, match="loss.kind='kl'"):
        gold_loss(logits(3, 6, seed=0), logits(3, 8, seed=0), vocab, kind="kl")
    with pytest.raises(ValueError, match="at least one token"):
        span_continuation(torch.zeros(3), torch.tensor([0]), torch.tensor([0]))


def test_the_default_chunk_holds_enough_rows_for_the_head_matmuls():
    # Qwen2.5's 152k student against a 131k teacher: the measured default (docs/benchmarks.md).
    assert default_chunk_size(151936, 131072) == MIN_CHUNK_ROWS == 128
    # Small vocabularies take more rows, up to a chunk of CHUNK_ELEMENTS elements of the larger one.
    assert default_chunk_size(300, 256) == CHUNK_ELEMENTS // 300

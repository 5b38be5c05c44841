"""The fused, chunked loss against the dense reference `distill_loss` on full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.losses import (
    KINDS,
    LMHead,
    SparseTeacher,
    distill_loss,
    fused_distill_loss,
    fused_sparse_distill_loss,
    fused_token_sums,
    head_quirks,
    sparse_distill_loss,
    sparse_per_token_divergence,
)

IGNORE = -100
# (temperature, beta, skew): defaults, soft, and sharp with skew 0.
SETTINGS = [(1.0, 0.5, 0.1), (2.0, 0.3, 0.5), (0.5, 0.9, 0.0)]


def make_inputs(tokens=37, hidden=12, teacher_hidden=9, vocab=23, *, dtype=torch.float64, seed=0, masked=0.3):
    """Hidden states and head weights of both models, and labels with some positions masked."""
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    student_weight = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5 * 3
    teacher_hidden_ = torch.randn(tokens, teacher_hidden, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, teacher_hidden, generator=g, dtype=torch.float64) / teacher_hidden**0.5 * 3
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < masked] = IGNORE
    labels[0] = 1
    cast = [t.to(dtype) for t in (student_hidden, student_weight, teacher_hidden_, teacher_weight)]
    return (*[t.requires_grad_(i < 2) for i, t in enumerate(cast)], labels)


def value_and_grads(loss_fn, student_hidden, student_weight):
    loss = loss_fn()
    grads = torch.autograd.grad(loss, [student_hidden, student_weight])
    return loss.detach(), grads


def assert_close_all(actual, expected, **tolerance):
    (value, grads), (ref_value, ref_grads) = actual, expected
    torch.testing.assert_close(value, ref_value, **tolerance)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **tolerance)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,beta,skew", SETTINGS)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 1000])
def test_fused_matches_dense_in_value_and_gradients(kind, temperature, beta, skew, chunk_size):
    sh, sw, th, tw, labels = make_inputs()
    settings = dict(kind=kind, temperature=temperature, beta=beta, skew=skew)
    dense = value_and_grads(lambda: distill_loss(sh @ sw.T, th @ tw.T, labels, **settings), sh, sw)
    fused = value_and_grads(lambda: fused_distill_loss(sh, sw, th, tw, labels, chunk_size=chunk_size, **settings), sh, sw)
    assert_close_all(fused, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_matches_dense_in_float32_and_bfloat16(kind):
    for dtype, tolerance in ((torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))):
        sh, sw, th, tw, labels = make_inputs(tokens=29, hidden=16, vocab=31, dtype=dtype, seed=1)
        settings = dict(kind=kind, temperature=2.0)
        dense = value_and_grads(lambda: distill_loss(sh @ sw.T, th @ tw.T, labels, **settings), sh, sw)
        fused = value_and_grads(lambda: fused_distill_loss(sh, sw, th, tw, labels, chunk_size=6, **settings), sh, sw)
        assert fused[1][0].dtype == dtype and fused[1][1].dtype == dtype
        assert_close_all(fused, dense, **tolerance)


def test_fused_accepts_batched_shapes_like_the_dense_loss():
    sh, sw, th, tw, labels = make_inputs(tokens=3 * 11)
    shaped = [t.detach().view(3, 11, -1).requires_grad_(t.requires_grad) for t in (sh, th)]
    fused = fused_distill_loss(shaped[0], sw, shaped[1], tw, labels.view(3, 11), kind="jsd", chunk_size=4)
    dense = distill_loss(shaped[0] @ sw.T, shaped[1] @ tw.T, labels.view(3, 11), kind="jsd")
    torch.testing.assert_close(fused, dense)


def test_masked_positions_and_all_masked_chunks_get_no_gradient():
    sh, sw, th, tw, labels = make_inputs(tokens=40, masked=0.0)
    labels[5:25] = IGNORE  # whole chunks of 4 with nothing to compute
    loss = fused_distill_loss(sh, sw, th, tw, labels, kind="fkl", chunk_size=4)
    dense = distill_loss(sh @ sw.T, th @ tw.T, labels, kind="fkl")
    torch.testing.assert_close(loss, dense)
    (grad,) = torch.autograd.grad(loss, [sh])
    assert grad[5:25].abs().max() == 0 and grad[:5].abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_every_position_masked_gives_zero_and_zero_gradients(kind):
    sh, sw, th, tw, labels = make_inputs(tokens=9)
    labels[:] = IGNORE
    loss = fused_distill_loss(sh, sw, th, tw, labels, kind=kind, chunk_size=2)
    grads = torch.autograd.grad(loss, [sh, sw])
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_a_frozen_student_head_gets_no_gradient_but_the_hidden_states_do():
    sh, sw, th, tw, labels = make_inputs()
    sw.requires_grad_(False)
    loss = fused_distill_loss(sh, sw, th, tw, labels, kind="fkl", chunk_size=7)
    (grad,) = torch.autograd.grad(loss, [sh])
    dense = distill_loss(sh @ sw.T, th @ tw.T, labels, kind="fkl")
    torch.testing.assert_close(grad, torch.autograd.grad(dense, [sh])[0])


def dense_head_logits(hidden, weight, bias=None, scale=1.0, softcap=None, vocab=None):
    """What a CausalLM computes: head, then its quirks, then the shared vocabulary slice."""
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits[..., :vocab] if vocab else logits


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
def test_head_bias_scaling_softcapping_and_padded_rows_match_the_model_computation(kind):
    sh, sw, th, tw, labels = make_inputs(vocab=23)
    g = torch.Generator().manual_seed(5)
    # Both heads have 4 padding rows past the 23 shared ids, with wild values that must not leak in.
    student_weight = torch.cat([sw.detach(), 50 * torch.randn(4, sw.shape[1], generator=g, dtype=sw.dtype)]).requires_grad_()
    teacher_weight = torch.cat([tw.detach(), 50 * torch.randn(4, tw.shape[1], generator=g, dtype=tw.dtype)])
    student_bias = torch.randn(27, generator=g, dtype=sw.dtype).requires_grad_()
    student_head = LMHead(student_weight, student_bias, scale=0.5, softcap=3.0, vocab_size=23)
    teacher_head = LMHead(teacher_weight, None, scale=1.5, softcap=None, vocab_size=23)
    settings = dict(kind=kind, temperature=1.5)
    sums = fused_token_sums(sh, student_head, labels, teacher_hidden=th, teacher_head=teacher_head, chunk_size=6, **settings)
    student_logits = dense_head_logits(sh, student_weight, student_bias, 0.5, 3.0, vocab=23)
    teacher_logits = dense_head_logits(th, teacher_weight, None, 1.5, None, vocab=23)
    dense_sum = distill_loss(student_logits, teacher_logits, labels, **settings) * (labels != IGNORE).sum()
    grads = torch.autograd.grad(sums.objective, [sh, student_weight, student_bias])
    dense_grads = torch.autograd.grad(dense_sum, [sh, student_weight, student_bias])
    torch.testing.assert_close(sums.objective, dense_sum)
    for grad, dense_grad in zip(grads, dense_grads):
        torch.testing.assert_close(grad, dense_grad)
    assert grads[1][23:].abs().max() == 0, "padding rows must get no gradient"


# skl runs autograd over each chunk; fkl and rkl write their logit gradient out (dense_chunk.py).
@pytest.mark.parametrize("kind", ["skl", "fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cross_entropy_mix_and_sft_match_full_logits(kind, temperature):
    sh, sw, th, tw, labels = make_inputs()
    kd_weight, ce_weight = 0.7 * temperature**2, 0.3
    sums = fused_token_sums(sh, LMHead(sw), labels, teacher_hidden=th, teacher_head=LMHead(tw), kind=kind,
                            temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=8)
    count = (labels != IGNORE).sum()
    kd = distill_loss(sh @ sw.T, th @ tw.T, labels, kind=kind, temperature=temperature) * count
    ce = F.cross_entropy(sh @ sw.T, labels, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(sums.kd, kd.detach())
    torch.testing.assert_close(sums.ce, ce.detach())
    expected = kd_weight * kd + ce_weight * ce
    torch.testing.assert_close(sums.objective, expected)
    torch.testing.assert_close(torch.autograd.grad(sums.objective, [sh, sw]),
                               torch.autograd.grad(expected, [sh, sw], retain_graph=True))

    sft = fused_token_sums(sh, LMHead(sw), labels, ce_weight=1.0, temperature=temperature, chunk_size=8)
    assert torch.isnan(sft.kd)
    torch.testing.assert_close(sft.objective, ce)
    torch.testing.assert_close(torch.autograd.grad(sft.objective, [sh, sw]), torch.autograd.grad(ce, [sh, sw]))


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_written_out_gradients_pass_through_head_quirks_with_cross_entropy(kind, temperature):
    sh, sw, th, tw, labels = make_inputs()
    student_bias = torch.randn(23, generator=torch.Generator().manual_seed(3), dtype=sw.dtype).requires_grad_()
    student_head = LMHead(sw, student_bias, scale=0.5, softcap=3.0)
    sums = fused_token_sums(sh, student_head, labels, teacher_hidden=th, teacher_head=LMHead(tw, scale=1.5),
                            kind=kind, temperature=temperature, kd_weight=0.7, ce_weight=0.3, chunk_size=6)
    student_logits = dense_head_logits(sh, sw, student_bias, 0.5, 3.0)
    count = (labels != IGNORE).sum()
    kd = distill_loss(student_logits, 1.5 * (th @ tw.T), labels, kind=kind, temperature=temperature) * count
    ce = F.cross_entropy(student_logits, labels, ignore_index=IGNORE, reduction="sum")
    expected = 0.7 * kd + 0.3 * ce
    torch.testing.assert_close(sums.objective, expected)
    params = [sh, sw, student_bias]
    torch.testing.assert_close(torch.autograd.grad(sums.objective, params), torch.autograd.grad(expected, params))


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_float32_sums_over_a_large_chunk_stay_as_exact_as_the_plain_path(kind):
    """A chunk holds millions of terms: summed by one float32 dot product they drifted 5e-5 relative
    from the float64 value at 256 x 8192; the plain path on full logits is within 1e-7."""
    tokens, vocab, hidden = 256, 8192, 64
    g = torch.Generator().manual_seed(0)
    sh, th = torch.randn(tokens, hidden, generator=g), torch.randn(tokens, hidden, generator=g)
    sw, tw = (torch.randn(vocab, hidden, generator=g) * 3 / hidden**0.5 for _ in range(2))  # KL of about 8 nats
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    exact = distill_loss(sh.double() @ sw.double().T, th.double() @ tw.double().T, labels, kind=kind)
    fused = fused_distill_loss(sh, sw, th, tw, labels, kind=kind, chunk_size=tokens)
    torch.testing.assert_close(fused.double(), exact, rtol=1e-6, atol=0)


class FreshChunkTensors(TorchDispatchMode):
    """Counts the operations that produce a new tensor of at least ``size`` elements (not a view,
    an in-place result or an ``out=`` buffer: its storage is none of the operation's inputs')."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.fresh = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() >= self.size:
                self.fresh += tensor.untyped_storage().data_ptr() not in storages
        return out


@pytest.mark.parametrize("kind", ["fkl", "rkl", None])
def test_chunks_reuse_their_buffers_instead_of_allocating_logits_each(kind):
    """On CPU a fresh 32 MiB tensor per chunk is a fresh zero-filled mmap: page faults were a third of
    the end-to-end benchmark's time. The count of chunk-sized allocations must not grow with chunks."""
    vocab, chunk = 501, 4

    def fresh_allocations(tokens):
        sh, sw, th, tw, labels = make_inputs(tokens=tokens, vocab=vocab, masked=0.0)
        teacher = dict(teacher_hidden=th, teacher_head=LMHead(tw), kind=kind) if kind else {}
        with FreshChunkTensors(chunk * vocab) as watch:
            sums = fused_token_sums(sh, LMHead(sw), labels, kd_weight=1.0, ce_weight=0.5, chunk_size=chunk, **teacher)
            sums.objective.backward()
        return watch.fresh

    two_chunks, sixteen_chunks = fresh_allocations(2 * chunk), fresh_allocations(16 * chunk)
    assert two_chunks == sixteen_chunks, (two_chunks, sixteen_chunks)
    assert sixteen_chunks <= 6  # the workspace's buffers, the weight gradient and the backward's copy


def test_tied_embeddings_accumulate_the_head_gradient_into_the_shared_matrix():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(23, 12).double()
    ids = torch.randint(0, 23, (37,))
    _, _, th, tw, labels = make_inputs()

    def loss(fused: bool):
        hidden = torch.tanh(embedding(ids))
        if fused:
            return fused_distill_loss(hidden, embedding.weight, th, tw, labels, kind="fkl", chunk_size=5)
        return distill_loss(hidden @ embedding.weight.T, th @ tw.T, labels, kind="fkl")

    fused_grad = torch.autograd.grad(loss(True), [embedding.weight])[0]
    dense_grad = torch.autograd.grad(loss(False), [embedding.weight])[0]
    torch.testing.assert_close(fused_grad, dense_grad)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_operation_ever_builds_logits_for_more_than_one_chunk():
    tokens, vocab, hidden, chunk = 64, 501, 8, 4
    sh, sw, th, tw, labels = make_inputs(tokens=tokens, hidden=hidden, teacher_hidden=hidden, vocab=vocab, masked=0.0)
    with LargestTensor() as watch:
        loss = fused_distill_loss(sh, sw, th, tw, labels, kind="jsd", chunk_size=chunk)
        loss.backward()
    # The head weight and its gradient are [V, H]; nothing else may exceed one chunk of logits.
    assert watch.largest <= max((chunk + 1) * (vocab + 1), vocab * hidden), watch.largest
    with LargestTensor() as dense_watch:
        distill_loss(sh @ sw.T, th @ tw.T, labels, kind="jsd").backward()
    assert dense_watch.largest >= tokens * vocab


def test_bad_arguments_are_refused_with_a_message():
    sh, sw, th, tw, labels = make_inputs()
    with pytest.raises(ValueError, match="positions"):
        fused_distill_loss(sh, sw, th, tw, labels[:-1], kind="fkl")
    with pytest.raises(ValueError, match="loss.beta"):
        fused_distill_loss(sh, sw, th, tw, labels, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="scores 23 ids and the teacher 20"):
        fused_token_sums(sh, LMHead(sw), labels, teacher_hidden=th, teacher_head=LMHead(tw, vocab_size=20))


def test_head_quirks_are_read_from_transformers_configs():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    assert head_quirks(LlamaConfig()) == {"scale": 1.0, "softcap": None}
    assert head_quirks(Gemma2Config(final_logit_softcapping=30.0))["softcap"] == 30.0
    assert head_quirks(CohereConfig(logit_scale=0.0625))["scale"] == 0.0625
    assert head_quirks(GraniteConfig(logits_scaling=8.0))["scale"] == 1 / 8


# ------------------------------------------------------------------------------ sparse teacher
def top_k_teacher(teacher_logits, k, pad_last=0):
    """The teacher's top-k log-probabilities at temperature 1, optionally with padding entries."""
    logprobs, ids = F.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    if pad_last:
        ids[..., -pad_last:] = -1
        logprobs[..., -pad_last:] = 0.0  # ignored: padding carries no mass, whatever is stored
    return SparseTeacher(logprobs, ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sparse_equals_dense_when_the_teacher_tail_is_empty(kind, temperature):
    g = torch.Generator().manual_seed(2)
    student = 2 * torch.randn(30, 17, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(30, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (30,), generator=g)
    labels[::4] = IGNORE
    # Keep only each position's top 6: the teacher has no mass outside them.
    top_ids = teacher.topk(6, dim=-1).indices
    truncated = torch.full_like(teacher, float("-inf")).scatter(-1, top_ids, teacher.gather(-1, top_ids))
    sparse = top_k_teacher(truncated, 6)
    settings = dict(kind=kind, temperature=temperature)
    dense_value = distill_loss(student, truncated, labels, **settings)
    sparse_value = sparse_distill_loss(student, sparse, labels, **settings)
    if kind == "rkl":  # the student has mass where the teacher has none: infinite on dense logits; the
        # sparse teacher's tail is floored at its rounding (float64's here), so it is large but finite
        (grad,) = torch.autograd.grad(sparse_value, student)
        assert dense_value > 1e30 and 1 < sparse_value < 100 and torch.isfinite(grad).all()
        return
    torch.testing.assert_close(sparse_value, dense_value)
    torch.testing.assert_close(torch.autograd.grad(sparse_value, student)[0], torch.autograd.grad(dense_value, student)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_is_a_lower_bound_that_tightens_as_k_grows(kind):
    g = torch.Generator().manual_seed(3)
    student = 2 * torch.randn(40, 50, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(40, 50, generator=g, dtype=torch.float64)
    labels = torch.zeros(40, dtype=torch.long)
    dense = distill_loss(student, teacher, labels, kind=kind)
    values = [sparse_distill_loss(student, top_k_teacher(teacher, k), labels, kind=kind) for k in (2, 8, 32, 50)]
    assert all(value <= dense + 1e-12 for value in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    torch.testing.assert_close(values[-1], dense)


def test_padding_entries_carry_no_mass():
    g = torch.Generator().manual_seed(4)
    student = torch.randn(10, 20, generator=g, dtype=torch.float64)
    teacher = torch.randn(10, 20, generator=g, dtype=torch.float64)
    labels = torch.zeros(10, dtype=torch.long)
    five = sparse_distill_loss(student, top_k_teacher(teacher, 5), labels, kind="fkl")
    padded = sparse_distill_loss(student, top_k_teacher(teacher, 8, pad_last=3), labels, kind="fkl")
    torch.testing.assert_close(padded, five)


def test_a_low_precision_cache_whose_top_k_sums_past_one_stays_finite():
    student = torch.randn(4, 10, dtype=torch.float32, requires_grad=True)
    ids = torch.arange(3).repeat(4, 1)
    logprobs = torch.log(torch.tensor([0.5, 0.3, 0.25])).repeat(4, 1).to(torch.float16)  # Σ = 1.05
    for kind in ("fkl", "jsd", "srkl", "tvd"):
        loss = sparse_distill_loss(student, SparseTeacher(logprobs, ids), torch.zeros(4, dtype=torch.long), kind=kind)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), kind


def confident_float16_cache(positions=6, vocab=50, k=4):
    """A teacher 1 − 7e-10 sure of token 0, as a float16 cache stores its top-k: log(1 − 7e-10) rounds
    to 0, so the listed mass comes out at 1 or above and the computed tail mass at 0."""
    teacher = torch.zeros(positions, vocab)
    teacher[:, 0] = 25.0
    sparse = top_k_teacher(teacher, k)
    cached = SparseTeacher(sparse.logprobs.to(torch.float16), sparse.ids.to(torch.int32))
    assert (cached.logprobs.float().logsumexp(dim=-1) >= 0).all(), "the listed mass must round to 1 or more"
    return teacher, cached


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_on_a_float16_cache_whose_listed_mass_rounds_to_one_is_finite(temperature):
    teacher, cached = confident_float16_cache()
    student = torch.randn(6, 50, generator=torch.Generator().manual_seed(5), requires_grad=True)
    labels = torch.zeros(6, dtype=torch.long)
    loss = sparse_distill_loss(student, cached, labels, kind="rkl", temperature=temperature)
    (grad,) = torch.autograd.grad(loss, student)
    dense = distill_loss(student, teacher, labels, kind="rkl", temperature=temperature)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().max() < 10
    # Still a lower bound of the full-vocabulary loss (finite here), and not a vanishing one.
    assert 0.5 * dense < loss <= dense


def test_the_tail_floor_is_the_rounding_of_the_cache_dtype():
    from trainer.losses.sparse import log_rounding_of_mass

    stored = torch.tensor([[0.0, -20.0]], dtype=torch.float16)
    floor = log_rounding_of_mass(stored, stored.float()).exp().item()
    # Half float16's smallest step (2⁻²⁴) at a log-probability stored as 0, plus e⁻²⁰ times half its step at 20.
    assert floor == pytest.approx(2.0**-25 + torch.tensor(-20.0).exp().item() * 2.0**-7, rel=1e-6)
    finer = log_rounding_of_mass(stored.float(), stored.float()).exp().item()  # float32 rounds far finer
    assert finer == pytest.approx(2.0**-150 + torch.tensor(-20.0).exp().item() * 2.0**-20, rel=1e-6)
    padded = torch.tensor([[0.0, float("-inf")]])
    assert torch.isfinite(log_rounding_of_mass(padded.half(), padded))


def test_the_fused_sparse_reverse_kl_on_that_cache_is_finite_and_matches():
    _, cached = confident_float16_cache(positions=7)
    sh, sw, _, _, labels = make_inputs(tokens=7, vocab=50, masked=0.0)
    settings = dict(kind="rkl")
    plain = value_and_grads(lambda: sparse_distill_loss(sh @ sw.T, cached, labels, **settings), sh, sw)
    fused = value_and_grads(lambda: fused_sparse_distill_loss(sh, sw, cached, labels, chunk_size=3, **settings), sh, sw)
    value, grads = plain
    assert torch.isfinite(value) and all(torch.isfinite(grad).all() for grad in grads)
    assert_close_all(fused, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_fused_sparse_matches_sparse_on_full_logits(kind, temperature):
    sh, sw, th, tw, labels = make_inputs(vocab=40)
    sparse = top_k_teacher((th @ tw.T).detach(), 7, pad_last=1)
    sparse = SparseTeacher(sparse.logprobs.to(torch.float16), sparse.ids.to(torch.int32))  # a cache's storage types
    settings = dict(kind=kind, temperature=temperature)
    dense = value_and_grads(lambda: sparse_distill_loss(sh @ sw.T, sparse, labels, **settings), sh, sw)
    fused = value_and_grads(lambda: fused_sparse_distill_loss(sh, sw, sparse, labels, chunk_size=5, **settings), sh, sw)
    assert_close_all(fused, dense, rtol=1e-10, atol=1e-12)


def test_sparse_ids_out_of_range_or_repeated_are_refused():
    student = torch.randn(3, 10)
    labels = torch.zeros(3, dtype=torch.long)
    logprobs = torch.full((3, 2), -1.0)
    with pytest.raises(ValueError, match="vocabulary has 10 ids"):
        sparse_distill_loss(student, SparseTeacher(logprobs, torch.tensor([[0, 10]] * 3)), labels, kind="fkl")
    with pytest.raises(ValueError, match="same token id twice"):
        sparse_distill_loss(student, SparseTeacher(logprobs, torch.tensor([[4, 4]] * 3)), labels, kind="fkl")


def test_a_second_backward_through_the_same_loss_is_refused():
    sh, sw, th, tw, labels = make_inputs()
    loss = fused_distill_loss(sh, sw, th, tw, labels, kind="fkl")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [7, 40])
def test_fused_sparse_objective_with_ce_and_head_quirks_matches_full_logits(kind, temperature, top_k):
    """The written-out sparse gradient, mixed with CE, through a scaled and soft-capped head, and with
    k = V (no tail): equal to autograd on full logits."""
    sh, sw, th, tw, labels = make_inputs(vocab=40)
    head = LMHead(sw, scale=0.5, softcap=3.0)
    sparse = top_k_teacher((th @ tw.T).detach(), top_k, pad_last=1 if top_k < 40 else 0)
    if top_k < 40:  # padding first in one row, and a row with nothing listed (an API that scored nothing)
        sparse.ids[1, :3], sparse.ids[2] = -1, -1
    settings = dict(kind=kind, temperature=temperature)

    def reference():
        logits = head.logits(sh)
        masked = labels != IGNORE
        divergence = sparse_per_token_divergence(logits, sparse, **settings)[masked].sum()
        return 0.7 * divergence + 0.3 * F.cross_entropy(logits[masked], labels[masked], reduction="sum")

    def fused():
        return fused_token_sums(sh, LMHead(sw, scale=0.5, softcap=3.0), labels, sparse_teacher=sparse, kd_weight=0.7,
                                ce_weight=0.3, chunk_size=6, **settings).objective

    expected, actual = value_and_grads(reference, sh, sw), value_and_grads(fused, sh, sw)
    if kind == "rkl" and top_k == 40:  # infinite on dense logits too wherever the listed mass rounds to 1
        return
    assert_close_all(actual, expected, rtol=1e-9, atol=1e-11)

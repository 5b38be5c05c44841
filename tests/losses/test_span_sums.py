"""A micro-batch's cross-tokenizer sums against float64 references: full logits, one span at a time."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.losses import LMHead
from trainer.losses.cross_tokenizer import shared_vocab, unshared_mass
from trainer.losses.fused import token_sums
from trainer.losses.objective import targets_at_each_position
from trainer.losses.settings import IGNORE_INDEX, LossSettings
from trainer.losses.span_sums import cross_tokenizer_eval_sums, cross_tokenizer_sums
from trainer.losses.spans import SpanBatch

# (row, student tokens [a, b), teacher tokens [c, d)): 1:1, 2:1, 1:3, 2:2 spans over two rows.
SPANS = [
    (0, (1, 2), (1, 2)),
    (0, (2, 4), (2, 3)),
    (0, (4, 5), (3, 6)),
    (1, (1, 3), (1, 3)),
    (1, (3, 4), (3, 4)),
    (1, (4, 6), (4, 5)),
    (1, (6, 7), (5, 8)),
]
ROW_LENGTHS = {"student": (5, 7), "teacher": (6, 8)}  # real tokens per row; the rest is padding
T_S, T_T, H_S, H_T = 8, 9, 8, 5
V_S, V_T, SHARED = 13, 11, 7


def generator(seed):
    return torch.Generator().manual_seed(seed)


def heads(quirky: bool):
    """The student's head (padded rows, bias, scale, soft-capping when quirky) and the teacher's."""
    rows = V_S + 3 if quirky else V_S
    weight = (0.8 * torch.randn(rows, H_S, generator=generator(1), dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(rows, generator=generator(2), dtype=torch.float64).requires_grad_(True) if quirky else None
    student = LMHead(weight, bias, scale=1.3 if quirky else 1.0, softcap=4.0 if quirky else None,
                     vocab_size=V_S if quirky else None)
    teacher = LMHead(0.8 * torch.randn(V_T, H_T, generator=generator(3), dtype=torch.float64))
    return student, teacher


def reference_logits(hidden, head):
    """``finish(hidden @ W[:V].T + b[:V])`` on every position, written out."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ head.weight[:head.rows].T
    if head.bias is not None:
        logits = logits + head.bias[:head.rows]
    logits = logits * head.scale
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits


def tokens(side, vocab_size, seed):
    length = T_S if side == "student" else T_T
    ids = torch.randint(vocab_size, (2, length), generator=generator(seed))
    for row, real in enumerate(ROW_LENGTHS[side]):
        ids[row, real:] = 0
    return ids


def labels_of(student_tokens):
    """Token 0 of each row is the prompt; padding is masked."""
    labels = student_tokens.clone()
    labels[:, 0] = IGNORE_INDEX
    for row, real in enumerate(ROW_LENGTHS["student"]):
        labels[row, real:] = IGNORE_INDEX
    return labels


def span_batch(spans, student_tokens, teacher_tokens):
    """The SpanBatch of ``spans``, built by hand from the token grids (module docstring of spans.py)."""
    columns = {name: [] for name in ("sf", "tf", "m", "n", "si", "sid", "ss", "ti", "tid", "ts")}
    for k, (row, (a, b), (c, d)) in enumerate(spans):
        columns["sf"].append(row * T_S + a - 1)
        columns["tf"].append(row * T_T + c - 1)
        columns["m"].append(b - a)
        columns["n"].append(d - c)
        for j in range(a + 1, b):
            columns["si"].append(row * T_S + j - 1)
            columns["sid"].append(int(student_tokens[row, j]))
            columns["ss"].append(k)
        for j in range(c + 1, d):
            columns["ti"].append(row * T_T + j - 1)
            columns["tid"].append(int(teacher_tokens[row, j]))
            columns["ts"].append(k)
    return SpanBatch(*(torch.tensor(columns[name], dtype=torch.long) for name in columns))


def merged(logits, tokens_, spans, side, temperature):
    """Each span's merged distribution ``softmax(first/T) · Π_inner softmax(inner/T)[token]``."""
    width = T_S if side == "student" else T_T
    rows = []
    for row, student_span, teacher_span in spans:
        start, end = student_span if side == "student" else teacher_span
        q = torch.softmax(logits[row * width + start - 1] / temperature, -1)
        for j in range(start + 1, end):
            q = q * torch.softmax(logits[row * width + j - 1] / temperature, -1)[tokens_[row, j]]
        rows.append(q)
    return rows


def sorted_l1(a, b):
    width = max(a.numel(), b.numel())
    a = F.pad(a.sort(descending=True).values, (0, width - a.numel()))
    b = F.pad(b.sort(descending=True).values, (0, width - b.numel()))
    return (a - b).abs().sum()


def with_remainder(values, merged_row):
    """`values` and the span's remainder 1 − Z (Z: the merged row's total) as one more outcome."""
    return torch.cat([values, (1 - merged_row.sum()).reshape(1)])


def coarse(merged_row, shared, only):
    """The shared ids' probabilities and the bucket: the unshared mass plus the continuation's 1 − Z."""
    bucket = merged_row[only].sum() + (1 - merged_row.sum())
    return torch.cat([merged_row[shared], bucket.reshape(1)])


def kl(p, q):
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum()


def gold(q, p, vocab, uld_weight, kind):
    q_c, p_c = coarse(q, vocab.student_ids, vocab.student_only), coarse(p, vocab.teacher_ids, vocab.teacher_only)
    divergence = kl(p_c, q_c) if kind == "fkl" else kl(q_c, p_c)
    return divergence + uld_weight * sorted_l1(with_remainder(q[vocab.student_only], q), with_remainder(p[vocab.teacher_only], p))


def reference_kd(student_logits, teacher_logits, student_tokens, teacher_tokens, method, vocab, temperature,
                 uld_weight=1.0, kind="fkl"):
    qs = merged(student_logits, student_tokens, SPANS, "student", temperature)
    ps = merged(teacher_logits, teacher_tokens, SPANS, "teacher", temperature)
    if method == "uld":
        return sum(sorted_l1(with_remainder(q, q), with_remainder(p, p)) for q, p in zip(qs, ps))
    return sum(gold(q, p, vocab, uld_weight, kind) for q, p in zip(qs, ps))


def batch(quirky=False):
    student_tokens, teacher_tokens = tokens("student", V_S, 4), tokens("teacher", V_T, 5)
    student_hidden = torch.randn(2, T_S, H_S, generator=generator(6), dtype=torch.float64).requires_grad_(True)
    teacher_hidden = torch.randn(2, T_T, H_T, generator=generator(7), dtype=torch.float64)
    vocab = shared_vocab(torch.randperm(V_S, generator=generator(8))[:SHARED],
                         torch.randperm(V_T, generator=generator(9))[:SHARED], V_S, V_T)
    student_head, teacher_head = heads(quirky)
    return dict(student_tokens=student_tokens, teacher_tokens=teacher_tokens, student_hidden=student_hidden,
                teacher_hidden=teacher_hidden, vocab=vocab, student_head=student_head, teacher_head=teacher_head,
                spans=span_batch(SPANS, student_tokens, teacher_tokens),
                targets=targets_at_each_position(labels_of(student_tokens)))


def sums_of(b, **settings):
    return cross_tokenizer_sums(b["student_hidden"], b["student_head"], b["teacher_hidden"], b["teacher_head"],
                                b["spans"], b["targets"], vocab=b["vocab"], **settings)


def student_params(b):
    head = b["student_head"]
    return [t for t in (b["student_hidden"], head.weight, head.bias) if t is not None]


def grads_of(value, params):
    return torch.autograd.grad(value, params)


CASES = [  # method, temperature, quirky head, kind
    ("uld", 1.0, False, "fkl"),
    ("uld", 1.7, True, "fkl"),
    ("gold", 1.0, True, "fkl"),
    ("gold", 1.7, False, "fkl"),
    ("gold", 1.3, True, "rkl"),
]


@pytest.mark.parametrize("method,temperature,quirky,kind", CASES)
@pytest.mark.parametrize("kd_weight,ce_weight", [(1.0, 0.0), (0.7, 0.4)])
def test_value_and_gradients_match_the_float64_reference(method, temperature, quirky, kind, kd_weight, ce_weight):
    b = batch(quirky)
    sums = sums_of(b, method=method, kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature,
                   uld_weight=0.6, kind=kind, chunk_size=2)
    student_logits = reference_logits(b["student_hidden"], b["student_head"])
    teacher_logits = reference_logits(b["teacher_hidden"], b["teacher_head"])
    kd = reference_kd(student_logits, teacher_logits, b["student_tokens"], b["teacher_tokens"], method, b["vocab"],
                      temperature, uld_weight=0.6, kind=kind)
    ce = F.cross_entropy(student_logits, b["targets"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    expected = kd_weight * kd + ce_weight * ce
    assert kd.item() > 0.1 and b["spans"].student_inner.numel() > 2 and b["spans"].teacher_inner.numel() > 2
    torch.testing.assert_close(sums.kd, kd.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sums.ce, ce.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sums.objective, expected.detach(), rtol=1e-10, atol=1e-10)
    params = student_params(b)
    for got, want in zip(grads_of(sums.objective, params), grads_of(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_the_heads_padding_rows_get_no_gradient_and_the_teacher_none():
    b = batch(quirky=True)
    b["teacher_head"].weight.requires_grad_(True)
    sums = sums_of(b, method="gold", kd_weight=1.0, ce_weight=0.5, chunk_size=3)
    sums.objective.backward()
    weight = b["student_head"].weight
    assert weight.grad[V_S:].abs().max() == 0 and weight.grad[:V_S].abs().max() > 0
    assert b["student_head"].bias.grad[V_S:].abs().max() == 0
    assert b["teacher_head"].weight.grad is None


def test_with_ce_weight_zero_the_ce_is_reported_but_not_trained():
    b = batch()
    trained = sums_of(b, method="gold", kd_weight=1.0, ce_weight=0.0, chunk_size=2)
    kd_only = reference_kd(reference_logits(b["student_hidden"], b["student_head"]),
                           reference_logits(b["teacher_hidden"], b["teacher_head"]),
                           b["student_tokens"], b["teacher_tokens"], "gold", b["vocab"], 1.0)
    assert trained.ce > 1.0
    params = student_params(b)
    for got, want in zip(grads_of(trained.objective, params), grads_of(kd_only, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gold_is_the_fused_forward_kl_when_both_sides_share_one_tokenizer_and_every_span_is_one_token(temperature):
    vocab_size, length = 17, 6
    student_tokens = torch.randint(vocab_size, (2, length), generator=generator(10))
    labels = student_tokens.clone()
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX
    targets = targets_at_each_position(labels)
    supervised = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    none = torch.zeros(0, dtype=torch.long)
    spans = SpanBatch(supervised, supervised, torch.ones_like(supervised), torch.ones_like(supervised),
                      none, none, none, none, none, none)
    student_hidden = torch.randn(2, length, H_S, generator=generator(11), dtype=torch.float64).requires_grad_(True)
    teacher_hidden = torch.randn(2, length, H_T, generator=generator(12), dtype=torch.float64)
    student_head = LMHead(torch.randn(vocab_size, H_S, generator=generator(13), dtype=torch.float64).requires_grad_(True))
    teacher_head = LMHead(torch.randn(vocab_size, H_T, generator=generator(14), dtype=torch.float64))
    identity = shared_vocab(torch.arange(vocab_size), torch.arange(vocab_size), vocab_size, vocab_size)
    ours = cross_tokenizer_sums(student_hidden, student_head, teacher_hidden, teacher_head, spans, targets,
                                method="gold", vocab=identity, kd_weight=0.8, ce_weight=0.3, temperature=temperature,
                                chunk_size=3)
    fused = token_sums(student_hidden, student_head, targets, LossSettings("fkl", temperature),
                       teacher_hidden=teacher_hidden, teacher_head=teacher_head, kd_weight=0.8, ce_weight=0.3,
                       chunk_size=3)
    for got, want in ((ours.objective, fused.objective), (ours.kd, fused.kd), (ours.ce, fused.ce)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = [student_hidden, student_head.weight]
    for got, want in zip(grads_of(ours.objective, params), grads_of(fused.objective, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["uld", "gold"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_with_no_spans_kd_is_zero_and_the_gradients_are_finite(method, ce_weight):
    b = batch()
    b["spans"] = SpanBatch.empty()
    sums = sums_of(b, method=method, kd_weight=1.0, ce_weight=ce_weight, chunk_size=2)
    assert sums.kd.item() == 0.0
    torch.testing.assert_close(sums.objective.detach(), ce_weight * sums.ce)
    sums.objective.backward()
    for param in student_params(b):
        assert param.grad is not None and torch.isfinite(param.grad).all()
    assert (b["student_hidden"].grad.abs().max() > 0) == (ce_weight > 0)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_eval_sums_match_the_reference(chunk_size):
    b = batch(quirky=True)
    got = cross_tokenizer_eval_sums(b["student_hidden"], b["student_head"], b["teacher_hidden"], b["teacher_head"],
                                    b["spans"], b["vocab"], chunk_size=chunk_size)
    with torch.no_grad():
        student_logits = reference_logits(b["student_hidden"], b["student_head"])
        teacher_logits = reference_logits(b["teacher_hidden"], b["teacher_head"])
        qs = merged(student_logits, b["student_tokens"], SPANS, "student", 1.0)
        ps = merged(teacher_logits, b["teacher_tokens"], SPANS, "teacher", 1.0)
        expected_kl = sum(gold(q, p, b["vocab"], 0.0, "fkl") for q, p in zip(qs, ps))
        firsts = student_logits[b["spans"].student_first]
        expected_mass = unshared_mass(firsts, b["vocab"].student_ids).sum()
    pairs = set(zip(b["vocab"].student_ids.tolist(), b["vocab"].teacher_ids.tolist()))
    teacher_top = teacher_logits[b["spans"].teacher_first].argmax(-1).tolist()
    agree = sum((s, t) in pairs for s, t in zip(firsts.argmax(-1).tolist(), teacher_top))
    assert list(got) == ["kl", "unshared_mass", "spans", "one_to_one", "top1_agreement"]
    torch.testing.assert_close(got["kl"], expected_kl, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["unshared_mass"], expected_mass, rtol=1e-10, atol=1e-10)
    assert got["spans"].item() == len(SPANS) and got["one_to_one"].item() == 2
    assert got["top1_agreement"].item() == agree
    assert all(value.dtype == torch.float64 and not value.requires_grad for value in got.values())


def test_eval_sums_count_agreement_only_on_shared_pairs():
    # Both heads put their argmax on student id 3 / teacher id 3 at every row: agreement exactly
    # when (3, 3) is a shared pair.
    b = batch()
    b["student_head"] = LMHead(torch.zeros(V_S, H_S, dtype=torch.float64), torch.zeros(V_S, dtype=torch.float64).index_fill(0, torch.tensor([3]), 5.0))
    b["teacher_head"] = LMHead(torch.zeros(V_T, H_T, dtype=torch.float64), torch.zeros(V_T, dtype=torch.float64).index_fill(0, torch.tensor([3]), 5.0))
    for paired, vocab in ((True, shared_vocab([3, 0], [3, 1], V_S, V_T)), (False, shared_vocab([3, 0], [1, 3], V_S, V_T))):
        got = cross_tokenizer_eval_sums(b["student_hidden"].detach(), b["student_head"], b["teacher_hidden"],
                                        b["teacher_head"], b["spans"], vocab, chunk_size=3)
        assert got["top1_agreement"].item() == (len(SPANS) if paired else 0)


class VocabWideTensors(TorchDispatchMode):
    """The most rows of any new tensor (not a view of an input) whose last dimension is one of
    ``widths`` (a vocabulary)."""

    def __init__(self, widths):
        super().__init__()
        self.widths, self.most_rows = set(widths), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[-1] in self.widths
                    and tensor.untyped_storage().data_ptr() not in storages):
                self.most_rows = max(self.most_rows, tensor.shape[0])
        return out


@pytest.mark.parametrize("method", ["uld", "gold"])
def test_no_pass_holds_more_than_a_chunk_of_logits(method):
    b = batch(quirky=True)
    widths = (V_S, V_S + 3, V_T, V_S - SHARED, V_T - SHARED)
    with VocabWideTensors(widths) as watch:
        sums = sums_of(b, method=method, kd_weight=1.0, ce_weight=1.0, chunk_size=2)
        sums.objective.backward()
        cross_tokenizer_eval_sums(b["student_hidden"].detach(), b["student_head"], b["teacher_hidden"],
                                  b["teacher_head"], b["spans"], b["vocab"], chunk_size=2)
    assert 0 < watch.most_rows <= 2


def test_spans_that_do_not_fit_the_batch_are_refused_by_name():
    b = batch()
    spans = b["spans"]
    outside = dataclasses.replace(spans, teacher_first=spans.teacher_first + 2 * T_T)
    with pytest.raises(ValueError, match="teacher_first points outside"):
        sums_of({**b, "spans": outside}, method="uld", kd_weight=1.0, ce_weight=0.0)
    bad_id = dataclasses.replace(spans, student_inner_ids=spans.student_inner_ids + V_S)
    with pytest.raises(ValueError, match="student_inner_ids has an id outside"):
        sums_of({**b, "spans": bad_id}, method="uld", kd_weight=1.0, ce_weight=0.0)
    short = dataclasses.replace(spans, teacher_first=spans.teacher_first[:-1])
    with pytest.raises(ValueError, match="teacher_first has 6 entries for 7 spans"):
        sums_of({**b, "spans": short}, method="uld", kd_weight=1.0, ce_weight=0.0)



@pytest.mark.parametrize("method", ["uld", "gold"])
def test_float32_inputs_give_float32_gradients_close_to_the_float64_reference(method):
    b = batch(quirky=True)
    params = student_params(b)
    low = [p.detach().float().requires_grad_(True) for p in params]
    head = b["student_head"]
    low_head = LMHead(low[1], low[2], scale=head.scale, softcap=head.softcap, vocab_size=head.vocab_size)
    teacher = LMHead(b["teacher_head"].weight.float())
    sums = cross_tokenizer_sums(low[0], low_head, b["teacher_hidden"].float(), teacher, b["spans"], b["targets"],
                                method=method, vocab=b["vocab"], kd_weight=0.7, ce_weight=0.4, chunk_size=2)
    exact = sums_of(b, method=method, kd_weight=0.7, ce_weight=0.4, chunk_size=2)
    assert sums.objective.dtype == torch.float32
    torch.testing.assert_close(sums.objective.double(), exact.objective, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_of(sums.objective, low), grads_of(exact.objective, params)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# --- a cached teacher (trainer/losses/topk_teacher.py) -------------------------------------------


def cached(teacher_logits, teacher_tokens, top_k):
    """The teacher's top-k at every flat position, and the exact log-probability of the token that follows."""
    from trainer.losses.topk_teacher import TopKTeacher

    log_probs = torch.log_softmax(teacher_logits, -1)
    top = log_probs.topk(top_k, dim=-1)
    following = torch.cat([teacher_tokens[:, 1:], teacher_tokens[:, :1]], dim=1).reshape(-1)
    return TopKTeacher(top.values, top.indices, following, log_probs.gather(1, following.unsqueeze(1)).squeeze(1),
                       teacher_logits.shape[-1])


@pytest.mark.parametrize("method,temperature", [("uld", 1.0), ("gold", 1.0), ("gold", 1.7)])
def test_a_cached_teacher_listing_every_id_gives_the_live_teachers_sums_and_gradients(method, temperature):
    b = batch(quirky=True)
    teacher_logits = reference_logits(b["teacher_hidden"], b["teacher_head"])
    settings = dict(method=method, kd_weight=0.7, ce_weight=0.4, temperature=temperature, chunk_size=2)
    live = sums_of(b, **settings)
    from_cache = cross_tokenizer_sums(b["student_hidden"], b["student_head"], None,
                                      cached(teacher_logits, b["teacher_tokens"], V_T), b["spans"], b["targets"],
                                      vocab=b["vocab"], **settings)
    torch.testing.assert_close(from_cache.objective, live.objective, rtol=1e-10, atol=1e-10)
    params = student_params(b)
    for got, want in zip(grads_of(from_cache.objective, params), grads_of(live.objective, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    live_eval = cross_tokenizer_eval_sums(b["student_hidden"], b["student_head"], b["teacher_hidden"],
                                          b["teacher_head"], b["spans"], b["vocab"], chunk_size=3)
    cached_eval = cross_tokenizer_eval_sums(b["student_hidden"], b["student_head"], None,
                                            cached(teacher_logits, b["teacher_tokens"], V_T), b["spans"], b["vocab"],
                                            chunk_size=3)
    for key, value in live_eval.items():
        torch.testing.assert_close(cached_eval[key], value, rtol=1e-10, atol=1e-10)


def test_a_cached_row_keeps_its_top_k_and_target_exact_and_spreads_the_rest_evenly():
    from trainer.losses.topk_teacher import TopKTeacher

    log_probs = torch.log_softmax(torch.randn(2, 10, generator=generator(11), dtype=torch.float64), -1)
    top = log_probs.topk(3, dim=-1)
    ids = top.indices.clone()
    ids[1, 2] = -1  # a position listing fewer entries
    target = log_probs[0].argmin().reshape(1)  # outside the top-k
    teacher = TopKTeacher(top.values, ids, torch.cat([target, ids[1, :1]]),
                          torch.stack([log_probs[0, target[0]], log_probs[1, ids[1, 0]]]), 10)
    rows = teacher.logits(torch.arange(2))
    assert torch.allclose(rows.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    listed = [set(ids[0].tolist()) | {int(target)}, set(ids[1, :2].tolist())]
    for r, known in enumerate(listed):
        for i in known:
            assert rows[r, i] == log_probs[r, i]
        rest = torch.tensor(sorted(set(range(10)) - known))
        left = 1 - log_probs[r, sorted(known)].exp().sum()
        torch.testing.assert_close(rows[r, rest].exp(), torch.full((len(rest),), float(left) / len(rest),
                                                                   dtype=torch.float64))
    # The stored value at temperature 1; read off the rebuilt row at any other.
    assert teacher.token_log_probs(torch.tensor([0]), target) == log_probs[0, target]
    torch.testing.assert_close(teacher.token_log_probs(torch.tensor([0]), target, temperature=2.0),
                               torch.log_softmax(rows[0] / 2, -1)[target])

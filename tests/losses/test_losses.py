"""Tests for trainer.losses on small random tensors, against a plain float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import KINDS, distill_loss, masked_sum, per_token_divergence, validate_loss_params

IGNORE = -100
SHAPES = [(3, 7, 11), (5, 13)]
# (temperature, beta, skew): the defaults, a soft setting, and a sharp one with skew 0.
SETTINGS = [(1.0, 0.5, 0.1), (2.0, 0.3, 0.5), (0.5, 0.9, 0.0)]


def make_batch(shape, *, dtype=torch.float64, seed=0, masked_fraction=0.3):
    """Random student/teacher logits ``[*shape]`` and labels ``[*shape[:-1]]`` with some masked."""
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(shape, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    masked = torch.rand(shape[:-1], generator=generator) < masked_fraction
    labels[masked] = IGNORE
    labels.view(-1)[0] = 1  # at least one position counts
    return student.to(dtype), teacher.to(dtype), labels


def reference_per_token(student, teacher, kind, temperature=1.0, beta=0.5, skew=0.1):
    """The formulas exactly as written down, in float64 probability space: ``[..., V] -> [...]``."""
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    q = torch.softmax(student.double() / temperature, dim=-1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skl":
        return kl(p, skew * p + (1 - skew) * q)
    if kind == "srkl":
        return kl(q, skew * q + (1 - skew) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def reference_loss(student, teacher, labels, kind, temperature=1.0, beta=0.5, skew=0.1):
    per_token = reference_per_token(student, teacher, kind, temperature, beta, skew)
    return per_token[labels != IGNORE].mean()


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,beta,skew", SETTINGS)
def test_matches_float64_reference(kind, shape, temperature, beta, skew):
    student, teacher, labels = make_batch(shape)
    params = dict(temperature=temperature, beta=beta, skew=skew)
    loss = distill_loss(student, teacher, labels, kind=kind, **params)
    expected = reference_loss(student, teacher, labels, kind, **params)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_matches_float64_reference(kind):
    student, teacher, labels = make_batch((4, 9, 17))
    loss = distill_loss(student.float(), teacher.float(), labels, kind=kind, temperature=1.5)
    expected = reference_loss(student, teacher, labels, kind, temperature=1.5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fkl_matches_torch_kl_div(temperature):
    student, teacher, _ = make_batch((6, 19))
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    expected = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    no_mask = torch.zeros(6, dtype=torch.long)
    loss = distill_loss(student, teacher, no_mask, kind="fkl", temperature=temperature)
    torch.testing.assert_close(loss, expected)


def test_per_token_divergence_shape_and_masked_sum():
    student, teacher, labels = make_batch((3, 7, 11))
    per_token = per_token_divergence(student, teacher, kind="jsd")
    assert per_token.shape == (3, 7)
    expected = reference_per_token(student, teacher, "jsd")[labels != IGNORE].sum()
    torch.testing.assert_close(masked_sum(per_token, labels), expected)


def test_distill_loss_is_masked_sum_over_count():
    student, teacher, labels = make_batch((3, 7, 11))
    per_token = per_token_divergence(student, teacher, kind="rkl", temperature=2.0)
    expected = masked_sum(per_token, labels) / (labels != IGNORE).sum()
    loss = distill_loss(student, teacher, labels, kind="rkl", temperature=2.0)
    torch.testing.assert_close(loss, expected)


def test_global_normalisation_over_chunks_equals_whole_batch():
    # The trainer sums masked_sum over micro-batches/ranks and divides once by the global count.
    student, teacher, labels = make_batch((8, 5, 11))
    whole = distill_loss(student, teacher, labels, kind="skl")
    chunk_sums = [
        masked_sum(per_token_divergence(s, t, kind="skl"), y)
        for s, t, y in zip(student.split(1), teacher.split(1), labels.split(1))
    ]
    torch.testing.assert_close(sum(chunk_sums) / (labels != IGNORE).sum(), whole)


# --- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_inputs_give_zero(kind, dtype):
    logits, _, labels = make_batch((3, 7, 11), dtype=dtype)
    loss = distill_loss(logits, logits.clone(), labels, kind=kind, temperature=0.7)
    torch.testing.assert_close(loss, torch.zeros((), dtype=dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_jsd_is_symmetric_at_half(temperature):
    student, teacher, labels = make_batch((5, 13))
    forward = distill_loss(student, teacher, labels, kind="jsd", beta=0.5, temperature=temperature)
    swapped = distill_loss(teacher, student, labels, kind="jsd", beta=0.5, temperature=temperature)
    torch.testing.assert_close(forward, swapped)
    assert forward <= torch.log(torch.tensor(2.0, dtype=torch.float64))


@pytest.mark.parametrize("skewed,plain", [("skl", "fkl"), ("srkl", "rkl")])
def test_skew_zero_equals_plain_kl(skewed, plain):
    student, teacher, labels = make_batch((3, 7, 11))
    skew_zero = distill_loss(student, teacher, labels, kind=skewed, skew=0.0, temperature=1.3)
    expected = distill_loss(student, teacher, labels, kind=plain, temperature=1.3)
    torch.testing.assert_close(skew_zero, expected, rtol=0, atol=0)


def test_tvd_is_in_unit_interval():
    student, teacher, _ = make_batch((64, 11))
    per_token = per_token_divergence(student, teacher, kind="tvd")
    assert ((per_token >= 0) & (per_token <= 1)).all()
    # Nearly disjoint one-hot distributions sit at the upper end, not beyond it.
    far_apart = per_token_divergence(torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]]), kind="tvd")
    assert 0.999 < far_apart.item() <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_skew_bounds_and_nonnegativity(kind):
    student, teacher, _ = make_batch((32, 11))
    per_token = per_token_divergence(student, teacher, kind=kind, skew=0.1)
    assert (per_token >= -1e-12).all()
    if kind in ("skl", "srkl"):
        assert (per_token <= -torch.log(torch.tensor(0.1, dtype=torch.float64)) + 1e-12).all()


# --- masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_in_masked_positions_changes_nothing(kind):
    student, teacher, labels = make_batch((3, 7, 11), dtype=torch.float32)
    masked = labels == IGNORE
    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    garbage_student[masked] = 1e4 * torch.randn_like(student[masked])
    garbage_teacher[masked] = torch.where(torch.arange(11) < 3, float("-inf"), -1e30)

    clean_logits = student.clone().requires_grad_()
    garbage_logits = garbage_student.clone().requires_grad_()
    clean = distill_loss(clean_logits, teacher, labels, kind=kind)
    dirty = distill_loss(garbage_logits, garbage_teacher, labels, kind=kind)
    clean.backward()
    dirty.backward()

    torch.testing.assert_close(dirty, clean)
    torch.testing.assert_close(garbage_logits.grad[~masked], clean_logits.grad[~masked])
    assert (garbage_logits.grad[masked] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_gives_exact_zero_with_zero_grad(kind):
    student, teacher, _ = make_batch((2, 5, 11), dtype=torch.float32)
    student.requires_grad_()
    labels = torch.full((2, 5), IGNORE)
    loss = distill_loss(student, teacher, labels, kind=kind)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert (student.grad == 0).all()


def test_masked_sum_ignores_nan_and_inf_at_masked_positions():
    values = torch.tensor([1.0, float("nan"), 2.0, float("inf")], requires_grad=True)
    labels = torch.tensor([5, IGNORE, 7, IGNORE])
    total = masked_sum(values, labels)
    total.backward()
    assert total.item() == 3.0
    assert values.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_custom_ignore_index():
    student, teacher, labels = make_batch((5, 13))
    relabelled = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    torch.testing.assert_close(
        distill_loss(student, teacher, relabelled, kind="fkl", ignore_index=-1),
        distill_loss(student, teacher, labels, kind="fkl"),
    )


# --- zero-probability tokens --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skew", [0.0, 0.1])
@pytest.mark.parametrize("padding", [float("-inf"), -1e30, torch.finfo(torch.float32).min])
def test_padded_vocab_columns_change_nothing(kind, skew, padding):
    # Vocabularies padded to a multiple of 64 carry columns that neither model may predict.
    student, teacher, labels = make_batch((3, 7, 11), dtype=torch.float32)
    pad = torch.full((3, 7, 5), padding)
    padded_student = torch.cat([student, pad], dim=-1).requires_grad_()
    padded_teacher = torch.cat([teacher, pad], dim=-1)
    plain_student = student.clone().requires_grad_()

    padded = distill_loss(padded_student, padded_teacher, labels, kind=kind, skew=skew, temperature=0.5)
    plain = distill_loss(plain_student, teacher, labels, kind=kind, skew=skew, temperature=0.5)
    padded.backward()
    plain.backward()

    torch.testing.assert_close(padded, plain)
    torch.testing.assert_close(padded_student.grad[..., :11], plain_student.grad)
    assert torch.isfinite(padded_student.grad).all()


@pytest.mark.parametrize("kind,skew", [("fkl", 0.1), ("jsd", 0.1), ("skl", 0.1), ("srkl", 0.1), ("tvd", 0.1)])
def test_tokens_only_the_teacher_rules_out_stay_finite(kind, skew):
    # p = 0 where q > 0: fkl ignores the token, the mixtures and tvd stay bounded.
    student, teacher, labels = make_batch((3, 7, 11), dtype=torch.float32)
    teacher[..., :4] = float("-inf")
    student.requires_grad_()
    loss = distill_loss(student, teacher, labels, kind=kind, skew=skew)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    expected = reference_loss(student.detach(), teacher.clamp(min=-30.0), labels, kind, skew=skew)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skew", [0.0, 0.3])
def test_gradcheck_float64(kind, skew):
    student, teacher, labels = make_batch((2, 3, 5))
    student.requires_grad_()

    def loss_of(student_logits):
        return distill_loss(student_logits, teacher, labels, kind=kind, temperature=1.7, beta=0.3, skew=skew)

    assert torch.autograd.gradcheck(loss_of, (student,))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_gradient_matches_float64_reference(kind):
    student, teacher, labels = make_batch((3, 7, 11))
    reference_student = student.clone().requires_grad_()
    reference_loss(reference_student, teacher, labels, kind, temperature=2.0, beta=0.3).backward()

    student32 = student.float().requires_grad_()
    distill_loss(student32, teacher.float(), labels, kind=kind, temperature=2.0, beta=0.3).backward()
    torch.testing.assert_close(student32.grad.double(), reference_student.grad, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_special_treatment():
    # A pure function: gradients reach whichever inputs require them; the caller freezes the teacher.
    student, teacher, labels = make_batch((5, 13))
    teacher.requires_grad_()
    distill_loss(student, teacher, labels, kind="jsd").backward()
    assert teacher.grad is not None and torch.isfinite(teacher.grad).all()


# --- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("low_precision", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_close_to_float32(kind, low_precision):
    student, teacher, labels = make_batch((4, 9, 17), dtype=torch.float32)
    low_student, low_teacher = student.to(low_precision), teacher.to(low_precision)
    # T = 1.3 so that dividing before upcasting would round the logits a second time.
    loss = distill_loss(low_student, low_teacher, labels, kind=kind, temperature=1.3)
    assert loss.dtype == torch.float32
    # Same numbers upcast by hand: identical, so the whole gap is input rounding, not the loss.
    upcast = distill_loss(low_student.float(), low_teacher.float(), labels, kind=kind, temperature=1.3)
    torch.testing.assert_close(loss, upcast, rtol=0, atol=0)
    full = distill_loss(student, teacher, labels, kind=kind, temperature=1.3)
    torch.testing.assert_close(loss, full, rtol=5e-2, atol=5e-3)


def test_mixed_dtypes_promote():
    student, teacher, labels = make_batch((5, 13))
    assert distill_loss(student.bfloat16(), teacher, labels, kind="fkl").dtype == torch.float64
    assert distill_loss(student.float(), teacher.half(), labels, kind="fkl").dtype == torch.float32


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,temperature,beta,skew,key",
    [
        ("jsd", 1.0, 1.5, 0.1, "loss.beta"),
        ("jsd", 1.0, 0.0, 0.1, "loss.beta"),
        ("jsd", 1.0, 1.0, 0.1, "loss.beta"),
        ("jsd", 1.0, float("nan"), 0.1, "loss.beta"),
        ("skl", 1.0, 0.5, 1.0, "loss.skew"),
        ("srkl", 1.0, 0.5, -0.1, "loss.skew"),
        ("fkl", 0.0, 0.5, 0.1, "loss.temperature"),
        ("fkl", -1.0, 0.5, 0.1, "loss.temperature"),
        ("sft", float("inf"), 0.5, 0.1, "loss.temperature"),
        ("kld", 1.0, 0.5, 0.1, "loss.kind"),
    ],
)
def test_validate_rejects_bad_settings_by_name(kind, temperature, beta, skew, key):
    with pytest.raises(ValueError) as error:
        validate_loss_params(kind, temperature, beta, skew)
    message = str(error.value)
    assert message.startswith(key + "=")
    assert "\n" not in message
    assert f"set {key}=" in message


def test_validate_example_message():
    with pytest.raises(ValueError, match=r"^loss\.beta=1\.5 is out of range: jsd needs 0 < beta < 1; set loss\.beta=0\.5"):
        validate_loss_params("jsd", 1.0, 1.5, 0.1)


@pytest.mark.parametrize("kind", ("sft",) + KINDS)
def test_validate_accepts_defaults_and_ignores_unused_keys(kind):
    validate_loss_params(kind, 1.0, 0.5, 0.1)
    validate_loss_params(kind, 2.0, 0.5, 0.0)
    if kind != "jsd":
        validate_loss_params(kind, 1.0, 7.0, 0.1)  # beta is only read by jsd
    if kind not in ("skl", "srkl"):
        validate_loss_params(kind, 1.0, 0.5, 3.0)  # skew is only read by skl/srkl


def test_losses_validate_their_arguments():
    student, teacher, labels = make_batch((5, 13))
    with pytest.raises(ValueError, match="loss.beta"):
        distill_loss(student, teacher, labels, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="hard labels"):
        per_token_divergence(student, teacher, kind="sft")
    with pytest.raises(ValueError, match="differ in shape"):
        per_token_divergence(student, teacher[..., :-1], kind="fkl")
    with pytest.raises(ValueError, match="differ in shape"):
        masked_sum(torch.zeros(5), labels[:4])

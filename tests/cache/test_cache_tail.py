"""A cache whose last entries are drawn from the teacher's tail: unbiased in expectation, where the
exact top-k is not, and reproducible draw for draw."""

from __future__ import annotations

import torch

from trainer.cache.tail import draw_seed, top_and_sampled_tail
from trainer.losses import SparseTeacher, distill_loss, sparse_distill_loss

VOCAB, ENTRIES, DRAWN = 200, 16, 6


def teacher_log_probs(rows: int = 4) -> torch.Tensor:
    """Long-tailed distributions: the top 10 of 200 ids hold roughly 70-90% of the mass."""
    torch.manual_seed(0)
    return torch.log_softmax(torch.randn(rows, VOCAB) * 2.0, dim=-1)


def draws(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_exact_part_is_the_top_tokens_and_the_listed_masses_sum_to_one():
    logprobs = teacher_log_probs()
    values, ids = top_and_sampled_tail(logprobs, ENTRIES, DRAWN, draws())
    top = logprobs.topk(ENTRIES - DRAWN, dim=-1)
    assert torch.equal(ids[:, :ENTRIES - DRAWN], top.indices) and torch.equal(values[:, :ENTRIES - DRAWN], top.values)
    for row_drawn, row_top in zip(ids[:, ENTRIES - DRAWN:], top.indices):
        assert not torch.isin(row_drawn, row_top).any()
    masses = torch.where(ids >= 0, values.exp(), 0.0).sum(dim=-1)
    torch.testing.assert_close(masses, torch.ones(len(logprobs)))


def test_the_drawn_masses_average_to_the_teachers_distribution():
    logprobs = teacher_log_probs()
    generator, average, repeats = draws(), torch.zeros_like(logprobs), 4000
    for _ in range(repeats):
        values, ids = top_and_sampled_tail(logprobs, ENTRIES, DRAWN, generator)
        average.scatter_add_(-1, ids.clamp(min=0), torch.where(ids >= 0, values.exp(), 0.0))
    assert (average / repeats - logprobs.exp()).abs().max() < 3e-3


def test_forward_kl_on_drawn_tails_has_the_dense_gradient_where_the_exact_top_k_does_not():
    teacher = teacher_log_probs()
    student = torch.randn(len(teacher), VOCAB)
    labels = torch.zeros(len(teacher), dtype=torch.long)

    def gradient(loss_of) -> torch.Tensor:
        logits = student.clone().requires_grad_(True)
        loss_of(logits).backward()
        return logits.grad

    dense = gradient(lambda z: distill_loss(z, teacher, labels, kind="fkl"))
    top = teacher.topk(ENTRIES, dim=-1)
    exact_top_k = gradient(lambda z: sparse_distill_loss(z, SparseTeacher(top.values, top.indices), labels, kind="fkl"))
    generator, repeats, drawn = draws(), 2000, torch.zeros_like(student)
    for _ in range(repeats):
        values, ids = top_and_sampled_tail(teacher, ENTRIES, DRAWN, generator)
        drawn += gradient(lambda z: sparse_distill_loss(z, SparseTeacher(values, ids), labels, kind="fkl")) / repeats
    bias_of_top_k = (exact_top_k - dense).norm()
    assert bias_of_top_k > 0.05 * dense.norm()
    assert (drawn - dense).norm() < bias_of_top_k / 5


def test_draws_depend_on_the_batchs_place_in_the_cache_only():
    logprobs = teacher_log_probs()
    seed = draw_seed("train", 3, 1)
    assert seed == draw_seed("train", 3, 1) != draw_seed("train", 3, 2) != draw_seed("eval", 3, 1)
    first = top_and_sampled_tail(logprobs, ENTRIES, DRAWN, draws(seed))
    again = top_and_sampled_tail(logprobs, ENTRIES, DRAWN, draws(seed))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_row_whose_top_tokens_hold_all_the_mass_draws_nothing():
    logprobs = torch.full((1, VOCAB), float("-inf"))
    logprobs[0, :3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    values, ids = top_and_sampled_tail(logprobs, 8, 4, draws())
    assert (ids[0, 4:] == -1).all() and torch.isfinite(values[0, 4:]).all()

"""sort_descending: the same sorted rows as torch's descending sort, by the radix path on wide CPU rows."""

import pytest
import torch

from trainer.losses import sorting
from trainer.losses.sorting import RADIX_MIN_COLUMNS, sort_descending, sorted_descending


def rows_with_every_kind_of_value(dtype, columns: int) -> torch.Tensor:
    """Negative and positive numbers, both zeros, ties, infinities and subnormals in every row."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, columns, generator=generator, dtype=torch.float64).mul(40).to(dtype)
    values[:, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 2.5, 2.5], dtype=torch.float64).to(dtype)
    values[1, 100:200] = 0.0  # a long tie, as the zero padding and underflowed probabilities give
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("columns", [RADIX_MIN_COLUMNS + 5, 300])
def test_rows_sort_to_the_values_torch_sorts_them_to(dtype, columns):
    values = rows_with_every_kind_of_value(dtype, columns)
    assert sorting._radix_sort_applies(values) == (columns >= RADIX_MIN_COLUMNS)
    ordered, where = sort_descending(values)
    expected = values.sort(dim=-1, descending=True).values
    assert torch.equal(ordered, expected)  # -0 == +0 here; the next test places them
    assert torch.equal(values.gather(-1, where), ordered)
    assert torch.equal(where.sort(dim=-1).values, torch.arange(columns).expand(3, -1))
    assert torch.equal(sorted_descending(values), expected)
    assert torch.equal(sorted_descending(values.requires_grad_()), expected)


def test_negative_zero_sorts_just_below_positive_zero():
    values = torch.zeros(1, RADIX_MIN_COLUMNS)
    values[0, 7] = -0.0
    assert sort_descending(values)[1][0, -1] == 7


def test_gradient_is_the_one_through_torch_sort():
    values = rows_with_every_kind_of_value(torch.float64, RADIX_MIN_COLUMNS + 5)[:, 8:].requires_grad_()
    weights = torch.linspace(-1, 1, values.shape[-1], dtype=torch.float64)
    (sort_descending(values)[0] * weights).sum().backward()
    ours = values.grad.clone()
    values.grad = None
    (values.sort(dim=-1, descending=True).values * weights).sum().backward()
    # Ties (the zeros of row 1) may swap places between the two sorts, so compare where no value repeats.
    unique = torch.stack([torch.unique(row, return_counts=True)[1][torch.unique(row, return_inverse=True)[1]] == 1
                          for row in values.detach()])
    assert torch.equal(ours[unique], values.grad[unique])

"""sort_descending: the same sorted rows as torch's descending sort, through NumPy on CPU."""

import pytest
import torch

from trainer.losses import sorting
from trainer.losses.sorting import MIN_VALUES_PER_THREAD, sort_descending, sorted_descending


def rows_with_every_kind_of_value(dtype, columns: int, rows: int = 3) -> torch.Tensor:
    """Negative and positive numbers, both zeros, ties, infinities and subnormals in every row."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(rows, columns, generator=generator, dtype=torch.float64).mul(40).to(dtype)
    values[:, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 2.5, 2.5], dtype=torch.float64).to(dtype)
    values[1, 100:200] = 0.0  # a long tie, as the zero padding and underflowed probabilities give
    return values


def assert_sorts_like_torch(values: torch.Tensor) -> None:
    ordered, where = sort_descending(values)
    expected = values.sort(dim=-1, descending=True).values
    assert torch.equal(ordered, expected)
    assert torch.equal(values.gather(-1, where), ordered)
    assert torch.equal(where.sort(dim=-1).values, torch.arange(values.shape[-1]).expand_as(values))
    assert torch.equal(sorted_descending(values), expected)
    assert torch.equal(sorted_descending(values.clone().requires_grad_()), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("columns", [300, 5])
def test_rows_sort_to_the_values_torch_sorts_them_to(dtype, columns):
    values = rows_with_every_kind_of_value(dtype, max(columns, 300))[:, -columns:]  # the 5: non-contiguous
    assert sorting._numpy_sort_applies(values) == (dtype != torch.bfloat16)
    assert_sorts_like_torch(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_shared_among_threads_sort_alike(dtype):
    values = rows_with_every_kind_of_value(dtype, MIN_VALUES_PER_THREAD // 4 + 3, rows=9)
    assert len(sorting._row_blocks(values.shape[0], 2)) == 2
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_sorts_like_torch(values)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("rows, threads, sizes", [(9, 2, [4, 5]), (1, 2, [1]), (5, 8, [1, 1, 1, 1, 1]), (0, 2, [0])])
def test_row_blocks_cover_every_row_once(rows, threads, sizes):
    blocks = sorting._row_blocks(rows, threads)
    assert [len(block) for block in blocks] == sizes
    assert [row for block in blocks for row in block] == list(range(rows))


def test_gradient_is_the_one_through_torch_sort():
    values = rows_with_every_kind_of_value(torch.float64, 305)[:, 8:].requires_grad_()
    weights = torch.linspace(-1, 1, values.shape[-1], dtype=torch.float64)
    (sort_descending(values)[0] * weights).sum().backward()
    ours = values.grad.clone()
    values.grad = None
    (values.sort(dim=-1, descending=True).values * weights).sum().backward()
    # Ties (the zeros of row 1) may swap places between the two sorts, so compare where no value repeats.
    unique = torch.stack([torch.unique(row, return_counts=True)[1][torch.unique(row, return_inverse=True)[1]] == 1
                          for row in values.detach()])
    assert torch.equal(ours[unique], values.grad[unique])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_probabilities_with_zeros_of_both_signs_sort_like_torch(dtype):
    """No negative numbers: the float32 path keys the bit patterns as they are (a −0 sorts last)."""
    values = torch.randn(4, 301, generator=torch.Generator().manual_seed(1)).mul(4).softmax(-1).to(dtype)
    values[:, 0], values[:, 1], values[:, 2:40] = -0.0, 0.0, values[:, 2:3]  # -(expm1(0)) is a remainder's −0
    assert_sorts_like_torch(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sorted_rows_are_zero_padded_to_the_width_asked(dtype):
    values = rows_with_every_kind_of_value(dtype, 300)
    padded = sorted_descending(values, width=310)
    assert torch.equal(padded[:, :300], values.sort(dim=-1, descending=True).values)
    assert torch.equal(padded[:, 300:], torch.zeros(3, 10, dtype=dtype))
    assert torch.equal(sorted_descending(values, width=300), padded[:, :300])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
def test_empty_rows_and_no_rows_sort(dtype, shape):
    """GOLD's unshared part is ``[N, 0]`` where the student's vocabulary is all shared."""
    values = torch.zeros(shape, dtype=dtype)
    ordered, where = sort_descending(values)
    assert ordered.shape == where.shape == values.shape
    assert torch.equal(sorted_descending(values, width=shape[1] + 2), torch.zeros(shape[0], shape[1] + 2, dtype=dtype))

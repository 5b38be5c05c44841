"""Which rows a rank trains on: independent of the rank/micro-batch split, computable per step."""

from __future__ import annotations

from trainer.data.batching import eval_batches, micro_batches_for_step, step_row_ids
from trainer.data.tokenize import TokenizedRow


def rows(count: int) -> list[TokenizedRow]:
    return [TokenizedRow(input_ids=[1, 10 + i, 2], labels=[-100, 10 + i, 2]) for i in range(count)]


def rows_seen(step, data, world, micro, accum):
    seen = []
    for slot in range(accum):
        for rank in range(world):
            batch = micro_batches_for_step(step, data, rank, world, micro, accum, seed=7, pad_id=0)[slot]
            seen += batch["input_ids"][:, 1].tolist()
    return seen


def test_each_accumulation_slot_holds_the_same_rows_for_any_rank_split():
    data = rows(50)
    for step in range(4):
        one_rank = rows_seen(step, data, world=1, micro=4, accum=2)
        two_ranks = rows_seen(step, data, world=2, micro=2, accum=2)
        assert one_rank == two_ranks


def test_steps_walk_whole_shuffled_epochs_without_repeats():
    ids = [i for step in range(5) for i in step_row_ids(step, 20, 4, seed=3)]
    assert sorted(ids) == list(range(20))
    assert ids != list(range(20)), "rows should be shuffled"


def test_a_step_is_computed_directly_so_resume_needs_no_replay():
    assert step_row_ids(7, 30, 8, seed=1) == step_row_ids(7, 30, 8, seed=1)
    assert step_row_ids(7, 30, 8, seed=1) != step_row_ids(7, 30, 8, seed=2)


def test_every_rank_runs_the_same_number_of_eval_batches_and_fillers_count_for_nothing():
    data = rows(7)
    per_rank = [eval_batches(data, rank, 3, batch_size=2, pad_id=0) for rank in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    supervised = sum(int((b["labels"] != -100).sum()) for batches in per_rank for b in batches)
    assert supervised == sum(r.num_supervised for r in data)

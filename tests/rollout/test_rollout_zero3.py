"""Rollouts from a ZeRO-3 student: a real 2-rank DeepSpeed engine through torchrun on gloo (one
launch, `zero3_worker.py`, whose cases every test here reads), and the mode choice and the hook
handling on their own."""

import json
import os
from collections import OrderedDict

import pytest
import torch

from conftest import REPO, assert_ok, run_cli
from trainer.rollout import zero3
from trainer.rollout.hf import HFRolloutEngine

MODES = ("gathered", "synced", "auto")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's cases: {case: {tokens, expected, forwards, left_as_it_was}}, rank 0 first."""
    out = tmp_path_factory.mktemp("zero3")
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "rollout")])
    # The worker's own gloo timeout is 120 s: a rank left waiting fails it well before this one.
    assert_ok(run_cli([str(out)], nproc=2, module="zero3_worker", timeout=420, env={"PYTHONPATH": path}))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_greedy_rollouts_equal_the_unsharded_generate_when_ranks_end_at_different_steps(ranks, mode):
    cases = [rank[f"split/{mode}"] for rank in ranks]
    for rank, case in enumerate(cases):
        assert case["tokens"] == case["expected"], f"rank {rank}"
        assert case["left_as_it_was"], f"rank {rank}: the model was not left sharded as it was, with its hooks back"
    # The premise: rank 0's one row writes its EOS early, rank 1's rows run on.
    assert max(map(len, cases[0]["tokens"])) < max(map(len, cases[1]["tokens"]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_rank_with_no_prompts_neither_hangs_nor_changes_the_others_tokens(ranks, mode):
    busy, idle = ranks[0][f"uneven/{mode}"], ranks[1][f"uneven/{mode}"]
    assert busy["tokens"] == busy["expected"] and len(busy["tokens"]) == 3
    assert idle["tokens"] == [] and idle["left_as_it_was"] and busy["left_as_it_was"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_sampled_rollouts_equal_the_unsharded_models_draw_for_draw(ranks, mode):
    for rank in ranks:
        case = rank[f"sampled/{mode}"]
        assert case["tokens"] == case["expected"] and all(len(tokens) == 10 for tokens in case["tokens"])


@pytest.mark.slow
def test_gathered_ranks_decode_alone_and_synced_ones_in_lockstep(ranks):
    # Gathered, the idle rank runs no forward at all (had the busy rank's forwards needed it, the
    # run would have hung); synced, it runs one dummy forward per step of the busy rank.
    busy, idle = ranks[0], ranks[1]
    assert idle["uneven/gathered"]["forwards"] == 0
    assert idle["uneven/synced"]["forwards"] == busy["uneven/synced"]["forwards"] == 10
    assert busy["split/gathered"]["forwards"] == 3 and busy["split/synced"]["forwards"] == 10
    # A tiny model fits on this machine: auto gathers.
    assert idle["uneven/auto"]["forwards"] == 0 and busy["split/auto"]["forwards"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["gathered", "synced"])
def test_rollouts_after_an_optimizer_step_come_from_the_updated_adapter(ranks, mode):
    case = ranks[0][f"after_step/{mode}"]
    assert case["tokens"] == case["expected"]
    assert case["expected"] != ranks[0]["after_step/before"]["expected"]  # the step changed what is written


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="zero3 mode is 'gather'; use one of auto, gathered, synced"):
        HFRolloutEngine(torch.nn.Linear(2, 2), [1], 0, zero3_mode="gather")


class Partitioned(torch.nn.Module):
    """A module whose parameter looks as ZeRO-3 leaves one: a shard of 2 elements of a 6-element weight."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(0))
        self.weight.ds_status, self.weight.ds_numel, self.weight.ds_tensor = "NOT_AVAILABLE", 6, torch.zeros(2)


def test_partitioning_is_read_from_the_parameters():
    assert zero3.is_partitioned(Partitioned())
    assert not zero3.is_partitioned(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("free, expected", [(32, True), (31, False)])
def test_gathered_fits_when_the_missing_bytes_take_at_most_half_the_free_memory(monkeypatch, free, expected):
    monkeypatch.setattr(zero3, "free_bytes", lambda device: free)
    assert zero3.fits_gathered(Partitioned()) is expected  # 4 float32 elements are missing: 16 bytes


def test_a_forced_mode_is_taken_without_asking_the_other_ranks(monkeypatch):
    monkeypatch.setattr(zero3, "max_over_ranks", lambda values: pytest.fail("a forced mode needs no collective"))
    assert zero3.choose_mode(Partitioned(), "synced") == "synced"
    assert zero3.choose_mode(Partitioned(), "gathered") == "gathered"


@pytest.mark.parametrize("answers, expected", [([0], "gathered"), ([1], "synced")])
def test_auto_takes_the_answer_of_the_rank_with_the_least_room(monkeypatch, answers, expected):
    # Here this rank fits; max_over_ranks plays the other rank's answer (1: it does not fit).
    monkeypatch.setattr(zero3, "fits_gathered", lambda module: True)
    monkeypatch.setattr(zero3, "max_over_ranks", lambda values: torch.maximum(values, torch.tensor(answers)))
    assert zero3.choose_mode(Partitioned(), "auto") == expected


def deepspeed_like_hook(*args):
    return None


deepspeed_like_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"


def test_only_deepspeeds_hooks_are_set_aside_and_all_come_back_in_their_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    seen = []
    model[0].register_forward_pre_hook(deepspeed_like_hook)
    model[0].register_forward_pre_hook(lambda module, args: seen.append("ours"))
    model[1].register_forward_hook(deepspeed_like_hook)
    before = [OrderedDict(m._forward_pre_hooks) for m in model] + [OrderedDict(m._forward_hooks) for m in model]
    with zero3._deepspeed_hooks_set_aside(model):
        assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model] == [1, 0]
        model(torch.zeros(1, 2))
    assert seen == ["ours"]
    after = [m._forward_pre_hooks for m in model] + [m._forward_hooks for m in model]
    assert [list(h.items()) for h in after] == [list(h.items()) for h in before]

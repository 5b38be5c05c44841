"""A checkpoint is verified before any weights load: damaged ones are passed over (resume=auto)
or refused by name (an explicit path), as are ones of another ZeRO layout or past train.max_steps.

The unit tests build checkpoint folders by hand, with the files DeepSpeed writes at each stage;
one end-to-end test checks the same on real checkpoints of a tiny run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, mount_tmpfs, read_jsonl, run_cli, tiny_overrides

from trainer.files import write_failure_reason
from trainer.train import checkpoints
from trainer.train.checkpoints import CheckpointError, TrainerState
from trainer.train.resume import check_fits_job, choose_resume_point, problem_with

STAGE_FILES = {
    0: ["mp_rank_00_model_states.pt"],
    2: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
    3: ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
}


def make_checkpoint(root: Path, step: int, stage: int = 0, manifest: bool = True, recorded_stage: bool = True) -> Path:
    """`root/step_N` with the files a one-rank save at `stage` writes, and `latest` naming it."""
    folder = root / checkpoints.tag_for(step)
    folder.mkdir(parents=True)
    for name in [*STAGE_FILES[stage], "rank0_state.pt"]:
        torch.save({"weights": torch.full((256,), float(step))}, folder / name)
    state = TrainerState(step=step, zero_stage=stage if recorded_stage else None)
    (folder / checkpoints.STATE_FILE).write_text(json.dumps(asdict(state)))
    if manifest:
        checkpoints._write_manifest(folder)
    (root / checkpoints.LATEST).write_text(folder.name)
    return folder


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run" / checkpoints.CHECKPOINTS
    make_checkpoint(root, 2)
    make_checkpoint(root, 4)
    return tmp_path / "run"


DAMAGE = {
    "deleted": lambda folder: (folder / "rank0_state.pt").unlink(),
    "truncated": lambda folder: cut_short(folder / "mp_rank_00_model_states.pt"),
    "invalid state": lambda folder: (folder / checkpoints.STATE_FILE).write_text('{"step": 4, "tokens'),
    "state deleted": lambda folder: (folder / checkpoints.STATE_FILE).unlink(),
}
SAID = {
    "deleted": "rank0_state.pt is missing",
    "truncated": "mp_rank_00_model_states.pt is ",
    "invalid state": "its trainer_state.json is not valid",
    "state deleted": "its trainer_state.json is missing",
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_auto_passes_over_a_damaged_checkpoint_to_the_newest_that_verifies(run_dir, damage, caplog):
    damaged = run_dir / "checkpoints" / "step_00000004"
    DAMAGE[damage](damaged)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert choose_resume_point(run_dir, "auto") == run_dir / "checkpoints" / "step_00000002"
    assert f"checkpoint {damaged} cannot be resumed: {SAID[damage]}" in caplog.text
    assert "resuming from" in caplog.text and "step_00000002" in caplog.text


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_explicit_resume_to_a_damaged_checkpoint_is_refused_naming_it_and_the_intact_one(run_dir, damage):
    damaged = run_dir / "checkpoints" / "step_00000004"
    DAMAGE[damage](damaged)
    for resume in (damaged, damaged.parent):  # the folder itself, or the checkpoints folder whose latest names it
        with pytest.raises(CheckpointError) as refused:
            choose_resume_point(Path("/elsewhere"), str(resume))
        message = str(refused.value)
        assert message.startswith(f"checkpoint {damaged} cannot be resumed: {SAID[damage]}"), message
        assert f"resume={run_dir / 'checkpoints' / 'step_00000002'}" in message and "\n" not in message


def test_a_truncated_file_is_named_with_its_size_now_and_when_saved(run_dir):
    damaged = run_dir / "checkpoints" / "step_00000004"
    saved = (damaged / "mp_rank_00_model_states.pt").stat().st_size
    cut_short(damaged / "mp_rank_00_model_states.pt")
    assert problem_with(damaged) == f"mp_rank_00_model_states.pt is {saved // 2} bytes, {saved} when it was saved"


def test_when_no_checkpoint_verifies_resume_auto_stops_with_one_line(run_dir):
    for step in (2, 4):
        cut_short(run_dir / "checkpoints" / checkpoints.tag_for(step) / "rank0_state.pt")
    with pytest.raises(CheckpointError, match=r"step_00000004 cannot be resumed: rank0_state.pt is .* no earlier "
                                              r"checkpoint in \S+ verifies either; start afresh with resume=never"):
        choose_resume_point(run_dir, "auto")


def test_a_checkpoint_saved_before_manifests_still_resumes_and_is_checked_for_what_it_must_hold(tmp_path):
    root = tmp_path / "checkpoints"
    folder = make_checkpoint(root, 3, stage=2, manifest=False, recorded_stage=False)
    assert problem_with(folder) is None
    assert choose_resume_point(tmp_path / "unused", str(folder)) == folder
    cut_short(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # no sizes to compare: the torch file is read
    assert problem_with(folder) == ("zero_pp_rank_0_mp_rank_00_optim_states.pt is not a complete torch file "
                                    "(cut short, or overwritten)")
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (folder / "rank0_state.pt").unlink()
    assert problem_with(folder) == "rank0_state.pt is missing (it was saved by 1 ranks)"


@pytest.mark.parametrize("saved,now", [(0, 2), (2, 0), (2, 3), (3, 2), (0, 3), (3, 1)])
def test_a_change_of_zero_layout_is_refused_before_weights_load(tmp_path, saved, now):
    folder = make_checkpoint(tmp_path, 2, stage=saved)
    with pytest.raises(CheckpointError) as refused:
        check_fits_job(folder, checkpoints.read_state(folder), zero_stage=now, max_steps=10)
    assert str(refused.value).startswith(f"checkpoint {folder} was saved under ZeRO stage {saved} and this job runs "
                                         f"stage {now}")
    assert f"resume with deepspeed=zero{saved}" in str(refused.value)


def test_stages_1_and_2_read_each_others_checkpoints_and_old_ones_are_judged_by_their_files(tmp_path):
    for saved, now in ((1, 2), (2, 1), (2, 2)):
        state = TrainerState(step=2, zero_stage=saved)
        check_fits_job(make_checkpoint(tmp_path / f"{saved}{now}", 2, stage=2), state, zero_stage=now, max_steps=10)
    old = make_checkpoint(tmp_path / "old", 2, stage=3, manifest=False, recorded_stage=False)
    with pytest.raises(CheckpointError, match="saved under ZeRO stage 3 and this job runs stage 2"):
        check_fits_job(old, checkpoints.read_state(old), zero_stage=2, max_steps=10)
    old = make_checkpoint(tmp_path / "old12", 2, stage=2, manifest=False, recorded_stage=False)
    check_fits_job(old, checkpoints.read_state(old), zero_stage=1, max_steps=10)
    with pytest.raises(CheckpointError, match=r"saved under ZeRO stage 1 or 2 and .* resume with deepspeed=zero2, "):
        check_fits_job(old, checkpoints.read_state(old), zero_stage=0, max_steps=10)


def test_a_checkpoint_past_train_max_steps_is_refused_and_one_at_it_is_not(tmp_path):
    folder = make_checkpoint(tmp_path, 4)
    state = checkpoints.read_state(folder)
    check_fits_job(folder, state, zero_stage=0, max_steps=4)  # a finished run, run again: it exports again
    with pytest.raises(CheckpointError) as refused:
        check_fits_job(folder, state, zero_stage=0, max_steps=2)
    assert str(refused.value) == (
        f"checkpoint {folder} is at step 4, past train.max_steps=2; set train.max_steps=4 to export it as it is (or "
        "higher to train on), or start afresh with resume=never in a new run directory (hydra.run.dir=...).")


# ------------------------------------------------------------------------------- a full disk
def test_torchs_short_write_error_on_a_full_disk_reads_no_space_left_on_device(tmp_path):
    """torch.save on a full disk says `unexpected pos N vs M`: the message asks the disk instead."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "size=256k"):
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        with pytest.raises(RuntimeError) as torch_error:
            torch.save(torch.zeros(2**17), disk / "big.pt")
        message = str(checkpoints._save_failed(torch_error.value, disk, "step_00000004"))
        assert "unexpected pos" in str(torch_error.value) and "unexpected pos" not in message
        assert message.startswith(f"writing checkpoint step_00000004 in {disk} failed ({os.strerror(errno.ENOSPC)}; "
                                  f"0 MiB free on the filesystem at {disk.resolve()}); no earlier checkpoint exists; "
                                  "free some space"), message
    finally:  # lazily: the torch error caught above still holds its file open
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_write_error_on_a_disk_with_room_keeps_its_own_words(tmp_path):
    message = str(checkpoints._save_failed(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                        "576 vs 534\nmore"), tmp_path, "step_00000004"))
    assert "failed ([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534; " in message


def test_safetensors_words_for_a_full_disk_read_no_space_left_on_device(tmp_path):
    from safetensors import SafetensorError

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure_reason(error, tmp_path) == os.strerror(errno.ENOSPC)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_real_checkpoints_damaged_or_mismatched_are_caught_before_weights_load(tiny, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    assert_ok(run_cli(tiny_overrides(tiny, run_dir, cache, "train.max_steps=4", "checkpoint.every=2")))
    newest = run_dir / "checkpoints" / "step_00000004"
    assert (newest / checkpoints.MANIFEST).is_file()

    refusals = {  # each stops before any weights load, naming the checkpoint and what to do
        "train.max_steps=2": f"checkpoint {newest} is at step 4, past train.max_steps=2; set train.max_steps=4",
        "deepspeed=zero3": f"checkpoint {newest} was saved under ZeRO stage 0 and this job runs stage 3",
    }
    for override, said in refusals.items():
        proc = run_cli(tiny_overrides(tiny, run_dir, cache, override))
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"distill: error: {said}"), last
        assert "Traceback" not in proc.stderr and "student: " not in proc.stdout + proc.stderr  # no model was built

    cut_short(newest / "mp_rank_00_model_states.pt")
    explicit = run_cli(tiny_overrides(tiny, tmp_path / "other", cache, f"resume={newest}"))
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    last = explicit.stderr.strip().splitlines()[-1]
    assert last.startswith(f"distill: error: checkpoint {newest} cannot be resumed: mp_rank_00_model_states.pt is "), last
    assert f"resume={run_dir / 'checkpoints' / 'step_00000002'}" in last

    again = run_cli(tiny_overrides(tiny, run_dir, cache, "train.max_steps=4"))
    assert_ok(again)
    output = again.stdout + again.stderr
    assert f"checkpoint {newest} cannot be resumed: mp_rank_00_model_states.pt is " in output
    assert "resumed from" in output and "step_00000002" in output and "at step 2" in output
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert problem_with(newest) is None, "the damaged checkpoint was replaced when the run saved step 4 again"

"""A CPU rank's freed memory is reused by the next step instead of faulting in fresh pages.

Each case runs in its own interpreter: glibc's settings are process-wide and cannot be read back,
so what is checked is what they do, in a process that starts with glibc's defaults. Whether the
defaults fault on a given step depends on the heap's layout (it varied from run to run here), so
the cases check what is certain: where a block lands, whether the heap keeps it once freed, and
that a steady step then faults no pages in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

WHAT_THE_ALLOCATOR_DOES = """
import json, resource, sys
import torch
kept = None
if sys.argv[1] == "keep":
    from trainer.launch.cpu_memory import keep_freed_cpu_memory
    kept = keep_freed_cpu_memory()
elif sys.argv[1] == "rank":  # what every CPU rank does at start-up
    from trainer.launch.distributed import init_distributed
    init_distributed()

def heap():
    line = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
    return [int(bound, 16) for bound in line.split()[0].split("-")]

block = torch.empty(4 << 20)  # 16 MiB: by default its own mmap, above glibc's starting 128 KiB
block.fill_(1.0)
start, end = block.data_ptr(), block.data_ptr() + block.nbytes
low, high = heap()
on_heap = low <= start and end <= high
del block
kept_after_free = heap()[1] >= end  # not trimmed back to the kernel

def one_step():  # as the tiny end-to-end shape makes them: four 8 MiB tensors written and freed
    step_tensors = [torch.empty(2 << 20) for _ in range(4)]
    for tensor in step_tensors:
        tensor.fill_(1.0)  # every page written

for _ in range(8):  # the first steps may still take new heap: a freed block is reused once its neighbours are freed
    one_step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"kept": kept, "on_heap": on_heap, "kept_after_free": kept_after_free, "faults": faults}))
"""

PAGES_OF_A_STEP = (32 << 20) // os.sysconf("SC_PAGE_SIZE")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def allocator(mode: str, **env: str) -> dict:
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith("MALLOC_") and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", WHAT_THE_ALLOCATOR_DOES, mode], cwd=REPO, capture_output=True,
                          text=True, env={**clean, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", **env},
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@linux_only
def test_glibcs_defaults_give_a_large_block_its_own_mapping():
    default = allocator("default")
    assert not default["on_heap"]  # the premise of the other cases


@linux_only
def test_kept_a_block_comes_from_the_heap_stays_there_once_freed_and_a_steady_step_faults_nothing():
    kept = allocator("keep")
    assert kept["kept"] is True
    assert kept["on_heap"] and kept["kept_after_free"]
    assert kept["faults"] < PAGES_OF_A_STEP // 20


@linux_only
def test_every_cpu_rank_keeps_its_freed_memory():
    rank = allocator("rank")
    assert rank["on_heap"] and rank["kept_after_free"]
    assert rank["faults"] < PAGES_OF_A_STEP // 20


@linux_only
def test_an_allocator_the_user_chose_is_left_alone():
    chosen = allocator("keep", MALLOC_ARENA_MAX="2")
    assert chosen["kept"] is False
    assert not chosen["on_heap"]

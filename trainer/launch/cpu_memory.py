"""On a CPU rank, glibc keeps the memory a step frees for the next step, instead of handing it back.

Every step allocates the same tensors again (activations, logits, the loss's chunk buffers) and
frees them at its end. By default glibc gives a block of more than 128 KiB its own ``mmap`` until it
sees such blocks freed (it then raises that threshold, to at most 32 MiB), and hands the top of its
heap back to the kernel once twice that threshold is free there. Either way the next step's tensors
land on fresh pages, which the kernel zero-fills one page fault at a time: at the end-to-end
benchmark's tiny shape that was 8,100 faults and 15 ms of system time a step (docs/benchmarks.md).
Here the threshold starts at glibc's own maximum, 32 MiB, and the heap is trimmed only when 2 GiB
at its top are free, so a step's freed blocks are taken again by the next. Blocks of 32 MiB and
more still get their own mapping, as glibc's default would give them: reused from the heap, a
large block can be left just short of the next aligned request of its size, and the heap grew by
several such blocks before settling in a test here.

The cost is that the process keeps its high-water mark of memory instead of shrinking between
steps, which a training process reaches every step anyway. On a GPU rank the CUDA caching allocator
already reuses device memory, and host memory churns little, so nothing is changed there. A user who
chose their own allocator settings (``MALLOC_*`` variables, ``GLIBC_TUNABLES``, or jemalloc/tcmalloc
preloaded) keeps them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Both are ints: glibc's largest dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), and the largest int.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_cpu_memory() -> bool:
    """Set glibc's thresholds as the module docstring says; True if they were set. Idempotent."""
    if _user_chose_an_allocator():
        return False
    libc = _glibc()
    if libc is None:  # musl, macOS: no mallopt to tune
        return False
    # The mmap threshold first: setting either one turns off glibc's own adjustment of the other,
    # and a trim threshold alone would leave every block above 128 KiB a fresh mmap.
    done = (libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_BYTES)) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD_BYTES)) == 1)
    if done:
        log.info("cpu memory: glibc reuses what each step frees (mmap from 32 MiB up, heap trimmed from 2 GiB free)")
    return done


def _user_chose_an_allocator() -> bool:
    env = os.environ
    preloaded = env.get("LD_PRELOAD", "")
    return (any(name.startswith("MALLOC_") for name in env) or "malloc" in env.get("GLIBC_TUNABLES", "")
            or "jemalloc" in preloaded or "tcmalloc" in preloaded)


def _glibc():
    """The C library if it is glibc (it answers gnu_get_libc_version), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    return libc

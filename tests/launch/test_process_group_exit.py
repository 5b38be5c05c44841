"""At exit no process group outlives the interpreter's last whole moment: a group still held when
the interpreter tears itself down keeps its gloo threads running, and freeing it then sometimes
aborts the process (SIGABRT: a job's exit status 2 became -6 in CI)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, outside_any_launcher

# A job's own imports after the group exists: transformers.modeling_utils (which the attention
# check imports) brings torch.distributed.nn.functional, whose defaults capture group.WORLD, and
# DeepSpeed caches a clone of the world group in its module globals.
JOB_AFTER_START = """
import os
from trainer.launch.distributed import _destroy_at_exit, init_distributed
init_distributed()
import transformers.modeling_utils
from deepspeed.utils import groups
groups._clone_world_group()
_destroy_at_exit()
print("THREADS", *sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


def test_every_gloo_thread_ends_before_the_interpreter_tears_down():
    env = {**outside_any_launcher(os.environ), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", JOB_AFTER_START], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = next(line for line in proc.stdout.splitlines() if line.startswith("THREADS")).split()[1:]
    assert not [name for name in threads if "gloo" in name or "tcpstore" in name], threads

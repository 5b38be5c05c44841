"""Fused, chunked distillation loss versus the plain logits path: peak memory and time.

For every shape and kind, one forward+backward of each path on the same random inputs:

- plain: ``distill_loss(hs @ ws.T, ht @ wt.T, labels)`` (teacher logits under no_grad), the way a
  trainer that calls its models' heads computes the loss;
- fused: ``fused_distill_loss(hs, ws, ht, wt, labels)``.

The student's head weight is trainable, so both paths also produce its ``[V, H]`` gradient (the
full contract; a LoRA student's frozen head is cheaper for both). "Peak extra" is the peak memory
above what was held before the call (inputs included in neither): on CUDA from the allocator's peak
counter, on CPU from the process's peak resident set (``VmHWM``, reset per measurement through
``/proc/self/clear_refs``), with glibc told to return every freed block over 64 KiB to the system so
the resident set follows live tensors. Everything runs in this one process; a path that runs out of
memory under ``--memory-limit-gb`` is reported as such and the run goes on.

    python scripts/bench_loss.py                       # the CPU table in docs/benchmarks.md
    python scripts/bench_loss.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

# Set before torch allocates anything: large frees go straight back to the system (CPU accounting).
if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.losses import KINDS, default_chunk_size, distill_loss, fused_distill_loss  # noqa: E402

GIB = 2**30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of both models")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--chunk-size", type=int, default=0, help="0: the loss's default for the vocabulary")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the fastest is kept")
    parser.add_argument("--memory-limit-gb", type=float, default=20.0,
                        help="CPU: address-space limit, so a path too big for the machine fails cleanly")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args()


class PeakMemory:
    """Peak bytes above the level at ``start()``."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024

    def peak_extra(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(tokens: int, vocab: int, hidden: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    scale = 3 / hidden**0.5  # logits of a few units, as a trained model's
    sh = torch.randn(tokens, hidden, generator=g, device=device).to(dtype).requires_grad_()
    ws = (scale * torch.randn(vocab, hidden, generator=g, device=device)).to(dtype).requires_grad_()
    th = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    wt = (scale * torch.randn(vocab, hidden, generator=g, device=device)).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return sh, ws, th, wt, labels


def plain_step(sh, ws, th, wt, labels, kind, chunk_size):
    with torch.no_grad():
        teacher_logits = th @ wt.T
    loss = distill_loss(sh @ ws.T, teacher_logits, labels, kind=kind)
    loss.backward()
    return loss.detach()


def fused_step(sh, ws, th, wt, labels, kind, chunk_size):
    loss = fused_distill_loss(sh, ws, th, wt, labels, kind=kind, chunk_size=chunk_size or None)
    loss.backward()
    return loss.detach()


def measure(step, inputs, kind, chunk_size, device, repeats):
    """Seconds (fastest of ``repeats``), peak extra bytes, loss value; None figures on OOM."""
    memory = PeakMemory(device)
    best, peak, value = float("inf"), 0, None
    for _ in range(repeats):
        for tensor in inputs[:2]:
            tensor.grad = None
        memory.start()
        started = time.perf_counter()
        try:
            value = float(step(*inputs, kind, chunk_size))
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if "memory" not in str(error).lower():
                raise
            return {"seconds": None, "peak_extra_bytes": None, "oom": True}
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
        peak = max(peak, memory.peak_extra())
    return {"seconds": best, "peak_extra_bytes": peak, "loss": value, "oom": False}


def limit_address_space(gigabytes: float) -> None:
    limit = int(gigabytes * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{platform.processor() or platform.machine()}, {cores} cores, {memory:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads"


def format_bytes(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and args.memory_limit_gb:
        limit_address_space(args.memory_limit_gb)
    print(f"# {machine_line(device)}; {args.dtype}; hidden {args.hidden}", flush=True)
    warm = make_inputs(64, 512, 64, dtype, device)
    for step in (plain_step, fused_step):
        step(*warm, "fkl", 0)
    print("| kind | V | N | chunk | plain peak | fused peak | memory ratio | plain s | fused s | time ratio | loss gap |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            inputs = make_inputs(tokens, vocab, args.hidden, dtype, device)
            chunk = args.chunk_size or default_chunk_size(vocab)
            for kind in args.kinds:
                plain = measure(plain_step, inputs, kind, chunk, device, args.repeats)
                fused = measure(fused_step, inputs, kind, chunk, device, args.repeats)
                row = {"kind": kind, "vocab": vocab, "tokens": tokens, "hidden": args.hidden, "chunk": chunk,
                       "dtype": args.dtype, "device": machine_line(device), "plain": plain, "fused": fused}
                rows.append(row)
                print(table_row(row, args.memory_limit_gb), flush=True)
            del inputs
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def table_row(row: dict, memory_limit_gb: float) -> str:
    plain, fused = row["plain"], row["fused"]
    if plain["oom"]:
        # The plain path needs more than the limit, so the true ratio is larger than this bound.
        plain_peak = f"OOM at {memory_limit_gb:g} GiB"
        memory_ratio = f"> {memory_limit_gb * GIB / max(fused['peak_extra_bytes'], 1):.1f}x"
        time_ratio, gap = "n/a", "n/a"
    else:
        plain_peak = format_bytes(plain["peak_extra_bytes"])
        memory_ratio = f"{plain['peak_extra_bytes'] / max(fused['peak_extra_bytes'], 1):.1f}x"
        time_ratio = f"{fused['seconds'] / plain['seconds']:.2f}"
        gap = f"{abs(fused['loss'] - plain['loss']):.1e}"
    seconds = "OOM" if plain["oom"] else f"{plain['seconds']:.2f}"
    return (f"| {row['kind']} | {row['vocab']} | {row['tokens']} | {row['chunk']} | {plain_peak} | "
            f"{format_bytes(fused['peak_extra_bytes'])} | {memory_ratio} | {seconds} | {fused['seconds']:.2f} | "
            f"{time_ratio} | {gap} |")


if __name__ == "__main__":
    main()

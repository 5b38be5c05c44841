"""Cross-tokenizer loss (ULD, GOLD) versus the same-tokenizer fused loss: peak memory, time, and
where one chunk's time goes.

Every cell is one forward+backward on random inputs, the student's head trainable (as in
``scripts/bench_loss.py``, whose measuring code this imports: peak extra memory from ``VmHWM`` on
CPU, glibc returning freed blocks, an address-space limit so a path that does not fit fails
cleanly; all cells one after another in this one process):

- ``same V=...``: ``fused_distill_loss(kind="fkl")``, both heads of one vocabulary: at the
  student's vocabulary (the reference, what a job between two models of one tokenizer runs) and at
  the teacher's;
- ``uld``/``gold``: ``fused_cross_tokenizer_loss`` between a ``--teacher-vocab`` teacher and a
  ``--student-vocab`` student, GOLD with the first ``--shared`` ids of each side paired and
  ``kind="fkl"``; each with every ``--top-k`` (0: the exact sort of the whole vocabulary).

Each cell first runs once on ``--warmup-tokens`` rows (warm-up and estimate); a cell whose
estimate for ``--tokens`` rows exceeds ``--cell-budget-s`` is timed on fewer rows instead, which
the table says. Time ratios are per token, so such a cell still compares with the reference.

    python scripts/bench_cross_tokenizer.py --json /tmp/bench_xt.json     # every cell (docs/benchmarks.md)
    python scripts/bench_cross_tokenizer.py --cells "gold top_k=1024"      # the reference and that cell only
    python scripts/bench_cross_tokenizer.py --tokens 1024 --chunk 64 256   # each cell at 64 and 256 rows a chunk
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from unittest import mock
from pathlib import Path

# Importing bench_loss sets glibc's trim threshold (re-executing this script once) and the repo path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import format_bytes, limit_address_space, machine_line, make_inputs, measure  # noqa: E402

import torch  # noqa: E402

from trainer.losses import LMHead, default_chunk_size, fused_cross_tokenizer_loss, fused_distill_loss, shared_vocab  # noqa: E402
from trainer.losses import cross_tokenizer as xt  # noqa: E402  (the breakdown times its private pieces)
from trainer.losses.divergence import tempered_log_probs  # noqa: E402

MEMORY_GOAL, TIME_GOAL = 1.5, 2.0  # issue 20: against the same-tokenizer fused loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="aligned positions N")
    parser.add_argument("--student-vocab", type=int, default=151936, help="V_s (Qwen2.5's head)")
    parser.add_argument("--teacher-vocab", type=int, default=131072, help="V_t")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of both models")
    parser.add_argument("--methods", nargs="*", default=list(xt.METHODS), choices=xt.METHODS,
                        help="none: the same-tokenizer references only")
    parser.add_argument("--top-k", type=int, nargs="+", default=[0, 1024], help="0: exact sort")
    parser.add_argument("--shared", type=int, default=100_000, help="GOLD: ids 0..S-1 of each side are paired")
    parser.add_argument("--chunk", type=int, nargs="+", metavar="ROWS",
                        help="rows per chunk of the cross-tokenizer cells, each its own cell (default: the loss's default)")
    parser.add_argument("--cells", nargs="+", metavar="NAME",
                        help="only these cells (by their table name), after the reference, which always runs")
    parser.add_argument("--warmup-tokens", type=int, default=256)
    parser.add_argument("--cell-budget-s", type=float, default=900.0,
                        help="a cell estimated to take longer at --tokens is timed on fewer rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit-gb", type=float, default=20.0)
    parser.add_argument("--json", type=Path, help="also write every cell and breakdown here")
    args = parser.parse_args(argv)
    if not 0 < args.shared <= min(args.student_vocab, args.teacher_vocab):
        parser.error(f"--shared {args.shared} must be in 1..min(--student-vocab, --teacher-vocab); lower it.")
    if args.chunk and min(args.chunk) < 1:
        parser.error("--chunk sizes must be at least 1 row; pass e.g. --chunk 64 256.")
    if not 0 < args.warmup_tokens <= args.tokens:
        parser.error("--warmup-tokens must be in 1..--tokens; pass a smaller warm-up.")
    return args


# --- cells ---------------------------------------------------------------------------------------


def cell_inputs(tokens: int, student_vocab: int, teacher_vocab: int, hidden: int):
    """``(student hidden, student head weight, teacher hidden, teacher head weight)``; the student's two
    require grad (first, so ``measure`` clears their gradients between runs)."""
    student_hidden, student_weight, *_ = make_inputs(tokens, student_vocab, hidden, torch.float32, torch.device("cpu"), seed=0)
    _, _, teacher_hidden, teacher_weight, _ = make_inputs(tokens, teacher_vocab, hidden, torch.float32,
                                                          torch.device("cpu"), seed=1)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def same_tokenizer_step(student_hidden, student_weight, teacher_hidden, teacher_weight, _kind, _chunk):
    labels = torch.zeros(student_hidden.shape[0], dtype=torch.long)  # a mask only: every row supervised
    loss = fused_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kind="fkl")
    loss.backward()
    return loss.detach()


def cross_tokenizer_step(cell: dict, vocab):
    def step(student_hidden, student_weight, teacher_hidden, teacher_weight, _kind, _chunk):
        loss = fused_cross_tokenizer_loss(student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight),
                                          method=cell["method"], vocab=vocab if cell["method"] == "gold" else None,
                                          kind="fkl", top_k=cell["top_k"] or None, chunk_size=cell["chunk"])
        loss.backward()
        return loss.detach()
    return step


def plan_cells(args) -> list[dict]:
    """The references first (the ratios need them), then every method × top-k (× ``--chunk``: a name
    with ``chunk=ROWS`` appended)."""
    cells = [dict(name=f"same V={vocab}", method="same", top_k=None, student_vocab=vocab, teacher_vocab=vocab,
                  chunk=default_chunk_size(vocab)) for vocab in dict.fromkeys((args.student_vocab, args.teacher_vocab))]
    chunks = args.chunk or [xt.default_chunk_size(args.student_vocab, args.teacher_vocab)]
    for method in args.methods:
        for top_k in args.top_k:
            for chunk in chunks:
                name = f"{method} {'exact sort' if not top_k else f'top_k={top_k}'}"
                cells.append(dict(name=f"{name} chunk={chunk}" if args.chunk else name, method=method,
                                  top_k=top_k or None, student_vocab=args.student_vocab,
                                  teacher_vocab=args.teacher_vocab, chunk=chunk))
    if args.cells:
        unknown = set(args.cells) - {cell["name"] for cell in cells}
        if unknown:
            raise SystemExit(f"--cells {sorted(unknown)} are not cells here; pick from {[cell['name'] for cell in cells]}.")
        cells = cells[:1] + [cell for cell in cells[1:] if cell["name"] in args.cells]
    return cells


def run_cell(cell: dict, args, vocab) -> dict:
    """Warm up on ``--warmup-tokens`` rows, then measure on ``--tokens`` rows or as many as fit the budget."""
    step = same_tokenizer_step if cell["method"] == "same" else cross_tokenizer_step(cell, vocab)
    warm = measure(step, cell_inputs(args.warmup_tokens, cell["student_vocab"], cell["teacher_vocab"], args.hidden),
                   "fkl", 0, torch.device("cpu"), 1)
    estimate = None if warm["oom"] else warm["seconds"] * args.tokens / args.warmup_tokens
    tokens = timed_tokens(args, estimate)
    inputs = cell_inputs(tokens, cell["student_vocab"], cell["teacher_vocab"], args.hidden)
    result = measure(step, inputs, "fkl", 0, torch.device("cpu"), 1)
    return {**cell, "tokens": tokens, "estimate_s": estimate, "warmup": warm, **result}


def timed_tokens(args, estimate: float | None) -> int:
    """``--tokens``, or the multiple of ``--warmup-tokens`` whose estimated time fits the budget."""
    if estimate is None or estimate <= args.cell_budget_s:
        return args.tokens
    per_warmup = estimate * args.warmup_tokens / args.tokens
    return max(1, math.floor(args.cell_budget_s / per_warmup)) * args.warmup_tokens


# --- where one chunk's time goes -----------------------------------------------------------------


class PieceTimer:
    """Seconds per named piece, summed over the pieces' calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, piece: str):
        started = time.perf_counter()
        yield
        self.seconds[piece] = self.seconds.get(piece, 0.0) + time.perf_counter() - started


def chunk_breakdown(cell: dict, vocab, hidden: int, repeats: int = 3) -> dict[str, float]:
    """Each piece's median seconds over ``repeats`` runs of :func:`one_chunk_pieces`: the first run
    alone would also time first calls and the first touch of every page the pieces write."""
    runs = [one_chunk_pieces(cell, vocab, hidden) for _ in range(repeats)]
    return {piece: statistics.median(run[piece] for run in runs) for piece in runs[0]}


def one_chunk_pieces(cell: dict, vocab, hidden: int) -> dict[str, float]:
    """One chunk of ``cell`` (its default rows) step by step, as ``fused_cross_tokenizer_loss`` runs it
    (with the module's own pieces): forward, autograd to the student's logits, the head's backward by
    hand (the hidden states' gradient, the weight's added in place into its accumulator)."""
    rows = min(cell["chunk"], cell["tokens"])
    student_hidden, student_weight, teacher_hidden, teacher_weight = cell_inputs(rows, cell["student_vocab"],
                                                                                 cell["teacher_vocab"], hidden)
    accumulated = torch.zeros_like(student_weight)
    timer = PieceTimer()
    with timer("head matmuls (forward)"):
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        student_logits = (student_hidden.detach() @ student_weight.detach().T).requires_grad_()
    pieces = uld_pieces if cell["method"] == "uld" else gold_pieces
    logit_grad = pieces(timer, student_logits.detach(), teacher_logits, cell, vocab)
    with timer("head matmuls (backward: hidden gradient, weight gradient by addmm_ into its accumulator)"):
        logit_grad @ student_weight
        accumulated.addmm_(logit_grad.T, student_hidden)
    return timer.seconds


def uld_pieces(timer, student_logits, teacher_logits, cell, _vocab) -> torch.Tensor:
    """ULD as ``uld_per_position`` runs it for a gradient, at T = 1 and one-token spans: the teacher's
    side, then the student's value and logit gradient written out, its sorts (or top-k) timed apart.
    Returns the logit gradient."""
    zeros = student_logits.new_zeros(student_logits.shape[0])
    with timer("teacher side (softmax)"):
        teacher_side = xt._merged_with_remainder(teacher_logits, zeros, 1.0, torch.float32)
    return student_side_pieces(timer, cell, "student side: softmax, sorted L1 and the logit gradient, written out",
                               xt._uld_and_gradient, student_logits, zeros, teacher_side, 1.0, cell["top_k"] or None,
                               True)


def gold_pieces(timer, student_logits, teacher_logits, cell, vocab) -> torch.Tensor:
    """GOLD (kind fkl) as ``gold_per_position`` runs it for a gradient, at T = 1 and one-token spans:
    the teacher's side, then the student's value and logit gradient written out, its sorts (or
    top-k) timed apart. Returns the logit gradient."""
    zeros = student_logits.new_zeros(student_logits.shape[0])
    with timer("teacher side (log-softmax, coarse columns, unshared probabilities)"):
        log_p = tempered_log_probs(teacher_logits, 1.0, torch.float32)
        log_p_coarse, log_p_unshared = xt._coarse(log_p, zeros, vocab.teacher_ids, vocab.teacher_only)
        teacher_rest = xt._with_remainder(log_p_unshared.exp(), zeros)
    return student_side_pieces(timer, cell, "student side: coarse KL, sorted L1 and the logit gradient, written out",
                               xt._gold_forward_kl_and_gradient, student_logits, zeros, log_p_coarse, teacher_rest,
                               vocab, 1.0, 1.0, cell["top_k"] or None, True)


def student_side_pieces(timer, cell, name: str, written_out, *args) -> torch.Tensor:
    """``written_out(*args)`` (a loss's value and gradients in one pass) timed, with the sorted
    comparison inside it (sorts or top-k, and the signs the gradient scatters back) timed apart."""
    sorts = PieceTimer()
    sorts_name = "sorts" if not cell["top_k"] else "topk"
    sorted_l1_with_signs = xt._sorted_l1_with_signs

    def timed_sorted_l1(a, b, top_k):
        with sorts(sorts_name):
            return sorted_l1_with_signs(a, b, top_k)

    started = time.perf_counter()
    with mock.patch.object(xt, "_sorted_l1_with_signs", timed_sorted_l1):
        _, logit_grad, _ = written_out(*args)
    timer.seconds[f"{name} (sorts apart)"] = time.perf_counter() - started - sorts.seconds[sorts_name]
    timer.seconds[sorts_name] = sorts.seconds[sorts_name]
    return logit_grad


# --- report --------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Memory and per-token time against the first row, the same-tokenizer reference."""
    reference = rows[0]
    for row in rows:
        if row["oom"] or reference["oom"]:
            row["memory_ratio"] = row["time_ratio"] = None
            continue
        row["memory_ratio"] = row["peak_extra_bytes"] / max(reference["peak_extra_bytes"], 1)
        row["time_ratio"] = (row["seconds"] / row["tokens"]) / (reference["seconds"] / reference["tokens"])


def table_row(row: dict, args) -> str:
    tokens = str(row["tokens"]) if row["tokens"] == args.tokens else \
        f"{row['tokens']} (est. {row['estimate_s']:.0f} s at {args.tokens})"
    if row["oom"]:
        return f"| {row['name']} | {row['student_vocab']} | {row['teacher_vocab']} | {tokens} | {row['chunk']} | " \
               f"OOM at {args.memory_limit_gb:g} GiB | n/a | n/a | n/a | n/a | no |"
    met = row["memory_ratio"] <= MEMORY_GOAL and row["time_ratio"] <= TIME_GOAL
    return (f"| {row['name']} | {row['student_vocab']} | {row['teacher_vocab']} | {tokens} | {row['chunk']} | "
            f"{format_bytes(row['peak_extra_bytes'])} | {row['memory_ratio']:.2f}x | {row['seconds']:.2f} | "
            f"{1000 * row['seconds'] / row['tokens']:.3f} | {row['time_ratio']:.2f}x | {'yes' if met else 'no'} |")


def breakdown_lines(row: dict, pieces: dict[str, float]) -> list[str]:
    chunks = math.ceil(row["tokens"] / row["chunk"])
    lines = [f"# {row['name']}: one chunk of {min(row['chunk'], row['tokens'])} rows (median of 3 runs); the cell "
             f"ran {chunks} chunks, {row['seconds'] / chunks:.3f} s each" if not row["oom"] else f"# {row['name']}: one chunk"]
    total = sum(pieces.values())
    lines += [f"#   {piece}: {seconds:.3f} s ({100 * seconds / total:.0f}%)" for piece, seconds in pieces.items()]
    return lines + [f"#   sum of the pieces: {total:.3f} s"]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_limit_gb:
        limit_address_space(args.memory_limit_gb)
    vocab = shared_vocab(torch.arange(args.shared), torch.arange(args.shared), args.student_vocab, args.teacher_vocab)
    print(f"# {machine_line(torch.device('cpu'))}; float32; hidden {args.hidden}; GOLD pairs ids "
          f"0..{args.shared - 1} of each side, kind fkl", flush=True)
    print("| cell | V_s | V_t | N | chunk | peak extra | memory ratio | s | s per 1k tokens | time ratio | goals met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows, breakdowns = [], {}
    for cell in plan_cells(args):
        rows.append(run_cell(cell, args, vocab))
        add_ratios(rows)
        print(table_row(rows[-1], args), flush=True)
        if cell["method"] != "same":
            breakdowns[cell["name"]] = chunk_breakdown(rows[-1], vocab, args.hidden)
            print("\n".join(breakdown_lines(rows[-1], breakdowns[cell["name"]])), flush=True)
        if args.json:  # after every cell, so a run stopped early keeps what it measured
            write_json(args, rows, breakdowns)


def write_json(args, rows: list[dict], breakdowns: dict) -> None:
    record = {"machine": machine_line(torch.device("cpu")), "args": {**vars(args), "json": str(args.json)},
              "cells": rows, "breakdowns": breakdowns}
    args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

"""The demo task: multi-digit addition written out digit by digit, from the right, with carries.

"347+285=" is answered "7+5+0=12;4+8+1=13;3+2+1=06;632": one step per column (its two digits,
the carry in, and a two-digit column sum), then the sum. Working the carries out in the open is
what lets a model of about a million weights get whole sums right. Every step has the same
width, so with operands of one length every row has the same layout, and finding "the digit
to copy next" is a fixed offset a small model learns within a couple of minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def worked_sum(a: int, b: int) -> str:
    """The response for "a+b=": column steps joined by ";", then the sum."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for column in range(max(len(digits_a), len(digits_b))):
        # A shorter operand contributes a written 0, so every column has the same shape.
        x = int(digits_a[column]) if column < len(digits_a) else 0
        y = int(digits_b[column]) if column < len(digits_b) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return ";".join([*steps, str(a + b)])


def random_operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A number whose digit count is uniform in [min_digits, max_digits] (no leading zero)."""
    n_digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)


def unique_problems(n: int, *, min_digits: int, max_digits: int, seed: int) -> list[dict]:
    """`n` rows of {"prompt", "response"}, no problem twice, the same for the same seed.

    Slicing this list gives splits that share no problem, so an eval split measures arithmetic
    the model has never seen rather than recall.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a = random_operand(rng, min_digits, max_digits)
        b = random_operand(rng, min_digits, max_digits)
        if (a, b) not in seen:
            seen.add((a, b))
            rows.append({"prompt": f"{a}+{b}=", "response": worked_sum(a, b)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

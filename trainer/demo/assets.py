"""Build the demo's teacher, student and data once, and find them in the cache after that."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.demo.metrics import exact_match_rate
from trainer.demo.recipe import DemoRecipe
from trainer.demo.student import drop_layers
from trainer.demo.task import unique_problems, write_jsonl
from trainer.demo.teacher import soften, train_teacher
from trainer.demo.tokenizer import build_char_tokenizer
from trainer.files import honour_umask, write_text_atomically

# Written last; a folder without it was never finished and is never returned.
COMPLETE_MARKER = "COMPLETE"


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo's models and data live, all inside one cache folder.

    teacher_path, student_path: Hugging Face model folders (safetensors weights + tokenizer).
    train_path, eval_path: jsonl files of {"prompt", "response"} rows, no problem in both.
    """

    teacher_path: Path
    student_path: Path
    train_path: Path
    eval_path: Path

    @classmethod
    def in_folder(cls, folder: Path) -> DemoAssets:
        return cls(
            teacher_path=folder / "teacher",
            student_path=folder / "student",
            train_path=folder / "train.jsonl",
            eval_path=folder / "eval.jsonl",
        )


def build_demo_assets(
    cache_dir: str | Path, *, seed: int = 0, recipe: DemoRecipe | None = None, log=print
) -> DemoAssets:
    """The demo assets for this recipe and seed: built on the first call, cached after.

    They live in `cache_dir/demo-<hash of version, recipe and seed>`. A build writes into a
    temporary sibling folder that is renamed into place only when complete, so an interrupted
    build is never mistaken for a finished one, and two processes racing to build end up
    sharing one complete copy.
    """
    recipe = recipe or DemoRecipe()
    final = Path(cache_dir) / f"demo-{recipe.fingerprint(seed)}"
    if is_complete(final):
        _write_model_cards(DemoAssets.in_folder(final))  # builds older than the cards get them here
        return DemoAssets.in_folder(final)
    log(f"Building the demo teacher, student and data in {final}; "
        "this takes about 2 minutes once, and later runs reuse them.")
    build_atomically(final, lambda staging: _build_into(staging, recipe, seed=seed, log=log))
    return DemoAssets.in_folder(final)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished build (its completion marker is written last)."""
    return (folder / COMPLETE_MARKER).exists()


def build_atomically(final: Path, build_into) -> None:
    """`build_into(staging)` into a temporary sibling of `final`, renamed to `final` when it returns.

    `build_into` writes COMPLETE_MARKER last. An interrupted build leaves nothing behind, and of two
    processes racing to build, the second keeps the first one's folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        with _torch_threads(2):
            build_into(staging)
        _publish(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with at most `n` intra-op threads: at this model size more threads only contend,
    and the time budget was measured with 2. The caller's setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished build into place; if another process got there first, keep theirs."""
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    honour_umask(staging)  # and so are the weights safetensors wrote owner-only
    try:
        os.rename(staging, final)
    except OSError:
        if not is_complete(final):
            raise RuntimeError(
                f"{final} exists but holds no finished build; delete it and run again."
            ) from None


# The demo's models are trained here from random weights on generated arithmetic: no one else's
# weights or text go into them, so nothing restricts what is done with them. Their cards say so,
# under Apache-2.0, and the licence gate reads them like any model's.
_CARD = """---
license: apache-2.0
tags:
- distill-demo
---

# distill demo {role}

{what} Trained by distill's demo (`trainer/demo`) from random initial weights on generated 3-digit
addition; no third-party weights or data went into it.
"""


def _write_model_cards(assets: DemoAssets) -> None:
    write_model_card(assets.teacher_path, "teacher", "A small Llama-architecture model.")
    write_model_card(assets.student_path, "student", "The demo teacher with half of its layers dropped.")


def write_model_card(model_path: Path, role: str, what: str) -> None:
    """The demo model card (licence and provenance) in `model_path`, unless it has one."""
    card = model_path / "README.md"
    if not card.exists():
        try:
            write_text_atomically(card, _CARD.format(role=role, what=what))
        except OSError:  # a shared cache we may not write to: the licence gate then names the missing card
            pass


def _build_into(folder: Path, recipe: DemoRecipe, *, seed: int, log) -> None:
    """Write data, teacher and student into `folder`, the completion marker last."""
    assets = DemoAssets.in_folder(folder)
    tokenizer = build_char_tokenizer()
    rows = unique_problems(
        recipe.n_train + recipe.n_eval + recipe.n_teacher_rows,
        min_digits=recipe.min_digits,
        max_digits=recipe.max_digits,
        seed=seed,
    )
    train = rows[: recipe.n_train]
    held_out = rows[recipe.n_train : recipe.n_train + recipe.n_eval]
    teacher_only = rows[recipe.n_train + recipe.n_eval :]
    write_jsonl(train, assets.train_path)
    write_jsonl(held_out, assets.eval_path)

    started = time.perf_counter()
    teacher = train_teacher(recipe, tokenizer, train + teacher_only, seed=seed, log=log)
    accuracy = exact_match_rate(teacher, held_out, tokenizer)
    log(f"The teacher trained in {time.perf_counter() - started:.0f} s and solves "
        f"{accuracy:.0%} of held-out problems exactly.")
    # Cut the student before softening the teacher: it starts from the network as trained,
    # at its own output scale. A student that inherits the softened scale learnt less in
    # 300 LoRA steps under either loss.
    student = drop_layers(teacher, recipe.student_layers)
    soften(teacher, recipe.teacher_temperature)
    for model, path in ((teacher, assets.teacher_path), (student, assets.student_path)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    _write_model_cards(assets)
    (folder / "recipe.json").write_text(json.dumps({"seed": seed, **asdict(recipe)}, indent=2))
    (folder / COMPLETE_MARKER).write_text(f"teacher_exact_match={accuracy:.4f}\n")

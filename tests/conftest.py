"""Tiny models and data the tests build themselves: no hub, no network, seconds on a CPU."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Keep every test offline and quiet; W&B writes its run files locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)


def tiny_llama_config(vocab_size: int, layers: int, hidden: int = 64, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )


# ChatML, as Qwen writes it: each turn ends with <|im_end|> and a newline.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]


def build_tokenizer(path, chat_template=CHATML):
    """A Llama-like character tokenizer: adds <s> by default, ends with </s>, pads with <pad>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """:func:`build_tokenizer`'s character tokenizer, once per test module."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def text_of(tokenizer, ids):
    """The text of `ids`, one character a token."""
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def save_model(config, tokenizer, path: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # A model card with a licence, as a hub model has: the licence gate refuses a teacher without one.
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# A tiny test model\n")
    return path


def arithmetic_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A 2-layer teacher, a 1-layer student (64 wide, same char tokenizer) and arithmetic data."""
    from trainer.demo.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_char_tokenizer()
    vocab = len(tokenizer)
    return {
        "teacher": save_model(tiny_llama_config(vocab + 3, layers=2), tokenizer, root / "teacher", seed=1),
        "student": save_model(tiny_llama_config(vocab, layers=1), tokenizer, root / "student", seed=2),
        "student_tied": save_model(tiny_llama_config(vocab, layers=1, tie_word_embeddings=True), tokenizer,
                                   root / "student_tied", seed=2),
        "train": write_jsonl(root / "train.jsonl", arithmetic_rows(64, seed=3)),
        "eval": write_jsonl(root / "eval.jsonl", arithmetic_rows(16, seed=4)),
        "root": root,
    }


def tiny_demo_recipe():
    """A demo recipe small enough that a build takes a second or two: it checks plumbing, not learning."""
    from trainer.demo import DemoRecipe

    return DemoRecipe(n_train=48, n_eval=16, n_teacher_rows=16, hidden_size=32, num_layers=2, num_heads=2,
                      intermediate_size=64, teacher_steps=3, teacher_batch_size=8, teacher_warmup_steps=1,
                      student_layers=(0,))


@pytest.fixture(scope="session")
def tiny_demo_assets(tmp_path_factory):
    """(cache folder, DemoAssets) of :func:`tiny_demo_recipe`, built once per session. Build anything
    derived from them into a folder of your own: tests count what this cache folder holds."""
    from trainer.demo import build_demo_assets

    cache = tmp_path_factory.mktemp("demo-cache")
    return cache, build_demo_assets(cache, recipe=tiny_demo_recipe(), log=lambda _: None)


@pytest.fixture
def one_gloo_rank(tmp_path):
    """A one-rank gloo group, for code that sums or compares over ranks (the evaluations do)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_overrides(tiny: dict, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"teacher.path={tiny['teacher']}", f"student.path={tiny['student']}",
        f"data.train={tiny['train']}", f"data.eval={tiny['eval']}",
        f"hydra.run.dir={run_dir}", f"cache_dir={cache}",
        "train.max_steps=4", "train.micro_batch_size=4", "train.log_every=1", "train.seq_len=32",
        "train.warmup_steps=0", "logger=none", *extra,
    ]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None,
            module: str = "trainer") -> subprocess.CompletedProcess:
    """`python -m <module>` (nproc 1) or `torchrun --nproc_per_node N -m <module>` on free ports."""
    if nproc == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", module, *args]
    full_env = {**outside_any_launcher(os.environ), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def outside_any_launcher(environ) -> dict:
    """The environment without torchrun's or SLURM's variables, so that a test job started from
    pytest inside an allocation (or after a test that set them) is a job of its own."""
    return {name: value for name, value in environ.items()
            if name not in LAUNCHER_VARIABLES and not name.startswith("SLURM_")}


def _free_port() -> int:
    from trainer.launch.distributed import free_port

    return free_port()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a small tmpfs at `path` (made here) with mount's `options` (`size=256k`, `ro,size=64k`):
    a real full or read-only filesystem. False where this machine does not let us mount one (not
    root); CI runs as root, so there the tests that need it run."""
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"

"""Whole training runs, end to end: our trainer versus TRL's GKDTrainer and a minimal PyTorch loop.

Three contenders distil the same frozen teacher into the same LoRA student, on the same rows:

- **ours**: `python -m trainer` with its defaults (fused chunked loss, DeepSpeed ZeRO-0, fp32 on CPU);
- **trl**: `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (off-policy: no generation), `beta=0`
  (its generalized JSD is then `F.kl_div(log q, log p)`, i.e. KL(teacher ‖ student)), `seq_kd=False`;
- **minimal**: teacher forward under `no_grad`, student forward, `F.kl_div` on full log-softmaxed
  logits over the supervised tokens, backward, clipping, AdamW step: the obvious loop, no tricks.

All three: LoRA r=16, alpha=32, dropout 0 on every linear layer of the student's blocks (never the
head), AdamW with the same lr, weight decay 0 and cosine schedule (no warm-up, down to 0.1x),
gradient clipping at 1.0, fp32, sdpa attention, `torch` threads = `--threads` (default `os.cpu_count()`;
1 on a CPU that others share, where idle threads spin against theirs), micro-batch B, no
accumulation. TRL's own defaults that would change the work are overridden to match (bf16 and
gradient checkpointing off, and the student's dropout left as its config has it: `GKDTrainer` sets
every dropout to 0 unless told `disable_dropout=False`, while ours and the minimal loop train the
model as it comes; GPT-2's 0.1 is 4-5 ms of a tiny step, Llama and Qwen2 have none).

Each contender runs in its own process, one after the other (`--repeats` rounds, interleaved).
**Peak RSS** is that process's peak resident set (`ru_maxrss` from `os.wait4` on it: start-up,
loading and evaluation included).
**Tokens/s** counts non-pad input tokens (the batches' attention-mask sum) of steps W+1..N, divided
by the wall time from the end of step W to the end of step N: the first W steps (`--warmup`) are
not timed. For ours that is the sum of its `metrics.jsonl` log windows after the first (`train.log_every=W`),
which cover the same steps; its evaluations before and after training are outside them.

The models are built here into `--work` from random weights (`--arch`: Llama-, Qwen2- or GPT-2-shaped,
one byte-level BPE tokenizer of `--vocab` ids whose every word is one token): speed and memory do not depend
on what the weights have learned. Every row is exactly `--seq-len` tokens (checked after they are written),
so every step does the same work whatever rows it draws. Results go to stdout as a markdown table and
to `--work/results.json`.

    pip install -e ".[bench]"                 # TRL, for this script only
    python scripts/bench_e2e.py --repeats 5   # the V=32k table in docs/benchmarks.md
    python scripts/bench_e2e.py --repeats 5 --arch gpt2 --vocab 2048 --teacher-hidden 128 \
        --student-hidden 64 --seq-len 128     # the tiny shape, where fixed per-step costs show

`--device cuda` runs all three on the GPU in bf16 (ours: `train.precision=bf16`; TRL: `bf16=True`; the
minimal loop: bf16 weights, its log-softmax in float32), and reports each one's peak allocated GPU
memory and, from ours' model FLOPs per token (the same work for all three), each one's MFU.
scripts/gpu/check.py runs it that way at real shapes. `--bf16` runs the same bf16 code on the CPU, slowly:
how the GPU check's `--cpu` mode (CI, scripts/gpu/preflight.sh) tries the GPU run's code paths first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import functools
import itertools
import string
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# The byte-level symbols words are spelt with: "Ġ" (the space before each) and the letters.
ALPHABET = ("Ġ", *string.ascii_lowercase)
TOKENIZER_KIND = "byte-level bpe, one token a word"  # in setup.json: a work folder of another kind is rebuilt
CONTENDERS = ("ours", "trl", "minimal")
# What each contender runs with: offline, no W&B, one tokenizer thread pool (torch's threads: --threads).
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_e2e"))
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama", help="the models' architecture")
    parser.add_argument("--vocab", type=int, default=32768, help="ids of the shared tokenizer (and both models)")
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (every row is this long)")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch (= per optimizer step)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per contender")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's CPU threads in every contender")
    add_device_arguments(parser, "every contender")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="which to run, in this order")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all contenders, interleaved so that drift in the machine's speed hits each "
                             "alike; the table gives medians")
    # One contender in its own process, writing into --child-out: how the main process runs trl and minimal.
    parser.add_argument("--child", choices=CONTENDERS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be at least 1.")
    if word_count(args.vocab) < 1:
        parser.error(f"--vocab {args.vocab} leaves no word beside the tokenizer's specials and alphabet; "
                     f"give at least {len(SPECIALS) + len(ALPHABET) + 1}.")
    if not 0 < args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be between 1 and --steps - 1 ({args.steps - 1}).")
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"--contenders has {sorted(unknown)}; choose from {', '.join(CONTENDERS)}.")
    settle_precision(parser, args)
    return args


def add_device_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--device and --bf16, as every benchmark of the GPU check takes them; `what` runs in that precision."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help=f"cpu: fp32; cuda: {what} on the GPU in bf16")
    parser.add_argument("--bf16", action="store_true",
                        help=f"{what} in bf16 on the CPU too (always so with --device cuda): the GPU's code paths, "
                             "at CPU speed")


def settle_precision(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A GPU always trains in bf16; `args.precision` names it as `train.precision` does, for ours and the
    results."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU; run on a GPU machine or with --device cpu.")
    args.bf16 = args.bf16 or args.device == "cuda"
    args.precision = "bf16" if args.bf16 else "fp32"


# ------------------------------------------------------------------------------------------ models
def word_count(vocab: int) -> int:
    """How many words a `vocab`-id tokenizer has beside its specials and its alphabet."""
    return vocab - len(SPECIALS) - len(ALPHABET)


@functools.lru_cache(maxsize=2)
def words(vocab: int) -> tuple[str, ...]:
    """a, b, ..., z, aa, ab, ...: every prefix of a word is a word, so one BPE merge per word builds it."""
    by_length = (map("".join, itertools.product(string.ascii_lowercase, repeat=n)) for n in itertools.count(1))
    return tuple(itertools.islice(itertools.chain.from_iterable(by_length), word_count(vocab)))


def text_of(word_ids: list[int], vocab: int) -> str:
    """The words, each after a space, so that each is one token."""
    return "".join(" " + words(vocab)[i] for i in word_ids)


def build_tokenizer(vocab: int):
    """Byte-level BPE, as Llama 3's and Qwen2's are, so that transformers loads it alike whatever the
    model's type: for a qwen2 folder it builds its own Qwen2Tokenizer from the vocabulary and merges,
    with its own pre-tokenizer, which drops every word of a word-level tokenizer. Four specials, the
    alphabet, then `Ġ`+word for every word, so any `--vocab` is exactly reached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate([*SPECIALS, *ALPHABET, *("Ġ" + w for w in words(vocab))])}
    merges = [("Ġ" + w[:-1], w[-1]) if len(w) > 1 else ("Ġ", w) for w in words(vocab)]
    core = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def llama(vocab: int, hidden: int, layers: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=-(-hidden * 8 // 3 // 64) * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=seq_len, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


# Qwen2.5's own shapes by width (config.json of Qwen2.5-0.5B/1.5B/3B/7B): MLP width, query heads,
# key/value heads, tied embeddings. Other widths: 64-wide heads, 2 KV heads, MLP 5.4x, untied.
QWEN2_SHAPES = {896: (4864, 14, 2, True), 1536: (8960, 12, 2, True), 2048: (11008, 16, 2, True),
                3584: (18944, 28, 4, False)}


def qwen2(vocab: int, hidden: int, layers: int, seq_len: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    mlp, heads, kv_heads, tied = QWEN2_SHAPES.get(hidden, (-(-hidden * 27 // 5 // 64) * 64, max(2, hidden // 64), 2,
                                                            False))
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(config)


def gpt2(vocab: int, hidden: int, layers: int, seq_len: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 32),
                        n_positions=seq_len, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config)


ARCHS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2}


def prepare(args) -> dict:
    """Models, tokenizer and rows in `--work`, rebuilt only when a setting that shapes them changed."""
    work = args.work
    paths = {"teacher": work / "teacher", "student": work / "student", "train": work / "train.jsonl",
             "eval": work / "eval.jsonl"}
    shape = {key: getattr(args, key) for key in ("arch", "vocab", "teacher_hidden", "teacher_layers", "student_hidden",
                                                 "student_layers", "seq_len", "batch", "steps")}
    shape["tokenizer"] = TOKENIZER_KIND
    stamp = work / "setup.json"
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return paths
    work.mkdir(parents=True, exist_ok=True)
    build_models(args, paths)
    # bos + (seq_len - 2) words + eos: every row is exactly seq_len tokens; each row is trained once.
    for name, rows, seed in (("train", args.steps * args.batch, 1), ("eval", args.batch, 2)):
        drawn = torch.randint(word_count(args.vocab), (rows, args.seq_len - 2),
                              generator=torch.Generator().manual_seed(seed))
        paths[name].write_text("".join(json.dumps({"text": text_of(row, args.vocab)}) + "\n" for row in drawn.tolist()))
    check_row_lengths(paths, args.seq_len, lambda row: len(row.input_ids), args.seq_len)
    stamp.write_text(json.dumps(shape))
    return paths


def build_models(args, paths: dict) -> None:
    """Teacher and student from random weights (seed 0), each with the shared tokenizer, into
    `paths["teacher"]` and `paths["student"]`; `args.seq_len` bounds their positions. Initialised on
    `args.device`: at the GPU check's 1.5B/0.5B shapes a CPU takes tens of seconds of the GPU's minutes."""
    tokenizer = build_tokenizer(args.vocab)
    device = torch.device(getattr(args, "device", "cpu"))
    torch.manual_seed(0)
    for name in ("teacher", "student"):
        with device:  # transformers initialises in the device context it is built in
            model = ARCHS[args.arch](args.vocab, getattr(args, f"{name}_hidden"), getattr(args, f"{name}_layers"),
                                     args.seq_len)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        # Random weights built here restrict nothing; the licence gate refuses a teacher without a card.
        (paths[name] / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n\n# benchmark {name}, random weights\n")
        del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the contenders, each its own process, get the whole GPU


# ------------------------------------------------------------------------------- one contender each
def run_contender(name: str, args, paths: dict, round_: int, script: Path | None = None, overrides=None,
                  read=None) -> dict:
    """Run one contender in its own process; its throughput, peak RSS and trainable parameter count.
    Another benchmark reuses this with its own `script` (re-run with `--child NAME` for a contender
    not ours), ours' `overrides(args, paths, out)` and `read(out)` of ours' run (defaults: this file's)."""
    script, overrides, read = script or Path(__file__).resolve(), overrides or our_overrides, read or read_ours
    out = args.work / "runs" / f"{name}-{round_}"
    shutil.rmtree(out, ignore_errors=True)  # a stale run directory would be resumed from
    out.mkdir(parents=True)
    if name == "ours":
        command = [sys.executable, "-m", "trainer", *overrides(args, paths, out)]
    else:
        # --work again as an absolute path: the child runs in the repository, wherever this was started.
        command = [sys.executable, str(script), *sys.argv[1:], "--work", str(args.work),
                   "--child", name, "--child-out", str(out)]
    print(f"{name} (round {round_ + 1} of {args.repeats}): running ({out / 'log.txt'})", flush=True)
    started = time.perf_counter()
    usage = run_measured(command, out / "log.txt", args.threads)
    result = read(out) if name == "ours" else json.loads((out / "timing.json").read_text())
    result.update(usage, process_s=time.perf_counter() - started, command=" ".join(command))
    print(f"{name}: {result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
          f"{result['process_s']:.0f} s in all", flush=True)
    return result


def run_measured(command: list[str], log: Path, threads: int) -> dict:
    """Run `command` to completion; its peak resident set (its own, not the largest child's so far, which
    `getrusage(RUSAGE_CHILDREN)` would give) and CPU time (sys time and minor faults: allocator churn)."""
    with open(log, "w") as stream:
        proc = subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                env={**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    if proc.returncode != 0:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: {command[2] if command[1] == '-m' else command[-1]} failed "
                         f"(exit {proc.returncode}); see {log}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "cpu_user_s": usage.ru_utime, "cpu_sys_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt}


def our_overrides(args, paths: dict, out: Path) -> list[str]:
    # warmup_steps=0: the cosine schedule the other two use (no warm-up, down to 0.1x); the timing's
    # warm-up is the first log window instead.
    return [f"teacher.path={paths['teacher']}", f"student.path={paths['student']}", f"data.train={paths['train']}",
            f"data.eval={paths['eval']}", f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}",
            f"train.max_steps={args.steps}", f"train.log_every={args.warmup}", "train.warmup_steps=0",
            f"train.lr={args.lr}", f"train.precision={args.precision}", "logger=none",
            f"cache_dir={args.work / 'cache_dir'}", f"hydra.run.dir={out / 'run'}"]


def read_ours(out: Path) -> dict:
    """Throughput over the log windows after the first, from the run's own metrics.jsonl."""
    windows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens = windows[-1]["tokens_seen"] - windows[0]["tokens_seen"]
    seconds = sum((w["tokens_seen"] - before["tokens_seen"]) / w["tokens_per_s"]
                  for before, w in zip(windows, windows[1:]))
    trainable = next(int(line.split("student: ")[1].split()[0]) for line in (out / "log.txt").read_text().splitlines()
                     if "trainable parameters" in line)
    # The trainer's own accounting over the same windows: model FLOP/s, and MFU where the device has a peak.
    timed = windows[1:]
    return {"tokens_per_s": tokens / seconds, "timed_tokens": tokens, "timed_s": seconds, "trainable": trainable,
            "losses": [w["loss"] for w in windows], "tflops_per_s": statistics.median(w["tflops_per_s"] for w in timed),
            "mfu": statistics.median(w["mfu"] for w in timed) if all(w.get("mfu") is not None for w in timed) else None,
            "peak_memory_gib": max(w["peak_memory_gib"] for w in windows)}


class StepClock:
    """Wall time at the end of each optimizer step, and each step's non-pad input tokens."""

    def __init__(self):
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def tick(self, tokens: int | None = None) -> None:
        if torch.cuda.is_initialized():  # the step's kernels are queued, not done
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if tokens is not None:
            self.tokens.append(tokens)

    def write(self, out: Path, warmup: int, trainable: int, losses: list[float], **extra) -> None:
        """timing.json: throughput over steps warmup+1.., per log window the mean loss, on a GPU the
        peak allocated memory, and whatever `extra` a caller measured besides."""
        steps = len(self.ends)
        tokens = sum(self.tokens[warmup:steps])  # TRL's loader may have collated one batch ahead
        seconds = self.ends[-1] - self.ends[warmup - 1]
        (out / "timing.json").write_text(json.dumps({
            "tokens_per_s": tokens / seconds, "timed_tokens": tokens, "timed_s": seconds, "trainable": trainable,
            "losses": losses, "step_s": [b - a for a, b in zip(self.ends, self.ends[1:])],
            **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_initialized() else {}),
            **extra,
        }, indent=2))


def load_rows(paths: dict, seq_len: int):
    """The tokenizer and the training rows exactly as our trainer tokenizes them (bos, text, eos; every
    token supervised but the first, which nothing predicts)."""
    from transformers import AutoTokenizer

    from trainer.data.examples import load_examples

    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    return tokenizer, load_examples(paths["train"], tokenizer, seq_len, cache_dir=None).rows


def check_row_lengths(paths: dict, seq_len: int, length_of, expected: int) -> None:
    """Every training row, tokenized as the trainer tokenizes it, measures `expected` by `length_of`:
    else the tokenizer as transformers reloads it is not the one built here, and every figure would
    be of other rows than the benchmark states."""
    tokenizer, rows = load_rows(paths, seq_len)
    wrong = sorted({length_of(row) for row in rows} - {expected})
    if wrong:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: the rows tokenize to {wrong} tokens, not {expected}, with "
                         f"{type(tokenizer).__name__} as transformers loads it from {paths['student']}; "
                         "build_tokenizer's tokenizer does not survive reloading there.")


def load_models(paths: dict, device: str, bf16: bool):
    """Teacher (frozen) and student on `device`, in bf16 (what ours and TRL train in on a GPU) or fp32."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa")
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], **kwargs).eval().requires_grad_(False)
    return teacher.to(device), AutoModelForCausalLM.from_pretrained(paths["student"], **kwargs).to(device)


def dropout_rates(model) -> list[float]:
    """Every dropout layer's rate (GPT-2's attention reads its rate from its own layer too)."""
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def lora_config():
    from peft import LoraConfig

    # "all-linear" is peft's name for every linear layer but the output head: the set ours finds.
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_trl(args, paths: dict, out: Path) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer, rows = load_rows(paths, args.seq_len)
    teacher, student = load_models(paths, args.device, args.bf16)
    clock = StepClock()
    pad = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)  # TRL's own, for tokenized rows

    def collate(examples):
        batch = pad(examples)
        clock.tokens.append(int(batch["attention_mask"].sum()))  # batch i is step i's (no accumulation)
        return batch

    class Tick(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()

    config = GKDConfig(
        output_dir=str(out / "run"), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, max_length=args.seq_len,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        # TRL turns bf16 and checkpointing on, and dropout off, by default; ours uses bf16 on a GPU (or
        # with --bf16) only, no checkpointing, and the model's own dropout. gradient_checkpointing, not
        # its newer alias activation_checkpointing, which transformers 5.17 (the GPU image's) does not know.
        bf16=args.bf16, gradient_checkpointing=False, use_cpu=args.device == "cpu",
        logging_steps=args.warmup, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
        disable_dropout=False)
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})
    rates = dropout_rates(student)  # before TRL wraps the student: its peft model shares these layers
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=collate, peft_config=lora_config(),
                         callbacks=[Tick()])
    if any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()):
        raise SystemExit("bench_e2e: TRL's student recomputes activations; the comparison would not be like for like.")
    if dropout_rates(trainer.model) != rates:
        raise SystemExit("bench_e2e: TRL changed the student's dropout; the comparison would not be like for like.")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    clock.write(out, args.warmup, trainable_count(trainer.model), losses)


def forward_kl(student_logits, teacher_logits, labels):
    """KL(teacher ‖ student) per supervised token. logits [B, T, V]; labels [B, T], -100 where masked.
    Position t predicts token t+1."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    log_q = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)  # [N, V], in float32 even from bf16
    log_p = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / mask.sum()


def train_minimal(args, paths: dict, out: Path) -> None:
    from peft import get_peft_model

    from trainer.data.batching import micro_batches_for_step
    from trainer.models.engines import warmup_cosine

    tokenizer, rows = load_rows(paths, args.seq_len)
    teacher, student = load_models(paths, args.device, args.bf16)
    student = get_peft_model(student, lora_config()).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup=0, total=args.steps))
    clock, step_losses = StepClock(), []
    for step in range(args.steps):
        # Our trainer's rows for this step, so the two see the same batches.
        batch = micro_batches_for_step(step, rows, 0, 1, args.batch, 1, 0, tokenizer.pad_token_id)[0]
        batch = {key: value.to(args.device) for key, value in batch.items()}
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = forward_kl(student_logits, teacher_logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
        clock.tick(int(batch["attention_mask"].sum()))  # a host read: the step's kernels are done
    windows = [step_losses[i:i + args.warmup] for i in range(0, args.steps, args.warmup)]  # as the others log
    clock.write(out, args.warmup, trainable_count(student), [sum(w) / len(w) for w in windows])


# -------------------------------------------------------------------------------------------- main
def machine() -> dict:
    cpu = platform.processor()
    if not cpu and Path("/proc/cpuinfo").exists():  # platform.processor() is empty on most Linux
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), "memory_gib": round(memory, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # trl, when only our trainer was measured
            return "not installed"

    found = {name: installed(name) for name in ("transformers", "peft", "accelerate", "deepspeed", "trl")}
    # The trainer measured: its commit, and whether trainer/ or conf/ differed from it.
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    edited = subprocess.run([*git, "status", "--porcelain", "trainer", "conf"], capture_output=True, text=True).stdout
    return {**found, "distill": f"{commit}{' + uncommitted changes' if edited.strip() else ''}"}


def check_same_trainable(rounds: list[dict]) -> None:
    """Every contender of every round trained as many parameters: else not the same LoRA, and the
    comparison would be void."""
    trainable = {(name, run["trainable"]) for runs in rounds for name, run in runs.items()}
    if len({count for _, count in trainable}) > 1:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: the contenders train different numbers of parameters "
                         f"({sorted(trainable)}); check their LoRA targets.")


def summarise(runs: list[dict]) -> dict:
    speeds = [run["tokens_per_s"] for run in runs]
    summary = {"tokens_per_s": statistics.median(speeds), "tokens_per_s_range": [min(speeds), max(speeds)],
               "peak_rss_mib": statistics.median(run["peak_rss_mib"] for run in runs)}
    if "tflops_per_s" in runs[0]:  # ours
        summary["tflops_per_s"] = statistics.median(run["tflops_per_s"] for run in runs)
        mfus = [run["mfu"] for run in runs]
        summary["mfu"] = statistics.median(mfus) if None not in mfus else None
    if all("peak_memory_gib" in run for run in runs):  # ours; the others on a GPU (peak allocated memory)
        summary["peak_memory_gib"] = statistics.median(run["peak_memory_gib"] for run in runs)
    return summary


def add_model_rates(summary: dict) -> None:
    """Model TFLOP/s and MFU of the other contenders, from ours' accounting: all three do the same work
    per token (the same models, rows and loss), so FLOPs per token and the device's peak are ours'."""
    ours = summary.get("ours")
    if ours is None:
        return
    flops_per_token = ours["tflops_per_s"] * 1e12 / ours["tokens_per_s"]
    peak = ours["tflops_per_s"] / ours["mfu"] if ours.get("mfu") else None
    for name, run in summary.items():
        if name != "ours":
            run["tflops_per_s"] = flops_per_token * run["tokens_per_s"] / 1e12
            run["mfu"] = run["tflops_per_s"] / peak if peak else None


def print_table(results: dict) -> None:
    summary = results["summary"]
    ours = summary.get("ours")
    repeats = len(results["rounds"])
    gpu = results["args"]["device"] == "cuda"  # peak allocated GPU memory; on the CPU, each process's peak RSS
    memory, unit = ("peak_memory_gib", "GiB") if gpu else ("peak_rss_mib", "MiB")
    print(f"| contender | tokens/s{f' (median of {repeats}; range)' if repeats > 1 else ''} | "
          f"{'peak GPU memory' if gpu else 'peak RSS'} | model TFLOP/s | MFU | ours ÷ it, tokens/s | ours ÷ it, memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, run in summary.items():
        speed = f"{run['tokens_per_s']:.0f}"
        if repeats > 1:
            speed += " ({:.0f}–{:.0f})".format(*run["tokens_per_s_range"])
        versus = ["", ""] if ours is None or name == "ours" else [
            f"{ours['tokens_per_s'] / run['tokens_per_s']:.2f}x", f"{ours[memory] / run[memory]:.2f}x"]
        rate = f"{run['tflops_per_s']:.3g}" if "tflops_per_s" in run else ""
        mfu = f"{run['mfu']:.1%}" if run.get("mfu") is not None else "n/a"
        print(f"| {name} | {speed} | {run[memory]:.{1 if gpu else 0}f} {unit} | {rate} | {mfu} | {versus[0]} | "
              f"{versus[1]} |")
    if ours is not None and repeats > 1:  # the spread of the ratio itself, round by round
        print()
        for name in (n for n in summary if n != "ours"):
            ratios = [runs["ours"]["tokens_per_s"] / runs[name]["tokens_per_s"] for runs in results["rounds"]]
            print(f"ours ÷ {name}, tokens/s, round by round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    if ours is not None:
        print("\nModel TFLOP/s: ours by its own accounting (median of windows), the others from ours' FLOPs per "
              "token; MFU n/a where the device has no known peak (a CPU).")
    m = results["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{'; ' + m['gpu'] if 'gpu' in m else ''}; "
          f"torch {m['torch']}; "
          + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    print(f"command: {results['command']}")


def main() -> None:
    args = parse_args()
    if "trl" in (args.child or args.contenders).split(",") and importlib.util.find_spec("trl") is None:
        print("bench_e2e: error: TRL is not installed; install the benchmark extra with "
              "pip install -e '.[bench]' and run again.", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    paths = prepare(args)
    if args.child:
        {"trl": train_trl, "minimal": train_minimal}[args.child](args, paths, args.child_out)
        return
    names = args.contenders.split(",")
    rounds = [{name: run_contender(name, args, paths, r) for name in names} for r in range(args.repeats)]
    check_same_trainable(rounds)
    summary = {name: summarise([runs[name] for runs in rounds]) for name in names}
    add_model_rates(summary)
    results = {"summary": summary, "rounds": rounds, "precision": args.precision,
               "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("child")},
               "machine": machine(), "versions": versions(),
               "command": "python scripts/bench_e2e.py " + " ".join(sys.argv[1:])}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()

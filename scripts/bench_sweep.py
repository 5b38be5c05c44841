"""A sweep of S student runs with the online teacher versus one teacher cache plus S cached runs.

Both sides run the same data, steps and sweep points (`train.lr`), each sweep as one Hydra multirun
process (`python -m trainer -m ...`), on this machine. The cached side's time includes building the
cache (`python -m trainer.cache`). Afterwards every final adapter is evaluated against the *full*
teacher (all logits, not its top-k), so the two sides' eval KL are the same quantity.

The models are built here, once, into `--work`: a word-level language with an LM's kind of
next-word distributions (smooth, learnable structure, some nearly certain and some broad, all with
long tails; see `word_language`), a 10-layer, 256-wide teacher trained on it until its top-64 holds
about 0.95 of its mass (a trained LM's range), and a student made of the teacher's first and last
layers (4.0x fewer parameters), trained with LoRA. Results go to stdout as a markdown table and to `--work/results.json`.

    python scripts/bench_sweep.py            # the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = 2044  # plus four special tokens: a 2048-id vocabulary, well above k=64
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_sweep"))
    parser.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3", help="the sweep's points (train.lr)")
    parser.add_argument("--steps", type=int, default=128, help="optimizer steps per run (2 epochs by default)")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--tail-samples", type=int, default=16,
                        help="of the top-k cache entries, how many are drawn from the teacher's tail "
                             "(teacher.tail_samples; 0: the exact top-k)")
    parser.add_argument("--train-rows", type=int, default=2048)
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=256, help="width of both models")
    parser.add_argument("--teacher-layers", type=int, default=10)
    parser.add_argument("--student-layers", default="0,9", help="the teacher's layers the student keeps")
    parser.add_argument("--sharpness", type=float, default=1.5,
                        help="lowest Zipf exponent of the language's next-word distributions (the highest is +1); "
                             "higher makes the teacher's top-k hold more of its mass, as in a real LM")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------ models
def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *(f"w{i}" for i in range(WORDS))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def word_language(seed: int, sharpness: float) -> torch.Tensor:
    """[WORDS, WORDS] next-word probabilities with the smooth structure a language model can learn.

    Words sit at random places on a circle; word a's successors are the words near its own target
    place, with probability ∝ (1 + distance)^-s_a, s_a uniform in [sharpness, sharpness + 1]. Some
    words have broad continuations and some nearly certain ones, and every distribution has a long
    tail over the whole vocabulary, as an LM's does."""
    generator = torch.Generator().manual_seed(seed)
    place = torch.randperm(WORDS, generator=generator)
    target = (place + torch.randint(WORDS, (WORDS,), generator=generator)) % WORDS
    exponents = sharpness + torch.rand(WORDS, 1, generator=generator)
    distance = (place.unsqueeze(0) - target.unsqueeze(1)).abs()
    distance = torch.minimum(distance, WORDS - distance).double()
    probs = (1 + distance) ** -exponents.double()
    return (probs / probs.sum(dim=1, keepdim=True)).float()


def sample_text(probs: torch.Tensor, rows: int, length: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    words = [torch.randint(WORDS, (rows,), generator=generator)]
    for _ in range(length - 1):
        words.append(torch.multinomial(probs[words[-1]], 1, generator=generator).squeeze(1))
    table = torch.stack(words, dim=1).tolist()
    return [" ".join(f"w{w}" for w in row) for row in table]


def train_teacher(tokenizer, texts: list[str], steps: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.engines import warmup_cosine

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup=20, total=steps))
    ids = torch.tensor([tokenizer(text)["input_ids"] for text in texts])
    started = time.perf_counter()
    for step in range(steps):
        batch = ids[torch.randint(len(ids), (32,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            print(f"teacher step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    return model.eval()


def prepare(work: Path, args) -> dict:
    from trainer.demo.student import drop_layers

    paths = {"teacher": work / "teacher", "student": work / "student", "train": work / "train.jsonl",
             "eval": work / "eval.jsonl"}
    if all(p.exists() for p in paths.values()):
        return _with_cards(paths)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    language = word_language(seed=0, sharpness=args.sharpness)
    teacher = train_teacher(tokenizer, sample_text(language, 8192, 128, seed=1), args.teacher_steps, args.hidden,
                            args.teacher_layers)
    student = drop_layers(teacher, keep=tuple(int(i) for i in args.student_layers.split(",")))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    for name, rows, seed in (("train", args.train_rows, 2), ("eval", 128, 3)):
        paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_text(language, rows, 128, seed)))
    return _with_cards(paths)


def _with_cards(paths: dict) -> dict:
    """Both models are trained here from random weights on generated text, so nothing restricts them;
    their cards say so (Apache-2.0), since the licence gate refuses a teacher without one."""
    for name in ("teacher", "student"):
        card = paths[name] / "README.md"
        if not card.exists():
            card.write_text(f"---\nlicense: apache-2.0\n---\n\n# bench_sweep {name}, trained from scratch\n")
    return paths


# ------------------------------------------------------------------------------------------ sweeps
def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as stream:
        proc = subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return time.perf_counter() - started


def shared_overrides(paths: dict, work: Path, steps: int, top_k: int, tail_samples: int) -> list[str]:
    return [f"teacher.path={paths['teacher']}", f"student.path={paths['student']}", f"data.train={paths['train']}",
            f"data.eval={paths['eval']}", f"cache_dir={work / 'cache_dir'}", f"teacher.top_k={top_k}",
            f"teacher.tail_samples={tail_samples}",
            "train.seq_len=160", "train.micro_batch_size=32", f"train.max_steps={steps}", "train.warmup_steps=10",
            f"train.log_every={steps}", "logger=none"]


# ------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def full_teacher_kl(paths: dict, adapter: Path, teacher, tokenizer, eval_rows) -> float:
    """KL(teacher ‖ student) per supervised token over the held-out rows, on full logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.data.batching import eval_batches
    from trainer.models.heads import Scorer
    from trainer.train.evaluation import evaluate

    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["student"]), adapter).eval()
    batches = eval_batches(eval_rows, 0, 1, 32, tokenizer.pad_token_id)
    vocab = len(tokenizer)
    metrics = evaluate(Scorer(teacher, vocab, fused=False), Scorer(student, vocab, fused=False), batches,
                       torch.device("cpu"), chunk_size=4096)
    return metrics["eval/kl_to_teacher"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count())
    paths = prepare(args.work, args)
    shared = shared_overrides(paths, args.work, args.steps, args.top_k, args.tail_samples)
    points = args.lrs.split(",")
    for folder in ("online", "cached", "cache_dir/teacher_cache"):
        shutil.rmtree(args.work / folder, ignore_errors=True)
    python = sys.executable
    seconds = {
        "online_sweep": timed([python, "-m", "trainer", "-m", *shared, f"train.lr={args.lrs}",
                               f"hydra.sweep.dir={args.work / 'online'}"], args.work / "online.log"),
        "cache_build": timed([python, "-m", "trainer.cache", *shared, f"hydra.run.dir={args.work / 'build'}"],
                             args.work / "cache.log"),
        "cached_sweep": timed([python, "-m", "trainer", "-m", "teacher=cache", *shared, f"train.lr={args.lrs}",
                               f"hydra.sweep.dir={args.work / 'cached'}"], args.work / "cached.log"),
    }
    results = {"seconds": seconds, "points": points, "args": {k: str(v) for k, v in vars(args).items()},
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "kl": evaluate_runs(paths, args.work, points)}
    results["teacher_top_k_mass"] = top_k_mass(paths, args.top_k)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def evaluate_runs(paths: dict, work: Path, points: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.examples import load_examples
    from trainer.launch.distributed import init_distributed

    init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    eval_rows = load_examples(paths["eval"], tokenizer, 160, cache_dir=None).rows
    kl = {}
    for side in ("online", "cached"):
        for index, point in enumerate(points):
            run = work / side / str(index)
            summary = json.loads((run / "summary.json").read_text())
            kl[f"{side}/{point}"] = {
                "full_kl": full_teacher_kl(paths, run / "adapter", teacher, tokenizer, eval_rows),
                "reported_kl": summary["eval/kl_to_teacher"], "initial_kl": summary["initial/eval/kl_to_teacher"],
                "train_wall_s": summary["train/wall_s"],
            }
    return kl


@torch.no_grad()
def top_k_mass(paths: dict, k: int) -> float:
    """The teacher's mean probability mass in its top-k over the held-out tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    texts = [json.loads(line)["text"] for line in paths["eval"].read_text().splitlines()][:32]
    ids = torch.tensor([tokenizer(t)["input_ids"] for t in texts])
    probs = teacher(input_ids=ids).logits[..., : len(tokenizer)].float().softmax(-1)
    return float(probs.topk(k, dim=-1).values.sum(-1).mean())


def print_table(results: dict) -> None:
    s = results["seconds"]
    online, cached = s["online_sweep"], s["cache_build"] + s["cached_sweep"]
    print(f"| sweep of {len(results['points'])} runs | wall time |\n| --- | ---: |")
    print(f"| online teacher | {online:.0f} s |")
    print(f"| cache build + cached runs | {s['cache_build']:.0f} s + {s['cached_sweep']:.0f} s = {cached:.0f} s |")
    print(f"| speed-up | **{online / cached:.2f}x** |\n")
    cached = f"top-{int(results['args']['top_k']) - int(results['args']['tail_samples'])} + " \
             f"{results['args']['tail_samples']} drawn"
    print(f"| train.lr | eval KL, online (full) | eval KL, cached ({cached}) | cached / online |")
    print("| --- | ---: | ---: | ---: |")
    for point in results["points"]:
        a, b = results["kl"][f"online/{point}"]["full_kl"], results["kl"][f"cached/{point}"]["full_kl"]
        print(f"| {point} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    print(f"\nteacher's mean top-{results['args']['top_k']} mass on held-out tokens: {results['teacher_top_k_mass']:.4f}")


if __name__ == "__main__":
    main()

"""Our rollout engine versus a bare `model.generate`: tokens/s of each, on the same batch.

Both sample (temperature and top-p as given) the same prompts, left-padded into one batch, with a KV
cache, for exactly `--max-new-tokens` tokens per row: the EOS is an id the model never writes (ours
is given one outside the vocabulary; `generate` none), so neither stops early and both do the same
work. **Tokens/s** is the generated tokens (batch x max_new_tokens) over the wall time of one call;
each contender runs `--repeats` times, interleaved, after one warm-up call each, and the table gives
the median (and the range). The model is a Llama-shaped one built here from random weights: speed
does not depend on what it has learned.

    python scripts/bench_rollout.py                       # the table in docs/benchmarks.md
    python scripts/bench_rollout.py --device cuda --hidden 1024 --layers 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.rollout.engine import RolloutSettings  # noqa: E402
from trainer.rollout.hf import HFRolloutEngine  # noqa: E402

PAD = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32, help="the longest prompt; the others are shorter")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.prompt_len + args.max_new_tokens + 8,
                         bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(args.device).eval()
    model.generation_config.eos_token_id = None  # run every row to max_new_tokens
    return model


def prompts_of(args) -> list[list[int]]:
    """Prompts of different lengths (from half the longest to the longest), so padding is exercised."""
    generator = torch.Generator().manual_seed(1)
    lengths = [args.prompt_len - (row * args.prompt_len // 2) // max(1, args.batch - 1) for row in range(args.batch)]
    return [torch.randint(1, args.vocab, (length,), generator=generator).tolist() for length in lengths]


def time_ours(model, prompts, args) -> tuple[float, int]:
    engine = HFRolloutEngine(model, [args.vocab + 1], PAD)
    settings = RolloutSettings(args.max_new_tokens, args.temperature, args.top_p)
    rollouts = engine.generate(prompts, list(range(len(prompts))), settings)
    return rollouts.seconds, rollouts.generated_tokens


def time_generate(model, prompts, args) -> tuple[float, int]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    start = time.perf_counter()
    # top_k=0: no top-k cut, as ours has none (None would fall back to transformers' default of 50).
    output = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                            top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens, pad_token_id=PAD)
    seconds = time.perf_counter() - start
    return seconds, (output.shape[1] - longest) * len(prompts)


CONTENDERS = {"ours (HFRolloutEngine)": time_ours, "bare model.generate": time_generate}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, prompts = build_model(args), prompts_of(args)
    rates = {name: [] for name in CONTENDERS}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, measure in CONTENDERS.items():
            seconds, tokens = measure(model, prompts, args)
            assert tokens == args.batch * args.max_new_tokens, f"{name} wrote {tokens} tokens"
            if repeat:
                rates[name].append(tokens / seconds)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, {args.device}; "
          f"Llama V={args.vocab} H={args.hidden} L={args.layers}; batch {args.batch}, prompts "
          f"{min(map(len, prompts))}-{args.prompt_len} tokens, {args.max_new_tokens} new tokens, "
          f"temperature {args.temperature}, top_p {args.top_p}; median of {args.repeats}")
    print("| engine | tokens/s (median) | range | vs bare generate |\n|---|---|---|---|")
    bare = statistics.median(rates["bare model.generate"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.0f} | {min(values):.0f}-{max(values):.0f} | {median / bare:.2f}x |")


if __name__ == "__main__":
    main()

"""`torchrun --nproc_per_node 2 -m zero3_worker OUT` (gloo): greedy rollouts of a 2-rank ZeRO-3 LoRA
student, next to what the unsharded model's `generate` writes; each rank writes `OUT/rank<r>.json`.

Cases, in each mode (gathered, synced, auto): "split", both ranks with prompts whose rollouts end at
different steps; "uneven", rank 0 with 3 prompts and rank 1 with none; "sampled", the split prompts
sampled, against our engine on the unsharded model; then "after_step", "uneven" after one optimizer
step, against an unsharded copy of the updated weights. Every rollout's tokens sit beside the
expected ones, with the forwards each rank ran and whether the model was left as it was (each
parameter's ZeRO-3 status as before, DeepSpeed's hooks back). The test reads and judges them.

`--bench N` instead times N rollout phases of each mode on the same prompts and prints the medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.rollout.engine import RolloutSettings
from trainer.rollout.hf import HFRolloutEngine

VOCAB, PAD = 64, 0
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
MAX_NEW = 10
NEVER = VOCAB + 1  # an EOS outside the vocabulary: no row stops before max_new_tokens


def lora_student(hidden: int, layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    # A wide initialisation makes a random model's greedy path vary instead of repeating one token;
    # a random (not zero) adapter makes the adapter's weights change what is written.
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


def zero3_engine(student):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    # No parameter persists: every layer is gathered and freed around each forward, as in a big model.
    trainable = [p for p in student.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(trainable, lr=0.05), config=config)
    return engine


def expected_greedy(model, prompts, eos: int) -> list[list[int]]:
    """The unsharded model's `generate` (one process), cut after the first EOS."""
    if not prompts:
        return []
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                             pad_token_id=PAD, eos_token_id=eos)[:, longest:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def deepspeed_hook_count(module) -> int:
    return sum(1 for m in module.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks)
               for hook in hooks.values() if "deepspeed" in (getattr(hook, "__module__", "") or ""))


def statuses(module) -> list[str]:
    """Each parameter's ZeRO-3 status (whole, partitioned, in flight)."""
    return [str(param.ds_status) for param in module.parameters()]


class Forwards:
    """Counts the root module's forwards (a hook of ours: gathered mode sets aside only DeepSpeed's)."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(self._seen)

    def _seen(self, *_):
        self.count += 1


def rollout_case(engine, reference, forwards, mode, prompts, eos) -> dict:
    rollouts = HFRolloutEngine(engine, [eos], PAD, zero3_mode=mode)
    before = statuses(engine.module), deepspeed_hook_count(engine.module)
    forwards.count = 0
    tokens = rollouts.generate(prompts, list(range(len(prompts))), RolloutSettings(MAX_NEW, temperature=0)).tokens
    after = statuses(engine.module), deepspeed_hook_count(engine.module)
    return {"tokens": tokens, "expected": expected_greedy(reference, prompts, eos), "forwards": forwards.count,
            "left_as_it_was": after == before and "ZeroParamStatus.NOT_AVAILABLE" in before[0]}


def sampled_case(engine, reference, mode, prompts) -> dict:
    """A sampled rollout (each row from its own seeded generator) beside the unsharded model's."""
    settings = RolloutSettings(MAX_NEW, temperature=1.0, top_p=0.9)
    seeds = [11 * (row + 1) for row in range(len(prompts))]
    tokens = HFRolloutEngine(engine, [NEVER], PAD, zero3_mode=mode).generate(prompts, seeds, settings).tokens
    return {"tokens": tokens, "expected": HFRolloutEngine(reference, [NEVER], PAD).generate(prompts, seeds, settings).tokens}


def one_step(engine, reference) -> None:
    """One AdamW step of the sharded student, then its weights (gathered) copied into `reference`."""
    import deepspeed

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    engine.train()
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        state = {name: tensor.detach().clone() for name, tensor in engine.module.state_dict().items()}
    reference.load_state_dict(state)


def run_cases(out: Path) -> None:
    rank = dist.get_rank()
    student = lora_student(hidden=64, layers=2)
    reference = copy.deepcopy(student).eval()
    engine = zero3_engine(student)
    forwards = Forwards(engine.module)
    # An EOS that rank 0's one row writes early, so the ranks' rollouts end at different steps.
    eos = expected_greedy(reference, PROMPTS[:1], NEVER)[0][2]
    split = [PROMPTS[:1], PROMPTS[1:]][rank]
    uneven = [PROMPTS, []][rank]
    cases = {}
    for mode in ("gathered", "synced", "auto"):
        cases[f"split/{mode}"] = rollout_case(engine, reference, forwards, mode, split, eos)
        cases[f"uneven/{mode}"] = rollout_case(engine, reference, forwards, mode, uneven, NEVER)
        cases[f"sampled/{mode}"] = sampled_case(engine, reference, mode, split)
    before_step = expected_greedy(reference, uneven, NEVER)
    one_step(engine, reference)
    for mode in ("gathered", "synced"):
        cases[f"after_step/{mode}"] = rollout_case(engine, reference, forwards, mode, uneven, NEVER)
    cases["after_step/before"] = {"expected": before_step}
    (out / f"rank{rank}.json").write_text(json.dumps(cases))


def bench(repeats: int, hidden: int, layers: int, batch: int, max_new: int) -> None:
    """Seconds per rollout phase of each mode: each rank `batch` prompts, `max_new` tokens each; and
    of an unsharded copy of the model on each rank, the floor."""
    rank = dist.get_rank()
    student = lora_student(hidden, layers)
    unsharded = copy.deepcopy(student)
    engine = zero3_engine(student)
    prompts = [[1 + (rank * batch + row + i) % (VOCAB - 1) for i in range(8 + row)] for row in range(batch)]
    settings = RolloutSettings(max_new, temperature=0)
    seconds = {"gathered": [], "synced": [], "unsharded": []}
    for _ in range(repeats + 1):  # the first round warms up
        for mode in seconds:
            model, zero3_mode = (unsharded, "auto") if mode == "unsharded" else (engine, mode)
            dist.barrier()
            start = time.perf_counter()
            HFRolloutEngine(model, [NEVER], PAD, zero3_mode=zero3_mode).generate(prompts, list(range(batch)), settings)
            seconds[mode].append(time.perf_counter() - start)
    if rank == 0:
        for mode, times in seconds.items():
            print(f"BENCH {mode}: {statistics.median(times[1:]):.3f} s per rollout phase "
                  f"(min {min(times[1:]):.3f}, max {max(times[1:]):.3f}; {repeats} phases, {dist.get_world_size()} ranks, "
                  f"{batch} prompts x {max_new} tokens per rank, hidden {hidden}, {layers} layers)", flush=True)


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--bench", type=int, default=0, help="time this many rollout phases of each mode")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    # A collective that never completes fails within two minutes instead of gloo's thirty.
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    if args.bench:
        bench(args.bench, args.hidden, args.layers, args.batch, args.max_new_tokens)
    else:
        run_cases(args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

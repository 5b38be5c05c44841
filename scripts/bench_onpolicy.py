"""On-policy steps, end to end: our trainer versus TRL's GKDTrainer(lmbda=1) and DistillationTrainer;
and our rollout phase versus a bare `model.generate` on the same batch.

Three contenders distil the same frozen teacher into the same LoRA student on the same prompts, every
step fully on-policy (the student writes every response, then the teacher grades every token):

- **ours**: `python -m trainer onpolicy.fraction=1` (rollouts by `trainer/rollout/hf.py`, then the
  fused loss), `loss.kind=--loss`;
- **trl-gkd**: `trl.experimental.gkd.GKDTrainer` with `lmbda=1`, `seq_kd=False`, `beta` 0 for
  `--loss fkl` and 1 for `rkl` (TRL's β weighs the teacher in the mixture as ours does: β=0 is
  KL(teacher ‖ student), β=1 KL(student ‖ teacher));
- **trl-distillation**: `trl.DistillationTrainer`, the same β (its chunked loss; generation by
  transformers' `generate`, no vLLM here). Left out, with a line saying so, where the installed TRL
  lacks it.

Like for like (everything else as `scripts/bench_e2e.py`, whose machinery this reuses: models built
from random weights, LoRA r=16 on every linear of the blocks, AdamW, cosine schedule, clipping, fp32,
sdpa, `--threads` torch threads, one contender per process, `--repeats` interleaved rounds, medians):
every prompt is `--prompt-len` tokens (bos and words), every rollout samples at `--temperature` with
no top-p or top-k cut, a KV cache and at most `--max-new-tokens` tokens, stopping at the EOS
(a random model almost never writes it: the mean rollout length is reported); `train.seq_len` is
prompt + new tokens, so nothing is cut; one micro-batch of `--batch` rows per optimizer step.
GKDTrainer's rows carry a response of `--max-new-tokens` tokens, which it discards (its token count
for the loss's normaliser is read from them; ours and DistillationTrainer's count the rollouts).

**Tokens/s** counts the trained rows' non-pad input tokens (prompt plus rollout, up to and with its
EOS) of steps W+1..N over the wall time from the end of step W to the end of step N, generation
included (`--warmup` W). **Generating** is the share of that time spent in the rollout call (ours:
the trainer's `rollout_share`; TRL's: its `generate` call, timed from outside) and its tokens/s the
generated tokens over that time. **The rollout phase** is then measured on its own, in this
process: `scripts/bench_rollout.py`'s two contenders (our `HFRolloutEngine` and a bare
`model.generate`, same batch, exactly `--max-new-tokens` tokens each, no EOS) on the LoRA student
and a training batch's prompts, `--rollout-repeats` calls each per round after a warm-up, interleaved.
The 1-minute load average is read before each contender (the machine may be shared). Results: a
markdown table on stdout and `--work/results.json`.

`--device cuda` runs every contender and the rollout phase on the GPU in bf16 (ours: `train.precision=bf16`;
TRL: `bf16=True`) and reports each one's peak allocated GPU memory instead of its peak RSS, as
`scripts/bench_e2e.py --device cuda` does; `scripts/gpu/check.py` runs it so. `--bf16` runs the same bf16
code on the CPU, as `scripts/gpu/check.py --cpu` does.

    pip install -e ".[bench]"                    # TRL, for this script only
    python scripts/bench_onpolicy.py --repeats 3 --threads 1    # the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as e2e  # noqa: E402  (puts the repository on the path too)
import bench_rollout  # noqa: E402

from trainer.rollout.prompts import prompt_of  # noqa: E402

CONTENDERS = ("ours", "trl-gkd", "trl-distillation")
BETA = {"fkl": 0.0, "rkl": 1.0}
"""TRL's β for our loss.kind: the weight of the teacher in its mixture, so 0 is KL(teacher ‖ student)."""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_onpolicy"))
    parser.add_argument("--arch", choices=sorted(e2e.ARCHS), default="llama", help="the models' architecture")
    parser.add_argument("--vocab", type=int, default=32768, help="ids of the shared tokenizer (and both models)")
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (bos and words)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens a rollout writes")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (DistillationTrainer applies it to its loss as well; keep 1)")
    parser.add_argument("--loss", choices=sorted(BETA), default="rkl", help="ours' loss.kind; TRL's beta follows")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch (= per optimizer step)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's CPU threads in every contender")
    e2e.add_device_arguments(parser, "every contender and the rollout phase")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="which to run, in this order")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of all contenders; medians")
    parser.add_argument("--rollout-repeats", type=int, default=3,
                        help="calls of each rollout contender per round, after one warm-up (0: none)")
    parser.add_argument("--child", choices=CONTENDERS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.seq_len = args.prompt_len + args.max_new_tokens  # bench_e2e's helpers read these two
    e2e.settle_precision(parser, args)
    if args.repeats < 1 or args.rollout_repeats < 0:
        parser.error("--repeats must be at least 1 and --rollout-repeats at least 0.")
    if e2e.word_count(args.vocab) < 1:
        parser.error(f"--vocab {args.vocab} leaves no word beside the tokenizer's specials and alphabet; "
                     f"give at least {len(e2e.SPECIALS) + len(e2e.ALPHABET) + 1}.")
    if not 0 < args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be between 1 and --steps - 1 ({args.steps - 1}).")
    if args.prompt_len < 2 or args.max_new_tokens < 2:
        parser.error("--prompt-len and --max-new-tokens must be at least 2 (a bos and one word; a word and an EOS).")
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"--contenders has {sorted(unknown)}; choose from {', '.join(CONTENDERS)}.")
    return args


# ------------------------------------------------------------------------------------- the rows
def prepare(args) -> dict:
    """Models (bench_e2e's), and rows in `--work`: each a prompt of `--prompt-len` tokens and a
    response that makes the row exactly `train.seq_len` (GKDTrainer reads it; the rollouts replace it)."""
    work = args.work
    paths = {"teacher": work / "teacher", "student": work / "student", "train": work / "train.jsonl",
             "eval": work / "eval.jsonl"}
    shape = {key: getattr(args, key) for key in ("arch", "vocab", "teacher_hidden", "teacher_layers", "student_hidden",
                                                 "student_layers", "prompt_len", "max_new_tokens", "batch", "steps")}
    shape["tokenizer"] = e2e.TOKENIZER_KIND
    stamp = work / "setup.json"
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return paths
    work.mkdir(parents=True, exist_ok=True)
    e2e.build_models(args, paths)
    words = e2e.word_count(args.vocab)
    # bos + (prompt_len - 1) words; (max_new_tokens - 1) words + eos.
    for name, rows, seed in (("train", args.steps * args.batch, 1), ("eval", args.batch, 2)):
        generator = torch.Generator().manual_seed(seed)
        prompts = torch.randint(words, (rows, args.prompt_len - 1), generator=generator).tolist()
        responses = torch.randint(words, (rows, args.max_new_tokens - 1), generator=generator).tolist()
        paths[name].write_text("".join(
            json.dumps({"prompt": e2e.text_of(p, args.vocab), "response": e2e.text_of(r, args.vocab)}) + "\n"
            for p, r in zip(prompts, responses)))
    e2e.check_row_lengths(paths, args.seq_len, lambda row: len(prompt_of(row)), args.prompt_len)
    e2e.check_row_lengths(paths, args.seq_len, lambda row: len(row.input_ids), args.seq_len)
    stamp.write_text(json.dumps(shape))
    return paths


def our_overrides(args, paths: dict, out: Path) -> list[str]:
    """bench_e2e's overrides, fully on-policy with this benchmark's sampling and loss. No evaluations
    between the first and the last: they are outside the timed windows anyway, and cost the machine time."""
    return [*e2e.our_overrides(args, paths, out), "train.eval_every=0", "onpolicy.fraction=1",
            f"onpolicy.max_new_tokens={args.max_new_tokens}", f"onpolicy.temperature={args.temperature}",
            "onpolicy.top_p=1.0", f"loss.kind={args.loss}"]


def read_ours(out: Path) -> dict:
    """bench_e2e's reading of ours' run, plus its rollouts over the same timed windows."""
    result = e2e.read_ours(out)
    windows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [(w["tokens_seen"] - before["tokens_seen"]) / w["tokens_per_s"] for before, w in zip(windows, windows[1:])]
    generating = sum(w["rollout_share"] * s for w, s in zip(windows[1:], seconds))
    generated = sum(w["rollout_mean_length"] * w["rollout_rows"] for w in windows[1:])
    return {**result, **rollout_rates(generating, generated, sum(seconds), sum(w["rollout_rows"] for w in windows[1:]))}


def rollout_rates(generating_s: float, generated: float, timed_s: float, rollouts: float) -> dict:
    return {"generation_share": generating_s / timed_s, "generation_tokens_per_s": generated / generating_s,
            "mean_rollout_length": generated / rollouts}


# ---------------------------------------------------------------------------------- TRL's two
class GenerationClock(e2e.StepClock):
    """bench_e2e's step clock, plus each step's generation time and generated tokens."""

    def __init__(self):
        super().__init__()
        self.generating_s: list[float] = []
        self.generated: list[int] = []

    @contextlib.contextmanager
    def generating(self):
        started = time.perf_counter()
        yield
        self.generating_s.append(time.perf_counter() - started)

    def write_all(self, out: Path, args, trainer) -> None:
        timed = slice(args.warmup, args.steps)
        timed_s = self.ends[-1] - self.ends[args.warmup - 1]
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        self.write(out, args.warmup, e2e.trainable_count(trainer.model), losses,
                   **rollout_rates(sum(self.generating_s[timed]), sum(self.generated[timed]), timed_s,
                                   args.batch * (args.steps - args.warmup)))


def trl_arguments(args, out: Path) -> dict:
    """TrainingArguments both TRL trainers take, set as bench_e2e sets GKDTrainer's (TRL's bf16 and
    checkpointing defaults off, our schedule, no saving; bf16 on a GPU or with --bf16 only, as ours).
    gradient_checkpointing: transformers 5.17 does not know its newer alias activation_checkpointing."""
    return dict(output_dir=str(out / "run"), beta=BETA[args.loss], temperature=args.temperature,
                per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
                learning_rate=args.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=args.bf16,
                gradient_checkpointing=False, use_cpu=args.device == "cpu", logging_steps=args.warmup,
                save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0)


def tick_callback(clock: GenerationClock):
    from transformers import TrainerCallback

    class Tick(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()

    return Tick()


def check_no_recompute(trainer) -> None:
    if any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()):
        raise SystemExit("bench_onpolicy: TRL's student recomputes activations; the comparison would not be like for like.")


def train_gkd(args, paths: dict, out: Path) -> None:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer, rows = e2e.load_rows(paths, args.seq_len)
    teacher, student = e2e.load_models(paths, args.device, args.bf16)
    clock = GenerationClock()

    class TimedGKD(GKDTrainer):
        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            with clock.generating():
                ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            clock.generated.append(int(mask[:, inputs["prompts"].shape[1]:].sum()))
            return ids, mask, labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clock.tokens.append(int(inputs["attention_mask"].sum()))  # the rows as rewritten by the rollouts
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def collate(examples):
        """GKD's batch: the rows (right-padded; all one length here) and their prompts, left-padded."""
        prompts = [torch.tensor(e["prompt"]) for e in examples]
        ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=tokenizer.pad_token_id,
                                              padding_side="left")
        return {"input_ids": torch.tensor([e["input_ids"] for e in examples]),
                "attention_mask": torch.ones(len(examples), len(examples[0]["input_ids"]), dtype=torch.long),
                "labels": torch.tensor([e["labels"] for e in examples]), "prompts": ids,
                "prompt_attention_mask": (ids != tokenizer.pad_token_id).long()}

    config = GKDConfig(lmbda=1.0, seq_kd=False, max_new_tokens=args.max_new_tokens, max_length=args.seq_len,
                       **trl_arguments(args, out))
    dataset = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows],
                                 "prompt": [prompt_of(r) for r in rows]})
    trainer = TimedGKD(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                       processing_class=tokenizer, data_collator=collate, peft_config=e2e.lora_config(),
                       callbacks=[tick_callback(clock)])
    check_no_recompute(trainer)
    trainer.train()
    clock.write_all(out, args, trainer)


def train_distillation(args, paths: dict, out: Path) -> None:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tokenizer, rows = e2e.load_rows(paths, args.seq_len)
    tokenizer.padding_side = "left"
    teacher, student = e2e.load_models(paths, args.device, args.bf16)
    clock = GenerationClock()
    texts = [json.loads(line)["prompt"] for line in paths["train"].read_text().splitlines()]
    if tokenizer(texts[0])["input_ids"] != prompt_of(rows[0]):  # it tokenizes the text itself
        raise SystemExit("bench_onpolicy: DistillationTrainer would see other prompt tokens than ours.")

    class TimedDistillation(DistillationTrainer):
        def _generate_single_turn(self, *inputs, **kwargs):
            with clock.generating():
                completions = super()._generate_single_turn(*inputs, **kwargs)
            clock.generated.append(sum(map(len, completions)))
            return completions

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clock.tokens.append(int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    config = DistillationConfig(max_completion_length=args.max_new_tokens, top_p=1.0, top_k=0,
                                **trl_arguments(args, out))
    trainer = TimedDistillation(model=student, teacher_model=teacher, args=config,
                                train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                peft_config=e2e.lora_config(), callbacks=[tick_callback(clock)])
    check_no_recompute(trainer)
    trainer.train()
    clock.write_all(out, args, trainer)


def distillation_trainer_exists() -> bool:
    from importlib.metadata import version

    try:
        importlib.import_module("trl").DistillationTrainer  # TRL imports its trainers lazily, on first use
    except (AttributeError, ImportError):
        print(f"bench_onpolicy: TRL {version('trl')} has no DistillationTrainer; it is left out.", flush=True)
        return False
    return True


# ----------------------------------------------------------------------------- the rollout phase
class RolloutPhase:
    """bench_rollout's contenders on the LoRA student and a training batch's prompts, in this process."""

    def __init__(self, args, paths: dict):
        from peft import get_peft_model

        _, rows = e2e.load_rows(paths, args.seq_len)
        _, student = e2e.load_models(paths, args.device, args.bf16)
        self.model = get_peft_model(student, e2e.lora_config()).eval()
        self.model.generation_config.eos_token_id = None  # every row runs to max_new_tokens, in both
        self.prompts = [prompt_of(row) for row in rows[:args.batch]]
        self.settings = argparse.Namespace(vocab=args.vocab, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, top_p=1.0, device=args.device)
        self.repeats, self.warm = args.rollout_repeats, False

    def measure(self) -> dict:
        """Tokens/s of each contender: `repeats` calls each, interleaved, after one warm-up each."""
        rates = {name: [] for name in bench_rollout.CONTENDERS}
        for repeat in range(self.repeats + (0 if self.warm else 1)):
            for name, call in bench_rollout.CONTENDERS.items():
                seconds, tokens = call(self.model, self.prompts, self.settings)
                if self.warm or repeat:
                    rates[name].append(tokens / seconds)
            self.warm = True
        return rates


# -------------------------------------------------------------------------------------------- main
def run_round(names: list[str], args, paths: dict, round_: int, phase: RolloutPhase | None) -> tuple[dict, dict]:
    runs = {}
    for name in names:
        load = os.getloadavg()[0]
        runs[name] = e2e.run_contender(name, args, paths, round_, script=Path(__file__).resolve(),
                                       overrides=our_overrides, read=read_ours)
        runs[name]["load_1min"] = load
    return runs, (phase.measure() if phase else {})


def summarise(rounds: list[dict]) -> dict:
    summary = {}
    for name in rounds[0]:
        runs = [runs[name] for runs in rounds]
        summary[name] = {**e2e.summarise(runs), **{key: statistics.median(run[key] for run in runs) for key in
                                                   ("generation_share", "generation_tokens_per_s",
                                                    "mean_rollout_length")}}
    return summary


def print_table(results: dict) -> None:
    summary, repeats = results["summary"], len(results["rounds"])
    ours = summary.get("ours")
    gpu = results["args"]["device"] == "cuda"  # peak allocated GPU memory; on the CPU, each process's peak RSS
    print(f"| contender | tokens/s (median of {repeats}; range) | generating: share of time | generation tokens/s "
          f"| mean rollout length | {'peak GPU memory' if gpu else 'peak RSS'} | ours ÷ it, tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, run in summary.items():
        versus = "" if ours is None or name == "ours" else f"{ours['tokens_per_s'] / run['tokens_per_s']:.2f}x"
        print(f"| {name} | {run['tokens_per_s']:.0f} ({run['tokens_per_s_range'][0]:.0f}–"
              f"{run['tokens_per_s_range'][1]:.0f}) | {run['generation_share']:.0%} | "
              f"{run['generation_tokens_per_s']:.0f} | {run['mean_rollout_length']:.1f} | "
              f"{memory_cell(run, gpu)} | {versus} |")
    if ours is not None and repeats > 1:
        for name in (n for n in summary if n != "ours"):
            ratios = [runs["ours"]["tokens_per_s"] / runs[name]["tokens_per_s"] for runs in results["rounds"]]
            print(f"\nours ÷ {name}, tokens/s, round by round: " + ", ".join(f"{r:.2f}x" for r in ratios))
    phase = results["rollout_phase"]
    if phase:
        bare = statistics.median(phase["bare model.generate"])
        print("\n| rollout phase, same batch | tokens/s (median) | range | vs bare generate |\n|---|---:|---:|---:|")
        for name, values in phase.items():
            print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}–{max(values):.0f} | "
                  f"{statistics.median(values) / bare:.2f}x |")
    loads = [run["load_1min"] for runs in results["rounds"] for run in runs.values()]
    m = results["machine"]
    print(f"\n1-minute load average before each contender: {min(loads):.2f}–{max(loads):.2f}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}; "
          + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    print(f"command: {results['command']}")


def memory_cell(run: dict, gpu: bool) -> str:
    return f"{run['peak_memory_gib']:.1f} GiB" if gpu else f"{run['peak_rss_mib']:.0f} MiB"


def main() -> None:
    args = parse_args()
    names = args.contenders.split(",")
    if any(name.startswith("trl") for name in (args.child or args.contenders).split(",")) \
            and importlib.util.find_spec("trl") is None:
        print("bench_onpolicy: error: TRL is not installed; install the benchmark extra with "
              "pip install -e '.[bench]', or run --contenders ours.", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    paths = prepare(args)
    if args.child:
        {"trl-gkd": train_gkd, "trl-distillation": train_distillation}[args.child](args, paths, args.child_out)
        return
    if "trl-distillation" in names and not distillation_trainer_exists():
        names.remove("trl-distillation")
    phase = RolloutPhase(args, paths) if args.rollout_repeats else None
    measured = [run_round(names, args, paths, r, phase) for r in range(args.repeats)]
    rounds = [runs for runs, _ in measured]
    e2e.check_same_trainable(rounds)
    results = {"summary": summarise(rounds), "rounds": rounds, "precision": args.precision,
               "rollout_phase": {name: [rate for _, rates in measured for rate in rates[name]]
                                 for name in (measured[0][1] if phase else {})},
               "args": {k: str(v) for k, v in vars(args).items() if not k.startswith("child")},
               "machine": e2e.machine(), "versions": e2e.versions(),
               "command": "python scripts/bench_onpolicy.py " + " ".join(sys.argv[1:])}
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()

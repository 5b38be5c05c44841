"""The GPU check: every figure a GPU machine owes this project, in one run.

Sections, each written to `gpu_check.json` and `gpu_check.md` in `--out` as soon as it ends (a run
stopped by its time limit keeps what it measured):

1. **correctness**: the fused loss of every kind in bf16 and fp32 against a float64 reference
   (value and both gradients); head parity on a Qwen2- and a Llama-shaped model; NaN/Inf steps
   skipped by the fused optimizer; a short bf16 job at ZeRO-0 and ZeRO-3 (1 rank; NCCL on a GPU;
   train.deterministic=true) killed after a checkpoint and resumed, its losses and adapter compared bit
   for bit with a run never interrupted (and where they part, whether before the kill: kernels that
   differ run to run).
2. **liger_shape**: the jsd loss at Liger-Kernel's published shape (V=128256, 8192 tokens, H=2048,
   bf16): ours (fused), plain PyTorch and Liger's own chunked JSD, peak memory and time
   (`scripts/bench_loss.py`'s measurement).
3. **end_to_end**: a Qwen2.5-1.5B-shaped teacher and a 0.5B-shaped LoRA student, random weights,
   vocabulary 151936, 2048 tokens per row, bf16: ours vs TRL's GKDTrainer vs the minimal loop
   (`scripts/bench_e2e.py --device cuda`): tokens/s, model TFLOP/s, MFU, peak memory, and the goals.
4. **onpolicy**: the same pair at 64-token prompts and rollouts of up to 128 tokens, every step fully
   on-policy (`scripts/bench_onpolicy.py --device cuda --contenders ours`): tokens/s, the share of
   the step spent generating, generation tokens/s, peak memory, and the rollout phase on its own (our
   engine against a bare `model.generate` on the same batch).

`--cpu` runs the same code at tiny shapes on the CPU (gloo; the GPU's dtypes, bf16 included, so the
bf16 paths a GPU run takes have run before it), so CI keeps the kit working; its figures say nothing
about a GPU. A section whose tool is missing (TRL, liger-kernel, a GPU) records
"skipped: <why>" and the rest go on.

    scripts/gpu/check.sh /tmp/gpu_out          # on the GPU machine, after scripts/gpu/wheels.sh here
    python scripts/gpu/check.py --cpu --out /tmp/gpu_cpu
"""

from __future__ import annotations

import os
import sys

# scripts/bench_loss.py re-executes itself with this set (its CPU memory accounting needs it); set it
# before importing it, so that the import does not restart this run.
if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
SECTIONS = ("correctness", "liger_shape", "end_to_end", "onpolicy")
# The job runs of section 1: offline, no W&B, and the test suite's fault injection on the path.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Shapes:
    """Every size the check uses: the GPU's, or --cpu's tiny ones."""

    loss: tuple[int, int, int]  # tokens, vocabulary, hidden: the fused loss against float64
    head_hidden: int  # head parity models' width
    resume_stages: tuple[int, ...]  # ZeRO stages of the kill-and-resume runs
    liger: tuple[int, int, int]  # tokens, vocabulary, hidden
    liger_repeats: int
    e2e: tuple[str, ...]  # scripts/bench_e2e.py's arguments
    e2e_timeout_s: int
    onpolicy: tuple[str, ...]  # scripts/bench_onpolicy.py's arguments
    onpolicy_timeout_s: int


GPU_SHAPES = Shapes(
    loss=(1024, 32768, 1024), head_hidden=512, resume_stages=(0, 3), liger=(8192, 128256, 2048), liger_repeats=3,
    e2e=("--device", "cuda", "--arch", "qwen2", "--vocab", "151936", "--teacher-hidden", "1536",
         "--teacher-layers", "28", "--student-hidden", "896", "--student-layers", "24", "--seq-len", "2048",
         "--batch", "4", "--steps", "14", "--warmup", "4"),
    e2e_timeout_s=330,
    onpolicy=("--device", "cuda", "--arch", "qwen2", "--vocab", "151936", "--teacher-hidden", "1536",
              "--teacher-layers", "28", "--student-hidden", "896", "--student-layers", "24", "--prompt-len", "64",
              "--max-new-tokens", "128", "--batch", "8", "--steps", "3", "--warmup", "1", "--rollout-repeats", "1"),
    onpolicy_timeout_s=150)
# On the CPU, kill-and-resume at ZeRO-3 only: ZeRO-0's is tests/train/test_resume.py's own case, and each
# stage costs three job start-ups; the loop over stages is the same code either way. The benchmarks run in
# bf16 (--bf16), as on a GPU.
CPU_SHAPES = Shapes(
    loss=(64, 512, 32), head_hidden=64, resume_stages=(3,), liger=(256, 2048, 64), liger_repeats=1,
    e2e=("--device", "cpu", "--threads", "1", "--bf16", "--arch", "qwen2", "--vocab", "512", "--teacher-hidden",
         "64", "--teacher-layers", "2", "--student-hidden", "32", "--student-layers", "1", "--seq-len", "32",
         "--batch", "2", "--steps", "4", "--warmup", "2"),
    e2e_timeout_s=900,
    onpolicy=("--device", "cpu", "--threads", "1", "--bf16", "--arch", "qwen2", "--vocab", "512", "--teacher-hidden",
              "64", "--teacher-layers", "2", "--student-hidden", "32", "--student-layers", "1", "--prompt-len", "16",
              "--max-new-tokens", "16", "--batch", "2", "--steps", "3", "--warmup", "1", "--rollout-repeats", "1"),
    onpolicy_timeout_s=600)

# The fused loss against float64: no further off than plain PyTorch in the same dtype, to within a
# margin (its chunks' GEMMs may sum in another order), or within the floor.
MARGIN_OVER_PLAIN = 1.25
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
# What training runs in on a GPU (train.precision=auto), and so what every section trains and measures in,
# --cpu included: a bf16 path that first runs on the GPU would cost the GPU's minutes if it broke.
TRAINING_DTYPE, TRAINING_PRECISION = torch.bfloat16, "bf16"  # the second as train.precision names the first
KILLED_AFTER_STEP = 3  # the kill-and-resume runs: checkpoint every 3 steps of 6, SIGKILL after the first


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI): checks the kit, not a GPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which to run, in this order")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill_gpu_check"), help="scratch: models, runs")
    parser.add_argument("--limit-s", type=float, default=480.0,
                        help="the whole run's time limit: the benchmark sections get what is left of it, in order "
                             "(end_to_end's goals first, onpolicy after)")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections has {sorted(unknown)}; choose from {', '.join(SECTIONS)}.")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("torch sees no GPU; run this on a GPU machine, or with --cpu for the tiny CPU check.")
    args.out, args.work = args.out.resolve(), args.work.resolve()
    args.deadline = time.monotonic() + args.limit_s
    return args


class Report:
    """gpu_check.json and gpu_check.md, rewritten after every section."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header, self.sections = out, header, {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, section: dict) -> None:
        self.sections[name] = section
        (self.out / "gpu_check.json").write_text(json.dumps({**self.header, "sections": self.sections}, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.header, self.sections))


# ------------------------------------------------------------------------------ 1. correctness
def fused_loss_against_float64(shapes: Shapes, device: torch.device) -> list[dict]:
    """Every kind, bf16 and fp32: the fused loss's value and its gradients for the student's hidden
    states and head weight, relative to distill_loss on the same inputs in float64.

    The logits' own rounding sets how close any path can come, and it depends on the kind: TVD's
    gradient is the sign of q - p, which rounding flips, about 5% off float64 in bf16 and 6e-5 in fp32
    on the CPU, in plain PyTorch too. So each error must be within `MARGIN_OVER_PLAIN` of plain
    PyTorch's in the same dtype (`bench_loss.plain_step`: whole logits, then distill_loss), or
    under `FLOOR`."""
    from bench_loss import fused_step, make_inputs, plain_step

    from trainer.losses import KINDS

    tokens, vocab, hidden = shapes.loss
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        inputs = make_inputs(tokens, vocab, hidden, dtype, device, seed=len(rows))
        exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs[:4]]
        for kind in KINDS:
            reference = loss_and_gradients(plain_step, [*exact, inputs[4]], kind)
            fused, plain = (errors_against(reference, step, inputs, kind) for step in (fused_step, plain_step))
            rows.append({"kind": kind, "dtype": str(dtype).removeprefix("torch."), "loss": float(reference[0]),
                         "loss_rel_err": fused[0], "grad_hidden_rel_err": fused[1], "grad_weight_rel_err": fused[2],
                         "plain_worst_rel_err": max(plain),
                         "ok": all(math.isfinite(f) and f <= max(FLOOR[dtype], MARGIN_OVER_PLAIN * p)
                                   for f, p in zip(fused, plain))})
    return rows


def loss_and_gradients(step, inputs: list[torch.Tensor], kind: str) -> tuple[torch.Tensor, ...]:
    """`step(*inputs, kind)`'s loss and its gradients for the student's hidden states and head weight."""
    for t in inputs[:2]:
        t.grad = None
    loss = step(*inputs, kind, 0)  # chunk 0: the fused loss's own default
    return loss, inputs[0].grad, inputs[1].grad


def errors_against(reference: tuple[torch.Tensor, ...], step, inputs: list[torch.Tensor], kind: str) -> list[float]:
    """Relative errors of `step`'s loss and two gradients to `reference`'s."""
    return [relative_error(actual, expected)
            for actual, expected in zip(loss_and_gradients(step, inputs, kind), reference)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN stays NaN (and fails)."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def head_parity(shapes: Shapes, device: torch.device) -> list[dict]:
    """Qwen2- and Llama-shaped models, random weights, in the dtype training uses on a GPU: the head
    applied to the hidden states against the model's own logits (the trainer's start-up check)."""
    from bench_e2e import llama, qwen2

    from trainer.models.heads import HiddenTap, model_head
    from trainer.models.loading import ModelError
    from trainer.models.probes import check_head_parity

    dtype = TRAINING_DTYPE
    rows = []
    for arch, build in (("qwen2", qwen2), ("llama", llama)):
        torch.manual_seed(0)
        model = build(4096, shapes.head_hidden, 2, 64).to(device=device, dtype=dtype)
        row = {"arch": arch, "dtype": str(dtype).removeprefix("torch.")}
        try:
            row.update(max_abs_gap=check_head_parity(arch, model, HiddenTap(model), model_head(model, 4096), device),
                       ok=True)
        except ModelError as error:  # the gap was over the trainer's tolerance
            row.update(error=str(error), ok=False)
        rows.append(row)
    return rows


def nonfinite_skipping(device: torch.device) -> dict:
    """SkippingAdamW (torch's fused AdamW with a found_inf flag) on the device: a NaN gradient and an
    Inf loss each leave the weights and the step count untouched, finite steps move them."""
    from trainer.models.optimizer import SkippingAdamW

    weight = torch.nn.Parameter(torch.randn(1000, device=device))
    optimizer = SkippingAdamW([weight], lr=1e-2)
    plan = [("finite", 1.0, 0.0), ("nan gradient", 1.0, float("nan")), ("inf loss", float("inf"), 0.0),
            ("finite", 1.0, 0.0)]
    steps, ok = [], True
    for what, loss, poison in plan:
        before = weight.detach().clone()
        weight.grad = torch.randn_like(weight)
        weight.grad[0] += poison
        optimizer.arm(torch.tensor(loss, device=device))
        optimizer.step()
        moved = not torch.equal(before, weight.detach())
        expected = what == "finite"
        ok &= moved == expected and bool(torch.isfinite(weight).all())
        steps.append({"step": what, "weights_moved": moved})
    total, in_a_row = optimizer.read_skips()
    step_count = float(optimizer.state[weight]["step"])
    ok &= (total, in_a_row, step_count) == (2, 0, 2.0)
    return {"steps": steps, "skipped": total, "optimizer_step_count": step_count, "ok": ok}


def resumed_jobs(args, shapes: Shapes, device: torch.device) -> list[dict]:
    """At each of `shapes.resume_stages` (ZeRO-0 and ZeRO-3 on a GPU), in bf16: a run straight through, and
    one SIGKILLed after its step-3 checkpoint and run again; every logged loss, gradient norm and the
    adapter must be equal bit for bit. With train.deterministic=true: on a GPU attention's default
    backward sums with atomics, and two runs never interrupted would part as well."""
    from bench_e2e import prepare

    shape = argparse.Namespace(work=args.work / "resume_models", arch="llama", vocab=512, teacher_hidden=128,
                               teacher_layers=2, student_hidden=64, student_layers=1, seq_len=64, batch=4, steps=6)
    paths = prepare(shape)
    rows = []
    for stage in shapes.resume_stages:
        started = time.perf_counter()
        runs = args.work / f"resume_zero{stage}"
        subprocess.run(["rm", "-rf", str(runs)], check=True)
        overrides = [f"teacher.path={paths['teacher']}", f"student.path={paths['student']}",
                     f"data.train={paths['train']}", f"data.eval={paths['eval']}", f"deepspeed=zero{stage}",
                     "train.max_steps=6", f"checkpoint.every={KILLED_AFTER_STEP}", "train.log_every=1",
                     "train.seq_len=64", "train.micro_batch_size=4", "train.warmup_steps=0", "peft.dropout=0.1",
                     f"train.precision={TRAINING_PRECISION}", "train.deterministic=true",
                     "logger=none", f"cache_dir={runs / 'cache'}"]
        straight = run_job([*overrides, f"hydra.run.dir={runs / 'straight'}"], "none")
        killed = run_job([*overrides, f"hydra.run.dir={runs / 'resumed'}"],
                         f"kill_after_checkpoint={KILLED_AFTER_STEP}")
        rerun = run_job([*overrides, f"hydra.run.dir={runs / 'resumed'}"], "none")
        row = {"stage": stage, "backend": "nccl" if device.type == "cuda" else "gloo", "precision": TRAINING_PRECISION}
        if straight.returncode or rerun.returncode or not killed.returncode:
            failed = next(p for p in (straight, killed, rerun) if (p.returncode != 0) != (p is killed))
            row.update(ok=False, error=(failed.stdout + failed.stderr)[-2000:])
        else:
            row.update(compare_runs(runs / "straight", runs / "resumed"), resumed="resumed from" in rerun.stdout,
                       deterministic=all(ran_deterministic(runs / run) for run in ("straight", "resumed")))
            row["ok"] = row["ok"] and row["resumed"] and row["deterministic"]
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
    return rows


def run_job(overrides: list[str], fault: str) -> subprocess.CompletedProcess:
    """`python -m trainer` through tests/fault_injection.py, on one rank."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}, **JOB_ENV,
           "DISTILL_TEST_FAULT": fault,
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fault_injection", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def ran_deterministic(run: Path) -> bool:
    """train.deterministic as the job resolved it (its .hydra/config.yaml)."""
    import yaml

    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["train"]["deterministic"] is True


def compare_runs(straight: Path, resumed: Path) -> dict:
    from safetensors.torch import load_file

    def logged(run: Path) -> list:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"], m["kd_loss"], m["grad_norm"]) for m in rows]

    adapters = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, resumed)]
    same_adapter = adapters[0].keys() == adapters[1].keys() and all(
        torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    a, b = logged(straight), logged(resumed)
    parted = next((mine[0] for mine, theirs in zip(a, b) if mine != theirs), None)
    trained = every_update_applied(a, [straight, resumed])
    return {"steps": len(a), "losses": [row[1] for row in a], "losses_equal": a == b, "adapter_equal": same_adapter,
            "trained": trained, "first_differing_step": parted, "cause": cause_of_difference(parted),
            "ok": a == b and same_adapter and trained and len(a) == 6}


def every_update_applied(logged: list[tuple], runs: list[Path]) -> bool:
    """Whether every step moved the adapter: each gradient norm finite and non-zero, and no update
    skipped in either run. Without it two runs that skipped every update (a NaN in every gradient, say)
    would end equal bit for bit at the adapter they started from, and pass."""
    skipped = [json.loads((run / "summary.json").read_text())["train/skipped_steps"] for run in runs]
    return all(math.isfinite(row[3]) and row[3] > 0 for row in logged) and skipped == [0] * len(runs)


def cause_of_difference(step: int | None) -> str | None:
    """Where the two runs' logs part, what that says. Up to the kill both ran the same code from the same
    seed: a difference there is the kernels' run-to-run nondeterminism, which no resume can fix."""
    if step is None:
        return None
    if step <= KILLED_AFTER_STEP:
        return (f"differs at step {step}, before the kill: a kernel is not deterministic run to run even with "
                "train.deterministic=true (not the resume)")
    return f"differs at step {step}, after the resume: the checkpoint did not restore the whole state"


def correctness(args, shapes: Shapes, device: torch.device) -> dict:
    parts = {"fused_loss_vs_float64": fused_loss_against_float64(shapes, device),
             "head_parity": head_parity(shapes, device),
             "nonfinite_skipping": nonfinite_skipping(device),
             "kill_and_resume": resumed_jobs(args, shapes, device)}
    rows = [*parts["fused_loss_vs_float64"], *parts["head_parity"], parts["nonfinite_skipping"],
            *parts["kill_and_resume"]]
    return {"status": "ok" if all(row["ok"] for row in rows) else "failed", **parts}


# ------------------------------------------------------------------------------ 2. liger_shape
LIGER_PATH = "Liger chunked JSD"


def liger_step(sh, ws, th, wt, labels, kind, chunk_size):
    """Liger-Kernel's chunked JSD (soft loss only, β=½, T=1), forward and backward."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)(
        sh, ws, th, wt, labels)
    loss.backward()
    return loss.detach()


def liger_shape(args, shapes: Shapes, device: torch.device) -> dict:
    from bench_loss import fused_step, make_inputs, plain_step

    from trainer.losses import default_chunk_size

    tokens, vocab, hidden = shapes.liger
    dtype = TRAINING_DTYPE
    inputs = make_inputs(tokens, vocab, hidden, dtype, device)
    chunk = default_chunk_size(vocab)
    paths = {"ours (fused)": fused_step, "plain PyTorch": plain_step}
    skipped = liger_unavailable(device)
    if skipped is None:
        paths[LIGER_PATH] = liger_step
    warm = make_inputs(64, 512, 64, dtype, device)
    rows = [measured_path(name, step, warm, inputs, chunk, device, shapes.liger_repeats)
            for name, step in paths.items()]
    ours_failed = any("error" in row for row in rows if row["path"] != LIGER_PATH)
    liger_error = next((row["error"] for row in rows if row["path"] == LIGER_PATH and "error" in row), None)
    return {"status": "failed" if ours_failed else "ok",
            "shape": {"tokens": tokens, "vocab": vocab, "hidden": hidden,
                      "dtype": str(dtype).removeprefix("torch."), "kind": "jsd", "chunk": chunk},
            "paths": rows, "liger": skipped or (f"failed: {liger_error}" if liger_error else "measured"),
            "published_liger_h100": {"liger_gb": 11.1, "plain_gb": 68.9, "liger_ms": 60.7, "plain_ms": 213.2}}


def measured_path(name: str, step, warm: tuple, inputs: tuple, chunk: int, device: torch.device,
                  repeats: int) -> dict:
    """One path's fastest time and peak memory above its inputs. A path that raises records its error:
    Liger's Triton kernels and torch.compile meet the image's versions first on the GPU, and their
    failure must cost Liger's row only, not ours' and plain PyTorch's figures."""
    from bench_loss import measure

    try:
        step(*warm, "jsd", 0)  # kernels compiled and loaded outside the timing
        result = measure(step, inputs, "jsd", chunk, device, repeats)
    except Exception as error:  # whatever broke is this row's figure
        return {"path": name, "ms": None, "peak_extra_gib": None, "loss": None, "oom": False,
                "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    return {"path": name, "ms": None if result["oom"] else 1e3 * result["seconds"],
            "peak_extra_gib": None if result["oom"] else result["peak_extra_bytes"] / 2**30,
            "loss": result.get("loss"), "oom": result["oom"]}


def liger_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "skipped: liger-kernel's Triton kernels need a GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger-kernel is not installed (scripts/gpu/wheels.sh brings it)"
    return None


# ------------------------------------------------------------------------------- 3. end_to_end
E2E_GOALS = {"mfu": 0.45, "vs_trl": 1.3, "vs_minimal": 0.95}


class Unmeasured(Exception):
    """A section that ends without figures; `section` is what the report records of it."""

    def __init__(self, section: dict):
        super().__init__(section["status"])
        self.section = section


def run_bench(args, script: str, arguments: list[str], timeout_s: float) -> tuple[str, dict]:
    """`scripts/<script> ARGUMENTS --work W` within `timeout_s` (or what is left of the run, less a margin
    to write the report: a slow machine loses this section's figures rather than everyone's); its command
    line and the results.json it wrote. Raises Unmeasured when it did not run or did not finish."""
    work = args.work / Path(script).stem
    command = [sys.executable, str(REPO / "scripts" / script), *arguments, "--work", str(work)]
    shown = " ".join(["python", f"scripts/{script}", *arguments])
    timeout = min(timeout_s, args.deadline - time.monotonic() - 15)
    if timeout < 30:
        raise Unmeasured({"status": "skipped: out of time (the sections before it took the run's limit)",
                          "command": shown})
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **JOB_ENV})
    except subprocess.TimeoutExpired as expired:
        raise Unmeasured({"status": f"failed: out of time after {timeout:.0f} s", "command": shown,
                          "error": output_text(expired.stdout)[-3000:]}) from None
    if proc.returncode:
        raise Unmeasured({"status": "failed", "command": shown, "error": (proc.stdout + proc.stderr)[-3000:]})
    return shown, json.loads((work / "results.json").read_text())


def peak_memory_gib(run: dict, device: torch.device) -> float:
    """On a GPU a contender's peak allocated memory; on the CPU its process's peak resident set."""
    return run["peak_memory_gib"] if device.type == "cuda" else run["peak_rss_mib"] / 1024


def end_to_end(args, shapes: Shapes, device: torch.device) -> dict:
    contenders = ["ours", "trl", "minimal"]
    notes = []
    trl_missing = trl_unavailable()
    if trl_missing:
        contenders.remove("trl")
        notes.append(f"trl {trl_missing}")
    try:
        command, results = run_bench(args, "bench_e2e.py", [*shapes.e2e, "--contenders", ",".join(contenders)],
                                     shapes.e2e_timeout_s)
    except Unmeasured as unmeasured:
        raise Unmeasured({**unmeasured.section, "notes": notes}) from None
    summary = results["summary"]
    rows = [{"contender": name, "tokens_per_s": run["tokens_per_s"], "tflops_per_s": run.get("tflops_per_s"),
             "mfu": run.get("mfu"), "peak_memory_gib": peak_memory_gib(run, device)} for name, run in summary.items()]
    return {"status": "ok", "command": command, "precision": results["precision"], "contenders": rows,
            "goals": e2e_goals(summary), "notes": notes}


def output_text(output: str | bytes | None) -> str:
    """A child's output as text: TimeoutExpired carries bytes even from a text-mode run."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def trl_unavailable() -> str | None:
    """Why TRL's GKDTrainer cannot run here, or None. Imported in a child: a wheel that does not fit the
    image (an older pyarrow under datasets, say) fails the import, not this run."""
    if importlib.util.find_spec("trl") is None:
        return "skipped: TRL is not installed (pip install -e '.[bench]'; scripts/gpu/wheels.sh brings it)"
    probe = subprocess.run([sys.executable, "-c", "import trl.experimental.gkd"], capture_output=True, text=True)
    if probe.returncode:
        return f"skipped: importing TRL failed: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def e2e_goals(summary: dict) -> dict:
    ours = summary["ours"]
    goals = {"mfu >= 45%": (ours.get("mfu"), ours["mfu"] >= E2E_GOALS["mfu"] if ours.get("mfu") else None)}
    for name, key in (("trl", "vs_trl"), ("minimal", "vs_minimal")):
        if name in summary:
            ratio = ours["tokens_per_s"] / summary[name]["tokens_per_s"]
            goals[f"tokens/s >= {E2E_GOALS[key]}x {name}"] = (ratio, ratio >= E2E_GOALS[key])
    return {goal: {"value": value, "met": met} for goal, (value, met) in goals.items()}


# --------------------------------------------------------------------------------- 4. onpolicy
def onpolicy(args, shapes: Shapes, device: torch.device) -> dict:
    """Ours only, fully on-policy: TRL's on-policy trainers are bench_onpolicy's own comparison, and
    their start-ups would take this run's minutes."""
    command, results = run_bench(args, "bench_onpolicy.py", [*shapes.onpolicy, "--contenders", "ours"],
                                 shapes.onpolicy_timeout_s)
    ours = results["summary"]["ours"]
    phase = {name: statistics.median(rates) for name, rates in results["rollout_phase"].items()}
    bare = phase.get("bare model.generate")
    return {"status": "ok", "command": command, "precision": results["precision"],
            "ours": {"tokens_per_s": ours["tokens_per_s"], "generation_share": ours["generation_share"],
                     "generation_tokens_per_s": ours["generation_tokens_per_s"],
                     "mean_rollout_length": ours["mean_rollout_length"],
                     "peak_memory_gib": peak_memory_gib(ours, device)},
            "rollout_phase": [{"engine": name, "tokens_per_s": rate, "vs_bare_generate": rate / bare if bare else None}
                              for name, rate in phase.items()]}


# -------------------------------------------------------------------------------------- main
def header(args, device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    names = ("torch", "transformers", "peft", "deepspeed", "hydra-core", "accelerate", "trl", "liger-kernel", "triton")
    return {"mode": "tiny shapes on the CPU: checks the kit, not a GPU" if args.cpu else "real shapes",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "python": platform.python_version(), "versions": {name: installed(name) for name in names},
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    shapes = CPU_SHAPES if args.cpu else GPU_SHAPES
    report = Report(args.out, header(args, device))
    run_section = {"correctness": correctness, "liger_shape": liger_shape, "end_to_end": end_to_end,
                   "onpolicy": onpolicy}
    for name in args.sections.split(","):
        started = time.perf_counter()
        print(f"gpu check: {name} ...", flush=True)
        try:
            section = run_section[name](args, shapes, device)
        except Unmeasured as unmeasured:
            section = unmeasured.section
        except Exception as error:  # one broken section must not cost the others' figures
            section = {"status": f"failed: {type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        section["seconds"] = round(time.perf_counter() - started, 1)
        report.add(name, section)
        print(f"gpu check: {name}: {section['status']} ({section['seconds']} s)", flush=True)
    print((args.out / "gpu_check.md").read_text())


# --------------------------------------------------------------------------------- markdown
def markdown(header: dict, sections: dict) -> str:
    lines = [f"# GPU check: {header['device']} ({header['mode']})", "",
             f"Started {header['started']}; Python {header['python']}; "
             + ", ".join(f"{k} {v}" for k, v in header["versions"].items()), ""]
    for name, section in sections.items():
        lines += [f"## {name}: {section['status']} ({section.get('seconds', '?')} s)", ""]
        broken = "error" in section or "traceback" in section
        # A failed check keeps its table: which rows failed is the finding.
        measured = section["status"] == "ok" or (name in ("correctness", "liger_shape") and not broken)
        if name in SECTION_MARKDOWN and measured:
            lines += SECTION_MARKDOWN[name](section)
        if broken:
            lines += ["```", (section.get("error") or section["traceback"]).strip()[-1500:], "```", ""]
    return "\n".join(lines) + "\n"


def table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value) -> str:
        if isinstance(value, float):  # rates whole, errors and shares to three figures
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    return [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}",
            *(f"| {' | '.join(cell(row.get(c)) for c in columns)} |" for row in rows), ""]


def correctness_markdown(section: dict) -> list[str]:
    lines = [f"Fused loss against float64 (relative errors; loss: float64's; ok: each error within "
             f"{MARGIN_OVER_PLAIN}x plain PyTorch's in the same dtype, whose worst is plain_worst_rel_err, or under "
             f"{FLOOR[torch.float32]:g} (fp32) / {FLOOR[torch.bfloat16]:g} (bf16)):", ""]
    lines += table(section["fused_loss_vs_float64"], ["kind", "dtype", "loss", "loss_rel_err", "grad_hidden_rel_err",
                                                      "grad_weight_rel_err", "plain_worst_rel_err", "ok"])
    lines += ["Head parity:", ""] + table(section["head_parity"], ["arch", "dtype", "max_abs_gap", "ok"])
    skip = section["nonfinite_skipping"]
    lines += [f"NaN/Inf skipping (fused AdamW): {skip['steps']}; skipped {skip['skipped']}, optimizer steps "
              f"{skip['optimizer_step_count']:g}; ok: {skip['ok']}", "", "Killed after a checkpoint and resumed:", ""]
    lines += table(section["kill_and_resume"],
                   ["stage", "backend", "precision", "deterministic", "steps", "trained", "losses_equal", "adapter_equal",
                    "resumed", "ok", "seconds"])
    lines += [f"- ZeRO-{row['stage']}: {row['cause']}" for row in section["kill_and_resume"] if row.get("cause")]
    return lines


def liger_markdown(section: dict) -> list[str]:
    shape = section["shape"]
    lines = [f"jsd, {shape['tokens']} tokens, V={shape['vocab']}, H={shape['hidden']}, {shape['dtype']}, "
             f"chunk {shape['chunk']}; Liger: {section['liger']}", ""]
    lines += table(section["paths"], ["path", "ms", "peak_extra_gib", "loss", "oom", "error"])
    published = section["published_liger_h100"]
    return lines + [f"Liger's published figures (H100): Liger {published['liger_gb']} GB / {published['liger_ms']} ms, "
                    f"plain {published['plain_gb']} GB / {published['plain_ms']} ms.", ""]


def e2e_markdown(section: dict) -> list[str]:
    lines = [f"`{section['command']}` (every contender in {section['precision']})", ""]
    lines += table(section["contenders"], ["contender", "tokens_per_s", "tflops_per_s", "mfu", "peak_memory_gib"])
    lines += [f"- {goal}: {g['value']:.3g} ({'met' if g['met'] else 'not met' if g['met'] is not None else 'n/a'})"
              if g["value"] is not None else f"- {goal}: n/a" for goal, g in section["goals"].items()]
    return lines + [f"- {note}" for note in section["notes"]] + [""]


def onpolicy_markdown(section: dict) -> list[str]:
    lines = [f"`{section['command']}` (in {section['precision']})", ""]
    lines += table([section["ours"]], ["tokens_per_s", "generation_share", "generation_tokens_per_s",
                                       "mean_rollout_length", "peak_memory_gib"])
    lines += ["The rollout phase on its own (the LoRA student, one training batch's prompts, every row to the "
              "longest rollout):", ""]
    return lines + table(section["rollout_phase"], ["engine", "tokens_per_s", "vs_bare_generate"])


SECTION_MARKDOWN = {"correctness": correctness_markdown, "liger_shape": liger_markdown, "end_to_end": e2e_markdown,
                    "onpolicy": onpolicy_markdown}


if __name__ == "__main__":
    main()

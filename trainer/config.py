"""Typed schema of every config key, and the checks Hydra cannot express.

The dataclasses back `conf/`: Hydra merges each group's YAML into them, so a mistyped key
(`train.lrr=1`) fails at start-up by name. A key the default groups leave alone (every `loss.*`
and `train.*` key among them) takes its default from here alone, the demo's value where the demo
needs one, since `python -m trainer` with no overrides is the demo. `--help` shows the field docs
below. `validate` then checks values and cross-key rules, raising `ConfigError` with one line that
says what to change.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.errors import UserError
from trainer.losses import KINDS, validate_loss_params
from trainer.metric_names import describe_metric_names, is_onpolicy_eval_metric, metric_names

DEMO_SCHEME = "demo://"


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message says which key and how to fix it."""


@dataclass
class ModelConfig:
    path: str = MISSING
    """A local Hugging Face model folder or a hub id; `demo://teacher` builds the demo's own."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit); ignored for local folders."""
    dtype: str = "auto"
    """Weights' dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16."""
    attn_implementation: Optional[str] = "sdpa"
    """Passed to from_pretrained; null lets transformers choose."""
    trust_remote_code: bool = False
    """Run Python code shipped with the checkpoint; off unless you trust its author."""
    allow_pickle: bool = False
    """Load weights stored as pickle (*.bin, *.pt, *.pth), which can run code when loaded; off:
    only safetensors are read, and a folder holding only pickled weights is refused."""


@dataclass
class TeacherConfig(ModelConfig):
    path: Optional[str] = MISSING
    """A local Hugging Face model folder or a hub id; null only when `cache` names a cache folder
    (e.g. one imported from an API), whose manifest then says who the teacher was."""
    shard: Optional[bool] = None
    """Partition the teacher over ranks with ZeRO-3; null means: when the student runs ZeRO-3."""
    cache: Optional[str] = None
    """Read the teacher's top-k log-probabilities instead of running it (no teacher in memory):
    auto finds the cache `python -m trainer.cache` built for this teacher, data and top_k under
    cache_dir; or a cache folder. null runs the teacher."""
    top_k: int = 64
    """Log-probabilities kept per position when a cache is built (the rest become one tail mass)."""
    tail_samples: int = 0
    """Of the top_k entries, how many are drawn from the teacher's tail instead of being its next
    most likely tokens (e.g. 16 of 64): forward KL against the cache then has the online gradient
    in expectation and teaches the tail's shape, at the same size. 0 keeps the exact top-k. Not for
    loss.kind=rkl. See trainer/cache/tail.py."""
    cache_dtype: str = "float16"
    """How a cache stores log-probabilities: float16 or bfloat16 (token ids are int32)."""
    cache_shard_rows: int = 256
    """Rows per cache shard: the unit a cache build writes at once and resumes from."""
    license: Optional[str] = None
    """The teacher's licence id as the hub names it (apache-2.0, llama3.1, gemma, or the license_name
    of an `other` licence, e.g. tongyi-qianwen); null reads `license:` from the teacher's model card
    (README.md front matter), or from a cache's manifest when teacher.path is null."""
    accept_license: Optional[str] = None
    """The exact licence id you acknowledge for a teacher whose licence restricts distillation (or is
    unknown: `unknown`), confirming that your use is permitted; the job stops otherwise. Recorded in
    provenance.json."""


@dataclass
class StudentConfig(ModelConfig):
    license: Optional[str] = None
    """The student's licence id, written into the adapter's model card; null reads it from the
    student's own model card."""


@dataclass
class PeftConfig:
    kind: str = "lora"
    """lora: train a LoRA adapter; none: fine-tune every student weight."""
    r: int = 16
    """LoRA rank: the width of each adapter's low-rank update."""
    alpha: int = 32
    """LoRA scaling: each update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs during training, in [0, 1)."""
    target_modules: Any = "all-linear"
    """'all-linear' finds every linear layer of the blocks (not the LM head); or a list of names."""
    merge: bool = False
    """Also write the student with the adapter merged in, to `merged/`."""


@dataclass
class DataConfig:
    train: Any = MISSING
    """A .jsonl/.parquet file, a list of them, a saved dataset folder or a `datasets` name."""
    eval: Any = None
    """Held-out data in the same forms; null holds out `eval_fraction` of `train`."""
    eval_fraction: float = 0.05
    """Share of `train` held out for evaluation when `eval` is null (seeded by train.seed), in (0, 1)."""
    max_eval_rows: int = 1000
    """Evaluate on at most this many held-out rows, so evaluation stays cheap."""
    truncate: bool = True
    """Cut rows longer than train.seq_len to fit (the log counts them); false refuses rows longer
    than train.seq_len, naming the first one."""
    pack: bool = False
    """Pack several training rows into each row of up to train.seq_len tokens, with no attention
    across them (trainer/data/packing.py): no compute spent on padding. Not with a teacher cache."""


@dataclass
class LossConfig:
    kind: str = "fkl"
    """fkl, rkl, jsd, skl, srkl, tvd (divergences to the teacher) or sft (hard labels only)."""
    temperature: float = 1.0
    """Softens both distributions inside the divergence (not a sampling temperature)."""
    beta: float = 0.5
    """jsd's mixture weight of the teacher, 0 < beta < 1."""
    skew: float = 0.1
    """skl/srkl's mixture weight alpha, 0 <= skew < 1."""
    ce_weight: float = 0.0
    """loss = (1 - ce_weight) * temperature^2 * divergence + ce_weight * cross-entropy on labels."""
    fused: bool = True
    """Apply both LM heads inside the loss, chunk by chunk, never holding [tokens, vocab] logits.
    false: the models return full logits (for an architecture the fused path cannot serve)."""
    chunk_size: int = 0
    """Tokens per chunk of the fused loss; 0: 2**23 // vocabulary size, at least 256."""
    cross_tokenizer: Optional[str] = None
    """null: teacher and student must share a tokenizer. `uld` or `gold`: distil across tokenizers
    (trainer/losses/cross_tokenizer.py): each model tokenises the row itself, the two are aligned by
    character offsets into spans, and ULD (sorted distributions) or GOLD (exact divergence of kind
    loss.kind over the ids both vocabularies share, ULD over the rest) compares each span. With
    python -m trainer.cache it builds a cache any student can read (trainer/cache/cross.py)."""
    uld_weight: float = 1.0
    """GOLD's weight of its ULD term over the ids only one vocabulary has; 0 drops that term."""
    uld_top_k: int = 0
    """0: ULD sorts the whole vocabulary (exact). k: it compares the k largest probabilities of
    each side exactly and the rest by their mass (a lower bound, O(V) instead of O(V log V))."""


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD): the student writes some responses itself and the teacher grades
    every token of them (trainer/rollout/)."""

    fraction: float = 0.0
    """GKD's lambda: the share of each step's rows whose response the student samples itself, in
    [0, 1]; 0 is off-policy (the dataset's responses), 1 fully on-policy. Which rows is drawn from
    train.seed, the step and the row, the same on any number of ranks and after a resume."""
    max_new_tokens: int = 64
    """The longest rollout, in tokens; rollouts that reach it without an EOS count as truncated."""
    temperature: float = 1.0
    """The rollouts' sampling temperature (not loss.temperature); 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts, in (0, 1]; 1 keeps every token."""


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    """ZeRO stage of the student: 0 (replicas) to 3 (parameters partitioned)."""
    offload_optimizer: bool = False
    """Keep the optimizer state in CPU memory (ZeRO-Offload)."""
    offload_param: bool = False
    """Keep the student's parameters in CPU memory; ZeRO-3 only."""
    gradient_clipping: float = 1.0
    """Clip the gradient's global norm to this value; 0 turns clipping off."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Merged last into the DeepSpeed JSON config, for keys this schema does not name."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train for (the demo's default; set it for your data)."""
    micro_batch_size: int = 16
    """Rows per rank per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; a step takes micro_batch_size x grad_accum x ranks rows."""
    lr: float = 4e-3
    """Peak learning rate of AdamW (the demo's; start near 2e-4 for LoRA on an LLM)."""
    warmup_steps: int = 10
    """Steps of linear warm-up to train.lr, then cosine decay to a tenth of it at max_steps."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, 0 or more."""
    seq_len: int = 512
    """Tokens per row: longer rows are cut (see data.truncate); rows are tokenised for this length."""
    seed: int = 0
    """Seeds the LoRA initialisation, the held-out split and the rows of every step."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    log_every: int = 10
    """Write metrics.jsonl, W&B and the progress bar every N optimizer steps (and at the last one)."""
    eval_every: Optional[int] = None
    """Evaluate every N steps, besides before the first and after the last step (0: only then);
    null: every ceil(max_steps / 5) steps, 4 times in between (fewer for under 5 steps), so that the
    report's plots show a curve."""
    max_nonfinite_steps: int = 5
    """Optimizer steps in a row skipped for a NaN/Inf loss or gradient before the job stops."""
    metric: str = "eval/kl_to_teacher"
    """The summary value the job returns to sweepers and prints on its RESULT line."""
    deterministic: bool = False
    """Deterministic kernels (torch's strict mode, cuBLAS's fixed workspace, cuDNN untuned): the same
    run twice, or killed and resumed, gives the same bits on a GPU too, at a cost in speed (attention's
    backward most). A CPU run is deterministic either way. See trainer/launch/determinism.py."""
    activation_checkpointing: bool = False
    """Recompute the student's layers in the backward instead of keeping their activations: less
    memory for longer sequences or bigger batches, about a third more student compute."""
    peak_tflops: Optional[float] = None
    """The device's peak TFLOP/s for MFU, per rank; null uses the table in trainer/train/throughput.py
    (bf16 peaks of known GPUs) and reports no MFU where the device is not in it (CPU)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save resumable state every N optimizer steps; 0: only at the end and when preempted."""
    keep: int = 3
    """Complete checkpoints kept in `checkpoints/`, oldest deleted first; 0 keeps every one."""


@dataclass
class GenerateConfig:
    """`python -m trainer.generate`: the teacher writes responses to prompts (sequence-level KD)."""

    prompts: Any = None
    """Prompt rows in the data forms: {prompt} (a response, if any, is replaced) or {messages}
    (a final assistant turn, if any, is replaced). null: the demo's training prompts when the
    teacher is the demo's (the only teacher they suit); required otherwise."""
    out: Optional[str] = "outputs/generated"
    """Folder to write: train.jsonl (rows the trainer reads), generation.json, shards/."""
    max_new_tokens: int = 256
    """The longest response the teacher writes, in tokens."""
    temperature: Optional[float] = None
    """Sampling temperature of the teacher's responses (not loss.temperature); 0 decodes greedily.
    null: as the teacher's generation_config.json asks (its temperature if it sets do_sample, else
    greedy, as transformers' generate does): model authors publish what suits their model there."""
    top_p: Optional[float] = None
    """null: the teacher's generation_config.json's, else 1.0 (no nucleus cut)."""
    top_k: Optional[int] = None
    """Sample among the k likeliest tokens only; 0 keeps all. null: the teacher's
    generation_config.json's, else 0."""
    samples_per_prompt: int = 1
    """Responses written per prompt."""
    batch_size: int = 8
    """Prompts per generation batch."""
    shard_rows: int = 256
    """Prompts per output shard: the unit that is written at once and resumed from."""
    seed: int = 0
    """Seeds the sampling, shard by shard (the same rows on any number of ranks)."""


@dataclass
class LoggerConfig:
    kind: str = "wandb"
    """wandb or none."""
    project: str = "distill"
    """The W&B project."""
    entity: Optional[str] = None
    """The W&B team or user; null: your default entity."""
    name: Optional[str] = None
    """The W&B run's name; null: the run directory's name."""
    group: Optional[str] = None
    """The W&B group; null: a sweep's points share one named after the sweep directory."""
    tags: List[str] = field(default_factory=list)
    """W&B tags, e.g. [kd, qwen]."""
    mode: str = "auto"
    """auto: online when WANDB_API_KEY is set, else offline; or online, offline."""


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    resume: str = "auto"
    """auto: continue from the run directory's latest complete checkpoint if any; never: start
    afresh; or a path: a `checkpoints/step_N` folder (or a `checkpoints` folder) of another run."""
    cache_dir: str = "${oc.env:DISTILL_CACHE,'~/.cache/distill'}"
    """Where the demo's models, tokenised datasets and teacher caches live ($DISTILL_CACHE, else ~/.cache/distill)."""


def register_configs() -> None:
    """Store the schema under the name `conf/config.yaml`'s defaults list starts with. The entry
    points also register `--help`'s key table (trainer/launch/help.py), which reads this module."""
    ConfigStore.instance().store(name="distill_schema", node=DistillConfig)


EVALUATIONS_BETWEEN = 4  # with train.eval_every=null: enough points for a curve, at little cost


def evaluation_interval(train) -> int:
    """Steps between held-out evaluations during training (0: none between the first and the last)."""
    if train.eval_every is not None:
        return train.eval_every
    return -(-train.max_steps // (EVALUATIONS_BETWEEN + 1))  # ceil: at most that many


def validate(cfg) -> None:
    """Reject values that would fail later, before any model or dataset is loaded."""
    _check_choice("peft.kind", cfg.peft.kind, ("lora", "none"))
    _check_choice("logger.kind", cfg.logger.kind, ("wandb", "none"))
    _check_choice("logger.mode", cfg.logger.mode, ("auto", "online", "offline"))
    _check_choice("train.precision", cfg.train.precision, ("auto", "fp32", "bf16"))
    for role in ("teacher", "student"):
        _check_choice(f"{role}.dtype", cfg[role].dtype, ("auto", "float32", "bfloat16", "float16"))
    _validate_teacher(cfg.teacher)
    _validate_loss(cfg.loss)
    _validate_onpolicy(cfg.onpolicy, cfg.teacher, cfg.data)
    _validate_cross_tokenizer_job(cfg)
    if is_onpolicy_eval_metric(cfg.train.metric) and cfg.teacher.cache:
        raise ConfigError(f"train.metric={cfg.train.metric} is never measured with a teacher cache (a cache cannot "
                          "score the student's own responses); set teacher.cache=null or pick another train.metric "
                          "such as eval/kl_to_teacher.")
    if cfg.data.pack and cfg.teacher.cache:
        raise ConfigError("data.pack=true cannot read a teacher cache (it is stored row by row); set data.pack=false "
                          "or teacher.cache=null.")
    if cfg.train.peak_tflops is not None and cfg.train.peak_tflops <= 0:
        raise ConfigError(f"train.peak_tflops={cfg.train.peak_tflops} must be positive (the device's peak TFLOP/s), "
                          "or null to look it up.")
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage={cfg.deepspeed.stage} is not a ZeRO stage; use 0, 1, 2 or 3.")
    if cfg.deepspeed.offload_param and cfg.deepspeed.stage != 3:
        raise ConfigError("deepspeed.offload_param needs ZeRO-3; use deepspeed=zero3_offload.")
    _validate_train(cfg.train)
    _validate_peft(cfg.peft)
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be between 0 and 1.")
    if cfg.data.max_eval_rows < 1:
        raise ConfigError(f"data.max_eval_rows={cfg.data.max_eval_rows} leaves nothing to evaluate on; use at least 1 "
                          "(e.g. 1000).")
    for key in ("every", "keep"):
        if cfg.checkpoint[key] < 0:
            raise ConfigError(f"checkpoint.{key}={cfg.checkpoint[key]} is negative; use 0 or more.")
    if cfg.resume not in ("auto", "never") and not Path(os.path.expanduser(cfg.resume)).exists():
        raise ConfigError(f"resume={cfg.resume} is neither auto, never nor an existing checkpoint folder.")
    _refuse_secrets(cfg)


def _validate_loss(loss) -> None:
    try:
        validate_loss_params(loss.kind, loss.temperature, loss.beta, loss.skew)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    # Checked whatever the kind, not only by the kinds that read them: a value that no kind could
    # use is a mistake even where it is ignored, and the next loss.kind override would hit it.
    if not 0.0 < loss.beta < 1.0:
        raise ConfigError(f"loss.beta={loss.beta} is out of range: jsd needs 0 < beta < 1 (the kind that reads it); "
                          "set loss.beta=0.5 for example.")
    if not 0.0 <= loss.skew < 1.0:
        raise ConfigError(f"loss.skew={loss.skew} is out of range: skl and srkl need 0 <= skew < 1 (the kinds that "
                          "read it); set loss.skew=0.1 for example.")
    if loss.chunk_size < 0:
        raise ConfigError(f"loss.chunk_size={loss.chunk_size} is negative; use 0 (automatic) or a token count.")
    if not 0.0 <= loss.ce_weight <= 1.0:
        raise ConfigError(f"loss.ce_weight={loss.ce_weight} is out of range; use a value in [0, 1].")
    _validate_cross_tokenizer(loss)


def _validate_cross_tokenizer(loss) -> None:
    if loss.cross_tokenizer not in (None, *CROSS_TOKENIZER_METHODS):
        raise ConfigError(f"loss.cross_tokenizer={loss.cross_tokenizer} is not a method; use null (one tokenizer), "
                          f"{' or '.join(CROSS_TOKENIZER_METHODS)} (distil across tokenizers).")
    if not (math.isfinite(loss.uld_weight) and loss.uld_weight >= 0):
        raise ConfigError(f"loss.uld_weight={loss.uld_weight} must be a finite number >= 0; use 1.0, or 0 to drop "
                          "GOLD's ULD term.")
    if loss.uld_top_k < 0:
        raise ConfigError(f"loss.uld_top_k={loss.uld_top_k} is negative; use 0 (sort the whole vocabulary) or a "
                          "count such as 1024.")
    if loss.cross_tokenizer and not loss.fused:
        raise ConfigError(f"loss.cross_tokenizer={loss.cross_tokenizer} runs on the fused path only; set "
                          "loss.fused=true.")


# The loss.* keys each kind leaves unread (loss.ce_weight too under sft, which is all cross-entropy).
_UNREAD_BY_KIND = {"beta": lambda kind: kind != "jsd", "skew": lambda kind: kind not in ("skl", "srkl"),
                   "temperature": lambda kind: kind == "sft", "ce_weight": lambda kind: kind == "sft",
                   "uld_weight": lambda kind: kind == "sft",
                   "uld_top_k": lambda kind: kind == "sft"}

CROSS_TOKENIZER_METHODS = ("uld", "gold")


def unread_loss_settings(loss) -> list[str]:
    """One warning per loss.* key set away from its default that `loss.kind` does not read: legal
    (a sweep over kinds sets them for all), but likely a sign the user meant another kind."""
    defaults = LossConfig()
    warnings = [f"loss.{key}={loss[key]} has no effect with loss.kind={loss.kind}; it is read only by "
                f"{_readers(key)}. Remove it, or pick a kind that reads it."
                for key, unread in _UNREAD_BY_KIND.items() if unread(loss.kind) and loss[key] != getattr(defaults, key)]
    if loss.kind != "sft" and loss.cross_tokenizer != "gold":
        warnings += [f"loss.{key}={loss[key]} has no effect with loss.cross_tokenizer={loss.cross_tokenizer}; it is "
                     "read only by loss.cross_tokenizer=gold. Remove it, or use gold."
                     for key in ("uld_weight",) if loss[key] != getattr(defaults, key)]
    if loss.kind != "sft" and loss.cross_tokenizer is None and loss.uld_top_k != defaults.uld_top_k:
        warnings.append(f"loss.uld_top_k={loss.uld_top_k} has no effect with loss.cross_tokenizer=null; it is read "
                        "only by uld and gold. Remove it, or set loss.cross_tokenizer.")
    if loss.cross_tokenizer == "uld" and loss.kind != "sft" and loss.ce_weight == 0:
        warnings.append("loss.cross_tokenizer=uld with loss.ce_weight=0: ULD compares the two distributions sorted, "
                        "so it cannot tell which token is which, and nothing ties the student to the right ones; "
                        "set loss.ce_weight=0.5 (the ULD paper trains on CE and ULD together), or use gold.")
    if loss.cross_tokenizer == "uld" and loss.kind not in (defaults.kind, "sft"):
        warnings.append(f"loss.kind={loss.kind} has no effect with loss.cross_tokenizer=uld (ULD compares sorted "
                        "distributions, no divergence kind); use loss.cross_tokenizer=gold to apply it to the "
                        "shared ids.")
    return warnings


def _readers(key: str) -> str:
    return "loss.kind=" + ", ".join(kind for kind in (*KINDS, "sft") if not _UNREAD_BY_KIND[key](kind))


def _validate_onpolicy(onpolicy, teacher, data) -> None:
    if not 0.0 <= onpolicy.fraction <= 1.0:
        raise ConfigError(f"onpolicy.fraction={onpolicy.fraction} is out of range; use a share of rows in [0, 1] "
                          "(0: off-policy, 1: every response written by the student).")
    if onpolicy.max_new_tokens < 1:
        raise ConfigError(f"onpolicy.max_new_tokens={onpolicy.max_new_tokens} must be at least 1, e.g. 256.")
    if not (math.isfinite(onpolicy.temperature) and onpolicy.temperature >= 0):
        raise ConfigError(f"onpolicy.temperature={onpolicy.temperature} must be a finite number >= 0; use 0 (greedy) "
                          "or e.g. 1.0.")
    if not 0.0 < onpolicy.top_p <= 1.0:
        raise ConfigError(f"onpolicy.top_p={onpolicy.top_p} must be in (0, 1]; use 1.0 to keep every token.")
    if onpolicy.fraction > 0 and data.pack:
        raise ConfigError(f"onpolicy.fraction={onpolicy.fraction} cannot pack rows (data.pack=true packs them once, "
                          "before training, and a rollout's length is known only at its step); set data.pack=false.")
    if onpolicy.fraction > 0 and teacher.cache:
        raise ConfigError(f"onpolicy.fraction={onpolicy.fraction} needs a teacher that runs (a cache cannot score the "
                          "student's new text); set teacher.cache=null or onpolicy.fraction=0.")


def _validate_cross_tokenizer_job(cfg) -> None:
    """What distillation across tokenizers does not do yet, refused before anything loads."""
    method = cfg.loss.cross_tokenizer
    if not method:  # under sft too: its evaluation compares the student with the teacher over aligned spans
        return
    if cfg.data.pack:
        raise ConfigError(f"loss.cross_tokenizer={method} cannot pack rows (the two tokenisations of a packed row "
                          "would need packing alike); set data.pack=false.")


# The two cuBLAS workspace settings cuBLAS documents as reproducible: PyTorch's deterministic mode
# refuses a matrix product without one (train.deterministic sets the first; trainer/launch/determinism.py).
REPRODUCIBLE_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


def _validate_train(train) -> None:
    for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_every", "max_nonfinite_steps"):
        if train[key] < 1:
            raise ConfigError(f"train.{key}={train[key]} must be at least 1.")
    if train.eval_every is not None and train.eval_every < 0:
        raise ConfigError(f"train.eval_every={train.eval_every} is negative; use 0 (evaluate before and after "
                          "training only), N (every N steps) or null (4 times in between).")
    if not (math.isfinite(train.lr) and train.lr > 0):
        raise ConfigError(f"train.lr={train.lr} must be a finite number > 0; e.g. train.lr=2e-4 for LoRA on an LLM.")
    if not (math.isfinite(train.weight_decay) and train.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay={train.weight_decay} must be a finite number >= 0; use 0 for none.")
    if train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={train.warmup_steps} is negative; use 0 (no warm-up) or more.")
    if train.metric not in metric_names():
        raise ConfigError(f"train.metric={train.metric!r} is not a number the job writes to summary.json; use one of "
                          f"{describe_metric_names()}.")
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG", REPRODUCIBLE_CUBLAS_WORKSPACES[0])
    if train.deterministic and workspace not in REPRODUCIBLE_CUBLAS_WORKSPACES:
        raise ConfigError(f"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG to be "
                          f"{' or '.join(REPRODUCIBLE_CUBLAS_WORKSPACES)}, not {workspace!r}; unset it (the job sets "
                          "the first) or set one of those.")


def _validate_peft(peft) -> None:
    if peft.kind == "lora" and peft.r < 1:
        raise ConfigError(f"peft.r={peft.r} must be at least 1.")
    if not 0.0 <= peft.dropout < 1.0:
        raise ConfigError(f"peft.dropout={peft.dropout} is out of range; use a probability in [0, 1), e.g. 0.05.")


def _refuse_secrets(cfg) -> None:
    """The resolved config goes to W&B, checkpoints and the log: a token in it would leak there."""
    from omegaconf import OmegaConf

    from trainer.secrets import secret_values

    secrets = secret_values()
    if not secrets:
        return
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=True)):
        for name, secret in secrets.items():
            if isinstance(value, str) and secret in value:
                raise ConfigError(f"{key} holds the value of {name}; keep secrets in the environment only "
                                  "(the config is saved with the run and sent to W&B) and remove it from the config.")


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a plain dict/list tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield prefix, node
        return
    for key, child in items:
        yield from _leaves(child, f"{prefix}.{key}" if prefix else str(key))


def _validate_teacher(teacher) -> None:
    _check_choice("teacher.cache_dtype", teacher.cache_dtype, ("float16", "bfloat16"))
    if teacher.top_k < 1:
        raise ConfigError(f"teacher.top_k={teacher.top_k} must be at least 1, e.g. 64.")
    if not 0 <= teacher.tail_samples < teacher.top_k:
        raise ConfigError(f"teacher.tail_samples={teacher.tail_samples} must be at least 0 and below "
                          f"teacher.top_k={teacher.top_k}, e.g. 16 of 64.")
    if teacher.cache_shard_rows < 1:
        raise ConfigError(f"teacher.cache_shard_rows={teacher.cache_shard_rows} must be at least 1.")
    if teacher.path is None and teacher.cache in (None, "auto"):
        raise ConfigError("teacher.path is null; set it to the teacher model, or set teacher.cache to a cache folder.")


def validate_generate(generate) -> None:
    """The checks `python -m trainer.generate` adds to :func:`validate`. Sampling settings left null
    are the teacher's own (trainer/generate/sampling.py), filled in once its folder is known."""
    if generate.prompts is None:
        raise ConfigError("generate.prompts is not set; point it at a .jsonl/.parquet file of {prompt} or {messages} rows.")
    if not generate.out:
        raise ConfigError("generate.out is not set; name the folder the generated dataset goes to.")
    if generate.temperature is not None and generate.temperature < 0:
        raise ConfigError(f"generate.temperature={generate.temperature} is negative; use 0 (greedy) or more.")
    if generate.top_p is not None and not 0.0 < generate.top_p <= 1.0:
        raise ConfigError(f"generate.top_p={generate.top_p} must be in (0, 1].")
    for key in ("max_new_tokens", "samples_per_prompt", "batch_size", "shard_rows"):
        if generate[key] < 1:
            raise ConfigError(f"generate.{key}={generate[key]} must be at least 1.")
    if generate.top_k is not None and generate.top_k < 0:
        raise ConfigError(f"generate.top_k={generate.top_k} is negative; use 0 (off) or a token count.")


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}; pick one of them.")


def cache_root(cfg) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))

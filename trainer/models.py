"""Loading teacher and student through `transformers`, checking they can be distilled, and LoRA.

Everything here works for any `AutoModelForCausalLM` architecture: nothing names Llama modules.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn


class ModelError(ValueError):
    """A model or tokenizer cannot be used; the message says what to do."""


def _looks_like_local_path(path: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a folder."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def check_model_source(role: str, path: str) -> None:
    """Fail fast on a local folder that is not there, before anything is downloaded or built."""
    expanded = Path(os.path.expanduser(path))
    if expanded.exists():
        if not (expanded / "config.json").exists():
            raise ModelError(f"{role}.path={path} has no config.json; point it at a folder written by save_pretrained.")
        return
    if _looks_like_local_path(path):
        raise ModelError(f"{role}.path={path} does not exist; check the path or give a hub id such as Qwen/Qwen2.5-0.5B.")


def check_model(role: str, model_cfg, loads_weights: bool = True) -> None:
    """Everything about a model that can be refused before a file of it is parsed: a missing
    folder, a hub id that cannot be fetched offline, code shipped with the checkpoint and pickled
    weights. A hub id is checked against its snapshot in the local hub cache when there is one;
    otherwise transformers' own refusals (turned into one line below) and `use_safetensors` hold."""
    from huggingface_hub import is_offline_mode

    check_model_source(role, model_cfg.path)
    folder = local_files(model_cfg.path, model_cfg.revision)
    if folder is None:
        if is_offline_mode():
            raise ModelError(
                f"{role}.path={model_cfg.path} is not available offline: it is not in the local Hugging Face cache "
                f"and HF_HUB_OFFLINE is set; download it first (hf download {model_cfg.path}) or set {role}.path "
                "to a local model folder."
            )
        return
    if not model_cfg.trust_remote_code and _needs_own_code(folder):
        raise _remote_code_error(role, model_cfg.path)
    if loads_weights and not model_cfg.allow_pickle:
        _check_no_pickle_only(role, model_cfg.path, folder)


def local_files(path: str, revision: str | None) -> Path | None:
    """The folder holding the model's files on this machine: the folder itself, or a hub id's
    snapshot in the local hub cache; None when the hub id has not been downloaded."""
    expanded = Path(os.path.expanduser(path))
    if expanded.is_dir():
        return expanded
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception:  # not downloaded, or not a valid repo id: from_pretrained reports it
        return None


def _needs_own_code(folder: Path) -> bool:
    """Whether transformers would have to import Python code from the checkpoint: its config maps
    classes to its own modules (`auto_map`) and names a model type transformers does not know.
    With a known type transformers ignores `auto_map` unless trust_remote_code is set, so
    refusing those would only push users to run code they do not need."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False  # an unreadable config is reported by load_config, in its own words
    return "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING


def _remote_code_error(role: str, path: str) -> ModelError:
    return ModelError(
        f"{role}.path={path} ships its own Python code (auto_map in its config) that transformers needs to load it; "
        f"set {role}.trust_remote_code=true only if you trust its author, or pick a model transformers supports."
    )


# Weight files `torch.load` unpickles: loading one can run any code its author put in it.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _check_no_pickle_only(role: str, path: str, folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickled = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickled and not any(name.endswith(".safetensors") for name in files):
        raise ModelError(
            f"{role}.path={path} holds its weights only as pickle ({pickled[0]}), which can run code when loaded; "
            f"convert them to safetensors (load the model once where you trust it and save_pretrained it) or set "
            f"{role}.allow_pickle=true if you trust the file."
        )


def load_tokenizer(role: str, model_cfg):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.expanduser(model_cfg.path),
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except ValueError as error:
        raise _refused_code_or(error, role, model_cfg.path, "tokenizer") from None
    except OSError as error:
        raise ModelError(
            f"cannot load the {role} tokenizer from {model_cfg.path} ({_first_line(error)}); check the path or hub id; "
            f"with no network, download the model first or set {role}.path to a local model folder."
        ) from None
    _give_pad_token(tokenizer, role, model_cfg.path)
    return tokenizer


def _give_pad_token(tokenizer, role: str, path: str) -> None:
    """Padding positions are masked out of every loss and attention, so any token will do: its eos,
    else its unk or bos. One with none of them is refused before any weights load."""
    if tokenizer.pad_token_id is not None:
        return
    stand_in = next((token for token in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token)
                     if token is not None), None)
    if stand_in is None:
        raise ModelError(
            f"the {role} tokenizer of {path} has no pad, eos, unk or bos token to pad batches with; add a "
            f"\"pad_token\" (any of its tokens will do: padding is masked out) to its tokenizer_config.json, in a "
            f"local copy of the model if {role}.path is a hub id."
        )
    tokenizer.pad_token = stand_in


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Logit distillation compares distributions id by id: both models must share one vocabulary."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))
    if differing:
        example = differing[0][0]
        raise ModelError(
            f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens, "
            f"e.g. {example!r} maps to {teacher_vocab.get(example)} vs {student_vocab.get(example)}); "
            "pick a student from the teacher's model family, or distil on teacher-generated text."
        )


def shared_vocab_size(tokenizer, teacher_config, student_config=None) -> int:
    """The ids both models score (the teacher's alone when no student config is given).
    Checkpoints pad their embedding rows differently (Qwen2.5-7B has 152064 rows, Qwen2.5-3B
    151936, one tokenizer), so only the tokenizer's real ids are compared and the padding rows
    are dropped from both sides."""
    real_ids = len(tokenizer)
    given = (("teacher", teacher_config), ("student", student_config))
    for role, config in ((role, config) for role, config in given if config is not None):
        rows = config.get_text_config().vocab_size
        if rows < real_ids:
            raise ModelError(
                f"the {role} scores {rows} token ids but its tokenizer has {real_ids}, so the checkpoint and "
                f"tokenizer do not belong together; put the model's own tokenizer in {role}.path."
            )
    return real_ids


def load_config(role: str, model_cfg):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            os.path.expanduser(model_cfg.path),
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except ValueError as error:
        raise _refused_code_or(error, role, model_cfg.path, "config") from None
    except OSError as error:
        raise ModelError(f"cannot read the {role} config from {model_cfg.path} ({_first_line(error)}); "
                         f"point {role}.path at a folder written by save_pretrained.") from None


def _refused_code_or(error: ValueError, role: str, path: str, what: str) -> ModelError:
    """transformers refuses a checkpoint's own code with a ValueError of several lines; say it in
    one. Any other ValueError is reported as it is, on one line."""
    if "custom code" in str(error):
        return _remote_code_error(role, path)
    return ModelError(f"cannot read the {role} {what} from {path} ({_first_line(error)}); "
                      f"check {role}.path and {role}.revision.")


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(role: str, model_cfg, dtype: torch.dtype, zero3_config: dict | None):
    """Load weights; with `zero3_config` they are partitioned while loading, so no rank ever
    holds the whole model (transformers reads the live HfDeepSpeedConfig and loads under
    `deepspeed.zero.Init`)."""
    from transformers import AutoModelForCausalLM

    keep_alive = _zero3_loading(zero3_config)
    with keep_alive:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                os.path.expanduser(model_cfg.path),
                revision=model_cfg.revision,
                dtype=dtype,
                attn_implementation=model_cfg.attn_implementation,
                trust_remote_code=model_cfg.trust_remote_code,
                # True forbids the fallback to pickled weights a hub repo without safetensors gets;
                # None (pickle allowed) still prefers safetensors when both are there.
                use_safetensors=None if model_cfg.allow_pickle else True,
            )
        except ValueError as error:
            if "custom code" not in str(error):
                raise
            raise _remote_code_error(role, model_cfg.path) from None
    return model


@contextlib.contextmanager
def _zero3_loading(zero3_config: dict | None):
    if zero3_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    # transformers holds only a weak reference to this object: it must stay alive while loading.
    hf_ds_config = HfDeepSpeedConfig(zero3_config)
    try:
        yield hf_ds_config
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        del hf_ds_config
        unset_hf_deepspeed_config()


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each layer in the backward. Non-reentrant, so frozen inputs (LoRA on a frozen
    embedding) still get gradients through the recomputed layers."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support activation checkpointing; set "
                         "train.activation_checkpointing=false.")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def find_lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer inside the blocks: q_proj/.../down_proj on Llama,
    c_attn/c_proj/c_fc on GPT-2 (Conv1D), query_key_value/dense_* on GPT-NeoX. The output
    head is excluded: adapting the vocabulary projection costs much and helps little."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(config, peft_cfg, trust_remote_code: bool) -> list[str]:
    """The LoRA targets `apply_lora` will use, found on the student built from its config on the
    meta device: no memory, no weights read, so a wrong name costs nothing."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return lora_targets(model, peft_cfg.target_modules)


def lora_targets(model: nn.Module, targets) -> list[str]:
    """`targets` ('all-linear' or a list of module names) resolved on `model`, or ModelError."""
    if targets == "all-linear":
        targets = find_lora_targets(model)
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ModelError(
                f"peft.target_modules {missing} match no module of the student; "
                f"use peft.target_modules=all-linear or names from {find_lora_targets(model)}."
            )
    if not targets:
        raise ModelError("the student has no linear layers for LoRA; use peft=none for full fine-tuning.")
    return targets


def apply_lora(model: nn.Module, peft_cfg):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, peft_cfg.target_modules)
    lora = LoraConfig(
        fan_in_fan_out=_targets_are_conv1d(model, targets),
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    # Keep adapters in the base model's dtype: fp32 adapters on a bf16 base break ZeRO-3's
    # all-gather (TRL #6089, DeepSpeed #8072).
    return get_peft_model(model, lora, autocast_adapter_dtype=False), targets


def _targets_are_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2-style Conv1D stores its weight transposed; peft must be told so."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

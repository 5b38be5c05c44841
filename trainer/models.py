"""Loading teacher and student through `transformers`, checking they can be distilled, and LoRA.

Everything here works for any `AutoModelForCausalLM` architecture: nothing names Llama modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import types
from pathlib import Path

import torch
from torch import nn

from trainer import model_files

log = logging.getLogger(__name__)


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
    folder, a hub id that cannot be fetched offline, code shipped with the checkpoint, an attention
    implementation this machine cannot run and pickled weights (the weight files themselves are
    checked by :func:`check_fits`, after the tokenizers are compared). A hub id is checked against
    its snapshot in the local hub cache when there is one; otherwise transformers' own refusals
    (turned into one line below) and `use_safetensors` hold."""
    from huggingface_hub import is_offline_mode

    check_model_source(role, model_cfg.path)
    if loads_weights:  # settings made in code rather than by Hydra may not name one
        check_attention(role, getattr(model_cfg, "attn_implementation", None))
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


def stored_shapes(role: str, model_cfg) -> dict[str, list[int]]:
    """Every tensor's shape in the safetensors files from_pretrained will read, after checking
    they are all there, each as long as its header says; a folder with no weights at all is
    refused too (one with pickled weights only, by check_model). Empty when pickled weights will
    be read, or for a hub snapshot while online (from_pretrained fetches what it still lacks)."""
    from huggingface_hub import is_offline_mode

    folder = local_files(model_cfg.path, model_cfg.revision)
    if folder is None or not (Path(os.path.expanduser(model_cfg.path)).is_dir() or is_offline_mode()):
        return {}
    try:
        files = model_files.safetensors_files(folder)
        shapes = {name: entry["shape"] for file in files or () for name, entry in model_files.read_header(file).items()}
    except model_files.WeightsFileError as error:
        raise ModelError(f"{role}.path={model_cfg.path}: {error}; copy or download the model's weights again.") from None
    if files is None and not any(p.name.endswith(PICKLE_SUFFIXES) for p in folder.iterdir()):
        raise ModelError(f"{role}.path={model_cfg.path} holds no weights ({model_files.SAFE_WEIGHTS} or "
                         f"{model_files.SAFE_WEIGHTS_INDEX} and its shards); point it at a folder written by "
                         "save_pretrained.")
    return shapes


def check_attention(role: str, name: str | None) -> None:
    """`<role>.attn_implementation` names one transformers knows and this machine can run; checked
    before any model is built, since transformers finds out only while building the model."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils import is_kernels_available

    usable = usable_attention()
    if name is None or name in usable:
        return
    installed = ", ".join(usable)
    if name in _flash_attention_versions() or "/" in name:
        # Without the FlashAttention package transformers falls back to the hub's kernels when the
        # `kernels` package is there; a kernel named by hub id (org/repo) needs that package anyway.
        if is_kernels_available():
            return
        missing = "the kernels package" if "/" in name else f"FlashAttention {name[-1]} (or the kernels package)"
        raise ModelError(f"{role}.attn_implementation={name} needs {missing}, which is not installed here (or has "
                         f"no GPU to run on); install it, or use one that is: {installed}.")
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return  # a variant transformers knows (paged|eager): it checks the rest itself
    raise ModelError(f"{role}.attn_implementation={name} is not an attention implementation transformers knows; "
                     f"use one of those installed here: {installed} (or null to let transformers choose).")


def usable_attention() -> list[str]:
    """The attention implementations this machine can run: eager and sdpa always, flex_attention
    where torch has it, each FlashAttention version whose package (and a GPU for it) is here."""
    from transformers.utils import is_torch_flex_attn_available

    names = ["eager", "sdpa"] + (["flex_attention"] if is_torch_flex_attn_available() else [])
    return names + [name for name, available in _flash_attention_versions().items() if available()]


def _flash_attention_versions() -> dict:
    """{"flash_attention_<N>": whether its package is installed and a device for it present}."""
    from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX

    return {f"flash_attention_{version}": spec["general_availability_check"]
            for version, spec in FLASH_ATTENTION_COMPATIBILITY_MATRIX.items()}


def check_tokenizer_files(role: str, path: str, revision: str | None) -> None:
    """A model folder with no tokenizer in it, named as such: AutoTokenizer would either fail with
    a riddle or build an empty tokenizer that then 'differs' from the other model's."""
    folder = local_files(path, revision)
    if folder is None or model_files.has_tokenizer_files(folder):
        return
    raise ModelError(
        f"{role}.path={path} has no tokenizer files (none of {', '.join(model_files.TOKENIZER_FILES[:4])}, ...); "
        "save the tokenizer of the model it was made from into that folder (AutoTokenizer.from_pretrained(that "
        f"model).save_pretrained('{path}')); a student cut from the teacher takes the teacher's."
    )


def load_tokenizer(role: str, model_cfg):
    from transformers import AutoTokenizer

    check_tokenizer_files(role, model_cfg.path, model_cfg.revision)
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
    """No gradients, and eval mode for good: a frozen model's dropout must never run. Its `train`
    is pinned to eval because callers switch "the model" back to train mode after a probe, and
    under DeepSpeed they cannot tell which mode it was in (see :func:`eval_mode`)."""
    model.requires_grad_(False)
    model.train = types.MethodType(_stay_in_eval, model)
    return model.eval()


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` (a module or a DeepSpeed engine) in eval mode for the duration, then every submodule
    back in the mode it was in. Read from the modules themselves: a DeepSpeed engine's own
    `.training` never changes (its train() and eval() set only its module's), so an engine in
    eval mode still says True."""
    module = getattr(model, "module", model)
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, mode in modes:
            submodule.training = mode


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


def build_on_meta(config, trust_remote_code: bool) -> nn.Module:
    """The model `config` describes, on the meta device: its modules and shapes, no memory, no
    weights read. What start-up checks that need the architecture look at."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_lora_targets(config, peft_cfg, trust_remote_code: bool) -> list[str]:
    """The LoRA targets `apply_lora` will use, found on the student built from its config on the
    meta device, so a wrong name costs nothing."""
    return lora_targets(build_on_meta(config, trust_remote_code), peft_cfg.target_modules)


def check_fits(role: str, model_cfg, config, seq_len: int | None) -> tuple[nn.Module, int | None]:
    """The checks that need the weights' headers or the architecture, on the model built from
    `config` on the meta device: weight files missing, empty or truncated, embedding rows against
    the config's vocabulary, and `seq_len` against a learned position table. Returns that model
    (for the LoRA and pair checks) and the positions beyond which a model without such a table
    extrapolates (None: no limit known), which only the rows' real lengths can tell matter
    (:func:`warn_past_positions`)."""
    model = build_on_meta(config, model_cfg.trust_remote_code)
    check_embedding_rows(role, model_cfg.path, model, stored_shapes(role, model_cfg))
    limit = None if seq_len is None else check_positions(role, config, model, seq_len)
    return model, limit


def check_embedding_rows(role: str, path: str, model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """The token embeddings and LM head in the weights (`shapes`, from their headers) have the
    rows the config says: a config.json whose vocab_size was edited (or belongs to another
    checkpoint) would otherwise stop the job with a size-mismatch report once the other model's
    weights are loaded."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None or getattr(module, "weight", None) is None:
            continue
        name = _qualified_name(model, module.weight)
        stored = _stored_name(name, shapes)
        if stored is not None and shapes[stored][:1] != [module.weight.shape[0]]:
            raise ModelError(
                f"{role}.path={path}: its config.json describes {module.weight.shape[0]} token rows "
                f"(vocab_size) but its weights' {stored} has {shapes[stored][0]}, so the config and the weights do "
                "not belong together; restore the config.json saved with these weights."
            )


def _qualified_name(model: nn.Module, param: nn.Parameter) -> str:
    return next(name for name, p in model.named_parameters(remove_duplicate=False) if p is param)


def _stored_name(name: str, shapes: dict) -> str | None:
    """`name` as a checkpoint stores it: as is, or with the base model's prefix (`model.`,
    `transformer.`) missing or extra, as checkpoints saved from the bare backbone have."""
    if name in shapes:
        return name
    return next((key for key in shapes if name.endswith("." + key) or key.endswith("." + name)), None)


def check_positions(role: str, config, model: nn.Module, seq_len: int) -> int | None:
    """Refuse `seq_len` beyond a learned position table (GPT-2's wpe, OPT's embed_positions): a
    position past its last row is an IndexError in the middle of a step. Returns the positions
    a model without such a table (rotary, ALiBi) was made for, for a warning once the rows'
    lengths are known; None when the config gives none."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    table = _position_table(model, limit)
    if table is not None and seq_len > limit:
        raise ModelError(f"train.seq_len={seq_len} is longer than the {role}'s learned position table ({table}: "
                         f"{limit} positions); set train.seq_len={limit} or less.")
    return None if table is not None else limit


def _position_table(model: nn.Module, limit: int) -> str | None:
    """The name of an embedding with one row per position, if the model has one: any embedding
    but the token embeddings with `max_position_embeddings` rows (OPT keeps 2 more, an offset)."""
    tokens = model.get_input_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is not tokens and 0 <= module.num_embeddings - limit <= 2:
            return name
    return None


def warn_past_positions(role: str, limit: int | None, longest_row: int) -> None:
    """A model without a learned position table runs past `max_position_embeddings`, but its
    outputs there are those of positions it never saw in training."""
    if limit is not None and longest_row > limit:
        log.warning("%s: rows of up to %d tokens are longer than the %d positions it was made for "
                    "(max_position_embeddings); its outputs past them are usually poor: lower train.seq_len, or "
                    "extend its context (rope_scaling in its config) first.", role, longest_row, limit)


def warn_about_pair(teacher_cfg, student_cfg, teacher: nn.Module | None, student: nn.Module) -> None:
    """Allowed but odd pairs, said once at start-up: the same model as teacher and student (a
    sanity check: the KL starts at 0), or a student larger than its teacher (swapped paths?)."""
    if same_model(teacher_cfg, student_cfg):
        log.warning("teacher.path and student.path are the same model (%s): the student starts equal to its "
                    "teacher, so the KL starts at 0 and there is nothing to distil; fine as a sanity check, "
                    "otherwise point student.path at a smaller model.", student_cfg.path)
        return
    if teacher is None:
        return
    teacher_size, student_size = parameter_count(teacher), parameter_count(student)
    if student_size > teacher_size:
        log.warning("the student (%s parameters) is larger than the teacher (%s): distillation usually makes a "
                    "smaller model; check that teacher.path and student.path are not swapped.",
                    _in_words(student_size), _in_words(teacher_size))


def same_model(first, second) -> bool:
    """Whether two model settings name the same model: one folder (however written, symlinks
    included), or one hub id at one revision."""
    paths = [os.path.expanduser(cfg.path) for cfg in (first, second)]
    if all(os.path.isdir(path) for path in paths):
        return os.path.samefile(*paths)
    return paths[0] == paths[1] and first.revision == second.revision


def parameter_count(model: nn.Module) -> int:
    """Parameters, tied ones once (a meta model counts as a real one)."""
    return sum(p.numel() for p in model.parameters())


def _in_words(count: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(count)


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

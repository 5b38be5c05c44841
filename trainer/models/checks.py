"""Checks that a teacher and student can be distilled, made before any weights load: files, shapes, positions, vocabulary."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn

from trainer.models import files as model_files
from trainer.models.loading import ModelError, build_on_meta, remote_code_error

log = logging.getLogger(__name__)


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
    folder = model_files.model_folder(model_cfg.path, model_cfg.revision)
    if folder is None:
        if is_offline_mode():
            raise ModelError(
                f"{role}.path={model_cfg.path} is not available offline: it is not in the local Hugging Face cache "
                f"and HF_HUB_OFFLINE is set; download it first (hf download {model_cfg.path}) or set {role}.path "
                "to a local model folder."
            )
        return
    if not model_cfg.trust_remote_code and _needs_own_code(folder):
        raise remote_code_error(role, model_cfg.path)
    if loads_weights and not model_cfg.allow_pickle:
        _check_no_pickle_only(role, model_cfg.path, folder)


def stored_shapes(role: str, model_cfg) -> dict[str, list[int]]:
    """Every tensor's shape in the safetensors files from_pretrained will read, after checking
    they are all there, each as long as its header says; a folder with no weights at all is
    refused too (one with pickled weights only, by check_model). Empty when pickled weights will
    be read, or for a hub snapshot while online (from_pretrained fetches what it still lacks)."""
    from huggingface_hub import is_offline_mode

    folder = model_files.model_folder(model_cfg.path, model_cfg.revision)
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
            "pick a student from the teacher's model family, set loss.cross_tokenizer=gold (or uld) to distil "
            "across tokenizers, or distil on teacher-generated text."
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

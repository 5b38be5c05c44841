"""Loading teacher and student through `transformers`: folders, tokenizers, configs, weights, frozen and eval modes.

Everything here works for any `AutoModelForCausalLM` architecture: nothing names Llama modules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types

import torch
from torch import nn

from trainer.errors import UserError, first_line
from trainer.models import files as model_files

log = logging.getLogger(__name__)


class ModelError(UserError, ValueError):
    """A model or tokenizer cannot be used; the message says what to do."""


def remote_code_error(role: str, path: str) -> ModelError:
    return ModelError(
        f"{role}.path={path} ships its own Python code (auto_map in its config) that transformers needs to load it; "
        f"set {role}.trust_remote_code=true only if you trust its author, or pick a model transformers supports."
    )


def check_tokenizer_files(role: str, path: str, revision: str | None) -> None:
    """A model folder with no tokenizer in it, named as such: AutoTokenizer would either fail with
    a riddle or build an empty tokenizer that then 'differs' from the other model's."""
    folder = model_files.model_folder(path, revision)
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
    tokenizer = _from_pretrained(
        AutoTokenizer, role, model_cfg, "tokenizer",
        cannot=f"cannot load the {role} tokenizer from {model_cfg.path}",
        fix=f"check the path or hub id; with no network, download the model first or set {role}.path to a local "
            "model folder.")
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


def load_config(role: str, model_cfg):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, role, model_cfg, "config",
                            cannot=f"cannot read the {role} config from {model_cfg.path}",
                            fix=f"point {role}.path at a folder written by save_pretrained.")


def _from_pretrained(auto_class, role: str, model_cfg, what: str, *, cannot: str, fix: str):
    """`auto_class.from_pretrained` on a model setting; its errors as one line: `cannot (reason); fix`."""
    try:
        return auto_class.from_pretrained(os.path.expanduser(model_cfg.path), revision=model_cfg.revision,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except ValueError as error:
        raise _refused_code_or(error, role, model_cfg.path, what) from None
    except OSError as error:
        raise ModelError(f"{cannot} ({first_line(error)}); {fix}") from None


def _refused_code_or(error: ValueError, role: str, path: str, what: str) -> ModelError:
    """transformers refuses a checkpoint's own code with a ValueError of several lines; say it in
    one. Any other ValueError is reported as it is, on one line."""
    if "custom code" in str(error):
        return remote_code_error(role, path)
    return ModelError(f"cannot read the {role} {what} from {path} ({first_line(error)}); "
                      f"check {role}.path and {role}.revision.")


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
            raise remote_code_error(role, model_cfg.path) from None
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


def build_on_meta(config, trust_remote_code: bool) -> nn.Module:
    """The model `config` describes, on the meta device: its modules and shapes, no memory, no
    weights read. What start-up checks that need the architecture look at."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)

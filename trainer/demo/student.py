"""The demo student: the teacher with some of its layers dropped."""

from __future__ import annotations

import copy
import re

from transformers import LlamaForCausalLM

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def drop_layers(teacher: LlamaForCausalLM, keep: tuple[int, ...]) -> LlamaForCausalLM:
    """A new model holding the teacher's layers `keep`, in that order, and everything else.

    The student is rebuilt from a config rather than by slicing `model.layers`, so each layer
    gets its new index: attention layers use that index to find their slot in the KV cache.
    """
    if sorted(set(keep)) != list(keep) or not all(0 <= i < teacher.config.num_hidden_layers for i in keep):
        raise ValueError(f"student layers {keep} must be increasing indices of the teacher's "
                         f"{teacher.config.num_hidden_layers} layers; fix DemoRecipe.student_layers.")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = LlamaForCausalLM(config)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = tensor.clone()
        elif int(match.group(1)) in new_index:
            state[f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student.eval()

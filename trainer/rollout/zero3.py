"""Rollouts from a ZeRO-3 student, whose parameters each rank holds only a shard of.

DeepSpeed gathers a layer's weights from every rank just before the layer runs and frees them after,
so every forward is a collective: decoding token by token all-gathers the whole model once per
token, and a rank that stops decoding earlier than the others (its rows wrote their EOS, or it had
no rows this step) leaves them waiting forever. Two ways out, as TRL's
`unwrap_model_for_generation(gather_deepspeed3_params=True)` and transformers' `synced_gpus` take:

- **gathered**: every rank gathers the whole model once for the rollout phase and sets DeepSpeed's
  forward hooks aside, so each rank then decodes alone, with no collective in the loop; the shards
  and hooks are back as they were afterwards. It needs the full weights to fit beside the KV cache.
- **synced**: the weights stay sharded and every rank keeps forwarding in lockstep (a one-token
  dummy batch once its own rows are done, or when it has none) until an all-reduce says that every
  rank is done.

`choose_mode` decides between them (the same answer on every rank); the caller may force either.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from trainer.models.engines import param_bytes_full, param_bytes_on_rank
from trainer.ranks import max_over_ranks

MODES = ("auto", "gathered", "synced")

# The gathered weights may take at most this share of the memory that is free: the KV cache, the
# logits and the allocator's slack need the rest.
HEADROOM = 0.5


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"zero3 mode is {mode!r}; use one of {', '.join(MODES)}")
    return mode


def is_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed's ZeRO-3 has partitioned the module's parameters (each carries `ds_status`)."""
    return any(hasattr(param, "ds_status") for param in module.parameters())


def choose_mode(module: nn.Module, requested: str) -> str:
    """`requested`, or for "auto" gathered exactly when the whole model fits on every rank. A
    collective in "auto" mode: each rank's answer is all-reduced so that all of them take the same
    path (one rank gathering while another forwards in lockstep would hang both)."""
    if requested != "auto":
        return requested
    misses = torch.tensor([0 if fits_gathered(module) else 1], dtype=torch.int64)
    return "synced" if int(max_over_ranks(misses).item()) else "gathered"


def fits_gathered(module: nn.Module) -> bool:
    """Whether gathering the parameters this rank lacks fits within `HEADROOM` of its free memory."""
    needed = param_bytes_full(module) - param_bytes_on_rank(module)
    return needed <= HEADROOM * free_bytes(next(module.parameters()).device)


def free_bytes(device: torch.device) -> int:
    """Memory free for this rank: its GPU's (what the driver has free, plus what torch's caching
    allocator holds but no tensor uses); on CPU its share of the host's available RAM, which all of
    the host's ranks share."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    import psutil

    return psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@contextlib.contextmanager
def gathered_weights(module: nn.Module):
    """The whole model on every rank for the duration, with DeepSpeed's forward hooks set aside, so
    a forward neither re-fetches nor releases anything and talks to no other rank. Entering is a
    collective (one all-gather of the parameters not already whole); leaving frees what it gathered,
    restores the hooks and needs no other rank. Parameters ZeRO-3 keeps whole anyway (those under
    `stage3_param_persistence_threshold`) are left alone, so they stay whole afterwards. The same
    parameters are missing on every rank: DeepSpeed's own fetches assume it too. Parameters are
    read, never written: `modifier_rank=None`."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [param for param in module.parameters() if param.ds_status != ZeroParamStatus.AVAILABLE]
    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
        with _deepspeed_hooks_set_aside(module):
            yield


@contextlib.contextmanager
def _deepspeed_hooks_set_aside(module: nn.Module):
    """Every submodule's forward (pre-)hooks without DeepSpeed's, then restored in their order.

    DeepSpeed's hooks would otherwise free each layer after it runs (the next token gathers it
    again) and, at the root, compare the recorded module order across ranks (a collective) whenever
    the trace is incomplete. They are recognised by where their function was defined, so the caller
    may hand us the DeepSpeed engine or its `.module`; other hooks (the loss's hidden-state tap) stay.
    """
    saved = []
    for submodule in module.modules():
        for hooks in (submodule._forward_pre_hooks, submodule._forward_hooks):
            ours = [key for key, hook in hooks.items() if _from_deepspeed(hook)]
            if ours:
                saved.append((hooks, list(hooks.items())))
                for key in ours:
                    del hooks[key]
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


def _from_deepspeed(hook) -> bool:
    while hook is not None:
        if (getattr(hook, "__module__", None) or "").startswith("deepspeed."):
            return True
        hook = getattr(hook, "__wrapped__", None)
    return False


def any_rank_busy(busy: bool, device: torch.device) -> bool:
    """Whether any rank still has rows to decode (an all-reduce: every rank must ask together)."""
    flag = torch.tensor([int(busy)], dtype=torch.int64, device=device)
    return bool(max_over_ranks(flag).item())

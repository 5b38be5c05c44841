"""`python -m cuda_strict_watch [overrides]`: `python -m trainer`, with every aten op the job runs checked
against those torch's strict deterministic mode refuses on CUDA; prints one line at exit,
`REFUSED_ON_CUDA {"<op>: <why>": count, ...}` (empty when none), and `OPS_SEEN [...]`, the name of
every op it saw (that it saw the backward, the optimizer and the rollouts' sampling too).

`train.deterministic=true` on a GPU turns on torch's strict mode, in which an op with no deterministic
CUDA kernel raises a RuntimeError: a job that runs one would crash there, on the GPU, and nowhere
else. On the CPU the same ops run (a CPU kernel raises for none of them), so this watch names them
here. It sees the job's ops after autograd and the composite ops' decompositions, which are the same
on both devices; what it cannot see is where our code or torch picks another op on CUDA (attention's
backend, which strict mode itself restricts; the losses' sorts, which run NumPy's on a CPU and
torch's `sort`, not in this table, on a GPU).

The table is the `alertNotDeterministic` calls in PyTorch 2.11's CUDA library (the GPU image's
version, read from its wheel), not the docstring of `torch.use_deterministic_algorithms`, which is
behind it: it still lists a floating `cumsum`, `kthvalue` and `reflection_pad2d`'s backward, which have
deterministic CUDA kernels in 2.11, and omits `index_reduce`, `nanmedian` and the antialiased upsampling
backwards, which raise.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ALWAYS = "no deterministic CUDA kernel"


def _argument(func, args: tuple, kwargs: dict, name: str):
    """`func`'s argument `name` as this call passed it, or its schema's default; None for an overload
    without it (`scatter.src` has no `reduce`)."""
    if name in kwargs:
        return kwargs[name]
    schema = [argument.name for argument in func._schema.arguments]
    if name not in schema:
        return None
    position = schema.index(name)
    return args[position] if len(args) > position else func._schema.arguments[position].default_value


def _floating_input(func, args, kwargs, out) -> str | None:
    tensor = args[0]
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
        return f"floating ({str(tensor.dtype).removeprefix('torch.')})"
    return None


def _reduced(func, args, kwargs, out) -> str | None:
    """A sum or mean (`reduction` not 0, none): atomics across the batch."""
    return "reduction sum or mean" if _argument(func, args, kwargs, "reduction") != 0 else None


def _reduce_is(*names: str):
    def why(func, args, kwargs, out) -> str | None:
        reduce = _argument(func, args, kwargs, "reduce")
        return f"reduce={reduce!r}" if reduce in names else None
    return why


def _with_weights(func, args, kwargs, out) -> str | None:
    return "with weights" if _argument(func, args, kwargs, "weights") is not None else None


def _embedding_bag_max(func, args, kwargs, out) -> str | None:
    return "mode='max'" if _argument(func, args, kwargs, "mode") == 2 else None


def _with_indices(func, args, kwargs, out) -> str | None:
    return "with indices" if isinstance(out, (tuple, list)) else None


def _always(func, args, kwargs, out) -> str:
    return ALWAYS


# op name (its overload packet's, `aten.<name>`) -> why it is refused for these arguments, or None.
REFUSED_ON_CUDA = {
    "nll_loss2d_forward": _reduced,
    "put_": _always,  # accumulate=False has no deterministic kernel anywhere; accumulate=True none on CUDA
    "put": _always,
    "histc": _floating_input,
    "bincount": _with_weights,
    "median": _with_indices,
    "nanmedian": _with_indices,
    "index_reduce": _always,
    "index_reduce_": _always,
    "scatter_reduce": _reduce_is("prod"),
    "scatter_reduce_": _reduce_is("prod"),
    "scatter": _reduce_is("multiply"),  # the legacy reduce= of a Tensor src; 'add' is sorted into index_put
    "scatter_": _reduce_is("multiply"),
    "_embedding_bag_backward": _embedding_bag_max,
    "_embedding_bag_dense_backward": _embedding_bag_max,
    "_ctc_loss_backward": _always,
    "avg_pool3d_backward": _always,
    "_adaptive_avg_pool2d_backward": _always,
    "_adaptive_avg_pool3d_backward": _always,
    "adaptive_max_pool2d_backward": _always,
    "max_pool3d_with_indices_backward": _always,
    "fractional_max_pool2d_backward": _always,
    "fractional_max_pool3d_backward": _always,
    "max_unpool2d": _always,
    "max_unpool3d": _always,
    "upsample_linear1d_backward": _always,
    "upsample_bilinear2d_backward": _always,
    "upsample_bicubic2d_backward": _always,
    "upsample_trilinear3d_backward": _always,
    "_upsample_bilinear2d_aa_backward": _always,
    "_upsample_bicubic2d_aa_backward": _always,
    "reflection_pad1d_backward": _always,
    "reflection_pad3d_backward": _always,
    "replication_pad1d_backward": _always,  # F.pad(mode="replicate") avoids these on CUDA; the aten ops raise
    "replication_pad2d_backward": _always,
    "replication_pad3d_backward": _always,
    "grid_sampler_2d_backward": _always,
    "grid_sampler_3d_backward": _always,
}


class RefusedOnCuda(TorchDispatchMode):
    """Counts the ops strict mode would refuse on CUDA, by op and reason, as they run."""

    def __init__(self):
        super().__init__()
        self.refused: Counter[str] = Counter()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.seen.add(name)
        rule = REFUSED_ON_CUDA.get(name)
        why = rule(func, args, kwargs, out) if rule else None
        if why:
            self.refused[f"{name}: {why}"] += 1
        return out


if __name__ == "__main__":
    import runpy

    watch = RefusedOnCuda()
    try:
        with watch:
            # Run as `python -m trainer` would: Hydra finds conf/ relative to trainer/__main__.py.
            runpy.run_module("trainer", run_name="__main__", alter_sys=True)
    finally:
        print("REFUSED_ON_CUDA " + json.dumps(dict(watch.refused)), flush=True)
        print("OPS_SEEN " + json.dumps(sorted(watch.seen)), flush=True)

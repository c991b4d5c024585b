"""Speed options of the denoising network, switchable by config: ``torch.compile``, channels_last and the autocast
precision of sampling.

Compile and channels_last leave the numbers unchanged up to floating-point reordering (tests compare them with the
plain path in fp32) and leave ``state_dict`` keys unchanged, so checkpoints move freely between a compiled and an
eager model. The sampling precision changes the network's numbers by its own rounding (bf16: within 1e-2 of fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.utils.enums import StrEnumChoice


class CompileMode(StrEnumChoice):
    """``torch.compile`` of the network, or not.

    ``default``: Inductor kernels (GroupNorm + SiLU and the other element-wise chains fused into the convolutions'
    neighbours). ``reduce-overhead``: the same plus CUDA graphs, which replay a fixed-shape forward (the sampling loop,
    a training step at a fixed batch size) without per-kernel launch cost; on a CPU it acts as ``default``.
    ``max-autotune``: also benchmarks matmul/convolution kernels at compile time (slow to start).
    """

    NONE = "none"
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"


def compile_in_place(net: nn.Module, mode: CompileMode) -> nn.Module:
    """Compile ``net``'s forward in place (``nn.Module.compile``: same object, same ``state_dict`` keys).

    Shapes are static at first and become dynamic on the first new batch size (Dynamo's automatic dynamic shapes),
    so a run recompiles once for its last, smaller batch, never every step: timesteps, labels and contexts are
    tensors, never Python numbers.
    """
    if mode is not CompileMode.NONE and not getattr(net, "_compiled_call_impl", None):
        net.compile(mode=None if mode is CompileMode.DEFAULT else mode.value)
    return net


# Lightning's precision strings (as in trainer.precision) → the autocast dtype of the network's forward
_AUTOCAST = {
    "32-true": None,
    "32": None,
    "64-true": None,
    "bf16-mixed": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16": torch.float16,
}


def autocast_dtype(precision: str | int, key: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision (``bf16-mixed`` → bfloat16, ``32-true`` → None: no autocast)."""
    value = str(precision)
    if value not in _AUTOCAST:
        raise ValueError(f"{key}={precision!r}: expected a trainer precision, one of {list(_AUTOCAST)}")
    return _AUTOCAST[value]

"""Counting the arithmetic of a network call with torch's ``FlopCounterMode`` (matmuls, convolutions and attention).

Two conventions, named apart: ``count_flops`` returns FLOPs at 2 per multiply-add (what MFU divides by a device's
FLOP/s, ``experiments/bench/run.py``); ``gflops_per_forward`` returns *multiply-adds* in billions, the unit the DiT
paper and fvcore call "Gflops" (DiT Table 4: DiT-XL/2 at 32x32x4 latents, 118.6 Gflops; a test reproduces the table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (2 per multiply-add) of the tensor operations ``fn()`` runs; tensors on the meta device count too."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def gflops_per_forward(net: Callable[..., Any], *inputs: torch.Tensor, **kwargs: Any) -> float:
    """Billions of multiply-adds of one ``net(*inputs, **kwargs)`` per example (inputs batched on dim 0) — DiT's
    "Gflops"."""
    return count_flops(lambda: net(*inputs, **kwargs)) / 2e9 / inputs[0].shape[0]

"""L_simple (Ho et al. 2020, eq. 14): E_{t, x_0, ε} ||target − f_θ(x_t, t)||², target per parameterisation."""

from __future__ import annotations

import torch
from torch import nn


class SimpleLoss(nn.Module):
    """Mean squared error per example.

    ``reduce_mean``: mean over C·H·W (the usual L_simple); otherwise the sum (improved-diffusion's "rescaled").
    forward(model_output (B, C, H, W), target (B, C, H, W)) → (B,) per-example loss.
    """

    def __init__(self, reduce_mean: bool = True) -> None:
        super().__init__()
        self.reduce_mean = reduce_mean

    def forward(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sq = (model_output.float() - target.float()) ** 2
        flat = sq.flatten(1)
        return flat.mean(dim=1) if self.reduce_mean else flat.sum(dim=1)

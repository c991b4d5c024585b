"""Samplers of the training timestep t (Ho et al.: uniform; importance sampling arrives with Improved DDPM)."""

from __future__ import annotations

import abc

import torch
from torch import nn


class TimestepSampler(nn.Module, abc.ABC):
    """Draws t: (B,) long in [0, T) and importance weights (B,) so that E[w · L_t] is the uniform-t objective."""

    def __init__(self, num_timesteps: int) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps

    @abc.abstractmethod
    def sample(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (t, weights)."""

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Feed back per-example losses (no-op for samplers that do not learn)."""


class UniformTimestepSampler(TimestepSampler):
    """t ~ U{0, …, T−1}, weights 1."""

    def sample(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return t, torch.ones(batch_size, device=device)

"""Training timesteps of a rectified flow: τ ∈ [0, 1] from SD3's distributions (Esser et al. 2024 §3.1), as the
network's t = T·τ."""

from __future__ import annotations

import math

import torch

from difflab.losses.timesteps import TimestepSampler
from difflab.utils.enums import StrEnumChoice, parse_enum


class TimeDistribution(StrEnumChoice):
    """How training draws τ (Esser et al. 2024 §3.1; ``one_step``: Liu et al.'s k = 1 distillation)."""

    UNIFORM = "uniform"  # τ ~ U(0, 1): rectified flow as in Liu et al.
    LOGIT_NORMAL = "logit_normal"  # τ = sigmoid(m + s n), n ~ N(0, 1): SD3's default (m = 0, s = 1)
    MODE = "mode"  # τ = 1 − u − s (cos²(πu/2) − 1 + u), u ~ U(0, 1): SD3's "mode sampling with heavy tails"
    ONE_STEP = "one_step"  # τ = 1 always: regress x_0 from ε in one Euler step (distillation of a reflowed coupling)


class FlowTimestepSampler(TimestepSampler):
    """Training timesteps of a flow: t = T·τ (B,) float with τ from ``distribution``, weights 1 (the
    :class:`~difflab.losses.TimestepSampler` interface; built by the module as ``sampler(num_timesteps)``).

    Args:
        num_timesteps: T (the process's timestep scale).
        distribution: ``uniform`` | ``logit_normal`` | ``mode`` | ``one_step`` (:class:`TimeDistribution`).
        loc, scale: m and s of logit_normal (SD3: 0, 1).  mode_scale: s of ``mode`` (SD3: 1.29).
    """

    def __init__(
        self,
        num_timesteps: int,
        distribution: str | TimeDistribution = TimeDistribution.UNIFORM,
        loc: float = 0.0,
        scale: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        super().__init__(num_timesteps)
        self.distribution = parse_enum(TimeDistribution, distribution, "model.timestep_sampler.distribution")
        if scale <= 0:
            raise ValueError(f"model.timestep_sampler.scale={scale}: expected > 0")
        if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"model.timestep_sampler.mode_scale={mode_scale}: expected in [-1, 2/(π − 2)] (monotone)")
        self.loc, self.scale, self.mode_scale = float(loc), float(scale), float(mode_scale)

    def sample_tau(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """τ (B,) float32 in [0, 1] from the global generator."""
        if self.distribution is TimeDistribution.LOGIT_NORMAL:
            return torch.sigmoid(self.loc + self.scale * torch.randn(batch_size, device=device))
        if self.distribution is TimeDistribution.ONE_STEP:
            return torch.ones(batch_size, device=device)
        u = torch.rand(batch_size, device=device)
        if self.distribution is TimeDistribution.MODE:
            return 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return u

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(t = T·τ (B,) float32, weights (B,) ones)."""
        return self.sample_tau(batch_size, device) * self.num_timesteps, torch.ones(batch_size, device=device)

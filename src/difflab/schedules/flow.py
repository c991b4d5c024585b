"""Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2023; Esser et al. 2024, SD3).

The process is the straight line between data and noise, over τ ∈ [0, 1]:
    x_τ = (1 − τ) x_0 + τ ε,          ε ~ N(0, I)                   (Liu et al. eq. 1 with X_0 = ε, X_1 = x_0 swapped)
    v = dx_τ/dτ = ε − x_0                                              (the velocity the network regresses)
and sampling integrates dx/dτ = v_θ(x_τ, τ) from τ = 1 (pure noise) to τ = 0. The network sees the timestep
t = T·τ (T = ``num_timesteps``, 1000 by default), the range the UNet's and DiT's sinusoidal embeddings were built
for (diffusers' FlowMatch schedulers pass the same ``sigma · num_train_timesteps``).

Written with x̂_0 and v̂, x_τ = x̂_0 + τ v̂: the flow is the variance-exploding ODE dx̃/dσ = ε̂ of
:mod:`difflab.schedules.continuous` with σ = τ, α = 1 and (x̂_0, v̂) in place of (x̂_0, ε̂). The continuous
solvers' Euler and Heun updates therefore integrate the flow unchanged (:mod:`difflab.samplers.flow`).

Parameterisations (``model.parameterization``): ``v`` (the velocity ε − x_0: the default and the paper's), ``x0``
(converted to v̂ = (x_τ − x̂_0)/τ). ``eps`` is refused: at τ = 1, x_1 = ε, so an ε-prediction says nothing about x_0
and the velocity there is undefined (0/0), exactly where sampling starts.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.schedules.parameterization import Parameterization, VarianceType


def shift_time(tau: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23 with α = shift = sqrt(m/n)): τ' = α τ / (1 + (α − 1) τ).
    α > 1 spends more steps at high noise (higher resolutions); α = 1 is the identity. Keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"sampler.shift={shift}: expected > 0 (1: no shift; SD3 uses 3 at 1024²)")
    return shift * tau / (1 + (shift - 1) * tau)


def flow_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """τ_0 = 1 > τ_1 > … > τ_N = 0: N uniform Euler steps (Liu et al.), then shifted; (N + 1,) float64."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampler.steps={num_steps!r}: expected a number of steps >= 1")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


class RectifiedFlow(nn.Module):
    """The linear interpolation process; the drop-in for :class:`GaussianDiffusion` in ``model.schedule``.

    Args:
        num_timesteps: T, the scale of the network's timestep input t = T·τ (not a discretisation: τ is continuous).

    Timesteps ``t`` everywhere (training, samplers, the network) are network units in [0, T]; τ = t / T.
    """

    process_kind = "flow"

    def __init__(self, num_timesteps: int = 1000) -> None:
        super().__init__()
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"model.schedule.num_timesteps={num_timesteps!r}: expected the timestep scale T >= 1")
        self.num_timesteps = num_timesteps

    def tau(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """τ = t/T (B,) → (B, 1, …, 1), broadcastable to ``like``, in ``like``'s dtype."""
        return (t.to(torch.float32) / self.num_timesteps).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def check_model(self, parameterization: Parameterization, variance_type: VarianceType, loss: nn.Module) -> None:
        """Refuse what a flow cannot train (construction time)."""
        if parameterization is Parameterization.EPS:
            raise ValueError(
                "model.parameterization=eps: a rectified flow cannot sample from an ε-prediction (at τ = 1, x = ε "
                "carries no information about x_0, so the velocity ε − x_0 is undefined); use v (default) or x0"
            )
        if variance_type.learned:
            raise ValueError("model.variance_type=learned_range: a flow is deterministic and has no variance to learn")
        if getattr(loss, "loss_type", None) is not None and loss.loss_type.value != "simple":
            raise ValueError(
                f"model.loss.loss_type={loss.loss_type.value}: the VLB terms are a Gaussian diffusion's; "
                "a rectified flow trains with loss_type=simple"
            )

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_τ = (1 − τ) x_0 + τ ε for x_start, noise (B, C, H, W) and network timesteps t (B,)."""
        tau = self.tau(t, x_start)
        return (1 - tau) * x_start + tau * noise

    def training_target(
        self, parameterization: Parameterization, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network regresses: v = ε − x_0 (``v``) or x_0 (``x0``)."""
        if parameterization is Parameterization.X0:
            return x_start
        if parameterization is Parameterization.V:
            return noise - x_start
        raise ValueError(f"model.parameterization={parameterization.value}: a flow predicts v or x0")

    def split_output(self, model_output: torch.Tensor, variance_type: VarianceType) -> tuple[torch.Tensor, None]:
        """(mean output, None): a flow has no variance channels."""
        return model_output, None

    def x0_velocity(
        self, parameterization: Parameterization, model_output: torch.Tensor, x_t: torch.Tensor, tau: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, v̂) from a network output at τ: v: x̂_0 = x_τ − τ v̂; x0: v̂ = (x_τ − x̂_0)/τ (τ > 0)."""
        if parameterization is Parameterization.V:
            return x_t - tau * model_output, model_output
        if parameterization is Parameterization.X0:
            return model_output, (x_t - model_output) / tau
        raise ValueError(f"model.parameterization={parameterization.value}: a flow predicts v or x0")

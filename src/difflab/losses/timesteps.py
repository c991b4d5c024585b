"""Samplers of the training timestep t: uniform (Ho et al.) and loss-aware importance sampling
(Nichol & Dhariwal 2021, eq. 17: p_t ∝ sqrt(E[L_t²]), from a history of the last 10 losses per t).

They are plain objects, not ``nn.Module``s, so that weight averaging (EMA) never touches their state; the
DiffusionModule stores :meth:`state_dict` in checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class TimestepSampler:
    """Draws t: (B,) long in [0, T) and weights (B,) with E_t[w_t L_t] = (1/T) Σ_t L_t (the uniform objective)."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """p_t: (T,), sums to 1."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, device=device)

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """t ~ p and the importance weights 1 / (T p_t)."""
        p = self.probabilities(device)
        t = torch.multinomial(p, batch_size, replacement=True)
        return t, 1.0 / (self.num_timesteps * p[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Feed back per-example losses (B,) at timesteps t (B,); a no-op for samplers that do not learn."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class UniformTimestepSampler(TimestepSampler):
    """t ~ U{0, …, T−1}, weights 1."""

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return t, torch.ones(batch_size, device=device)


class LossAwareTimestepSampler(TimestepSampler):
    """Importance sampling with p_t ∝ sqrt(E[L_t²]) over the last ``history`` losses of each t (uniform until every
    t has ``history`` of them), mixed with ``uniform_prob`` of the uniform distribution as improved-diffusion does.

    Under DDP every rank all-gathers (t, loss) of the step before updating, so all ranks hold the same history and
    the same p. No host-device synchronisation happens in :meth:`sample` or :meth:`update`.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        if history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError("model.timestep_sampler: history must be >= 1 and uniform_prob in [0, 1]")
        self.history, self.uniform_prob = history, uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def _to(self, device: torch.device | str) -> None:
        if self.loss_history.device != torch.device(device):
            self.loss_history = self.loss_history.to(device)
            self.loss_counts = self.loss_counts.to(device)

    def probabilities(self, device: torch.device | str = "cpu") -> torch.Tensor:
        self._to(device)
        weights = self.loss_history.pow(2).mean(dim=1).sqrt()
        weights = weights / weights.sum().clamp(min=1e-300)
        weights = weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps
        uniform = torch.full_like(weights, 1.0 / self.num_timesteps)
        warm = (self.loss_counts >= self.history).all()
        return torch.where(warm, weights, uniform).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t, losses = _all_gather(t), _all_gather(losses)
        self._to(t.device)
        order = torch.argsort(t, stable=True)
        ts, vals = t[order], losses[order].to(self.loss_history.dtype)
        idx = torch.arange(ts.numel(), device=ts.device)
        first = torch.ones_like(ts, dtype=torch.bool)
        first[1:] = ts[1:] != ts[:-1]
        occurrence = idx - torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=0).values
        slot = (self.loss_counts[ts] + occurrence) % self.history  # ring buffer: overwrite the oldest
        self.loss_history[ts, slot] = vals
        self.loss_counts.index_add_(0, ts, torch.ones_like(ts))

    def state_dict(self) -> dict[str, Any]:
        return {"loss_history": self.loss_history.cpu(), "loss_counts": self.loss_counts.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["loss_history"].shape != self.loss_history.shape:
            raise ValueError(
                f"timestep sampler state has shape {tuple(state['loss_history'].shape)}, expected "
                f"{tuple(self.loss_history.shape)} (T x history): the checkpoint was trained with another T"
            )
        self.loss_history = state["loss_history"].to(self.loss_history.device, torch.float64)
        self.loss_counts = state["loss_counts"].to(self.loss_counts.device, torch.long)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank (rank order)."""
    chunks = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, x.contiguous())
    return torch.cat(chunks)

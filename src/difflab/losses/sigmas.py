"""Training noise levels of a σ process (EDM's Table 1, "training" rows), behind the timestep-sampler interface."""

from __future__ import annotations

import torch

from difflab.losses.timesteps import TimestepSampler


class SigmaSampler(TimestepSampler):
    """Draws σ (B,) float32 from ``process.sample_sigma`` (:class:`~difflab.schedules.SigmaProcess`: log-normal for
    edm, log-uniform for ve, σ(t) with t ~ U(ε_t, 1) for vp/subvp, u_j for iddpm), weights 1. Built by
    :class:`~difflab.modules.EDMModule` from its process; nothing to configure beyond the process's keys."""

    def __init__(self, process) -> None:
        super().__init__(process.num_timesteps)
        self.process = process

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.process.sample_sigma(batch_size, device), torch.ones(batch_size, device=device)

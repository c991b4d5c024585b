"""EDMModule: a preconditioned denoiser D(x; σ) around any of our nets (Karras et al. 2022), the score-SDE family
(VP, sub-VP, VE/NCSN, iDDPM) as its preconditionings (:class:`~difflab.schedules.SigmaProcess`)."""

from __future__ import annotations

from typing import Any

import torch

from difflab.losses import SigmaSampler
from difflab.losses.vlb import mean_flat
from difflab.modules.diffusion import DiffusionModule
from difflab.schedules import SigmaProcess


class EDMModule(DiffusionModule):
    """``model=edm`` (and ``model=ncsn``): trains F in D(x̃; σ) = c_skip x̃ + c_out F(c_in x̃; c_noise) on
    E ||F − (x_0 − c_skip x̃)/c_out||² = E λ(σ) ||D − x_0||² (Karras et al. eq. 8 with λ = 1/c_out², Table 1), σ drawn
    by the preconditioning. Everything else (nets, classes and CFG, EMA, callbacks, checkpoints, ``sample()``) is
    the :class:`DiffusionModule`'s: ``model(x̃, σ, y)`` returns D = x̂_0 (``parameterization: x0``), and the σ-space
    solvers (heun, edm, euler, dpmpp_2m, …) sample it. The arguments are the DiffusionModule's; ``schedule`` must be a
    :class:`SigmaProcess` (``schedule=edm``), and ``timestep_sampler`` stays null (σ comes from the process).
    """

    preconditioned = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parameterization", "x0")
        if kwargs.get("timestep_sampler") is not None:
            raise ValueError(
                "model.timestep_sampler: an EDM-family model draws its training σ from model.schedule "
                "(preconditioning, P_mean, P_std, sigma_min/sigma_max): set model.timestep_sampler=null"
            )
        schedule = kwargs.get("schedule", args[1] if len(args) > 1 else None)
        if not isinstance(schedule, SigmaProcess):
            raise ValueError(
                f"model.schedule: {type(schedule).__name__} is not a σ process; model=edm needs "
                "schedule=edm (difflab.schedules.SigmaProcess, with its preconditioning)"
            )
        super().__init__(*args, **kwargs)
        self.timestep_sampler = SigmaSampler(self.diffusion)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """D(x̃; σ) (B, C, H, W) for σ (B,): the net F under the preconditioning."""
        condition = y if self.num_classes else None
        return self.diffusion.precondition(
            lambda x_in, c_noise: self.net(self.net_input(x_in), c_noise, condition), x, sigma
        )

    def diffusion_loss(
        self, x_start: torch.Tensor, y: torch.Tensor | None, sigma: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example ||F(c_in x̃; c_noise) − (x_0 − c_skip x̃)/c_out||² (B,) at x̃ = x_0 + σ ε."""
        x_noisy = self.diffusion.q_sample(x_start, sigma, noise)
        c = self.diffusion.scalings(self.diffusion.expand(sigma, x_noisy))
        out = self.net(self.net_input(c.c_in * x_noisy), c.c_noise.flatten(), y if self.num_classes else None)
        target = self.diffusion.training_target(x_start, x_noisy, sigma)
        mse = mean_flat((out.float() - target.float()) ** 2)
        return {"loss": mse, "mse": mse}

    def eval_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Validation σ (B,) from the training distribution, drawn from ``generator``."""
        return self.diffusion.sample_sigma(batch_size, device, generator)

    @torch.no_grad()
    def nll(self, x_start: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None):
        raise ValueError(
            "metrics=[nll]: the full-chain VLB is a discrete Gaussian diffusion's; an EDM-family model's likelihood "
            "is the probability-flow ODE's (metrics=[ode_nll])"
        )

    def reconstruction_sampler(self):
        raise ValueError(
            "reconstruction (DDIM encode-decode) needs a discrete Gaussian diffusion; this checkpoint is an "
            f"EDM-family model ({self.diffusion.preconditioning.value} preconditioning)"
        )

"""LCM's multistep sampler (Luo et al. 2023, Algorithm 3; diffusers' ``LCMScheduler``).

    x ← z;  for the n timesteps τ_1 > … > τ_n of :func:`lcm_timesteps` (from LCM's skipping-step grid):
        x̂ ← f(x, τ_i) = c_skip(τ_i) x + c_out(τ_i) x̂_0(x, τ_i)                         (the consistency function)
        x ← sqrt(ᾱ_{τ_{i+1}}) x̂ + sqrt(1 − ᾱ_{τ_{i+1}}) z_i   (fresh noise; the last step returns x̂ instead)
One network evaluation per step (NFE = steps); guidance is the network's own w input (latent consistency models), so
no CFG doubling. The scalings c_skip, c_out are LCM's discrete-time ones (:class:`LCMBoundary`), which
:class:`~difflab.modules.LatentConsistencyModule` trains with: a latent consistency model binds its own
``original_steps`` (T/k of its distillation grid), ``timestep_scaling`` and σ_d. On another DDPM-type model it is
a multistep x̂_0 sampler. x̂_0 is thresholded as the other samplers (``clip_denoised`` is diffusers'
``clip_sample``, off for latents; ``dynamic_threshold`` its ``thresholding``).
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import Sampler, SamplerOutput
from difflab.samplers.thresholding import dynamic_threshold
from difflab.schedules import NoiseLevel, x0_eps_from_output
from difflab.schedules.latent_consistency import LCMBoundary, lcm_timesteps


class LCMSampler(Sampler):
    """``sampler=lcm``. Extra arguments (the others as :class:`Sampler`; ``spacing`` is unused):

    original_steps: the grid the steps are taken from, T/k points (LCM's 50 for k = 20 of T = 1000); null: the
        model's distillation grid (a latent consistency model), else min(50, T).
    timestep_scaling: s of c_skip, c_out (diffusers: 10); null: the model's.
    sigma_data: σ_d of c_skip, c_out (0.5); null: the model's.
    steps: the number of steps n (default 4, the pipeline's), 1 <= n <= original_steps.
    """

    def __init__(
        self,
        *args,
        original_steps: int | None = None,
        timestep_scaling: float | None = None,
        sigma_data: float | None = None,
        **kwargs,
    ) -> None:
        if original_steps is not None and (isinstance(original_steps, bool) or original_steps < 1):
            raise ValueError(f"sampler.original_steps={original_steps!r}: expected >= 1 (null: the model's grid)")
        self.settings = {
            "original_steps": original_steps,
            "timestep_scaling": timestep_scaling,
            "sigma_data": sigma_data,
        }
        diffusion = kwargs.get("diffusion", args[0] if args else None)
        self.check_process_kind(diffusion)
        self.original_steps = original_steps or min(50, diffusion.num_timesteps)
        self.boundary = LCMBoundary(timestep_scaling or 10.0, sigma_data or 0.5)
        kwargs.setdefault("steps", 4)
        super().__init__(*args, **kwargs)

    def bind(self, original_steps: int, boundary: LCMBoundary) -> LCMSampler:
        """Sample on a latent consistency model's own grid and scalings (what the config leaves null)."""
        if self.settings["original_steps"] is None:
            self.original_steps = int(original_steps)
        self.boundary = LCMBoundary(
            self.settings["timestep_scaling"] or boundary.timestep_scaling,
            self.settings["sigma_data"] or boundary.sigma_data,
        )
        self.set_timesteps(self.num_steps)
        return self

    def set_timesteps(self, num_steps: int | None = None) -> None:
        num_steps = self.num_steps if num_steps is None else num_steps
        self.nfe = 0
        steps = lcm_timesteps(self.num_timesteps, self.original_steps, num_steps)
        self.timesteps = torch.tensor(steps, dtype=torch.long)
        self._t_host = steps
        self._eval = 0
        self._index = {t: i for i, t in enumerate(reversed(steps))}  # ascending positions, as Sampler.step_index
        self.levels = [self.level(t) for t in steps]

    def level(self, t: int) -> NoiseLevel:
        """α_t = sqrt(ᾱ_t), s_t = sqrt(1 − ᾱ_t), 1/α_t, σ_t as Python floats from the float64 ᾱ (CPU)."""
        ab = float(self.diffusion.alphas_cumprod_64[t])
        return NoiseLevel(
            alpha=math.sqrt(ab),
            std=math.sqrt(1.0 - ab),
            recip_alpha=1 / math.sqrt(ab),
            sigma=math.sqrt((1.0 - ab) / ab),
        )

    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError("LCMSampler overrides set_timesteps")

    def denoised(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, k: int) -> torch.Tensor:
        """f(x_t, t) (B, C, H, W): LCM's c_skip x_t + c_out x̂_0, x̂_0 thresholded as configured, in x_t's dtype
        (≥ float32; float64 stays float64)."""
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x_in = x_t.to(dtype)
        x0 = x0_eps_from_output(self.parameterization, model_output.to(dtype), x_in, self.levels[k])[0]
        if self.dynamic_threshold is not None:
            x0 = dynamic_threshold(x0, self.dynamic_threshold)
        elif self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        c_skip, c_out = self.boundary.scalings(t)
        return c_out * x0 + c_skip * x_in

    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        k = self._advance(t)
        x_hat = self.denoised(model_output, self._t_host[k], x_t, k)
        if k + 1 == len(self._t_host):
            return SamplerOutput(prev_sample=x_hat.to(x_t.dtype), pred_x0=x_hat)
        level = self.levels[k + 1]
        z = torch.randn(x_hat.shape, generator=generator, device=x_hat.device, dtype=torch.float32).to(x_hat.dtype)
        return SamplerOutput(prev_sample=(level.alpha * x_hat + level.std * z).to(x_t.dtype), pred_x0=x_hat)

    def _advance(self, t: int | torch.Tensor) -> int:
        """The position of ``t`` in the chain (it must be the next one)."""
        k = self._eval
        if k >= len(self._t_host):
            raise ValueError("this chain is finished: call set_timesteps before sampling again")
        if int(t) != self._t_host[k]:
            raise ValueError(f"step(t={int(t)}): expected t={self._t_host[k]}, step {k} of this chain")
        self._eval += 1
        return k

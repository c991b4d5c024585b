"""UpscalerModule: a super-resolution diffusion model for a cascade (SR3, Saharia et al. 2021; Imagen's
noise-conditioning augmentation, Saharia et al. 2022 §2.5).

The network sees x_t concatenated with the low-resolution image, upsampled (bilinear) to the output size and noised
to an augmentation level a: c_a = q_sample(up(x_low), a). Training draws a uniformly from [0, aug_levels) per image;
a reaches the network through its class-embedding path (a learned table added to the time embedding, the
``num_classes`` of the net factory, so UNet and DiT both take it). Level a is the model's own timestep a: a = 0 is
the (almost) clean low-res image; larger a teach the upscaler to ignore the artefacts of a base model's samples.
Everything else (schedule, parameterisation, losses, samplers) is :class:`DiffusionModule`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.modules.diffusion import DiffusionModule
from difflab.samplers import Sampler, sample_loop

LowResCondition = tuple[torch.Tensor, torch.Tensor]  # (c_a (B, C, H, W), a (B,) long)


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, size, size), antialiased bilinear (as the data modules resize)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) → (B, C, size, size), bilinear: SR3's conditioning input."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class UpscalerModule(DiffusionModule):
    """p(x_high | x_low): a DiffusionModule whose net takes 2C input channels and the augmentation level.

    Args (besides :class:`DiffusionModule`'s; ``image_shape`` is the high-resolution shape):
        low_res_size: side of the low-resolution input (the base model's image size), below the output size.
        aug_levels: number of augmentation levels a ∈ [0, aug_levels) drawn in training (timesteps of the schedule).
        sample_aug_level: the level a used when sampling (Imagen sweeps it; small values keep the input's detail).
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        image_shape: Sequence[int],
        low_res_size: int,
        aug_levels: int = 250,
        sample_aug_level: int = 50,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("num_classes"):
            raise ValueError("model.num_classes: the upscaler is conditioned on the low-res image only; set it to null")
        size = int(image_shape[-1])
        if not 1 <= low_res_size < size:
            raise ValueError(
                f"model.low_res_size={low_res_size}: expected a size in [1, {size}) (the output is {size})"
            )
        schedule = kwargs.get("schedule")
        if schedule is not None and not 1 <= aug_levels <= schedule.num_timesteps:
            raise ValueError(f"model.aug_levels={aug_levels}: expected 1 <= aug_levels <= T={schedule.num_timesteps}")

        def conditioned_net(**net_kwargs: Any) -> nn.Module:  # x_t ⊕ c_a, and a as the "class"
            return net(**{**net_kwargs, "in_channels": 2 * net_kwargs["in_channels"], "num_classes": aug_levels})

        super().__init__(net=conditioned_net, image_shape=image_shape, **kwargs)
        self.aug_levels, self.low_res_size = int(aug_levels), int(low_res_size)
        self.sample_aug_level = self.check_aug_level(sample_aug_level)
        self.reference: torch.Tensor | None = None  # high-res images whose low-res versions sample() upscales

    def check_aug_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.aug_levels:
            raise ValueError(f"aug_level={level!r}: expected an integer timestep in [0, {self.aug_levels})")
        return level

    def low_res_condition(
        self, x_low: torch.Tensor, aug_level: torch.Tensor | int | None = None, generator: torch.Generator | None = None
    ) -> LowResCondition:
        """(c_a, a) for low-res images x_low (B, C, h, w): a uniform in [0, aug_levels) when ``aug_level`` is None."""
        batch, size = x_low.shape[0], self.image_shape[-1]
        if aug_level is None:
            a = torch.randint(0, self.aug_levels, (batch,), generator=generator, device=x_low.device)
        else:
            a = torch.as_tensor(aug_level, device=x_low.device, dtype=torch.long).expand(batch)
        up = upsample(x_low.float(), size)
        noise = torch.randn(up.shape, generator=generator, device=up.device, dtype=up.dtype)
        return self.diffusion.q_sample(up, a, noise), a

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: LowResCondition | None) -> torch.Tensor:
        """The net on x_t ⊕ c_a with a through the embedding; ``y`` None (Gflops counting): a clean zero image."""
        if y is None:
            y = (torch.zeros_like(x_t), torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device))
        cond, level = y
        return self.net(self.net_input(torch.cat([x_t, cond.to(x_t.dtype)], dim=1)), t, level)

    def _remember(self, x: torch.Tensor) -> None:
        if self.reference is None:
            self.reference = x[:64].detach().clone()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        self._remember(x)
        return super().training_step((x, self.low_res_condition(downsample(x, self.low_res_size))), batch_idx)

    def _eval_loss(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        self._remember(x)
        generator = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        cond = self.low_res_condition(downsample(x, self.low_res_size), generator=generator)
        return super()._eval_loss((x, cond), batch_idx)

    def model_fn(self, y: LowResCondition | None, guidance_scale: float = 0.0) -> Callable[..., torch.Tensor]:
        return lambda x, t: self(x, t, y)

    @torch.no_grad()
    def upscale(
        self,
        x_low: torch.Tensor,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
        aug_level: int | None = None,
        num_steps: int | None = None,
    ) -> torch.Tensor:
        """Samples (B, C, H, W) in [-1, 1] of p(x_high | x_low) for low-res images x_low (B, C, h, w) in [-1, 1]."""
        if tuple(x_low.shape[1:]) != (self.image_shape[0], self.low_res_size, self.low_res_size):
            raise ValueError(
                f"upscaler: low-res input of shape {tuple(x_low.shape[1:])}, expected "
                f"{(self.image_shape[0], self.low_res_size, self.low_res_size)} (the base model's images)"
            )
        level = self.sample_aug_level if aug_level is None else self.check_aug_level(aug_level)
        sampler = sampler or self.sampler
        was_training = self.training
        self.eval()
        chunks = []
        for start in range(0, x_low.shape[0], self.sample_batch_size):
            low = x_low[start : start + self.sample_batch_size].to(self.device)
            cond = self.low_res_condition(low, level, generator)
            with self.sampling_precision():
                shape = (low.shape[0], *self.image_shape)
                chunks.append(sample_loop(self.model_fn(cond), sampler, shape, generator, self.device, num_steps))
        self.train(was_training)
        return torch.cat(chunks).clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample(
        self, num_samples: int, generator: torch.Generator | None = None, sampler: Sampler | None = None,
        num_steps: int | None = None, guidance_scale: float | None = None, **unused: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Upscales of the low-res versions of the first training batch's images (grids and train-end samples);
        an upscaler alone has nothing to upscale: ``sample.py mode=cascade`` runs it on a base model's samples.
        (``y``, ``progress`` of :meth:`DiffusionModule.sample` are accepted and unused.)"""
        if self.reference is None:
            raise ValueError(
                "this upscaler has no low-res images to upscale: run the cascade, "
                "python src/sample.py mode=cascade ckpt=<base checkpoint> upscaler_ckpt=<this checkpoint>"
            )
        if guidance_scale is not None:
            raise ValueError(f"guidance_scale={guidance_scale}: the upscaler is not class-conditional")
        index = torch.arange(num_samples) % self.reference.shape[0]
        low = downsample(self.reference[index].to(self.device), self.low_res_size)
        return self.upscale(low, generator, sampler, num_steps=num_steps)

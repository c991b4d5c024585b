"""DiffusionModule: DDPM training (and, through config, the later methods) on top of the shared core."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from difflab.losses import DiffusionLoss, TimestepSampler, UniformTimestepSampler, full_chain_bpd
from difflab.modules.likelihood import ode_nll_of
from difflab.modules.optim import check_optimizer, clip_gradients
from difflab.modules.step_logging import log_train_step
from difflab.modules.warm_start import load_net_weights
from difflab.samplers import AncestralSampler, DDIMSampler, Sampler, sample_loop
from difflab.samplers.classifier_guidance import ClassifierGuidance
from difflab.samplers.guidance import classifier_free_guidance
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType
from difflab.utils.enums import parse_enum
from difflab.utils.flops import gflops_per_forward
from difflab.utils.progress import SamplingProgress
from difflab.utils.speed import CompileMode, autocast_dtype, compile_in_place


class DiffusionModule(pl.LightningModule):
    """Trains f_θ(x_t, t) with L_simple (Ho et al. 2020, Algorithm 1) and samples with the configured sampler.

    Args:
        net: a factory (Hydra ``_partial_``) called as ``net(in_channels=, out_channels=, image_size=, num_classes=)``;
            output channels follow from ``variance_type`` (2C when learned).
        schedule: the :class:`GaussianDiffusion` process.
        sampler: a factory for the :class:`Sampler` used for sample grids and ``sample()``.
        optimizer: factory ``optimizer(params)``; lr_scheduler: optional factory ``lr_scheduler(optimizer)``,
            stepped every optimizer step.
        image_shape: (C, H, W) of the data (from the data config).
        num_classes: class count for a class-conditional net (the net adds a null class ``num_classes``), None for
            unconditional.
        p_uncond: probability of replacing a training label by the null class (classifier-free guidance; 0.1 in
            Ho & Salimans).
        guidance_scale: default w of ε̃ = (1 + w) ε(x, c) − w ε(x, ∅) when sampling (0: conditional sampling).
        parameterization: ``eps`` | ``x0`` | ``v``.  variance_type: see :class:`VarianceType`.
        loss: a :class:`DiffusionLoss` (simple | hybrid | vlb); default L_simple.
        timestep_sampler: factory ``timestep_sampler(num_timesteps)``; default uniform. Its state (the
            importance sampler's loss history) is saved in checkpoints under ``timestep_sampler``.
        sample_batch_size: batch size of ``sample()``.
        compile: ``none`` | ``default`` | ``reduce-overhead`` (CUDA graphs) | ``max-autotune``: ``torch.compile`` of
            the network, applied in ``configure_model`` (after Lightning's EMA has copied the eager module) and by
            ``load_module`` for sampling.
        channels_last: keep the network's weights and inputs in channels_last memory format (faster convolutions
            on tensor-core GPUs, especially under bf16).
        teacher_ckpt: reflow (``experiment=reflow``): the flow (or pixel-space diffusion, InstaFlow) checkpoint whose
            couplings the data module trains on; the network starts from its (EMA) weights, as Liu et al.'s
            k-rectified flows start from the (k−1)-th.
            ``load_module`` ignores it (a trained checkpoint carries its own weights).
        sample_precision: a trainer precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ...): the network runs under
            that autocast in ``sample()`` (grids, metrics, ``sample.py``); the sampler's arithmetic and the NLL stay
            fp32. The configs set it to ``${trainer.precision}``: sampling as the model was trained.
    """

    preconditioned = False  # EDMModule: the σ processes' preconditioned denoiser

    def __init__(
        self,
        net: Callable[..., nn.Module],
        schedule: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        image_shape: Sequence[int],
        sampler: Callable[..., Sampler] = AncestralSampler,
        lr_scheduler: Callable[..., Any] | None = None,
        num_classes: int | None = None,
        p_uncond: float = 0.0,
        guidance_scale: float = 0.0,
        parameterization: str | Parameterization = Parameterization.EPS,
        variance_type: str | VarianceType = VarianceType.FIXED_SMALL,
        loss: DiffusionLoss | None = None,
        timestep_sampler: Callable[[int], TimestepSampler] | None = None,
        sample_batch_size: int = 256,
        compile: str | CompileMode = CompileMode.NONE,
        channels_last: bool = False,
        sample_precision: str = "32-true",
        teacher_ckpt: str | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"model.image_shape={list(image_shape)}: expected [channels, height, width]")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.parameterization = parse_enum(Parameterization, parameterization, "model.parameterization")
        self.variance_type = parse_enum(VarianceType, variance_type, "model.variance_type")
        self.num_classes = num_classes
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"model.p_uncond={p_uncond}: expected a probability in [0, 1]")
        if p_uncond and not num_classes:
            raise ValueError("model.p_uncond > 0 needs a class-conditional model (model.num_classes)")
        if guidance_scale < 0:
            raise ValueError(f"model.guidance_scale={guidance_scale}: expected >= 0")
        self.p_uncond, self.guidance_scale = p_uncond, guidance_scale
        channels, height, _ = self.image_shape
        out_channels = channels * (2 if self.variance_type.learned else 1)
        self.net = net(in_channels=channels, out_channels=out_channels, image_size=height, num_classes=num_classes)
        if getattr(schedule, "process_kind", "gaussian") == "sigma" and not self.preconditioned:
            raise ValueError(
                f"model.schedule: {type(schedule).__name__} is a σ process (EDM and the score SDEs); it trains with "
                "model=edm (or model=ncsn), not this model"
            )
        self.diffusion = schedule
        self.loss_fn = loss if loss is not None else DiffusionLoss()
        self.loss_fn.check(self.variance_type)
        if hasattr(schedule, "check_model"):  # a process with its own limits (RectifiedFlow: v/x0, no VLB)
            schedule.check_model(self.parameterization, self.variance_type, self.loss_fn)
        self.timestep_sampler = (timestep_sampler or UniformTimestepSampler)(schedule.num_timesteps)
        self.sampler = self.build_sampler(sampler)
        check_optimizer(optimizer, "model.optimizer")
        self._optimizer, self._lr_scheduler = optimizer, lr_scheduler
        self.sample_batch_size = sample_batch_size
        self.compile_mode = parse_enum(CompileMode, compile, "model.compile")
        if not isinstance(channels_last, bool):
            raise ValueError(f"model.channels_last={channels_last!r}: expected true or false")
        self.channels_last = channels_last
        self.sample_dtype = autocast_dtype(sample_precision, "model.sample_precision")
        self._forward_dtype: torch.dtype | None = None  # set by sampling_precision()
        if teacher_ckpt:
            load_net_weights(self.net, teacher_ckpt, "model.teacher_ckpt")
        # sampling only (sample.py classifier_ckpt=...): a plain attribute, so the classifier is no submodule
        self.classifier_guidance: ClassifierGuidance | None = None
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def configure_model(self) -> None:
        """Shard the module under ``trainer=fsdp`` (:class:`difflab.strategies.FSDPStrategy`), then compile the
        network (both idempotent). Lightning calls this after the callbacks' ``setup``, so the copy that the EMA
        callback makes of the module is the eager one."""
        parallelize = getattr(self._trainer.strategy, "parallelize", None) if self._trainer is not None else None
        if parallelize is not None:
            parallelize(self)
        compile_in_place(self.net, self.compile_mode)

    def build_sampler(self, sampler: Callable[..., Sampler]) -> Sampler:
        """Complete a sampler factory with what only the model knows; a setting the sampler does not have is an
        error naming it and listing the ones it has (not a TypeError from its constructor)."""
        cls, given = getattr(sampler, "func", None), getattr(sampler, "keywords", {}) or {}
        if isinstance(cls, type) and issubclass(cls, Sampler):
            unknown = sorted(set(given) - cls.setting_names() - set(Sampler.MODEL_ARGUMENTS))
            if unknown:
                raise ValueError(
                    f"sampler.{unknown[0]}: {cls.__name__} has no such setting; its settings: "
                    f"{', '.join(sorted(cls.setting_names()))}"
                )
        return sampler(
            diffusion=self.diffusion,
            parameterization=self.parameterization,
            model_variance_type=self.variance_type,
        )

    # ------------------------------------------------------------------ training
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network output for x_t (B, C, H, W) at timesteps t (B,) (under ``sampling_precision()``: autocast)."""
        if self._forward_dtype is None:
            return self.denoise(x_t, t, y)
        with torch.autocast(x_t.device.type, dtype=self._forward_dtype):
            return self.denoise(x_t, t, y).float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The network call; subclasses change how the condition reaches the network."""
        return self.net(self.net_input(x_t), t, y if self.num_classes else None)

    @torch.no_grad()
    def gflops_per_forward(self) -> float:
        """Billions of multiply-adds of one network evaluation per image, DiT's "Gflops": the denoiser on x_t of the
        diffusion space (latents for latent diffusion, whose conditioner counts and frozen autoencoder does not),
        under the null condition. Counted in eval mode (no dropout draws from the RNG)."""
        x_t = torch.zeros(1, *self.image_shape, device=self.device)
        t = self.eval_timesteps(1, torch.Generator(device=self.device).manual_seed(0), self.device)
        was_training = self.training
        self.eval()
        try:
            return gflops_per_forward(self.denoise, x_t, t, None)
        finally:
            self.train(was_training)

    def net_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """x_t in the network's memory format (channels_last when ``model.channels_last``)."""
        return x_t.contiguous(memory_format=torch.channels_last) if self.channels_last else x_t

    def diffusion_loss(
        self, x_start: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example terms (B,) at x_t = q_sample(x_0, t, ε): ``loss`` and ``mse``/``vb`` (Algorithm 1)."""
        x_t = self.diffusion.q_sample(x_start, t, noise)
        return self.loss_fn(
            self.diffusion, self.parameterization, self.variance_type, self(x_t, t, y), x_start, x_t, noise, t
        )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """``batch``: (x, y), or (x, y, noise) for a fixed coupling (reflow's pairs, :mod:`difflab.data.pairs`)."""
        x, y, *coupling = batch
        y = self.training_condition(y)
        t, weights = self.timestep_sampler.sample(x.shape[0], x.device)
        terms = self.diffusion_loss(x, y, t, coupling[0] if coupling else torch.randn_like(x))
        self.timestep_sampler.update(t, terms["loss"].detach())
        loss = (terms["loss"] * weights).mean()
        log_train_step(self, "train/loss", loss, x.shape[0], bar="loss")
        for name in ("mse", "vb"):
            if name in terms and len(terms) > 2:
                log_train_step(self, f"train/{name}", terms[name].mean(), x.shape[0])
        return loss

    def training_condition(self, y: torch.Tensor) -> torch.Tensor:
        """Labels seen by the net in training: dropped to the null class w.p. p_uncond (classifier-free guidance)."""
        if self.num_classes and self.p_uncond:
            drop = torch.rand(y.shape, device=y.device) < self.p_uncond
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def _eval_loss(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """L_simple with t and ε drawn from a generator seeded by the batch index, so curves are comparable."""
        x, y, *coupling = batch
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        t = self.eval_timesteps(x.shape[0], generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.diffusion_loss(x, y, t, coupling[0] if coupling else noise)["loss"].mean()

    def eval_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The timesteps (B,) of the validation/test loss, drawn from ``generator``: uniform over [0, T)."""
        return torch.randint(0, self.diffusion.num_timesteps, (batch_size,), generator=generator, device=device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._eval_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._eval_loss(batch, batch_idx)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch[0].shape[0])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "timestep_sampler" in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer([p for p in self.parameters() if p.requires_grad])  # frozen parts stay out
        if self._lr_scheduler is None:
            return optimizer
        scheduler = self._lr_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # fused optimizers too

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nll(self, x_start: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Full-chain VLB of x_start (B, C, H, W) in bits/dim (see :func:`difflab.losses.full_chain_bpd`)."""
        return full_chain_bpd(
            lambda x, t: self(x, t, y), self.diffusion, self.parameterization, self.variance_type, x_start, generator
        )

    def ode_nll(
        self, x_start: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None, **kwargs
    ) -> tuple[torch.Tensor, int]:
        """(bits/dim (B,), NFE) of 8-bit images x_start from the probability-flow ODE (``kwargs``: rtol, atol,
        estimator; see :func:`difflab.losses.ode_bits_per_dim`): diffusion, EDM-family and flow models alike."""
        return ode_nll_of(self, lambda x, t: self(x, t, y), x_start, generator, **kwargs)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
        num_steps: int | None = None,
        y: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        progress: bool | SamplingProgress = False,
        prompts: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Generate (num_samples, C, H, W) images in [-1, 1], in batches of ``sample_batch_size``.

        ``generator`` (on ``self.device``) makes the result reproducible. For a class-conditional model ``y``
        (num_samples,) gives the labels (default: all classes in turn) and ``guidance_scale`` the CFG weight w
        (default: the model's); an unconditional model refuses a ``guidance_scale`` (it would be ignored).
        ``progress``: a bar over steps × batches with NFE and images/s (TTY only); a ``SamplingProgress`` continues
        that bar (several calls, one bar), and is left open. Text ``prompts`` need a text-conditioned latent model
        (:meth:`text_condition`): here they are refused.
        """
        if prompts is not None:
            y = self.text_condition(prompts)
        if guidance_scale is not None and not self.conditional:
            raise ValueError(
                f"guidance_scale={guidance_scale}: this checkpoint's model is unconditional (it has no classes), so "
                "there is nothing to guide towards; classifier-free guidance needs a class-conditional model "
                "(python src/train.py experiment=cfg) or a conditioned latent diffusion model"
            )
        sampler = sampler or self.sampler
        num_classes = self.num_classes or (self.classifier_guidance and self.classifier_guidance.num_classes)
        if num_classes and y is None:
            y = torch.arange(num_samples) % num_classes
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        was_training = self.training
        self.eval()
        sampler.set_timesteps(num_steps)
        batches = range(0, num_samples, self.sample_batch_size)
        own_bar = not isinstance(progress, SamplingProgress)
        bar = (
            SamplingProgress(len(batches), len(sampler.timesteps), sampler.num_evaluations(num_steps), progress)
            if own_bar
            else progress
        )
        chunks = []
        for start in batches:
            n = min(self.sample_batch_size, num_samples - start)
            labels = None if y is None else y[start : start + n].to(self.device)
            model_fn = self.model_fn(labels, w)
            shape = (n, *self.image_shape)
            with self.sampling_precision():
                x_0 = sample_loop(model_fn, sampler, shape, generator, self.device, num_steps, on_step=bar.update)
            chunks.append(self.to_images(x_0))
            bar.batch_done(n)
        if own_bar:
            bar.close()
        self.train(was_training)
        return torch.cat(chunks).clamp(-1.0, 1.0)

    def text_condition(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text prompts → the condition ``model_fn`` takes (latent diffusion with a text conditioner); every other
        model refuses them, with the key to change."""
        raise ValueError("prompt=...: this checkpoint's conditioner does not take text (conditioner=text_*)")

    def condition(self, y: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Data labels → what ``model_fn`` takes as condition (the labels here; latent diffusion's conditioner)."""
        return y

    @property
    def conditional(self) -> bool:
        """Whether the network takes a condition (classes here; latent diffusion: a conditioner)."""
        return bool(self.num_classes)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images ``sample()`` returns: the diffusion space here (latent diffusion decodes)."""
        return self.image_shape

    def to_images(self, x_0: torch.Tensor) -> torch.Tensor:
        """Map samples of the diffusion space to images (identity here; latent diffusion decodes)."""
        return x_0

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] → the diffusion space, the inverse of ``to_images`` (identity here; latent
        diffusion encodes): where inpainting and img2img start from."""
        return images

    def reconstruction_sampler(self) -> DDIMSampler:
        """The default sampler of :meth:`reconstruct`: 50 DDIM steps (T if fewer), η = 0, no clipping."""
        steps = min(50, self.diffusion.num_timesteps)
        return self.build_sampler(functools.partial(DDIMSampler, eta=0.0, steps=steps, clip_denoised=False))

    @torch.no_grad()
    def reconstruct(
        self, x_start: torch.Tensor, y: torch.Tensor | None = None, sampler: DDIMSampler | None = None
    ) -> torch.Tensor:
        """DDIM encode-decode (η = 0, no clipping) of x_start (B, C, H, W): what ReconstructionMetricsCallback and
        ``sample.py mode=reconstruct`` measure. Default: 50 DDIM steps on the model's schedule."""
        sampler = sampler or self.reconstruction_sampler()
        model_fn = self.model_fn(y if self.num_classes else None, 0.0)
        x_T = sampler.encode(model_fn, x_start)
        return sample_loop(model_fn, sampler, x_start.shape, noise=x_T).clamp(-1, 1)

    @contextlib.contextmanager
    def sampling_precision(self) -> Iterator[None]:
        """Inside, ``forward`` runs the network under the autocast of ``sample_precision`` and returns fp32: the
        network only, so the sampler's and the guidance's arithmetic stay fp32."""
        previous, self._forward_dtype = self._forward_dtype, self.sample_dtype
        try:
            yield
        finally:
            self._forward_dtype = previous

    def model_fn(self, y: torch.Tensor | None, guidance_scale: float = 0.0) -> Callable[..., torch.Tensor]:
        """``fn(x_t, t)`` for samplers: the network with labels ``y`` bound, guided when w > 0; with
        ``classifier_guidance`` set, that output's ε̂ is then guided by the classifier's gradient towards ``y``."""
        if not self.num_classes or y is None:
            fn = lambda x, t: self(x, t, None)  # noqa: E731
        else:
            fn = classifier_free_guidance(self.forward, y, self.num_classes, guidance_scale, self.image_shape[0])
        if self.classifier_guidance is None:
            return fn
        return self.classifier_guidance.wrap(fn, y, self.diffusion, self.parameterization, self.image_shape[0])

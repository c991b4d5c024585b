"""LatentDiffusionModule: the platform's diffusion in the latent space of a frozen stage-1 autoencoder
(Rombach et al. 2022; survey §5.4, Definition 5.14, Method 5.16), conditioned through cross-attention.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset

from difflab.data.latent_cache import LatentDataset
from difflab.modules.autoencoder import LoadedCheckpoint, load_autoencoder
from difflab.modules.diffusion import DiffusionModule
from difflab.networks.conditioners import Conditioner
from difflab.samplers.guidance import classifier_free_guidance
from difflab.utils.hashing import state_dict_sha256


class LatentCache(Dataset):
    """A training set as encoder outputs, computed once: items are (moments (C', h, w) float32, y). ``source`` is
    the image dataset it was encoded from (what FID's real statistics read, see GenerativeMetricsCallback)."""

    def __init__(self, moments: torch.Tensor, labels: torch.Tensor, source: Dataset | None = None) -> None:
        self.moments, self.labels, self.source = moments, labels, source

    @classmethod
    @torch.no_grad()
    def encode(cls, autoencoder: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256):
        """Encode every (x, y) of ``dataset`` on ``device`` (the autoencoder goes back to where it was)."""
        home = next(autoencoder.parameters()).device
        autoencoder.to(device)
        moments, labels = [], []
        for x, y in DataLoader(dataset, batch_size=batch_size):
            moments.append(autoencoder.encode_moments(x.to(device)).float().cpu())
            labels.append(y)
        autoencoder.to(home)
        rank_zero_info(f"cache_latents: encoded {len(dataset)} training images once")
        return cls(torch.cat(moments), torch.cat(labels), source=dataset)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moments[index], self.labels[index]


class LatentDiffusionModule(DiffusionModule):
    """Diffusion on z = scale_factor · E(x); samples are D(z / scale_factor).

    Args (besides :class:`DiffusionModule`'s, which all apply in latent space):
        autoencoder_ckpt: a stage-1 checkpoint (``src/train.py model=autoencoder``) or ``shipped:NAME``; frozen.
        image_shape: (C, H, W) of the *images*; the diffusion works on the autoencoder's latent shape.
        scale_factor: fixed latent scale (used when ``scale_by_std`` is false).
        scale_by_std: set scale_factor = 1 / std of the first training batch's latents (over all DDP ranks), once;
            it is stored in checkpoints (``latent_scale_factor``) and restored on resume and by ``load_module``.
        conditioner: a :class:`Conditioner` (class / text); None for an unconditional LDM. Its ``context_dim`` is
            passed to the net, which cross-attends to the context.
        p_uncond: probability of replacing the condition by the null condition in training (classifier-free
            guidance; the null class or the empty caption).
        sample_posterior: encode training images with a posterior sample (kl) instead of its mean.
        cache_latents: encode the training set once at fit start and train from those encoder outputs (posterior
            moments for kl, so samples stay fresh; z_e for vq) instead of encoding every batch. Data augmentation
            (random flips) is then frozen into the cache; validation still encodes on the fly.

    Batches are images (B, C, H, W), or encoder outputs (B, C', h, w) from a latent cache (``data=latents``,
    :class:`difflab.data.LatentDataModule`, or ``cache_latents``), told apart by their shape; the on-disk cache is
    refused unless it was encoded by this very autoencoder (:meth:`check_latent_cache`).
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        autoencoder_ckpt: str | LoadedCheckpoint | None,
        image_shape: Sequence[int],
        conditioner: Conditioner | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = True,
        p_uncond: float = 0.1,
        sample_posterior: bool = True,
        cache_latents: bool = False,
        **kwargs: Any,
    ) -> None:
        autoencoder, autoencoder_config = load_autoencoder(autoencoder_ckpt)
        pixel_shape = tuple(int(s) for s in image_shape)
        if pixel_shape != (autoencoder.in_channels, autoencoder.image_size, autoencoder.image_size):
            raise ValueError(
                f"model.autoencoder_ckpt={autoencoder_ckpt!r} was trained on images of shape "
                f"{(autoencoder.in_channels, autoencoder.image_size, autoencoder.image_size)}, but the data gives "
                f"{pixel_shape}: train a stage-1 model on this data (python src/train.py model=autoencoder data=...)"
            )
        if scale_factor <= 0:
            raise ValueError(f"model.scale_factor={scale_factor}: expected > 0")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"model.p_uncond={p_uncond}: expected a probability in [0, 1]")
        if conditioner is not None:
            net = functools.partial(net, context_dim=conditioner.context_dim)
        super().__init__(net=net, image_shape=autoencoder.latent_shape, **kwargs)
        self.autoencoder = autoencoder
        self.autoencoder_config = autoencoder_config  # saved in checkpoints: they carry their stage 1 whole
        self.autoencoder_source = str(autoencoder_ckpt)  # what error messages name
        self.conditioner = conditioner
        self.pixel_shape = pixel_shape
        self.p_uncond = p_uncond if conditioner is not None else 0.0
        self.num_classes = conditioner.num_classes if conditioner is not None else None
        # A plain attribute, not a buffer: the EMA callback swaps and copies every buffer of the module with its
        # averaged copy, which would restore the value from before scale_by_std set it.
        self.scale_factor = float(scale_factor)
        self.scale_by_std, self.scale_set = scale_by_std, not scale_by_std
        self.sample_posterior, self.cache_latents = sample_posterior, cache_latents

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # frozen stage 1: dropout/normalisation always in inference mode
        return self

    # ------------------------------------------------------------------ latents
    @torch.no_grad()
    def encode(self, x: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] — or, with ``cached``, their cached encoder outputs — → scaled latents
        (B, embed_dim, H/f, W/f)."""
        moments = x if cached else self.autoencoder.encode_moments(x)
        sample = self.sample_posterior and self.training
        return self.scale_factor * self.autoencoder.latent_from_moments(moments, sample).float()

    @property
    def moments_shape(self) -> tuple[int, int, int]:
        """Shape of one encoder output (:meth:`Autoencoder.encode_moments`): kl (2·embed_dim, h, w) = [μ, log σ²];
        vq (embed_dim, h, w) = z_e."""
        channels, h, w = self.autoencoder.latent_shape
        return (2 * channels if self.autoencoder.quantizer is None else channels, h, w)

    def cached(self, x: torch.Tensor) -> bool:
        """Whether a batch holds encoder outputs (a latent cache's) rather than images; an error for neither."""
        shape = tuple(x.shape[1:])
        if shape == self.pixel_shape:
            return False
        if shape == self.moments_shape:
            return True
        raise ValueError(
            f"a batch of shape {tuple(x.shape)}: expected images (B, *{self.pixel_shape}) or the encoder outputs of "
            f"model.autoencoder_ckpt={self.autoencoder_source!r} (B, *{self.moments_shape})"
        )

    def check_latent_cache(self, cache_dir: Any, manifest: dict[str, Any]) -> None:
        """Refuse a latent cache (``data=latents``) that another autoencoder encoded (its weights hash differs from
        this model's stage 1), or whose encoder outputs have another shape than this autoencoder's."""
        recorded, ours = manifest["autoencoder"], state_dict_sha256(self.autoencoder)
        if recorded["sha256"] != ours:
            raise ValueError(
                f"data.cache_dir={str(cache_dir)!r} was encoded by another autoencoder: the cache's (autoencoder_ckpt="
                f"{recorded['ckpt']!r}) has weights sha256 {recorded['sha256']}, this model's (model.autoencoder_ckpt="
                f"{self.autoencoder_source!r}) has {ours}. Encode the data with the model's autoencoder (python "
                "src/encode.py autoencoder_ckpt=<model.autoencoder_ckpt> data=... out_dir=<a new folder>) or train "
                f"with model.autoencoder_ckpt={recorded['ckpt']}"
            )
        shape = tuple(int(s) for s in manifest["moments"]["shape"])
        if shape != self.moments_shape:
            raise ValueError(
                f"data.cache_dir={str(cache_dir)!r} holds encoder outputs of shape {shape}, the model's autoencoder "
                f"gives {self.moments_shape}: encode the data again (python src/encode.py ... out_dir=<a new folder>)"
            )

    def setup(self, stage: str) -> None:
        """With ``cache_latents``, replace the data module's training set by its encoder outputs (once; not when
        the data module gives latents already, ``data=latents``)."""
        if stage != "fit" or not self.cache_latents or self._trainer is None:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train"):
            raise ValueError("model.cache_latents=true needs a difflab data module (with a `train` dataset)")
        datamodule.setup("fit")
        if not isinstance(datamodule.train, (LatentCache, LatentDataset)):
            datamodule.train = LatentCache.encode(self.autoencoder, datamodule.train, self.trainer.strategy.root_device)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.pixel_shape

    @torch.no_grad()
    def to_images(self, x_0: torch.Tensor) -> torch.Tensor:
        """Latents from the sampler → images D(z / scale_factor) in [-1, 1]."""
        return self.autoencoder.decode(x_0 / self.scale_factor).clamp(-1, 1)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images → scaled latents (the posterior mean outside training)."""
        return self.encode(images)

    @torch.no_grad()
    def _set_scale(self, x: torch.Tensor, cached: bool = False) -> None:
        """scale_by_std: 1 / std of the first batch's latents, the variance averaged over DDP ranks."""
        moments = x if cached else self.autoencoder.encode_moments(x)
        z = self.autoencoder.latent_from_moments(moments, sample=self.sample_posterior).float()
        var = z.var()
        if self._trainer is not None:
            var = self.trainer.strategy.reduce(var, reduce_op="mean")
        self.scale_factor = float(1.0 / var.sqrt())
        self.scale_set = True
        rank_zero_info(f"scale_by_std: latent std {float(var.sqrt()):.4f} → scale_factor {self.scale_factor:.4f}")

    # ------------------------------------------------------------------ conditioning
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Network output for latents x_t (B, C, h, w) under condition ``y`` (see :class:`Conditioner`)."""
        x_t = self.net_input(x_t)
        if self.conditioner is None:
            return self.net(x_t, t)
        if y is None:  # an unconditional call of a conditional model: the null condition
            y = self.conditioner.null(x_t.shape[0], x_t.device)
        context, mask = self.conditioner(y)
        return self.net(x_t, t, context=context, context_mask=mask)

    @property
    def conditional(self) -> bool:
        return self.conditioner is not None

    def condition(self, y: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Data labels y (B,) → the conditioner's condition (captions from templates for text conditioners)."""
        if self.conditioner is None or y is None:
            return None
        return self.conditioner.from_labels(y, generator)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        cached = self.cached(x)
        if not self.scale_set:
            self._set_scale(x, cached)
        return super().training_step((self.encode(x, cached), y), batch_idx)

    def training_condition(self, y: torch.Tensor) -> torch.Tensor | None:
        """Labels → conditions (a random caption template per image for text), then the null condition w.p.
        p_uncond (classifier-free guidance)."""
        generator = torch.Generator().manual_seed(int(self.global_step) * 1000 + self.global_rank)
        cond = self.condition(y, generator)
        if cond is not None and self.p_uncond:
            cond = self.conditioner.drop(cond, torch.rand(y.shape, device=y.device) < self.p_uncond)
        return cond

    def _eval_loss(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return super()._eval_loss((self.encode(x, self.cached(x)), self.condition(y)), batch_idx)

    def nll(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("bits/dim of images is not defined for latent diffusion (the VLB is of latents)")

    def ode_nll(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, int]:
        raise ValueError(
            "metrics=[ode_nll]: the probability-flow ODE gives the density of latents; bits/dim of images would "
            "need the decoder's likelihood, which model.autoencoder_ckpt's autoencoder does not have"
        )

    def reconstruct(self, x_start: torch.Tensor, y: torch.Tensor | None = None, sampler: Any = None) -> torch.Tensor:
        """DDIM encode-decode in latent space of images x_start, decoded back to images."""
        z = super().reconstruct(self.encode(x_start), self.condition(y), sampler)
        return self.to_images(z)

    def model_fn(self, y: torch.Tensor | None, guidance_scale: float = 0.0) -> Callable[..., torch.Tensor]:
        """``fn(x_t, t)`` with condition ``y`` bound (already a condition tensor), guided when w > 0."""
        if self.conditioner is None or y is None:
            return lambda x, t: self(x, t, None)
        null = self.conditioner.null(y.shape[0], y.device)
        return classifier_free_guidance(self.forward, y, null, guidance_scale, self.image_shape[0])

    def text_condition(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.conditioner is None or not self.conditioner.accepts_prompts:
            return super().text_condition(prompts)  # the refusal
        return self.conditioner.from_prompts(list(prompts)).to(self.device)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        sampler: Any = None,
        num_steps: int | None = None,
        y: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        prompts: Sequence[str] | None = None,
        progress: Any = False,
    ) -> torch.Tensor:
        """Images (num_samples, C, H, W): labels ``y`` (default: all classes in turn; captions from the first
        template) or text ``prompts`` (text conditioners), guided with w = ``guidance_scale``."""
        cond = None
        if prompts is not None:
            cond = self.text_condition(prompts)
        elif self.conditioner is not None:
            labels = torch.arange(num_samples) % self.num_classes if y is None else y
            cond = self.conditioner.from_labels(labels.to(self.device))
        return super().sample(num_samples, generator, sampler, num_steps, cond, guidance_scale, progress)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["latent_scale_factor"] = self.scale_factor if self.scale_set else None
        # The stage-1 weights are in state_dict ("autoencoder.*"); with its config beside them the checkpoint
        # loads without the file model.autoencoder_ckpt named at training time (see load_module).
        checkpoint["autoencoder_config"] = self.autoencoder_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("latent_scale_factor") is not None:
            self.scale_factor, self.scale_set = float(checkpoint["latent_scale_factor"]), True

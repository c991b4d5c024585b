"""AutoencoderModule: stage 1 of latent diffusion (Rombach et al. 2022), with a PatchGAN trained alongside.

Two optimizers through Lightning's manual optimization: each batch takes one autoencoder step (reconstruction +
perceptual + KL/VQ + adaptive-weighted GAN term) and, once ``loss.disc_start`` batches have passed, one
discriminator step (hinge loss). Validation logs the same terms; SSIM/PSNR/LPIPS and reconstruction grids come
from :class:`difflab.callbacks.ReconstructionMetricsCallback` through :meth:`reconstruct`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from difflab.losses.autoencoder import AutoencoderLoss
from difflab.modules.optim import check_optimizer, clip_gradients
from difflab.modules.step_logging import log_train_step
from difflab.networks.autoencoder import Autoencoder
from difflab.networks.regularizers import Regularizer
from difflab.utils.checkpoint_io import load_checkpoint
from difflab.utils.stored_config import check_stored_config


class AutoencoderModule(pl.LightningModule):
    """Args:
    net: factory ``net(in_channels=, image_size=)`` of an :class:`Autoencoder` (kl or vq).
    discriminator: factory ``discriminator(in_channels=)`` of a :class:`PatchDiscriminator`.
    loss: the :class:`AutoencoderLoss`. optimizer / disc_optimizer: factories ``optimizer(params)``.
    image_shape: (C, H, W) of the data.
    gradient_clip_val: clip each optimizer's gradients to this norm (manual optimization: the module clips, and
        ``src/train.py`` drops ``trainer.gradient_clip_val``); None: no clipping.
    """

    # Under DDP (train.py reads this): the discriminator is idle before disc_start and the discriminator step leaves
    # the autoencoder out, so DDP must look for unused parameters (a graph traversal per backward pass).
    ddp_find_unused_parameters = True

    def __init__(
        self,
        net: Callable[..., Autoencoder],
        discriminator: Callable[..., nn.Module],
        loss: AutoencoderLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        disc_optimizer: Callable[..., torch.optim.Optimizer],
        image_shape: Sequence[int],
        gradient_clip_val: float | None = 1.0,
        lr_scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"model.image_shape={list(image_shape)}: expected [channels, height, width]")
        self.automatic_optimization = False
        self.image_shape = tuple(int(s) for s in image_shape)
        self.autoencoder = net(in_channels=self.image_shape[0], image_size=self.image_shape[1])
        self.discriminator = discriminator(in_channels=self.image_shape[0])
        self.loss_fn = loss
        check_optimizer(optimizer, "model.optimizer")
        check_optimizer(disc_optimizer, "model.disc_optimizer")
        self._optimizer, self._disc_optimizer = optimizer, disc_optimizer
        self._lr_scheduler = lr_scheduler  # per optimizer, stepped with it (manual optimization)
        self.gradient_clip_val = gradient_clip_val
        self.batches_seen = 0  # GAN schedule clock: Lightning's global_step counts both optimizers' steps

    @property
    def kl(self) -> bool:
        return self.autoencoder.regularizer is Regularizer.KL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x (B, C, H, W) through the posterior mean (kl) or the codebook (vq)."""
        return self.autoencoder(x, sample_posterior=False)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction in [-1, 1] (for ReconstructionMetricsCallback)."""
        return self(x).clamp(-1, 1)

    def _log_terms(self, prefix: str, logs: dict[str, torch.Tensor], **kwargs: Any) -> None:
        for name, value in logs.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("loss", "rec"), **kwargs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        opt_ae, opt_disc = self.optimizers()
        gan = self.loss_fn.gan_active(self.batches_seen)
        sched_ae, sched_disc = self.lr_schedulers() if self._lr_scheduler is not None else (None, None)
        x_hat, reg_loss, info = self.autoencoder(x)
        logits_fake = self.discriminator(x_hat) if gan else None
        loss, logs = self.loss_fn.generator_loss(
            x, x_hat, reg_loss, logits_fake, self.autoencoder.last_layer, self.batches_seen, self.kl
        )
        self._step(opt_ae, loss, sched_ae)
        if gan:  # discriminator step on detached reconstructions
            d_loss = self.loss_fn.discriminator_loss(self.discriminator(x), self.discriminator(x_hat.detach()))
            self._step(opt_disc, d_loss, sched_disc)
            logs["d_loss"] = d_loss.detach()
        for key in ("perplexity", "usage"):
            if key in info:
                logs[f"codebook_{key}"] = info[key].detach()
        self.batches_seen += 1
        for name, value in logs.items():
            log_train_step(self, f"train/{name}", value, x.shape[0], bar=name if name in ("loss", "rec") else None)
        return loss.detach()

    def _step(self, optimizer: Any, loss: torch.Tensor, scheduler: Any = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val:
            clip_gradients(self, optimizer, self.gradient_clip_val, "norm")  # fused optimizers too
        optimizer.step()
        if scheduler is not None:  # the discriminator's warms up over its own steps (from disc_start)
            scheduler.step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, _ = batch
        x_hat, reg_loss, info = self.autoencoder(x, sample_posterior=False)
        _, logs = self.loss_fn.generator_loss(x, x_hat, reg_loss, None, self.autoencoder.last_layer, 0, self.kl)
        logs.update({f"codebook_{k}": v for k, v in info.items() if k in ("perplexity", "usage")})
        self._log_terms("val", logs, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["batches_seen"] = self.batches_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batches_seen = int(checkpoint.get("batches_seen", 0))

    def configure_optimizers(self) -> Any:
        optimizers = [
            self._optimizer(self.autoencoder.parameters()),
            self._disc_optimizer(self.discriminator.parameters()),
        ]
        if self._lr_scheduler is None:
            return tuple(optimizers)
        return optimizers, [self._lr_scheduler(optimizer) for optimizer in optimizers]


SHIPPED_DIR = Path(__file__).resolve().parents[1] / "weights"
SHIPPED_PREFIX = "shipped:"
STAGE1_COMMAND = "python src/train.py experiment=autoencoder_kl_f4"


def resolve_autoencoder_path(path: str | Path | None) -> Path:
    """``shipped:NAME`` → the checkpoint shipped in ``difflab/weights/NAME.pt``; anything else is a path."""
    if path is None or str(path) in ("", "None", "null"):
        raise FileNotFoundError(
            "model.autoencoder_ckpt is not set: latent diffusion needs a trained stage-1 autoencoder. Train one with "
            f"`{STAGE1_COMMAND}` (or `make ldm` for both stages) and pass model.autoencoder_ckpt=<its last.ckpt>, "
            "or use the shipped one: model.autoencoder_ckpt=shipped:ae_kl_f4_fmnist"
        )
    text = str(path)
    if text.startswith(SHIPPED_PREFIX):
        resolved = SHIPPED_DIR / f"{text[len(SHIPPED_PREFIX) :]}.pt"
        if not resolved.is_file():
            shipped = sorted(p.stem for p in SHIPPED_DIR.glob("*.pt"))
            raise FileNotFoundError(f"model.autoencoder_ckpt={text!r}: no shipped checkpoint; shipped: {shipped}")
        return resolved
    resolved = Path(text).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(
            f"model.autoencoder_ckpt={text!r}: no such file. Train stage 1 with `{STAGE1_COMMAND}` "
            "and pass the path of its checkpoint"
        )
    return resolved


class LoadedCheckpoint:
    """A checkpoint already in memory and the path it came from: how ``load_module`` hands a latent diffusion
    checkpoint (which carries its stage 1) to :func:`load_autoencoder` without reading the file a second time.

    A plain class on purpose: ``hydra.utils.instantiate`` passes such objects through untouched, while a dataclass
    would be taken for a structured config and converted."""

    def __init__(self, path: str, content: dict[str, Any]) -> None:
        self.path, self.content = path, content

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:  # error messages name the file, never dump the tensors
        return repr(self.path)


def load_autoencoder(path: str | Path | LoadedCheckpoint | None) -> tuple[Autoencoder, dict[str, Any]]:
    """A frozen :class:`Autoencoder` (eval mode, no gradients) from a stage-1 checkpoint and its run config.

    Reads checkpoints written by ``src/train.py model=autoencoder`` (the EMA weights when EMA was on), the slim
    ones of :func:`export_autoencoder`, and latent diffusion checkpoints, which carry their frozen stage 1 (weights
    under the same ``autoencoder.`` prefix, its run config under ``autoencoder_config``).
    """
    from hydra.utils import instantiate

    if isinstance(path, LoadedCheckpoint):
        checkpoint = path.content
    else:
        checkpoint = load_checkpoint(resolve_autoencoder_path(path), "model.autoencoder_ckpt")
    config: dict[str, Any] = {}
    section = "difflab.config.model"
    if isinstance(checkpoint, dict):
        config = checkpoint.get("autoencoder_config") or (checkpoint.get("difflab") or {}).get("config", {})
        section = "autoencoder_config.model" if checkpoint.get("autoencoder_config") else section
    model_cfg = config.get("model", {})
    check_stored_config(model_cfg, f"model.autoencoder_ckpt={str(path)!r}", section)
    if model_cfg.get("_target_", "").rsplit(".", 1)[-1] != "AutoencoderModule":
        raise ValueError(
            f"model.autoencoder_ckpt={str(path)!r}: not a stage-1 checkpoint (its model is "
            f"{model_cfg.get('_target_')!r}, expected difflab.modules.AutoencoderModule; train one with "
            f"`{STAGE1_COMMAND}`)"
        )
    channels, size = int(model_cfg["image_shape"][0]), int(model_cfg["image_shape"][1])
    net = instantiate(model_cfg["net"])(in_channels=channels, image_size=size)
    prefix = "autoencoder."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), config


def export_autoencoder(path: str | Path, out: str | Path) -> Path:
    """Write a slim copy of a stage-1 checkpoint (autoencoder weights and run config; no discriminator, no optimizer
    state): what ``difflab/weights/`` ships."""
    checkpoint = load_checkpoint(path)
    state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("autoencoder.")}
    slim = {"state_dict": state, "difflab": checkpoint["difflab"], "global_step": checkpoint.get("global_step", 0)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, out)
    return out

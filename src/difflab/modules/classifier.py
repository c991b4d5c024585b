"""ClassifierModule: trains the small CNN whose features and logits serve as offline FID/KID/IS networks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from difflab.modules.optim import check_optimizer
from difflab.modules.step_logging import log_train_step


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``net(in_channels=, num_classes=, image_size=)``; logs loss and accuracy."""

    def __init__(
        self,
        net: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        image_shape: Sequence[int],
        num_classes: int,
        lr_scheduler: Callable[..., Any] | None = None,
        augment_shift: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(augment_shift, int) or augment_shift < 0:
            raise ValueError(f"model.augment_shift={augment_shift!r}: expected an int >= 0 (pixels)")
        self.augment_shift = augment_shift
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = num_classes
        self.net = net(in_channels=self.image_shape[0], num_classes=num_classes, image_size=self.image_shape[1])
        check_optimizer(optimizer, "model.optimizer")
        self._optimizer, self._lr_scheduler = optimizer, lr_scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def batch_logits(self, x: torch.Tensor, stage: str, batch_idx: int) -> torch.Tensor:
        """Logits (B, num_classes) of a data batch x (B, C, H, W); the noisy classifier noises x first."""
        return self(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.batch_logits(x, stage, batch_idx)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        for name, value in (("loss", loss), ("acc", accuracy)):
            if stage == "train":
                log_train_step(self, f"train/{name}", value, x.shape[0], bar=name)
            else:
                self.log(f"{stage}/{name}", value, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """Random translation of each image by up to ``augment_shift`` pixels (B, C, H, W), the background (-1)
        padded in. Drawn inside the training step from the global generator (the training stream that
        ``TrainingRandomState`` swaps in), so resume replays it; the data order stays ``difflab.data.order``'s."""
        k = self.augment_shift
        b, _, h, w = x.shape
        padded = F.pad(x, (k, k, k, k), value=-1.0)
        offsets = torch.randint(0, 2 * k + 1, (2, b), device=x.device)
        rows = (torch.arange(h, device=x.device)[None, :] + offsets[0][:, None])[:, None, :, None]
        cols = (torch.arange(w, device=x.device)[None, :] + offsets[1][:, None])[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channels, rows, cols]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.augment_shift:
            batch = (self.shift(batch[0]), batch[1])
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", batch_idx)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", batch_idx)

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer(self.parameters())
        if self._lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self._lr_scheduler(optimizer), "interval": "step"},
        }

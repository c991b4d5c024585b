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
    ) -> None:
        super().__init__()
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

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
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

"""Logger glue: images to whichever loggers are active, logger identities for exact resume, wandb mode."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


def wandb_offline() -> bool:
    """Offline unless the user chose: WANDB_MODE set (wandb reads it itself) or WANDB_API_KEY present."""
    return not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))


def log_image(loggers: list[Logger], key: str, grid: torch.Tensor, step: int) -> None:
    """Send a (C, H, W) grid in [0, 1] to every logger that shows images (wandb panels, TensorBoard)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid.permute(1, 2, 0).numpy()], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)


def logger_identity(logger: Logger) -> dict[str, Any]:
    """What resuming needs to continue the same logger run: class, save_dir, name, version (wandb: run id)."""
    return {
        "class": type(logger).__name__,
        "save_dir": logger.save_dir,
        "name": logger.name,
        "version": logger.version,
    }


def resume_logger_kwargs(target: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Constructor overrides that reattach a logger (by its ``_target_``) to the run recorded in a checkpoint."""
    class_name = target.rsplit(".", 1)[-1]
    for record in records:
        if record["class"] != class_name or record.get("version") is None:
            continue
        kwargs: dict[str, Any] = {"version": record["version"]}
        if class_name == "WandbLogger":
            kwargs["resume"] = "allow"
        elif record.get("save_dir") and os.path.isdir(record["save_dir"]):
            kwargs["save_dir"] = record["save_dir"]
        return kwargs
    return {}


def finish_loggers(loggers: list[Logger]) -> None:
    """Close wandb runs so each Hydra job (multirun included) is exactly one wandb run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()

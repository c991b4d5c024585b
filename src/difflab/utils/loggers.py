"""Logger glue: images to whichever loggers are active, logger identities for exact resume (with the metric history
kept), wandb mode."""

from __future__ import annotations

import csv
import logging
import os
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` that keeps the history of a resumed run.

    Lightning's writer deletes an existing ``metrics.csv`` when a run reattaches to its version directory, so a
    resumed run kept only the rows logged after the resume. With ``resume_step`` (set by ``src/train.py`` from the
    checkpoint's global step) the rows logged before that step are kept and the run appends to them; rows at or
    after it came from the part of the interrupted run that the checkpoint does not hold, and the resumed run logs
    those steps again. ``resume_row`` (the checkpoint's ``unlogged_row``, see :class:`difflab.callbacks.RunRecord`)
    is the row of the checkpoint's own step, written when a kill right after the save kept it off the file.
    """

    def __init__(
        self, *args: Any, resume_step: int | None = None, resume_row: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step, self.resume_row = resume_step, resume_row

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        fields, rows = _read_history(path, self.resume_step) if self.resume_step is not None else ([], [])
        fields, rows = _with_row(fields, rows, self.resume_row)
        writer = super().experiment  # deletes the old file
        if fields:
            with open(path, "w", newline="") as file:
                history = csv.DictWriter(file, fieldnames=fields)
                history.writeheader()
                history.writerows(rows)
            writer.metrics_keys = list(fields)  # appended rows follow this header (a new key rewrites it)
        return writer


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous=None`` it always hands to ``wandb.init``: wandb (≥ 0.19)
    prints "The anonymous setting has no effect and will be removed" for any value of it, in every run's log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class _DropMessages(logging.Filter):
    """Drops the log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_LITLOGGER_TIP = _DropMessages("💡 Tip: For seamless cloud logging")


def silence_litlogger_tip() -> None:
    """Drop Lightning's advertisement for its LitLogger service (logged at INFO by every ``Trainer`` without a
    LitLogger), and nothing else: a filter on the two loggers Lightning's ``rank_zero_info`` writes to."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _LITLOGGER_TIP not in logger.filters:
            logger.addFilter(_LITLOGGER_TIP)


def _read_history(path: str, before_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows with ``step`` < ``before_step`` of a metrics.csv (nothing if there is none)."""
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows = [row for row in reader if not row.get("step") or int(float(row["step"])) < before_step]
        return list(reader.fieldnames or []), rows


def _with_row(
    fields: list[str], rows: list[dict[str, str]], row: dict[str, Any] | None
) -> tuple[list[str], list[dict[str, str]]]:
    """``rows`` with ``row`` (``{"step", "metrics"}``) appended when no row of its step holds its values."""
    if not row:
        return fields, rows
    step = str(row["step"])
    if any(r.get("step") == step and any(r.get(k) for k in row["metrics"]) for r in rows):
        return fields, rows
    fields = fields or ["step"]
    fields = fields + [k for k in row["metrics"] if k not in fields]
    return fields, [*rows, {**{k: str(v) for k, v in row["metrics"].items()}, "step": step}]


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


def resume_logger_kwargs(
    target: str, records: list[dict[str, Any]], global_step: int = 0, unlogged_row: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Constructor overrides that reattach a logger (by its ``_target_``) to the run recorded in a checkpoint of
    ``global_step``: the same wandb run id (``resume="allow"``), the same CSV/TensorBoard version directory with the
    history before ``global_step`` kept (difflab's :class:`CSVLogger`: ``resume_step``, and ``resume_row``: the
    checkpoint's ``unlogged_row``; TensorBoard: its ``purge_step``, which hides the events the resumed run logs
    again)."""
    class_name = target.rsplit(".", 1)[-1]
    for record in records:
        if record["class"] != class_name or record.get("version") is None:
            continue
        kwargs: dict[str, Any] = {"version": record["version"]}
        if class_name == "WandbLogger":
            kwargs["resume"] = "allow"
            return kwargs
        if record.get("save_dir") and os.path.isdir(record["save_dir"]):
            kwargs["save_dir"] = record["save_dir"]
        if target == f"{CSVLogger.__module__}.CSVLogger":
            kwargs["resume_step"] = global_step
            if unlogged_row:
                kwargs["resume_row"] = unlogged_row
        elif class_name == "TensorBoardLogger":
            kwargs["purge_step"] = global_step
        return kwargs
    return {}


def finish_loggers(loggers: list[Logger]) -> None:
    """Close wandb runs so each Hydra job (multirun included) is exactly one wandb run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()

"""Logger glue: images to whichever loggers are active, logger identities for exact resume (with the metric history
kept), wandb mode."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import warnings
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` that carries the history of the run it resumes.

    ``history`` (set by ``src/train.py`` on resume: the source run's ``metrics.csv``) and ``resume_step`` (the
    checkpoint's global step): this run's file starts with the source's rows logged before that step, and the run
    appends to them; rows at or after it came from the part of the interrupted run that the checkpoint does not hold,
    and the resumed run logs those steps again. The source file is read, never written (a resumed run writes into
    its own run dir); resumed into the same folder, the file is its own history (Lightning's writer would delete
    it). ``resume_row`` (the checkpoint's ``unlogged_row``, see :class:`difflab.callbacks.RunRecord`) is the row of
    the checkpoint's own step, written when a kill right after the save kept it off the source file.
    """

    def __init__(
        self,
        *args: Any,
        resume_step: int | None = None,
        resume_row: dict[str, Any] | None = None,
        history: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step, self.resume_row, self.history = resume_step, resume_row, history

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        source = self.history or path
        fields, rows = _read_history(source, self.resume_step) if self.resume_step is not None else ([], [])
        fields, rows = _with_row(fields, rows, self.resume_row)
        writer = super().experiment  # deletes the old file
        if fields:
            with open(path, "w", newline="") as file:
                history = csv.DictWriter(file, fieldnames=fields)
                history.writeheader()
                history.writerows(rows)
            writer.metrics_keys = list(fields)  # appended rows follow this header (a new key rewrites it)
        return writer


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` that carries the history of the run it resumes: with ``history`` (the
    source run's version folder, set by ``src/train.py`` on resume) its event files are copied into this run's
    folder first, and ``purge_step`` (the checkpoint's step) makes TensorBoard drop their events from that step on,
    which the resumed run logs again. The source folder is read, never written."""

    def __init__(self, *args: Any, history: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history = history

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None and self.history and os.path.isdir(self.history):
            target = os.path.abspath(self.log_dir)
            if os.path.abspath(self.history) != target:
                os.makedirs(target, exist_ok=True)
                for name in sorted(os.listdir(self.history)):
                    if name.startswith("events.out.tfevents."):
                        shutil.copy2(os.path.join(self.history, name), os.path.join(target, name))
        return super().experiment


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
    LitLogger), and nothing else: a filter on the two loggers Lightning's ``rank_zero_info`` writes to. Also torch's
    FutureWarning that Lightning's own ``utilities/_pytree.py`` (its data fetcher, every run) still builds a
    ``LeafSpec``: a message for Lightning's developers, matched by its text and Lightning's module only."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _LITLOGGER_TIP not in logger.filters:
            logger.addFilter(_LITLOGGER_TIP)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


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
        elif isinstance(logger, LightningTensorBoardLogger):
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
    """Constructor overrides that continue, in this run's own folders, the logger run recorded (by class) in a
    checkpoint of ``global_step``: wandb the same run id (``resume="allow"``); difflab's :class:`CSVLogger` and
    :class:`TensorBoardLogger` the source's history before ``global_step`` (``history``: the source file or folder,
    read only; ``resume_step``/``purge_step``; the CSV's ``resume_row``: the checkpoint's ``unlogged_row``)."""
    class_name = target.rsplit(".", 1)[-1]
    for record in records:
        if record["class"] != class_name or record.get("version") is None:
            continue
        if class_name == "WandbLogger":
            return {"version": record["version"], "resume": "allow"}
        version = record["version"]
        folder = os.path.join(
            record["save_dir"], record.get("name") or "", version if isinstance(version, str) else f"version_{version}"
        )
        if target == f"{CSVLogger.__module__}.CSVLogger":
            kwargs: dict[str, Any] = {"history": os.path.join(folder, "metrics.csv"), "resume_step": global_step}
            return {**kwargs, "resume_row": unlogged_row} if unlogged_row else kwargs
        if target == f"{TensorBoardLogger.__module__}.TensorBoardLogger":
            return {"history": folder, "purge_step": global_step}
        return {}
    return {}


def finish_loggers(loggers: list[Logger]) -> None:
    """Close wandb runs so each Hydra job (multirun included) is exactly one wandb run."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()

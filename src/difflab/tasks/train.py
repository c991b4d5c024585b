"""Training: build data, model, callbacks, loggers and trainer from the config, fit, then write samples."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from difflab.callbacks import (
    EMA,
    CutEpochRestore,
    FinalValidation,
    NonFiniteError,
    NonFiniteGuard,
    RunRecord,
    TrainingRandomState,
    TrainThroughput,
)
from difflab.callbacks.ema import young_ema_warning
from difflab.callbacks.progress import model_summary, step_progress_bar
from difflab.callbacks.sample_grid import sample_class_rows
from difflab.callbacks.validation import check_objective
from difflab.modules import read_run_record, sampler_config
from difflab.strategies import is_sharded_strategy
from difflab.tasks.resume import hydra_choices, resume_config, teacher_config
from difflab.utils.checkpoint_io import AtomicCheckpointIO, checkpoints_trusted, trusted_checkpoints
from difflab.utils.checkpoint_ref import fetch_checkpoint
from difflab.utils.config import instantiate_group
from difflab.utils.images import image_grid, save_npz
from difflab.utils.labels import class_names_of, save_labelled_grid
from difflab.utils.loggers import finish_loggers, log_image, resume_logger_kwargs, silence_litlogger_tip
from difflab.utils.progress import stderr_is_terminal
from difflab.utils.sweep_summary import write_run_summary

log = logging.getLogger(__name__)


def _resume_overrides(cfg: DictConfig, record: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Logger kwargs that continue the logger runs recorded in a checkpoint's ``record`` (None: not resuming)."""
    if record is None:
        return {}
    return {
        entry._target_: resume_logger_kwargs(
            entry._target_, record.get("loggers", []), record["global_step"], record.get("unlogged_row")
        )
        for entry in (cfg.get("logger") or {}).values()
        if entry is not None
    }


def write_samples(
    module: Any, cfg: DictConfig, out_dir: Path, loggers: list[Any], names: list[str] | None
) -> dict[str, Path]:
    """Sample ``cfg.samples.num_samples`` images with a seeded generator (class-conditional: a row per class,
    labelled with ``names``); write a PNG grid and a .npz, log the grid."""
    images, labels, tags, rows, used = draw_samples(module, cfg, names)
    nrow = cfg.samples.get("nrow") or rows  # class-conditional: one labelled row per class
    log_image(loggers, "samples/final", image_grid(images, nrow), module.global_step)
    return {
        "grid": save_labelled_grid(images, out_dir / "samples.png", nrow=nrow, tags=tags),
        "npz": save_npz(images, out_dir / "samples.npz", labels=labels),
        "drawn_with": f"{type(used).__name__}, {used.num_evaluations(None)} NFE",
    }


def draw_samples(module: Any, cfg: DictConfig, names: list[str] | None, progress: bool = True) -> tuple[Any, ...]:
    """(images, labels, tags, row length, sampler) of ``cfg.samples``, drawn with its seeded generator."""
    generator = torch.Generator(device=module.device).manual_seed(int(cfg.samples.seed))
    progress = progress and bool(cfg.trainer.get("enable_progress_bar", True))  # with Lightning's bar (a TTY only)
    sampler = final_sampler(module, cfg)
    count = int(cfg.samples.num_samples)
    drawn = sample_class_rows(module, count, generator, names, progress=progress, sampler=sampler)
    return (*drawn, sampler or module.sampler)


def final_sampler(module: Any, cfg: DictConfig) -> Any:
    """The sampler of the samples written after fit: ``cfg.samples.sampler`` (sample.py's default) completed by the
    model; None (the model's own, ``cfg.sampler``) when it is null, integrates another process (a flow's) or the
    model is a few-step one, which samples at the step count it was trained for (``own_sampler``)."""
    given = cfg.samples.get("sampler")
    if given is None or cfg.get("sampler") is None or not hasattr(module, "build_sampler"):
        return None
    if getattr(module, "own_sampler", False):
        return None
    chosen = sampler_config(cfg.sampler, given, fallback={})  # another process: the model's own
    if chosen.get("_target_") != given.get("_target_"):
        return None
    return module.build_sampler(instantiate(chosen))


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The run's final metrics as the loggers got them (floats): the progress bar's own aliases (``loss``: the
    epoch's mean under another name than the logged ``train/loss``) left out, so a summary has one value per
    metric."""
    bar_only = set(trainer.progress_bar_metrics) - set(trainer.logged_metrics)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k not in bar_only}


def search_objective(cfg: DictConfig, choices: dict[str, Any] | None) -> str | None:
    """``optimized_metric`` when a hyperparameter search (``hparams_search=...``) reads it, else None."""
    return cfg.get("optimized_metric") if (choices or {}).get("hparams_search") else None


def nonfinite_report(trainer: pl.Trainer, metrics: dict[str, float]) -> dict[str, Any]:
    """What ``run_summary.json`` records of non-finite values: the steps ``callbacks.nonfinite.action=skip``
    dropped, and, when the last validation is not finite (its model cannot be used), ``status: nonfinite`` with the
    error to raise."""
    guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
    skipped = guard.skipped_steps if guard is not None else 0
    report: dict[str, Any] = {"nonfinite_steps_skipped": skipped}
    bad = {k: v for k, v in metrics.items() if k.startswith("val/") and not math.isfinite(v)}
    if bad:
        values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        report["status"] = "nonfinite"
        report["error"] = (
            f"the last validation is not finite ({values}) after {trainer.global_step} steps, {skipped} of them "
            "skipped as non-finite (callbacks.nonfinite.action=skip): the model is not usable. Lower the learning "
            "rate (model.optimizer.lr) or clip gradients (trainer.gradient_clip_val)"
        )
    return report


def network_size(model: Any) -> dict[str, Any]:
    """Parameters of the denoising network and its Gflops per forward (DiT's multiply-add count), where the model
    has them (diffusion models; the autoencoder and classifier report their parameters only)."""
    net = getattr(model, "net", model)
    size: dict[str, Any] = {"params": sum(p.numel() for p in net.parameters())}
    if hasattr(model, "gflops_per_forward"):
        size["gflops_per_forward"] = round(model.gflops_per_forward(), 6)
    return size


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured model; returns the final metrics (floats) and the paths written, which also go to
    ``<run dir>/run_summary.json`` with the network's size, the training images/s and the wall time. Checkpoints
    (``ckpt_path``, ``model.autoencoder_ckpt``) are opened safely unless ``trust_checkpoint``."""
    if cfg.get("plan"):  # a dry run: the memory plan only
        from difflab.tasks.plan import plan

        return plan(cfg)
    with trusted_checkpoints(cfg.get("trust_checkpoint", False)):
        return _train(cfg)


def _run_config(cfg: DictConfig) -> tuple[DictConfig, str | None, dict[str, Any] | None, dict[str, Any] | None]:
    """(config, checkpoint to resume, its run record, config-group choices): a resumed run takes the checkpoint's
    own config; reflow's student takes its teacher's net and data shape."""
    ckpt_path, record, choices = cfg.get("ckpt_path"), None, hydra_choices()
    if ckpt_path:  # a path, or wandb:<entity>/<project>/model-<run id>:<alias> (logger.wandb.log_model)
        ckpt_path = fetch_checkpoint(str(ckpt_path), "ckpt_path")
        record = read_run_record(ckpt_path, "ckpt_path")  # opened safely, before anything is built
        cfg, choices = resume_config(cfg, record, f"ckpt_path={str(ckpt_path)!r}")  # the checkpoint's own config
    elif teacher := OmegaConf.select(cfg, "model.teacher_ckpt"):  # reflow: the student is the teacher's net
        cfg = teacher_config(cfg, read_run_record(teacher, "model.teacher_ckpt"), f"model.teacher_ckpt={teacher!r}")
    return cfg, ckpt_path, record, choices


def build_trainer(
    cfg: DictConfig, model: pl.LightningModule, callbacks: list[Any], loggers: list[Any], size: dict[str, Any]
) -> pl.Trainer:
    """``cfg.trainer`` with the run's callbacks and loggers, and what the model or the console needs (``size``:
    :func:`network_size`, whose Gflops the model summary shows)."""
    if not loggers:  # LearningRateMonitor refuses to run without a logger; `logger=none` is a valid choice
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    extra: dict[str, Any] = {}
    if not stderr_is_terminal():  # its carriage-return updates would fill a log: ProgressLines logs lines instead
        extra["enable_progress_bar"] = False
    elif cfg.trainer.get("enable_progress_bar", True):
        callbacks = [*callbacks, step_progress_bar()]
    if cfg.trainer.get("enable_model_summary", True) and "gflops_per_forward" in size:
        callbacks = [*callbacks, model_summary(size["gflops_per_forward"])]
    if not model.automatic_optimization:  # Lightning refuses trainer.gradient_clip_val then; such modules clip
        extra["gradient_clip_val"] = None  # themselves (model.gradient_clip_val)
    if getattr(model, "ddp_find_unused_parameters", False) and cfg.trainer.get("strategy") == "ddp":
        # e.g. the autoencoder: its discriminator takes no part in a step before disc_start, and the discriminator
        # step leaves the autoencoder out; plain DDP stops at the first step with an "unused parameters" error
        extra["strategy"] = "ddp_find_unused_parameters_true"
    silence_litlogger_tip()
    plugins = [AtomicCheckpointIO()]  # a kill or a full disk never leaves a partial checkpoint
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins, **extra)


def _train(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, ckpt_path, record, choices = _run_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    logger_overrides = _resume_overrides(cfg, record)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    size = network_size(model)  # before fit: eager, on the CPU
    throughput, final = TrainThroughput(), FinalValidation(search_objective(cfg, choices))
    callbacks = [*instantiate_group(cfg.get("callbacks")), RunRecord(run_config, choices)]
    callbacks += [TrainingRandomState(cfg.seed), CutEpochRestore(), throughput, final]
    loggers = instantiate_group(cfg.get("logger"), logger_overrides, "logger")
    trainer = build_trainer(cfg, model, callbacks, loggers, size)
    for logger in loggers:
        logger.log_hyperparams(run_config)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not checkpoints_trusted())
    metrics = final_metrics(trainer)
    if final.needs_final_validation(trainer) and not trainer.interrupted:  # the final model, validated
        trainer.validate(model, datamodule=datamodule, verbose=False)  # (it replaces the trainer's metrics)
        metrics.update(final_metrics(trainer))
    check_objective(final.objective, metrics)

    def summary(**fields: Any) -> None:  # <run dir>/run_summary.json
        if trainer.is_global_zero:
            write_run_summary(
                cfg.paths.output_dir,
                metrics=metrics,
                **size,
                train_images=throughput.images,
                train_images_per_s=throughput.images_per_s,
                wall_time_s=time.perf_counter() - start,
                **fields,
            )

    health = nonfinite_report(trainer, metrics)
    if "error" in health:  # never "ok", never samples from it: recorded, then an error (rc != 0)
        summary(**health)
        raise NonFiniteError(health["error"])
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(final_metrics(trainer))
    result = _final_outputs(cfg, trainer, model, datamodule, loggers, metrics)
    finish_loggers(loggers)
    summary(**health)
    return result


def _final_outputs(
    cfg: DictConfig, trainer: pl.Trainer, model: Any, datamodule: Any, loggers: list[Any], metrics: dict[str, float]
) -> dict[str, Any]:
    """The run's result: metrics, output dir, the checkpoint written, and the final samples (drawn here)."""
    result: dict[str, Any] = {"metrics": metrics, "output_dir": cfg.paths.output_dir}
    checkpoint_cb = trainer.checkpoint_callback
    ckpt_written = checkpoint_cb and (checkpoint_cb.last_model_path or checkpoint_cb.best_model_path)
    if ckpt_written and trainer.is_global_zero and Path(ckpt_written).exists():  # none under fast_dev_run
        result["checkpoint"] = ckpt_written
        log.info("Checkpoint: %s", ckpt_written)
    sharded = is_sharded_strategy(trainer.strategy)  # every process takes part in each forward; rank 0 writes
    if (trainer.is_global_zero or sharded) and cfg.samples.num_samples > 0 and hasattr(model, "sample"):
        # After fit, the EMA callback has copied the EMA weights into the model: samples use them.
        # Lightning moves the model back to the CPU at teardown; sample on the training device.
        model.to(trainer.strategy.root_device)
        if not trainer.is_global_zero:
            draw_samples(model, cfg, names=None, progress=False)  # its part of every sharded forward
            return result
        for ema in (c for c in trainer.callbacks if isinstance(c, EMA)):
            if warning := young_ema_warning(ema.decay, ema.warmup, ema.num_updates):
                log.warning("Final samples: %s", warning.replace("`weights=raw`", "`sample.py weights=raw`"))
        names = class_names_of(datamodule)  # the instance's: an image folder's come from its files
        result.update(write_samples(model, cfg, Path(cfg.paths.output_dir) / "samples", loggers, names))
        log.info("Samples: %s and %s (%s)", result["grid"], result["npz"], result["drawn_with"])
    return result

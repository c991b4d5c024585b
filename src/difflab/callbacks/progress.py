"""Training progress as plain log lines when the output is not a terminal."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl

from difflab.utils.progress import LINE_SECONDS, log, progress_line, stderr_is_terminal


class ProgressLines(pl.Callback):
    """Off a terminal (``make train > log``, SLURM, CI) Lightning's bar writes carriage-return updates into the log
    (``src/train.py`` turns it off there): this logs one line every ``every_n_seconds`` instead: steps done of the
    run's total (``trainer.estimated_stepping_batches``; a resumed run: its own steps, then the global step of the
    whole run), epoch, the last logged ``train/loss``, rate and ETA. A no-op on a terminal. The loss is read back
    from the device only when a line is written."""

    def __init__(self, every_n_seconds: float = LINE_SECONDS) -> None:
        if every_n_seconds <= 0:
            raise ValueError(f"callbacks.progress_lines.every_n_seconds={every_n_seconds}: expected > 0")
        self.every = float(every_n_seconds)
        self.active, self.start, self.last, self.first_step = False, 0.0, 0.0, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = trainer.is_global_zero and not stderr_is_terminal()
        self.start = self.last = time.perf_counter()
        self.first_step = trainer.global_step  # a resumed run's rate counts its own steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.active and time.perf_counter() - self.last >= self.every:
            self.report(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active:
            self.report(trainer)

    def report(self, trainer: pl.Trainer) -> None:
        self.last = time.perf_counter()
        run_total = trainer.estimated_stepping_batches
        total = int(run_total) - self.first_step if run_total != float("inf") else None
        extra = f"epoch {trainer.current_epoch}"
        if self.first_step:  # resumed: this run's steps above, the whole run's here
            extra = f"global step {trainer.global_step}/{int(run_total)}, {extra}" if total else extra
        loss = trainer.logged_metrics.get("train/loss")
        if loss is not None:
            extra += f", train/loss {float(loss):.4g}"
        done = trainer.global_step - self.first_step
        log.info(progress_line("training", done, total, "step", self.last - self.start, extra))


def step_progress_bar() -> pl.Callback:
    """Lightning's rich bar (its default on a terminal) without what misleads in a step-limited run: "Epoch 0/-2"
    (``max_epochs`` is -1 when ``max_steps`` ends the run), ``v_num`` among the metrics, and "260/59" after a resume
    in mid-epoch (its total is the steps left, its count the batch index in the epoch). TQDM's bar where rich is
    missing, as Lightning does."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    base = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar

    class StepProgressBar(base):  # type: ignore[misc, valid-type]
        def _get_train_description(self, current_epoch: int) -> str:
            description = super()._get_train_description(current_epoch)
            return f"Epoch {current_epoch}" if self.trainer.max_epochs == -1 else description

        @property
        def total_train_batches(self) -> int | float:
            trainer = self.trainer
            if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
                done_in_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
                remaining = trainer.max_steps - trainer.global_step
                return min(trainer.num_training_batches, done_in_epoch + remaining)
            return trainer.num_training_batches

        def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)  # the logger's version: a run-dir detail, not a training metric
            return metrics

    return StepProgressBar()


def model_summary(gflops_per_forward: float) -> pl.Callback:
    """Lightning's model summary (rich where installed, as Lightning picks it) with the network's FLOPs per forward
    of one image (2 × DiT's Gflops, i.e. multiply-adds) as "Total FLOPs", and "-" in the per-layer FLOPs column:
    Lightning counts FLOPs only through an ``example_input_array`` forward, which our modules do not define (it would
    run the network once more at fit start), so it printed "Total FLOPs: 0". Uses Lightning's private
    ``_summary``/``_get_summary_data`` (the only way to pass the total in without rewriting its table)."""
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    base = RichModelSummary if _RICH_AVAILABLE else ModelSummary
    total_flops = int(round(2e9 * gflops_per_forward))

    class FlopsModelSummary(base):  # type: ignore[misc, valid-type]
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not self._max_depth or not trainer.is_global_zero:
                return
            summary = self._summary(trainer, pl_module)
            data = [(n, ["-"] * len(v) if n == "FLOPs" else v) for n, v in summary._get_summary_data()]
            self.summarize(
                data,
                summary.total_parameters,
                summary.trainable_parameters,
                summary.model_size,
                summary.total_training_modes,
                total_flops=total_flops,
                **self._summarize_kwargs,
            )

    return FlopsModelSummary()

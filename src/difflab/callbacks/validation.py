"""Every run ends validated, and a search's objective is logged: what a sweeper reads is never missing."""

from __future__ import annotations

import lightning.pytorch as pl


class ObjectiveNotLogged(ValueError):
    """``optimized_metric`` names a metric the run does not log (a sweeper would get None for it)."""


class FinalValidation(pl.Callback):
    """Tracks the step of the last validation of ``fit`` (:attr:`validated_at`, None: none yet), so that
    ``src/train.py`` validates once more after fit when the last step was not validated (a run shorter than
    ``trainer.val_check_interval`` never validated: its ``val/*`` metrics, a sweep's objective among them, were
    missing). With ``objective`` (``optimized_metric`` of a hyperparameter search), the first validation that does
    not log it fails the run at once, naming what it logged, instead of the sweeper failing after the trial."""

    def __init__(self, objective: str | None = None) -> None:
        self.objective, self.validated_at = objective, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validated_at = trainer.global_step
        check_objective(self.objective, trainer.callback_metrics)

    def needs_final_validation(self, trainer: pl.Trainer) -> bool:
        """Whether the run can validate and its last validation is older than its last step."""
        batches = trainer.limit_val_batches
        return bool(batches) and self.validated_at != trainer.global_step


def check_objective(objective: str | None, metrics: dict) -> None:
    if objective and objective not in metrics:
        raise ObjectiveNotLogged(
            f"optimized_metric={objective}: the run does not log it (it logs {sorted(metrics)}); a hyperparameter "
            "search needs it: choose one of those"
        )

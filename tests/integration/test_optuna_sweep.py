"""`hparams_search=optuna_lr_ema`: an Optuna sweep of 2 trials on the 8x8 digits with the tiny sizes — the sweep
summary has a row per trial whose val/loss Optuna saw, job folders are named by the trial's values, and every job's
wandb run (offline) is in the sweep's group."""

from __future__ import annotations

import csv
import json

import pytest
from omegaconf import OmegaConf

from difflab.utils.sweep_summary import RUN_SUMMARY
from tests.conftest import TINY, cli_ok, run_cli

SEARCHED = ("model.optimizer.lr", "model.lr_scheduler.warmup_steps", "callbacks.ema.decay", "model.p_uncond")


def test_optuna_sweep_of_two_trials(tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith(SEARCHED)]  # TINY fixes the EMA decay and warm-up: search them
    cli_ok(
        run_cli(
            "train.py",
            "hparams_search=optuna_lr_ema",
            *tiny,
            "hydra.sweeper.n_trials=2",
            "trainer.max_steps=2",
            "trainer.limit_train_batches=2",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            timeout=600,
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        )
    )
    result = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert result["name"] == "optuna" and set(result["best_params"]) == set(SEARCHED)

    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    losses = [json.loads((sweep / r["job"] / RUN_SUMMARY).read_text())["metrics"]["val/loss"] for r in rows]
    assert [float(r["val/loss"]) for r in rows] == pytest.approx(losses, rel=1e-3)  # the row shows it to 4 digits
    assert result["best_value"] == min(losses)  # the metric each trial returned is the one in its row
    best = rows[losses.index(min(losses))]
    assert {k: float(best[k]) for k in SEARCHED} == {k: float(v) for k, v in result["best_params"].items()}
    assert rows[0]["model.optimizer.lr"] != rows[1]["model.optimizer.lr"]

    for num, row in enumerate(rows):
        job = sweep / row["job"]
        # named by the trial's values, not by TINY's overrides (the same in every job)
        assert job.name.startswith(f"{num}_") and "model.optimizer.lr-" in job.name and "data-" not in job.name
        assert (job / "checkpoints" / "last.ckpt").is_file()
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        assert f"train_{sweep.name}".encode() in run_file.read_bytes()  # the wandb group: the sweep

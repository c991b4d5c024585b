"""The ODE/SDE solvers through the entry points: sample.py (+ progress bar), eval.py, the metric callbacks (torchrun:
tests/integration/test_sample_modes.py)."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from difflab.tasks.eval import evaluate
from difflab.tasks.train import train
from tests.conftest import TINY_GENERATIVE_METRICS, compose_config
from tests.integration.test_sample_modes import checkpoint, run  # noqa: F401  (fixture, helper)
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)

SOLVERS = ["euler", "heun", "euler_ancestral", "euler_maruyama", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc"]
SOLVERS += ["plms", "pndm"]  # the pseudo numerical methods (DDIM's transfer, multistep ε)


README_VARIANTS = {  # the README's command lines, on the tiny model
    "unipc": ["sampler.order=3"],
    "euler": ["sampler.sigma_schedule=karras", "sampler.sigma_max=80"],
}


@pytest.mark.parametrize("name", SOLVERS)
def test_sample_py_with_every_solver(checkpoint, tmp_path, name):  # noqa: F811
    """`python src/sample.py ckpt=... sampler=<solver> sampler.steps=4` on a T = 20 model: uint8 images, reproducible
    under the seed (the stochastic solvers too)."""
    args = [f"sampler={name}", "sampler.steps=4", "num_samples=3", *README_VARIANTS.get(name, [])]
    a = np.load(run(checkpoint, tmp_path / "a", *args)["npz"])["arr_0"]
    b = np.load(run(checkpoint, tmp_path / "b", *args)["npz"])["arr_0"]
    assert a.shape == (3, 16, 16, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "overrides, expected",
    [([], "DPMSolverSDESampler"), (["~sampler"], "AncestralSampler"), (["sampler=unipc"], "UniPCSampler")],
)
def test_sample_py_default_is_the_studys_best_at_20_nfe(checkpoint, tmp_path, overrides, expected):  # noqa: F811
    """conf/sample.yaml defaults to dpmpp_2m_sde, 20 steps (experiments/sampler_nfe); ~sampler: the checkpoint's."""
    from difflab.tasks.sample import load_for_sampling

    module, _ = load_for_sampling(compose_config([f"ckpt={checkpoint}", *overrides], tmp_path, "sample"), "cpu")
    assert type(module.sampler).__name__ == expected
    if not overrides:
        assert module.sampler.num_evaluations() == 20


def test_progress_bar_shows_nfe_on_a_tty_and_nothing_otherwise(checkpoint, tmp_path, monkeypatch, capfd):  # noqa: F811
    run(checkpoint, tmp_path / "quiet", "sampler=heun", "sampler.steps=3", "num_samples=2")
    assert "sampling" not in capfd.readouterr().err  # pytest's stderr is not a TTY

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(checkpoint, tmp_path / "tty", "sampler=heun", "sampler.steps=3", "num_samples=2", "batch_size=1")
    text = terminal.getvalue()
    assert "sampling" in text and "NFE 5/5" in text and "img/s" in text and "10/10" in text  # 2 batches × 5 evals


def test_eval_py_with_a_solver(checkpoint, weights_dir, tmp_path):  # noqa: F811
    cfg = compose_config(
        [
            f"ckpt={checkpoint}",
            "metrics=[fid,is]",
            "num_samples=8",
            "num_real=16",
            "batch_size=8",
            "sampler=unipc",
            "sampler.steps=5",
            f"out={tmp_path / 'eval.json'}",
        ],
        tmp_path,
        "eval",
    )
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["sampler"]["_target_"].endswith("UniPCSampler") and saved["sampler"]["steps"] == 5
    assert report["results"]["fid_fmnist_cls"] > 0


def test_metric_callbacks_and_grids_sample_with_the_configured_solver(tiny_cfg, weights_dir, tmp_path):  # noqa: F811
    cfg = tiny_cfg("sampler=dpmpp_2m", "sampler.steps=4", *TINY_GENERATIVE_METRICS)
    result = train(cfg)
    assert result["metrics"]["val/fid_fmnist_cls"] > 0
    saved = torch.load(result["checkpoint"], weights_only=True)["difflab"]["config"]["model"]["sampler"]
    assert saved["_target_"].endswith("DPMSolverMultistepSampler")

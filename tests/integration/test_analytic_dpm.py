"""Analytic-DPM end to end: src/analytic.py writes Γ beside a tiny trained checkpoint, sample.py/eval.py sample with
``sampler.variance_type=analytic`` (DDPM and DDIM), and the refusals (no Γ, another checkpoint's Γ, a learned
variance, a σ process)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from difflab.losses import DiffusionLoss
from difflab.modules import EDMModule, load_module
from difflab.samplers import EDMSampler
from difflab.samplers.analytic import gamma_path, read_gamma
from difflab.schedules import SigmaProcess
from difflab.tasks.analytic import analytic, check_model
from difflab.tasks.sample import sample
from difflab.utils.hashing import state_dict_sha256
from tests.conftest import TINY_NETS, cli_ok, compose_config, raises_in_config, run_cli, tiny_diffusion_module

ANALYTIC = {"variance_type": "analytic", "steps": 4}


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> str:
    """A copy of the session's tiny checkpoint (T = 20, EMA on): Γ is written beside it."""
    (tmp_path / "ckpt").mkdir()
    return str(shutil.copy(tiny_checkpoint, tmp_path / "ckpt" / "model.ckpt"))


@pytest.fixture
def with_gamma(checkpoint, tmp_path) -> str:
    analytic(compose_config([f"ckpt={checkpoint}", "num_samples=3", "progress=false"], tmp_path, "analytic"))
    return checkpoint


def test_analytic_writes_gamma_beside_the_checkpoint(with_gamma):
    loaded = read_gamma(gamma_path(with_gamma))
    module, _ = load_module(with_gamma)
    assert loaded.gamma.shape == (20,) and loaded.gamma.dtype == torch.float64
    assert loaded.info["weights_sha256"] == state_dict_sha256(module.net) and loaded.info["weights"] == "ema"
    assert loaded.info["num_samples"] == 3 and loaded.info["seed"] == 0 and "_target_" in loaded.info["data"]
    assert (loaded.gamma > 0).all() and torch.isfinite(loaded.gamma).all()
    with open(gamma_path(with_gamma), "rb") as file:  # safetensors: a length-prefixed JSON header, no pickle
        assert file.read(9)[8:9] == b"{"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_with_analytic_variance(with_gamma, tmp_path, sampler):
    overrides = [f"ckpt={with_gamma}", "num_samples=2", f"sampler={sampler}", "sampler.variance_type=analytic"]
    cfg = compose_config([*overrides, "sampler.steps=4"], tmp_path / sampler, "sample")
    images = np.load(sample(cfg)["npz"])["arr_0"]
    assert images.shape[0] == 2
    module, record = load_module(with_gamma, sampler={**ANALYTIC, "_target_": cfg.sampler._target_, "_partial_": True})
    assert module.sampler.analytic and record["sampler"]["gamma"] == str(gamma_path(with_gamma))


def test_no_gamma_names_the_command(checkpoint):
    with pytest.raises(FileNotFoundError, match=f"python src/analytic.py ckpt={checkpoint}"):
        load_module(checkpoint, sampler=ANALYTIC)


def test_gamma_of_other_weights_is_an_error(with_gamma, tmp_path):
    with raises_in_config(ValueError, match="estimated for other weights"):
        load_module(with_gamma, sampler=ANALYTIC, weights="raw")  # Γ was estimated for the EMA weights
    other = shutil.copy(gamma_path(with_gamma), tmp_path / "elsewhere.safetensors")
    load_module(with_gamma, sampler={**ANALYTIC, "gamma": str(other)})  # sampler.gamma=PATH: any file of these weights


def test_learned_variance_and_sigma_process_are_refused():
    hybrid = tiny_diffusion_module(num_timesteps=10, variance_type="learned_range", loss=DiffusionLoss("hybrid"))
    with pytest.raises(ValueError, match="learned Σ_θ"):
        check_model(hybrid, "ckpt='x'")
    edm = EDMModule(
        net=TINY_NETS["unet"],
        schedule=SigmaProcess(),
        image_shape=(1, 8, 8),
        optimizer=torch.optim.Adam,
        sampler=EDMSampler,
    )
    with pytest.raises(ValueError, match="discrete Gaussian"):
        check_model(edm, "ckpt='x'")


@pytest.mark.slow
def test_cli_end_to_end(checkpoint, tmp_path):
    """The two commands of the README section, as subprocesses (~30 s on 2 cores)."""
    cli_ok(run_cli("analytic.py", f"ckpt={checkpoint}", "num_samples=2", "progress=false", cwd=tmp_path))
    assert gamma_path(checkpoint).is_file()
    run = [f"ckpt={checkpoint}", "num_samples=2", "sampler=ddpm", "sampler.variance_type=analytic", "sampler.steps=4"]
    cli_ok(run_cli("sample.py", *run, cwd=tmp_path))

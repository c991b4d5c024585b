"""Shared fixtures: composing the real Hydra configs with tiny, offline overrides."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, open_dict
from omegaconf.errors import InterpolationResolutionError

from difflab import samplers
from difflab.modules import DiffusionModule
from difflab.networks import DiT, UNet
from difflab.schedules import GaussianDiffusion
from difflab.utils.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# A model small enough to train a few steps on 2 CPU cores in about a second, on data shipped by scikit-learn.
TINY = [
    "data=digits",
    "data.batch_size=16",
    "net=unet_s",
    "net.model_channels=16",
    "net.channel_mult=[1,2]",
    "net.attention_resolutions=[8]",
    "schedule.num_timesteps=20",
    "trainer=cpu",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.ema.decay=0.9",
    "model.lr_scheduler.warmup_steps=2",
    "samples.num_samples=4",
]

# The generative-metrics callback at validation on 8 samples against 16 real images, two training steps.
TINY_GENERATIVE_METRICS = [
    "callbacks=[default,generative_metrics]",
    "callbacks.generative_metrics.every_n_epochs=1",
    "callbacks.generative_metrics.num_samples=8",
    "callbacks.generative_metrics.num_real=16",
    "callbacks.generative_metrics.batch_size=8",
    "callbacks.generative_metrics.kid_subset_size=4",
    "trainer.max_steps=2",
    "trainer.limit_train_batches=2",
]

# The same with net=dit_tiny at half its width (2 blocks of width 32, 2 heads, 2x2 patches).
TINY_DIT = [o for o in TINY if not o.startswith("net")] + ["net=dit_tiny", "net.hidden_size=32", "net.num_heads=2"]

# 8x8 digits, the tiny UNet, quiet (no validation, sample grids or final samples); no schedule: the few-step tests'
# teacher takes the cosine schedule at T = 1000 (T costs nothing; the tiny T = 20 linear schedule reaches only σ ≈ 0.5)
DIGITS_8 = [o for o in TINY if not o.startswith("schedule.")] + [
    "data.image_size=8",
    "trainer.limit_val_batches=0",
    "callbacks.sample_grid.every_n_epochs=1000",
    "samples.num_samples=0",
]

# A 16 → 32 upscaler (model=upscaler) on digits, with augmentation levels that fit the tiny T = 20.
TINY_UPSCALER = [
    *TINY,
    "model=upscaler",
    "data.image_size=32",
    "net.attention_resolutions=[16]",
    "model.low_res_size=16",
    "model.aug_levels=10",
    "model.sample_aug_level=2",
]

register_resolvers()

# Under pytest-xdist (`make test` runs two workers on two cores) each worker computes on one thread, and so do the
# scripts it starts: two workers of two threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# the user cache folder (FID statistics) of every test and subprocess: a fresh one, never the developer's ~/.cache
os.environ["DIFFLAB_CACHE"] = tempfile.mkdtemp(prefix="difflab-test-cache-")

TINY_NETS = {
    "unet": functools.partial(
        UNet, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_groups=8
    ),
    "dit": functools.partial(DiT, patch_size=2, hidden_size=32, depth=2, num_heads=2, frequency_size=32),
}


def tiny_diffusion_module(num_timesteps: int = 50, net: str = "unet", **kwargs) -> DiffusionModule:
    """A seeded DDPM on 1x8x8 images with a 2-level, 16-channel UNet (``net="dit"``: a 2-block, 32-wide DiT),
    outside any Trainer (``log`` is a no-op)."""
    net = TINY_NETS[net]
    torch.manual_seed(0)
    module = DiffusionModule(
        net=net,
        schedule=GaussianDiffusion(num_timesteps=num_timesteps),
        image_shape=(1, 8, 8),
        **{"optimizer": torch.optim.Adam, **kwargs},
    )
    module.log = lambda *args, **kw: None
    return module


def perturb_weights(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add seeded N(0, scale²) noise to every parameter: moves a fresh model off its zero-initialised output layer
    (whose ε̂ is exactly 0, with gradients only in that layer), or stands in for an optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_((torch.randn(p.shape, generator=generator) * scale).to(p.device))


@contextlib.contextmanager
def raises_in_config(error: type[Exception], match: str):
    """``pytest.raises(error, match=...)`` for an error raised while ``hydra.utils.instantiate`` builds an object:
    Hydra wraps it in an InstantiationException that keeps the message, so the type is checked on the original
    error (the ``__cause__`` chain)."""
    wrappers = (InstantiationException, InterpolationResolutionError)  # a resolver that builds (data_num_classes)
    with pytest.raises((error, *wrappers), match=match) as info:
        yield info
    cause = info.value
    while isinstance(cause, wrappers) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, error), f"expected {error.__name__}, got {type(cause).__name__}: {cause}"


def load_experiment(name: str):
    """``experiments/<name>.py`` as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    """``experiments/bench/run.py`` as a module."""
    return load_experiment("bench/run")


def cli_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Assert that a ``run_cli`` process exited 0, showing the ends of its output otherwise."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )
    return proc


def bare_trainer(**kwargs) -> pl.Trainer:
    """A CPU ``Trainer`` without logger, checkpoints, summary or validation (``kwargs`` add or override)."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def compose_config(
    overrides: Sequence[str], output_dir: Path, config_name: str = "train", keep_hydra: bool = False
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the CLI would, with every path inside ``output_dir``.

    Like ``@hydra.main``, the returned config has no ``hydra`` node unless ``keep_hydra``.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: the tiny training config plus extra overrides, writing under tmp_path."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config([*TINY, *overrides], output_dir or tmp_path)

    return make


def run_cli(script: str, *args: str, cwd: Path, timeout: int = 300, env: dict | None = None):
    """Run ``src/<script>`` in a subprocess from ``cwd`` (logs land under cwd/logs); returns CompletedProcess."""
    full_env = {**os.environ, "DIFFLAB_ROOT": str(cwd), "HYDRA_FULL_ERROR": "1", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


ONE_OF_EACH_SAMPLER = [  # DDPM, DDIM and each ODE/SDE solver (Karras steps: fractional timesteps)
    samplers.AncestralSampler,
    functools.partial(samplers.DDIMSampler, steps=5, eta=0.5),
    functools.partial(samplers.PNDMSampler, steps=5, prk_steps=True),
    functools.partial(samplers.EulerSampler, steps=5),
    functools.partial(samplers.HeunSampler, steps=4, sigma_schedule="karras"),
    functools.partial(samplers.EulerAncestralSampler, steps=5),
    functools.partial(samplers.EulerMaruyamaSampler, steps=5, sigma_schedule="karras"),
    functools.partial(samplers.DPMSolverMultistepSampler, steps=6, order=3, sigma_schedule="uniform_lambda"),
    functools.partial(samplers.DPMSolverSDESampler, steps=5, dynamic_threshold=0.995),
    functools.partial(samplers.UniPCSampler, steps=6, order=3, sigma_schedule="karras"),
]


def _train_once(tmp_path_factory, name: str, overrides: list[str]) -> str:
    from difflab.tasks.train import train

    return train(compose_config(overrides, tmp_path_factory.mktemp(name)))["checkpoint"]


# Checkpoints trained once per test session (per pytest-xdist worker), for tests that only read them: never write
# into their run dirs (copy a file to change it). Each kind is one config; a module that needs another trains its own.
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The ``last.ckpt`` of the tiny DDPM (``TINY``) trained 3 steps."""
    return _train_once(tmp_path_factory, "tiny_ddpm", [*TINY, "trainer.max_steps=3", "trainer.limit_train_batches=3"])


@pytest.fixture(scope="session")
def tiny_cfg_checkpoint(tmp_path_factory) -> str:
    """The ``last.ckpt`` of the tiny class-conditional model (``TINY`` + ``model=cfg``) trained 2 steps."""
    run = ["model=cfg", "trainer.max_steps=2", "trainer.limit_train_batches=2"]
    return _train_once(tmp_path_factory, "tiny_cfg", [*TINY, *run])


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    """The few-step acceptance tests' teacher (consistency distillation and training, progressive distillation): a
    cosine-schedule (T = 1000) ε-prediction DDPM on 8x8 digits (``DIGITS_8``), 120 steps (~6-12 s on one core)."""
    run = ["schedule=cosine", "trainer.max_steps=120", "model.lr_scheduler.warmup_steps=1", "model.optimizer.lr=2e-3"]
    return _train_once(tmp_path_factory, "digits_teacher", [*DIGITS_8, *run, "callbacks.ema.decay=0.99"])


@pytest.fixture(scope="session")
def tiny_upscaler_checkpoint(tmp_path_factory) -> str:
    """The ``last.ckpt`` of the tiny 16 → 32 upscaler (``TINY_UPSCALER``) trained 2 steps."""
    run = ["trainer.max_steps=2", "trainer.limit_train_batches=2"]
    return _train_once(tmp_path_factory, "tiny_upscaler", [*TINY_UPSCALER, *run])

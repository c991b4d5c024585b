"""Latent consistency distillation end to end (issue 31): the acceptance test on a tiny class-conditional LDM teacher
(the loss falls; the student's 2-step guided samples closer, in latent space, to the teacher's many-step guided DDIM
samples than the teacher's own 2-step ones), train → sample.py with the checkpoint's own sampler and steps and
guidance as the network's w input (one evaluation per step), the record, resume of θ⁻, and the error paths."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab import samplers
from difflab.modules import load_module
from difflab.samplers import sample_loop
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.checkpoint_io import load_checkpoint
from tests.conftest import TINY, compose_config, raises_in_config
from tests.integration.test_consistency import falls, losses
from tests.integration.test_ldm import AE_TINY

pytestmark = pytest.mark.xdist_group("test_latent_consistency")  # module-scoped checkpoints: one worker

# 16x16 digits → 8x8x3 latents of a 2-step kl autoencoder; T = 1000 (LCM's k = 20: a 50-point grid)
QUIET = [
    "trainer.limit_val_batches=0",
    "callbacks.sample_grid.every_n_epochs=1000",
    "samples.num_samples=0",
    "trainer.log_every_n_steps=1",
]
STUDENT = [o for o in TINY if not o.startswith(("schedule.", "net"))] + QUIET
W = 2.0  # the guidance scale of the comparisons, inside the trained [0, 3]
DDIM = functools.partial(samplers.DDIMSampler, eta=0.0, spacing="trailing", clip_denoised=False)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lcm_ae")
    return train(compose_config([*AE_TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2"], out))["checkpoint"]


@pytest.fixture(scope="module")
def teacher(autoencoder, tmp_path_factory) -> str:
    """A class-conditional ε LDM (cross-attention, p_uncond 0.1) on the latents, 150 steps (~15 s on one core)."""
    run = (
        [o for o in TINY if not o.startswith("schedule.")]
        + QUIET
        + ["model=ldm", f"model.autoencoder_ckpt={autoencoder}"]
    )
    run += ["schedule=scaled_linear"]  # Stable Diffusion's (LCM's teachers): ᾱ_999 = 0.0047
    run += ["net.num_heads=2", "net.num_head_channels=-1", "conditioner.context_dim=16", "callbacks.ema.decay=0.99"]
    run += ["trainer.max_steps=150", "model.lr_scheduler.warmup_steps=1", "model.optimizer.lr=2e-3"]
    return train(compose_config(run, tmp_path_factory.mktemp("lcm_teacher")))["checkpoint"]


def distill(out: Path, teacher: str, *extra: str) -> dict:
    return train(
        compose_config(
            [*STUDENT, "experiment=latent_consistency", "data=digits", f"model.teacher_ckpt={teacher}", *extra], out
        )
    )


def latents(module, sampler, z: torch.Tensor, labels: torch.Tensor, fn=None) -> torch.Tensor:
    """Guided samples (latents) of ``module`` at w = W from the noise z with ``sampler`` (re-noising draws from a
    generator seeded 1: the same draws for every chain); ``fn``: another model function than the module's."""
    sampler = sampler if isinstance(sampler, samplers.Sampler) else module.build_sampler(sampler)
    fn = fn or module.model_fn(module.condition(labels), W)
    return sample_loop(fn, sampler, z.shape, torch.Generator().manual_seed(1), noise=z)


def teacher_ode(teacher, labels: torch.Tensor, steps: int = 50):
    """x0-model function (x_t, t) → the teacher's guided 50-step DDIM solution from (x_t, t) down to 0: f as the
    consistency function of the teacher's ODE, what the student learns."""
    sampler = teacher.build_sampler(functools.partial(DDIM, steps=steps))
    sampler.set_timesteps(steps)
    fn = teacher.model_fn(teacher.condition(labels), W)

    def solve(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for s in sampler.timesteps.tolist():
            if s <= int(t[0]):
                x = sampler.step(fn(x, torch.full_like(t, s)), s, x).prev_sample
        return x

    return solve


def test_latent_consistency_beats_the_teachers_few_steps(teacher, tmp_path):
    """1 step: the ODE solution from z (deterministic). 2 steps: LCM's chain re-noises between its steps, so the
    reference is that chain with the teacher's ODE as f and the same noise draws (what a perfect student gives);
    the teacher's own 2-step chain takes its x̂_0 instead."""
    fit = ["trainer.max_steps=100", "model.optimizer.lr=1e-3", "callbacks.ema.decay=0.9", "model.skip=100"]
    result = distill(tmp_path, teacher, *fit)
    first, last = falls(losses(tmp_path))
    student, _ = load_module(result["checkpoint"])
    reference, _ = load_module(teacher)
    z = torch.randn(60, *student.image_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(60) % 10
    lcm = {k: functools.partial(samplers.LCMSampler, steps=k) for k in (1, 2)}
    ode = latents(reference, functools.partial(DDIM, steps=50), z, labels)
    mse = lambda a, b: ((a - b) ** 2).mean().item()  # noqa: E731
    ours = {k: latents(student, lcm[k], z, labels) for k in (1, 2)}
    one_its = mse(latents(reference, functools.partial(DDIM, steps=1), z, labels), ode)
    x0_lcm = samplers.LCMSampler(reference.diffusion, "x0", steps=2, clip_denoised=False)  # f: the ODE's x_0
    chain = latents(reference, x0_lcm, z, labels, fn=teacher_ode(reference, labels))
    two_its = mse(latents(reference, lcm[2], z, labels), chain)
    print(
        f"LCM loss {first:.4f} -> {last:.4f}; w={W}, latent MSE: 1 step to the teacher's 50-step DDIM "
        f"{mse(ours[1], ode):.4f} vs its 1-step DDIM {one_its:.4f}; 2 steps to LCM's chain with the teacher's ODE "
        f"{mse(ours[2], chain):.4f} vs the teacher's 2-step chain {two_its:.4f} (its 2-step DDIM to the ODE: "
        f"{mse(latents(reference, functools.partial(DDIM, steps=2), z, labels), ode):.4f})"
    )
    assert mse(ours[1], ode) < 0.5 * one_its
    assert mse(ours[2], chain) < 0.9 * two_its


def test_train_then_sample_with_its_own_sampler_and_w_input(teacher, tmp_path):
    result = distill(tmp_path / "lcm", teacher, "trainer.max_steps=2")
    checkpoint = load_checkpoint(result["checkpoint"], "ckpt")
    record = checkpoint["distillation"]
    assert record["method"] == "latent_consistency" and record["steps"] == 4
    assert record["teacher"]["ckpt"] == str(Path(teacher).resolve()) and len(record["teacher"]["sha256"]) == 64
    assert checkpoint["consistency"]["target"] is not None and checkpoint["consistency"]["num_scales"] == 51
    assert not any(k.startswith(("teacher", "target")) for k in checkpoint["state_dict"])
    assert "net.guidance_embed.proj.weight" in checkpoint["state_dict"]
    assert checkpoint["latent_scale_factor"] == load_checkpoint(teacher, "ckpt")["latent_scale_factor"]
    moved = tmp_path / "elsewhere.ckpt"  # sampling needs the student's file only (it carries the autoencoder)
    moved.write_bytes(Path(result["checkpoint"]).read_bytes())
    overrides = [
        f"ckpt={moved}",
        "num_samples=4",
        "batch_size=4",
        "device=cpu",
        "progress=false",
        f"guidance_scale={W}",
    ]
    done = sample(compose_config(overrides, tmp_path / "sample", "sample"))
    assert done["summary"]["sampler"] == "LCMSampler" and done["summary"]["steps"] == 4 and done["summary"]["nfe"] == 4
    assert np.load(done["npz"])["arr_0"].shape == (4, 16, 16, 1)  # decoded images
    module, _ = load_module(moved)
    calls = []
    module.net.register_forward_hook(
        lambda net, args, kwargs, out: calls.append((args[0].shape[0], kwargs["w"])), with_kwargs=True
    )
    module.sample(3, generator=torch.Generator().manual_seed(0), num_steps=2, guidance_scale=W)
    assert [batch for batch, _ in calls] == [3, 3]  # one evaluation of the batch per step: no CFG doubling
    assert all(torch.equal(w, torch.full((3,), W)) for _, w in calls)  # w reaches the network's input


def test_resume_restores_the_target_network(teacher, tmp_path):
    first = distill(tmp_path / "a", teacher, "trainer.max_steps=2", "model.target_decay=0.5")
    before = load_checkpoint(first["checkpoint"], "ckpt")
    resumed = train(compose_config([f"ckpt_path={first['checkpoint']}", "trainer.max_steps=3"], tmp_path / "b"))
    after = load_checkpoint(resumed["checkpoint"], "ckpt")
    assert after["global_step"] == 3
    raw = after.get("current_model_state", after["state_dict"])  # the EMA callback keeps the raw weights there
    for name, value in after["consistency"]["target"].items():  # θ⁻_3 = μ θ⁻_2 + (1 − μ) θ_3: θ⁻_2 was restored
        if value.is_floating_point():
            expected = 0.5 * before["consistency"]["target"][name] + 0.5 * raw[f"net.{name}"]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_error_paths(teacher, tmp_path, caplog):
    pixel = train(compose_config([*TINY, *QUIET, "trainer.max_steps=1"], tmp_path / "pixel"))["checkpoint"]
    with raises_in_config(ValueError, "distils a latent diffusion teacher"):
        distill(tmp_path / "from_pixel", pixel, "trainer.max_steps=1")
    with raises_in_config(ValueError, "latent consistency distillation needs a latent diffusion teacher"):
        train(compose_config([*STUDENT, "experiment=latent_consistency", "model.teacher_ckpt=null"], tmp_path / "none"))
    with raises_in_config(ValueError, "model.guidance_scale=5.0: the default w must lie in the trained range"):
        distill(tmp_path / "w", teacher, "model.guidance_scale=5.0")
    with raises_in_config(ValueError, "model.w_min=2.0, model.w_max=1.0"):
        distill(tmp_path / "range", teacher, "model.w_min=2.0", "model.w_max=1.0")
    with raises_in_config(ValueError, "model.skip=600"):
        distill(tmp_path / "skip", teacher, "model.skip=600")
    student, _ = load_module(distill(tmp_path / "ok", teacher, "trainer.max_steps=1")["checkpoint"])
    with caplog.at_level(logging.WARNING):
        student.sample(2, generator=torch.Generator().manual_seed(0), num_steps=1, guidance_scale=6.0)
    assert "outside the range this latent consistency model was trained on" in caplog.text
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        student.sample(2, num_steps=1, guidance_scale=-1.0)

"""Consistency distillation and training end to end (issue 31): the acceptance test (the loss falls; few-step
samples closer to the teacher's many-step ODE samples than the teacher's own few-step samples), train → sample.py
with the checkpoint's own sampler and steps, the distillation record, resume of θ⁻ and of CT's curriculum, and the
error paths."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest
import torch

from difflab import samplers
from difflab.modules import load_module
from difflab.samplers import sample_loop
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.checkpoint_io import load_checkpoint
from tests.conftest import DIGITS_8, compose_config, raises_in_config

# 8x8 digits, the tiny UNet; the teacher (tests/conftest.py's ``digits_teacher``, shared with progressive
# distillation's acceptance test) is the study's cosine schedule at T = 1000
BASE = DIGITS_8
SIGMA_MAX = 10.0  # the tiny teacher's ε̂ is poor at σ = 80 (x̂_0 = x̃ − σ ε̂ amplifies it): every chain starts at 10
FIT = [
    "model.optimizer.lr=1e-3",
    f"model.sigma_max={SIGMA_MAX}",
    "callbacks.ema.decay=0.9",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def teacher(digits_teacher) -> str:
    """A cosine-schedule ε-prediction DDPM on 8x8 digits, 120 steps (the session's ``digits_teacher``)."""
    return digits_teacher


def distill(out: Path, teacher: str, *extra: str) -> dict:
    return train(
        compose_config([*BASE, "experiment=consistency_distill", f"model.teacher_ckpt={teacher}", *extra], out)
    )


def losses(out: Path) -> list[float]:
    rows = csv.DictReader(next(out.rglob("metrics.csv")).open())
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def falls(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 5)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    assert last < 0.8 * first, (first, last)
    return first, last


def draw(module, sampler, steps: int, z: torch.Tensor) -> torch.Tensor:
    sampler = module.build_sampler(sampler)
    sampler.set_timesteps(steps)
    noise = z * sampler.init_noise_sigma
    generator = torch.Generator().manual_seed(1)
    return sample_loop(module.model_fn(None), sampler, z.shape, generator, noise=noise, num_steps=steps)


def teacher_samples(teacher: str, z: torch.Tensor) -> dict:
    """The teacher's 40-step Heun ODE samples and its own 1- and 2-step (Euler, 1 and 2 NFE) samples from z."""
    module, _ = load_module(teacher)
    karras = {"sigma_schedule": "karras", "sigma_max": SIGMA_MAX}
    out = {"ode": draw(module, functools.partial(samplers.HeunSampler, steps=40, **karras), 40, z)}
    for k in (1, 2):
        out[k] = draw(module, functools.partial(samplers.EulerSampler, steps=k, **karras), k, z)
    return out


def test_consistency_distillation_beats_the_teachers_few_steps(teacher, tmp_path):
    result = distill(tmp_path, teacher, "trainer.max_steps=100", "model.num_scales=6", *FIT)
    first, last = falls(losses(tmp_path))
    student, _ = load_module(result["checkpoint"])
    z = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = teacher_samples(teacher, z)
    for k in (1, 2):
        ours = ((draw(student, samplers.ConsistencySampler, k, z) - reference["ode"]) ** 2).mean().item()
        its = ((reference[k] - reference["ode"]) ** 2).mean().item()
        print(f"CD loss {first:.3f} -> {last:.3f}; {k} step(s): MSE to the teacher's ODE {ours:.4f} vs {its:.4f}")
        assert ours < 0.5 * its


# ~25 s on one core (the teacher fixture shared): CT learns from scratch (100 steps are not enough on this size)
def test_consistency_training_beats_the_teachers_few_steps(teacher, tmp_path):
    run = ["experiment=consistency_training", "trainer.max_steps=150", "net.dropout=0.0", *FIT]
    result = train(compose_config([*BASE, *run], tmp_path))
    first, last = falls(losses(tmp_path))
    model, _ = load_module(result["checkpoint"])
    z = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = teacher_samples(teacher, z)
    spread = lambda x: x.std(dim=0).mean().item()  # noqa: E731  per-pixel spread over samples (the teacher's 1 step: a blur)
    for k in (1, 2):
        ours = abs(spread(draw(model, samplers.ConsistencySampler, k, z)) - spread(reference["ode"]))
        its = abs(spread(reference[k]) - spread(reference["ode"]))
        print(
            f"CT loss {first:.3f} -> {last:.3f}; {k} step(s): |Δ spread| to the teacher's ODE {ours:.4f} vs {its:.4f}"
        )
        assert ours < its


def test_train_then_sample_with_its_own_sampler_and_record(teacher, tmp_path):
    result = distill(tmp_path / "cd", teacher, "trainer.max_steps=2", "model.num_scales=4")
    checkpoint = load_checkpoint(result["checkpoint"], "ckpt")
    record = checkpoint["distillation"]
    assert record["method"] == "consistency_distillation" and record["steps"] == 2
    assert record["teacher"]["ckpt"] == str(Path(teacher).resolve()) and len(record["teacher"]["sha256"]) == 64
    assert checkpoint["consistency"]["target"] is not None
    assert not any(k.startswith(("teacher", "target")) for k in checkpoint["state_dict"])
    moved = tmp_path / "elsewhere.ckpt"  # sampling needs the student's file only
    moved.write_bytes(Path(result["checkpoint"]).read_bytes())
    overrides = [f"ckpt={moved}", "num_samples=4", "batch_size=4", "device=cpu", "progress=false"]
    done = sample(compose_config(overrides, tmp_path / "sample", "sample"))
    assert done["summary"]["sampler"] == "ConsistencySampler" and done["summary"]["steps"] == 2
    assert done["summary"]["nfe"] == 2


def test_resume_restores_the_target_network_and_curriculum(teacher, tmp_path):
    first = distill(tmp_path / "a", teacher, "trainer.max_steps=2", "model.num_scales=4", "model.target_decay=0.5")
    before = load_checkpoint(first["checkpoint"], "ckpt")
    resumed = distill(tmp_path / "b", teacher, f"ckpt_path={first['checkpoint']}", "trainer.max_steps=3")
    after = load_checkpoint(resumed["checkpoint"], "ckpt")
    assert after["global_step"] == 3
    raw = after.get("current_model_state", after["state_dict"])  # the EMA callback keeps the raw weights there
    for name, value in after["consistency"]["target"].items():  # θ⁻_3 = μ θ⁻_2 + (1 − μ) θ_3: θ⁻_2 was restored
        if value.is_floating_point():
            expected = 0.5 * before["consistency"]["target"][name] + 0.5 * raw[f"net.{name}"]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    ct = ["experiment=consistency_training", "net.dropout=0.0", "model.curriculum_s1=40"]
    run = train(compose_config([*BASE, *ct, "trainer.max_steps=4"], tmp_path / "c"))
    longer = [*BASE, *ct, f"ckpt_path={run['checkpoint']}", "trainer.max_steps=6"]
    state = load_checkpoint(train(compose_config(longer, tmp_path / "d"))["checkpoint"], "ckpt")["consistency"]
    assert state["total_steps"] == 4 and state["num_scales"] == 41  # K of the run: N(6) = min(10·2^⌊6/1⌋, 40) + 1


def test_error_paths(teacher, tmp_path):
    with raises_in_config(ValueError, "teacher makes \\[1, 8, 8\\] images"):
        distill(tmp_path / "shape", teacher, "data.image_size=16", "trainer.max_steps=1")
    with raises_in_config(ValueError, "consistency distillation needs a teacher"):
        train(compose_config([*BASE, "experiment=consistency_distill", "model.teacher_ckpt=null"], tmp_path / "none"))
    with raises_in_config(ValueError, "learns without a teacher"):
        train(
            compose_config([*BASE, "experiment=consistency_training", f"model.teacher_ckpt={teacher}"], tmp_path / "ct")
        )
    flow = ["model=rectified_flow", "trainer.max_steps=1", "trainer.limit_train_batches=1"]
    flow_ckpt = train(compose_config([*BASE, *flow], tmp_path / "flow"))["checkpoint"]
    with raises_in_config(ValueError, "distils with experiment=reflow"):
        distill(tmp_path / "from_flow", flow_ckpt, "trainer.max_steps=1")

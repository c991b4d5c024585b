"""Issue 31's acceptance test for progressive distillation: from a small ε-prediction cosine teacher (digits 8×8,
T = 100), two rounds (4 → 2 → 1 DDIM steps): the loss falls, and the student's N-step DDIM samples are closer (MSE,
same initial noise) to the teacher's 100-step DDIM samples than the teacher's own N-step samples are.

The same setup measured the student's parameterisation (``model.parameterization``; see
src/difflab/modules/progressive.py and the README): the v-student is the one this test runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from difflab.modules import load_module
from difflab.tasks.train import train
from tests.conftest import TINY, compose_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_progressive_learning")]

BASE = [o for o in TINY if not o.startswith(("schedule.", "model.lr_scheduler", "data.batch_size"))] + [
    "data.image_size=8",
    "data.batch_size=64",
    "schedule=cosine",
    "schedule.num_timesteps=100",
    "trainer.limit_val_batches=0",
    "callbacks.sample_grid=null",
    "callbacks.ema.decay=0.99",
    "samples.num_samples=0",
    "trainer.log_every_n_steps=1",
]
TEACHER = ["model.optimizer.lr=2e-3", "model.lr_scheduler.warmup_steps=20", "trainer.max_steps=400"]
STEPS_PER_ROUND = 150
STUDENT = [
    "model.start_steps=4",
    "model.rounds=2",
    f"model.steps_per_round={STEPS_PER_ROUND}",
    "model.optimizer.lr=1e-3",
]
DDIM = {"_target_": "difflab.samplers.DDIMSampler", "_partial_": True, "eta": 0.0, "spacing": "trailing"}


def draw(path: str | Path, steps: int | None = None, n: int = 256) -> torch.Tensor:
    """n samples of the checkpoint from the same initial noise (seed 1): its own sampler, or DDIM with ``steps``."""
    module, _ = load_module(path, sampler=None if steps is None else {**DDIM, "steps": steps})
    return module.sample(n, generator=torch.Generator().manual_seed(1))


def test_students_few_steps_beat_the_teachers_few_steps(tmp_path):
    teacher = train(compose_config([*BASE, *TEACHER], tmp_path / "teacher"))["checkpoint"]
    student = tmp_path / "student"
    run = ["experiment=progressive_distill", f"model.teacher_ckpt={teacher}", *STUDENT]
    train(compose_config([*BASE, *run], student))
    losses = [
        float(r["train/loss"]) for r in csv.DictReader(open(next(student.rglob("metrics.csv")))) if r["train/loss"]
    ]
    assert len(losses) == 2 * STEPS_PER_ROUND
    for k in range(2):  # (a) the loss falls in each round
        rounds = losses[k * STEPS_PER_ROUND : (k + 1) * STEPS_PER_ROUND]
        assert sum(rounds[-20:]) / 20 < 0.6 * sum(rounds[:20]) / 20, (k, rounds[:20], rounds[-20:])
    reference = draw(teacher, 100)
    for k, steps in ((0, 2), (1, 1)):  # (b) closer to the teacher's 100 steps than the teacher's own N steps
        distilled = draw(student / "checkpoints" / f"round_{k}_{steps}steps.ckpt")
        own = draw(teacher, steps)
        mse_student, mse_teacher = ((distilled - reference) ** 2).mean(), ((own - reference) ** 2).mean()
        assert mse_student < mse_teacher, (steps, float(mse_student), float(mse_teacher))

"""Progressive distillation's arithmetic (Salimans & Ho 2022): eq. 10's target inverts one DDIM step onto the
teacher's two, the grids nest, the truncated-SNR weight, the v/ε/x0 conversions the loss reads."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from difflab.modules import DiffusionModule
from difflab.modules.progressive import (
    ProgressiveDistillationModule,
    ddim_step,
    distillation_target,
    level_of,
    round_grid,
    truncated_snr_weight,
)
from difflab.samplers import AncestralSampler, DDIMSampler
from difflab.samplers.base import spaced_timesteps
from difflab.schedules import GaussianDiffusion, Parameterization, output_from_x0_eps, x0_eps_from_output
from tests.conftest import TINY_NETS, perturb_weights


def test_eq10_target_is_the_exact_inverse_of_one_ddim_step_onto_the_teachers_two():
    """From z_t, one DDIM step t → t'' with x̂ = x̃ lands exactly on the teacher's z_{t''} (float64), at every student
    point of a 4-step grid on the cosine schedule, the last (t'' = data) and the first (t = T, SNR ≈ 0) included."""
    generator = torch.Generator().manual_seed(0)
    ab_table = GaussianDiffusion("cosine", 1000).alphas_cumprod_64
    _, ab = round_grid(ab_table, 4)
    for j in range(2, 9, 2):
        at, at1, at2 = (level_of(ab[j - k]) for k in (0, 1, 2))
        z_t = torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64)
        teacher_x0 = [torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2)]
        eps = (z_t - at.alpha * teacher_x0[0]) / at.std  # a consistent (x̂, ε̂) pair at t
        z_t1 = ddim_step(teacher_x0[0], eps, at1)
        eps1 = (z_t1 - at1.alpha * teacher_x0[1]) / at1.std
        z_t2 = ddim_step(teacher_x0[1], eps1, at2)
        x_tilde = distillation_target(z_t, z_t2, at, at2)
        student_eps = (z_t - at.alpha * x_tilde) / at.std
        torch.testing.assert_close(ddim_step(x_tilde, student_eps, at2), z_t2, rtol=0, atol=1e-10)


def test_eq10_target_through_the_ddim_sampler_in_float32():
    """The student's own sampler (DDIMSampler, η = 0, trailing, no clipping) makes the same step from x̃ given as a
    v-output: the target is in the sampler's conventions (timesteps, ᾱ, the v conversion)."""
    diffusion = GaussianDiffusion("cosine", 100)
    timesteps, ab = round_grid(diffusion.alphas_cumprod_64, 4)
    sampler = DDIMSampler(diffusion, parameterization="v", steps=4, spacing="trailing", clip_denoised=False)
    generator = torch.Generator().manual_seed(1)
    for j in (2, 4, 6):  # t'' is a noisy level (the last step's target is z_{t''} = x̃ itself)
        at, at2 = level_of(ab[j]), level_of(ab[j - 2])
        z_t = torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
        z_t2 = at2.alpha / at.alpha * z_t + 0.3 * torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64)
        x_tilde = distillation_target(z_t, z_t2, at, at2)
        v = output_from_x0_eps(Parameterization.V, x_tilde, (z_t - at.alpha * x_tilde) / at.std, at)
        t = int(timesteps[j - 1])
        stepped = sampler.step(v.float(), t, z_t.float()).prev_sample
        torch.testing.assert_close(stepped.double(), z_t2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_timesteps, steps", [(1000, 500), (1000, 64), (1000, 48), (20, 4), (100, 8)])
def test_the_trailing_grid_of_2n_nests_the_grid_of_n(num_timesteps, steps):
    ab_table = GaussianDiffusion("cosine", num_timesteps).alphas_cumprod_64
    timesteps, ab = round_grid(ab_table, steps)
    student = spaced_timesteps(num_timesteps, steps, "trailing")
    assert timesteps.numel() == 2 * steps and int(timesteps[-1]) == num_timesteps - 1
    assert torch.equal(timesteps[1::2], student)  # τ_2, τ_4, …, τ_2N
    assert ab[0] == 1.0 and torch.equal(ab[1:], ab_table[timesteps])


def test_truncated_snr_weight():
    ab = torch.tensor([0.999, 0.8, 0.5, 0.2, 1e-9], dtype=torch.float64)
    expected = torch.tensor([999.0, 4.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(truncated_snr_weight(ab), expected)


@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_the_conversions_the_loss_reads_round_trip(parameterization):
    """x̂ from the student's output in each parameterisation, at the levels of the grid (float64)."""
    generator = torch.Generator().manual_seed(2)
    _, ab = round_grid(GaussianDiffusion("cosine", 1000).alphas_cumprod_64, 4)
    for j in range(1, 9):
        level = level_of(ab[j])
        x0, eps = (torch.randn(2, 1, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
        z = level.alpha * x0 + level.std * eps
        output = output_from_x0_eps(parameterization, x0, eps, level)
        back_x0, back_eps = x0_eps_from_output(parameterization, output, z, level)
        tolerance = 1e-6 if parameterization is Parameterization.EPS else 1e-9  # ε: x̂ = z/α − σ ε̂, 1/α = 2e4
        torch.testing.assert_close(back_x0, x0, rtol=0, atol=tolerance)
        if parameterization is Parameterization.V:
            torch.testing.assert_close(output, level.alpha * eps - level.std * x0)  # v = α ε − σ x


def test_v_loss_weight_is_the_truncated_snr_weight_times_sigma_squared():
    """max(SNR, 1) ‖x̂ − x̃‖² = max(α², σ²) ‖v̂ − ṽ‖² for a v-student: between ½ and 1 of the v-loss everywhere."""
    level = level_of(torch.tensor(0.3, dtype=torch.float64))
    z, v_hat, v_tilde = torch.randn(3, 8, dtype=torch.float64).unbind()
    x_hat, x_tilde = (level.alpha * z - level.std * v for v in (v_hat, v_tilde))
    weighted = truncated_snr_weight(torch.tensor(0.3, dtype=torch.float64)) * (x_hat - x_tilde).square().sum()
    torch.testing.assert_close(weighted, max(0.3, 0.7) * (v_hat - v_tilde).square().sum())


def _student(**kwargs):
    defaults = {
        "net": TINY_NETS["unet"],
        "schedule": GaussianDiffusion("cosine", 20),
        "optimizer": torch.optim.Adam,
        "image_shape": (1, 8, 8),
        "sampler": functools.partial(DDIMSampler, eta=0.0, spacing="trailing", steps=4),
    }
    return ProgressiveDistillationModule(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_steps": 12, "rounds": 3}, "model.start_steps=12 does not halve model.rounds=3"),
        ({"rounds": 0}, "model.rounds=0"),
        ({"steps_per_round": 0}, "model.steps_per_round=0"),
        ({"start_steps": 32}, "model.start_steps=32: more than the schedule's T=20"),
        ({"sampler": functools.partial(DDIMSampler, eta=1.0, spacing="trailing")}, "sampler: .*DDIM η = 0"),
        ({"sampler": functools.partial(DDIMSampler, spacing="leading")}, "sampler.spacing=trailing"),
        ({"sampler": AncestralSampler}, "sampler: .*AncestralSampler"),
        ({"guidance_scale": 1.0}, "model.guidance_scale=1.0: the student samples unguided"),
    ],
)
def test_construction_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _student(**{"start_steps": 8, **kwargs})


def test_without_a_teacher_it_builds_for_sampling_but_does_not_train():
    student = _student(start_steps=8)
    assert student.teacher is None and student.sampler.num_steps == 4
    with pytest.raises(ValueError, match="model.teacher_ckpt"):
        student.on_fit_start()


def test_after_the_first_round_the_teacher_is_the_previous_student_in_the_students_parameterization():
    """Round 1's teacher is round 0's student: its x̂ at (z, t) is the one the student samples with (its v output read
    as v), whatever the first teacher's parameterisation (ε here); round 0's teacher is the checkpoint's, read as ε."""
    student = _student(start_steps=8, rounds=2, sampler=functools.partial(DDIMSampler, eta=0.0, spacing="trailing"))
    teacher = DiffusionModule(TINY_NETS["unet"], GaussianDiffusion("cosine", 20), torch.optim.Adam, (1, 8, 8))  # ε
    perturb_weights(student.net, seed=1)
    student._teacher.value = teacher
    student._round_teacher.value = copy.deepcopy(student.net).requires_grad_(False).eval()  # η ← θ
    z, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([19, 14, 9])
    at = level_of(student.diffusion.alphas_cumprod_64[t].float().reshape(-1, 1, 1, 1))
    student.use_round(0)
    fn, parameterization = student.teacher_fn(None)
    assert parameterization is Parameterization.EPS and torch.equal(fn(z, t), teacher(z, t))
    student.use_round(1)
    fn, parameterization = student.teacher_fn(None)
    assert parameterization is Parameterization.V
    with torch.no_grad():
        x0_teacher = x0_eps_from_output(parameterization, fn(z, t), z, at)[0]
        x0_student = student.student_x0(z, t, None, None, at)
    torch.testing.assert_close(x0_teacher, x0_student, rtol=0, atol=0)

"""Guidance distillation (Meng et al. 2023) inside progressive distillation: stage one's target is the teacher's CFG
x̂ at each example's w and its loss the truncated-SNR-weighted distance to it, the w input reaches the network (one
evaluation per step), the schedule of stage one and rounds, and the construction errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from difflab.modules import DiffusionModule, ProgressiveDistillationModule
from difflab.modules.guidance_distill import guidance_target
from difflab.modules.guided import GuidedCondition
from difflab.modules.progressive import level_of, truncated_snr_weight
from difflab.samplers import DDIMSampler
from difflab.samplers.base import spaced_timesteps
from difflab.schedules import GaussianDiffusion
from tests.conftest import TINY_NETS, perturb_weights

NUM_CLASSES = 3


class LabelAffine(nn.Module):
    """An analytic class-conditional ε-network: ε̂(x, t, y) = a_y x + b_y t/T, y = ``num_classes``: the null class."""

    def __init__(self, in_channels: int, out_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.a = nn.Parameter(torch.linspace(0.2, 0.8, num_classes + 1))
        self.b = nn.Parameter(torch.linspace(-1.0, 1.0, num_classes + 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.full_like(t, self.num_classes) if y is None else y
        shape = (-1, 1, 1, 1)
        return self.a[y].reshape(shape) * x + self.b[y].reshape(shape) * (t.float() / 20).reshape(shape)


def _student(teacher: DiffusionModule | None = None, **kwargs) -> ProgressiveDistillationModule:
    defaults = {
        "net": TINY_NETS["unet"],
        "schedule": GaussianDiffusion("cosine", 20),
        "optimizer": torch.optim.Adam,
        "image_shape": (1, 8, 8),
        "num_classes": NUM_CLASSES,
        "sampler": functools.partial(DDIMSampler, eta=0.0, spacing="trailing", clip_denoised=False),
        "start_steps": 8,
        "rounds": 2,
        "w_min": 0.0,
        "w_max": 4.0,
        "guidance_steps": 5,
        "guidance_scale": 1.0,
    }
    student = ProgressiveDistillationModule(**{**defaults, **kwargs})
    if teacher is not None:  # as attach_teacher would, without a checkpoint file
        student._teacher.value = teacher
        student.use_round(student.first_round)
    return student


def _teacher() -> DiffusionModule:
    return DiffusionModule(
        LabelAffine, GaussianDiffusion("cosine", 20), torch.optim.Adam, (1, 8, 8), num_classes=NUM_CLASSES
    )


def test_stage_ones_target_is_the_teachers_cfg_x0_at_each_examples_w():
    """x̂^w = (z − s ε̃)/α with ε̃ = (1 + w) ε̂(z, c) − w ε̂(z, ∅), w per example (float64, by hand)."""
    student = _student(_teacher())
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
    t, y, w = torch.tensor([19, 12, 5, 0]), torch.tensor([0, 1, 2, 1]), torch.tensor([0.0, 1.0, 2.5, 4.0])
    ab = student.diffusion.alphas_cumprod_64[t].reshape(-1, 1, 1, 1)
    a, b = torch.linspace(0.2, 0.8, 4, dtype=torch.float64), torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    eps = lambda label: col(a[label]) * z + col(b[label]) * col(t / 20)  # noqa: E731
    guided = (1 + col(w)) * eps(y) - col(w) * eps(torch.full_like(y, NUM_CLASSES))
    expected = (z - (1 - ab).sqrt() * guided) / ab.sqrt()
    at = level_of(ab.float())
    target = guidance_target(*student.teacher_fn(y, w.float()), z.float(), t, at, clip_denoised=False)
    torch.testing.assert_close(target.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    clipped = guidance_target(*student.teacher_fn(y, w.float()), z.float(), t, at, clip_denoised=True)
    torch.testing.assert_close(clipped, target.clamp(-1, 1))  # the sampler's thresholding, when it clips


def test_stage_ones_loss_is_the_truncated_snr_weighted_distance_to_that_target():
    student = _student(_teacher())
    perturb_weights(student.net, seed=1)
    generator = torch.Generator().manual_seed(1)
    x, noise = (torch.randn(3, 1, 8, 8, generator=generator) for _ in range(2))
    y, w, i = torch.tensor([2, 0, 1]), torch.tensor([0.5, 3.0, 1.5]), torch.tensor([8, 4, 1])
    loss = student.guidance_loss(x, y, noise, i, w)
    t = spaced_timesteps(20, 8, "trailing")[i - 1]  # stage one's points: the N_0 = 8 grid itself
    ab = student.diffusion.alphas_cumprod_64[t].float()
    at = level_of(ab.reshape(-1, 1, 1, 1))
    z = at.alpha * x + at.std * noise
    target = guidance_target(*student.teacher_fn(y, w), z, t, at, clip_denoised=False)
    with torch.no_grad():
        v = student.net(z, t, y, w=w)
    x_hat = at.alpha * z - at.std * v  # the v-student's x̂
    expected = truncated_snr_weight(ab) * (x_hat - target).square().flatten(1).mean(1)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_the_w_input_gets_each_examples_w_with_one_evaluation_per_step():
    student = _student()
    perturb_weights(student.net, seed=2)
    proj = student.net.guidance_embed.proj
    torch.nn.init.normal_(proj.weight, std=0.5)  # the zero-initialised w input would hide w
    calls = []
    student.net.register_forward_hook(lambda net, args, kwargs, out: calls.append(kwargs.get("w")), with_kwargs=True)
    draw = lambda w: student.sample(2, generator=torch.Generator().manual_seed(0), num_steps=4, guidance_scale=w)  # noqa: E731
    samples = {w: draw(w) for w in (0.5, 3.0)}
    assert len(calls) == 2 * 4 and all(torch.equal(c, torch.full((2,), 0.5)) for c in calls[:4])  # no CFG doubling
    assert (samples[0.5] - samples[3.0]).abs().max() > 1e-3
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([0, 1])
    w = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(student(x, t, GuidedCondition(y, w)), student.net(x, t, y, w=w))
    torch.testing.assert_close(student.model_fn(y, w)(x, t), student.net(x, t, y, w=w))  # per-example w (teacher use)
    with pytest.raises(ValueError, match=r"guidance_scale=4.5: .*\[model.w_min, model.w_max\] = \[0.0, 4.0\]"):
        student.sample(2, guidance_scale=4.5)


def test_stage_one_then_the_rounds_in_optimizer_steps():
    student = _student(guidance_steps=4, steps_per_round=3)
    assert student.first_round == -1 and student.round == -1 and student.student_steps() == 8
    assert [student.round_of(s) for s in range(12)] == [-1] * 4 + [0] * 3 + [1] * 5  # the last round runs on
    assert [student.round_end(k) for k in (-1, 0, 1)] == [4, 7, 10]
    student.use_round(-1)
    assert torch.equal(student._grid_t, spaced_timesteps(20, 8, "trailing"))
    decay = student.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [round(decay(s), 4) for s in range(8)] == [1.0, 0.75, 0.5, 0.25, 1.0, 0.6667, 0.3333, 1.0]
    assert _student(guidance_steps=0).first_round == 0
    assert _student(guidance_scale=None, w_min=0.5).guidance_scale == 0.5  # null without a teacher: w_min


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"w_max": None}, "model.w_min=0.0, model.w_max=None: set both"),
        ({"w_min": 3.0, "w_max": 1.0}, "model.w_min=3.0, model.w_max=1.0: expected 0 <= w_min <= w_max"),
        ({"teacher_guidance_scale": 2.0}, "model.teacher_guidance_scale=2.0: with model.w_min/model.w_max"),
        ({"w_min": None, "w_max": None}, "model.guidance_steps=5: stage one .* needs the w range"),
        ({"guidance_steps": -1}, "model.guidance_steps=-1: expected a whole number >= 0"),
        ({"guidance_scale": 5.0}, r"model.guidance_scale=5.0: the default w must lie in .* \[0.0, 4.0\]"),
    ],
)
def test_construction_errors_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _student(**kwargs)

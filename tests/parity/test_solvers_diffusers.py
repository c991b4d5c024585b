"""Parity of the continuous-time solvers with diffusers 0.42.1: the same analytic model function, the same σ steps,
the same initial noise and the same generator, the whole chain compared step by step to float32 tolerance.

The model function is the exact denoiser of Gaussian data x_0 ~ N(μ, s² I) (:class:`GaussianData`), expressed as ε, x_0
or v. diffusers' Euler/Heun schedulers work on x̃ = x_t/α_t (``scale_model_input`` divides by sqrt(σ² + 1)); ours keep
x_t in the loop, so their samples are compared after dividing by sqrt(σ² + 1). Both sides get our σ steps (diffusers'
own steps are compared separately in the schedule tests, where we mean the same steps) and the network sees our
timesteps on both sides.

Where we differ from diffusers on purpose (each pinned below):
- The chain starts from x_T = z in x_t, i.e. x̃ = z sqrt(1 + σ_max²) (the process's marginal at t = T), where
  diffusers' Euler-type schedulers with linspace/trailing spacing start from σ_max z.
- Off-table σ (karras, uniform_lambda) reach the network as fractional timesteps (log σ interpolated, as
  k-diffusion); diffusers' DPM-Solver/UniPC round or truncate them to integers, so their network sees another σ
  than their solver uses.
- Euler, Euler ancestral and Heun are written from (x̂_0, ε̂) (x̃' = x̂_0 + σ' ε̂) instead of x̃ + Δσ (x̃ − x̂_0)/σ:
  equal in exact arithmetic, but the cosine schedule's σ_max ≈ 2·10⁴ costs diffusers' form 10⁻⁴ in float32 on a first
  long step. The model-timestep parity therefore runs on the linear schedule (σ_max ≈ 157), and a pinned test shows
  ours matching a float64 chain on the cosine one.
- No noise is drawn for the last step to σ = 0 (diffusers draws it and multiplies it by 0).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from difflab.samplers import (
    DPMSolverMultistepSampler,
    DPMSolverSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    UniPCSampler,
    sample_loop,
)
from difflab.schedules import GaussianDiffusion

warnings.filterwarnings("ignore", message=".*scale_model_input.*")


class GaussianData:
    """x_0 ~ N(μ, s² I) per pixel: the exact denoiser x̂_0 = μ + α s²/(α² s² + s_t²) (x_t − α μ) at any timestep
    (σ from the schedule's log-σ interpolation), as the output of an ε, x_0 or v network; and the exact solution of the
    probability-flow ODE, x̃(σ) − μ ∝ sqrt(s² + σ²)."""

    def __init__(self, diffusion: GaussianDiffusion, shape=(2, 1, 4, 4), scale: float = 0.8, s: float = 0.5):
        g = torch.Generator().manual_seed(0)
        self.view, self.s = diffusion.continuous, s
        self.mu = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).clamp(-1.2, 1.2)
        self.noise = torch.randn(shape, generator=g)

    def denoiser(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sigma = self.view.t_to_sigma(t.double()).reshape(-1, *([1] * (x_t.ndim - 1)))
        alpha = (1 + sigma**2).rsqrt()
        std = sigma * alpha
        x = x_t.double()
        x0 = self.mu + alpha * self.s**2 / (alpha**2 * self.s**2 + std**2) * (x - alpha * self.mu)
        return x0, (x - alpha * x0) / std, alpha

    def model_fn(self, parameterization: str, dtype=torch.float32):
        def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0, eps, alpha = self.denoiser(x_t, t)
            std = (1 - alpha**2).sqrt()
            out = {"eps": eps, "x0": x0, "v": alpha * eps - std * x0}[parameterization]
            return out.to(dtype)

        return fn

    def ode_solution(self, sigma_start: float) -> torch.Tensor:
        """x_0 of the probability-flow ODE from x_T = ``self.noise`` at σ_start (float64)."""
        x_tilde = self.noise.double() * (1 + sigma_start**2) ** 0.5
        return self.mu + (x_tilde - self.mu) * self.s / (self.s**2 + sigma_start**2) ** 0.5


DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# name: (our class, our kwargs, diffusers class, diffusers kwargs, diffusers works on x̃ = x_t/α)
SOLVERS = {
    "euler": (EulerSampler, {}, EulerDiscreteScheduler, {}, True),
    "euler_ancestral": (EulerAncestralSampler, {}, EulerAncestralDiscreteScheduler, {}, True),
    "heun": (HeunSampler, {}, HeunDiscreteScheduler, {}, True),
    "dpmpp_2m": (DPMSolverMultistepSampler, {"order": 2}, DPMSolverMultistepScheduler, {"solver_order": 2}, False),
    "dpmpp_3m": (DPMSolverMultistepSampler, {"order": 3}, DPMSolverMultistepScheduler, {"solver_order": 3}, False),
    "dpmpp_2m_sde": (
        DPMSolverSDESampler,
        {"order": 2},
        DPMSolverMultistepScheduler,
        {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
        False,
    ),
    "unipc": (UniPCSampler, {"order": 2}, UniPCMultistepScheduler, {"solver_order": 2}, False),
    "unipc_3": (UniPCSampler, {"order": 3}, UniPCMultistepScheduler, {"solver_order": 3}, False),
}
SCHEDULES = {
    "linear-trailing": ("linear", {"sigma_schedule": "model", "spacing": "trailing"}),
    "cosine-karras": ("cosine", {"sigma_schedule": "karras", "sigma_max": 80.0}),  # EDM's σ_max
    "linear-uniform_lambda": ("linear", {"sigma_schedule": "uniform_lambda"}),
}


EULER_TYPE = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler)


def diffusers_scheduler(cls, diffusion: GaussianDiffusion, ours, **kwargs):
    """A diffusers scheduler on our β (float64 → its float32 ᾱ), stepping through our σ (and, for the Euler-type
    ones, whose ``step`` finds its index by timestep, our timesteps)."""
    sched = cls(trained_betas=diffusion.betas.double().numpy(), **kwargs)
    sched.set_timesteps(len(ours.sigmas) - 1)
    sigmas = ours.sigmas.float()
    if cls is HeunDiscreteScheduler:  # each interior level twice, as its set_timesteps lays them out
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    sched.sigmas = sigmas
    if cls in EULER_TYPE:
        sched.timesteps = ours.timesteps.clone()
    return sched


def build(name: str, parameterization: str, schedule: str, steps: int, **kwargs):
    beta_schedule, sigma_kwargs = SCHEDULES[schedule]
    diffusion = GaussianDiffusion(beta_schedule)
    ours_cls, ours_kwargs, *_ = SOLVERS[name]
    kwargs = {"clip_denoised": False, **sigma_kwargs, **ours_kwargs, **kwargs}
    return diffusion, ours_cls(diffusion=diffusion, parameterization=parameterization, steps=steps, **kwargs)


def run_both(name: str, parameterization: str, schedule: str, steps: int, ours_extra=None, theirs_extra=None):
    """(our x_t after each network evaluation, diffusers' x_t after each) over one whole chain."""
    diffusion, ours = build(name, parameterization, schedule, steps, **(ours_extra or {}))
    _, _, theirs_cls, theirs_kwargs, tilde = SOLVERS[name]
    data = GaussianData(diffusion)
    model = data.model_fn(parameterization)
    trace_ours, x, g = [], data.noise.clone(), torch.Generator().manual_seed(1)
    for t in ours.timesteps.tolist():  # the loop of sample_loop, keeping every x
        x = ours.step(model(x, torch.full((x.shape[0],), t)), t, x, generator=g).prev_sample
        trace_ours.append(x)
    final = sample_loop(model, ours, x.shape, generator=torch.Generator().manual_seed(1), noise=data.noise.clone())
    torch.testing.assert_close(final, trace_ours[-1], rtol=0, atol=0)

    kwargs = {"prediction_type": DIFFUSERS_PREDICTION[parameterization], **theirs_kwargs, **(theirs_extra or {})}
    sched = diffusers_scheduler(theirs_cls, diffusion, ours, **kwargs)
    scale = [float(1 + s**2) ** 0.5 if tilde else 1.0 for s in ours.sigmas]  # x̃ = x_t sqrt(1 + σ²)
    after = ours.plan[1:] + [len(ours.sigmas) - 1]  # the level each evaluation's step lands on
    trace_theirs, x, g = [], data.noise.clone() * scale[0], torch.Generator().manual_seed(1)
    generator = {} if theirs_cls in (HeunDiscreteScheduler, UniPCMultistepScheduler) else {"generator": g}
    for k, t_ours in enumerate(ours.timesteps.tolist()):
        t_theirs = sched.timesteps[k]
        out = model(sched.scale_model_input(x, t_theirs), torch.full((x.shape[0],), t_ours))
        x = sched.step(out, t_theirs, x, **generator).prev_sample
        trace_theirs.append(x / scale[after[k]])
    return trace_ours, trace_theirs


def assert_chains_close(ours, theirs, atol=2e-5):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=atol, msg=lambda m, k=k: f"evaluation {k}: {m}")


CASES = [
    (name, param, schedule, steps)
    for name in SOLVERS
    for param in ("eps", "x0", "v")
    for schedule in SCHEDULES
    for steps in (6, 20)
    if not (name == "euler_ancestral" and param == "x0")  # diffusers' EulerAncestral has no x0 prediction
]


@pytest.mark.parametrize("name, parameterization, schedule, steps", CASES)
def test_whole_chain_matches_diffusers(name, parameterization, schedule, steps):
    assert_chains_close(*run_both(name, parameterization, schedule, steps))


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "unipc_3"])
@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"clip_denoised": True}, {"thresholding": True, "sample_max_value": 1.0}),  # s clamped to 1: a static clip
        (
            {"clip_denoised": True, "dynamic_threshold": 0.9},
            {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1e6},
        ),
    ],
    ids=["static", "dynamic"],
)
def test_thresholding_matches_diffusers(name, ours, theirs):
    """Static clipping and Imagen's dynamic thresholding of x̂_0 (Saharia et al. §2.3) on data that leaves [-1, 1]."""
    chain_ours, chain_theirs = run_both(name, "eps", "linear-trailing", 8, ours, theirs)
    assert_chains_close(chain_ours, chain_theirs)


def test_heun_clip_matches_diffusers_clip_sample():
    chain_ours, chain_theirs = run_both(
        "heun", "eps", "linear-trailing", 8, {"clip_denoised": True}, {"clip_sample": True}
    )
    assert_chains_close(chain_ours, chain_theirs)


# ---------------------------------------------------------------------- σ steps and timesteps
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_karras_and_uniform_lambda_sigmas_match_diffusers(beta_schedule):
    """Karras ρ = 7 over the model's whole σ range and uniform λ: DPMSolverMultistepScheduler's use_karras_sigmas and
    use_lu_lambdas (same ends: σ_0 and σ_{T−1}). diffusers' float32 ᾱ costs up to 3e-4 relative at σ_0 of the cosine
    schedule (1 − ᾱ_0 = 4e-5 in float32); ours are float64."""
    diffusion = GaussianDiffusion(beta_schedule)
    betas = diffusion.betas.double().numpy()
    for option, schedule in (("use_karras_sigmas", "karras"), ("use_lu_lambdas", "uniform_lambda")):
        sched = DPMSolverMultistepScheduler(trained_betas=betas, **{option: True})
        sched.set_timesteps(12)
        ours = DPMSolverMultistepSampler(diffusion=diffusion, steps=12, sigma_schedule=schedule)
        torch.testing.assert_close(ours.sigmas.float(), sched.sigmas, rtol=5e-4, atol=0)


def test_karras_timesteps_are_the_interpolated_ones_of_diffusers_euler():
    """EulerDiscreteScheduler keeps the Karras timesteps fractional (log σ interpolation): so do we, everywhere."""
    diffusion = GaussianDiffusion("linear")
    sched = EulerDiscreteScheduler(trained_betas=diffusion.betas.double().numpy(), use_karras_sigmas=True)
    sched.set_timesteps(10)
    ours = EulerSampler(diffusion=diffusion, steps=10, sigma_schedule="karras")
    torch.testing.assert_close(ours.timesteps, sched.timesteps, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours.sigmas.float(), sched.sigmas, rtol=1e-4, atol=0)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_model_timesteps_match_diffusers(spacing):
    diffusion = GaussianDiffusion("linear")
    betas = diffusion.betas.double().numpy()
    for ours_cls, theirs_cls in ((EulerSampler, EulerDiscreteScheduler), (HeunSampler, HeunDiscreteScheduler)):
        sched = theirs_cls(trained_betas=betas, timestep_spacing=spacing)
        sched.set_timesteps(10)
        ours = ours_cls(diffusion=diffusion, steps=10, spacing=spacing)
        torch.testing.assert_close(ours.timesteps, sched.timesteps.float(), rtol=0, atol=0)
        sigmas = ours.sigmas.float()
        if ours_cls is HeunSampler:
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------- our choices, pinned
def test_pinned_chain_starts_from_the_marginal_at_t_T():
    """x_T = z in x_t (x̃ = z sqrt(1 + σ_max²)); diffusers' trailing Euler starts from σ_max z: pinned, ours."""
    diffusion = GaussianDiffusion("linear")
    seen = []
    sampler = EulerSampler(diffusion=diffusion, steps=4, spacing="trailing")
    noise = torch.randn(2, 1, 4, 4)
    sample_loop(lambda x, t: seen.append(x.clone()) or torch.zeros_like(x), sampler, noise.shape, noise=noise)
    torch.testing.assert_close(seen[0], noise, rtol=0, atol=0)
    sched = EulerDiscreteScheduler(trained_betas=diffusion.betas.double().numpy(), timestep_spacing="trailing")
    sched.set_timesteps(4)
    assert float(sched.init_noise_sigma) == pytest.approx(float(sampler.sigmas[0]), rel=1e-4)  # theirs: σ_max, not
    assert float(sampler.sigmas[0]) < float(1 + sampler.sigmas[0] ** 2) ** 0.5  # sqrt(1 + σ_max²)


def test_pinned_fractional_timesteps_evaluate_the_solvers_sigma():
    """The network's t of a Karras step is fractional and maps back to exactly that σ (diffusers' DPM-Solver and UniPC
    round t, so their network is evaluated at another σ than their update uses)."""
    diffusion = GaussianDiffusion("linear")
    ours = DPMSolverMultistepSampler(diffusion=diffusion, steps=10, sigma_schedule="karras")
    assert (ours.timesteps.double() != ours.timesteps.double().round()).any()
    back = diffusion.continuous.t_to_sigma(diffusion.continuous.sigma_to_t(ours.sigmas[:-1]))
    torch.testing.assert_close(back, ours.sigmas[:-1], rtol=1e-12, atol=0)
    sched = DPMSolverMultistepScheduler(trained_betas=diffusion.betas.double().numpy(), use_karras_sigmas=True)
    sched.set_timesteps(10)
    assert sched.timesteps.dtype == torch.int64


@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_pinned_large_sigma_euler_tracks_a_float64_chain(parameterization):
    """Cosine schedule, trailing steps (σ_max ≈ 2·10⁴ → 6.4 in one step): our float32 Euler stays within 1e-5 of
    diffusers' update run in float64, while their float32 update is ~1e-4 off (x̃ + Δσ d loses digits at σ_max).
    (Heun's corrector multiplies the float32 rounding of the network output at its predicted point by Δσ/2 ≈ 10⁴ on
    such a step, in any implementation: its default Karras steps avoid that.)"""
    diffusion = GaussianDiffusion("cosine")
    data = GaussianData(diffusion)
    ours = EulerSampler(
        diffusion=diffusion, parameterization=parameterization, steps=10, spacing="trailing", clip_denoised=False
    )
    x_ours = sample_loop(data.model_fn(parameterization), ours, data.noise.shape, noise=data.noise.clone())
    prediction = DIFFUSERS_PREDICTION[parameterization]
    betas = diffusion.betas.double().numpy()
    finals = {}
    for dtype in (torch.float64, torch.float32):
        sched = EulerDiscreteScheduler(trained_betas=betas, prediction_type=prediction)
        sched.set_timesteps(10)
        sched.sigmas, sched.timesteps = ours.sigmas.to(dtype), ours.timesteps.to(dtype)
        model = data.model_fn(parameterization, dtype)
        x = (data.noise.double() * float(1 + ours.sigmas[0] ** 2) ** 0.5).to(dtype)
        for t in sched.timesteps:
            x = sched.step(model(sched.scale_model_input(x, t), t.repeat(x.shape[0])), t, x).prev_sample
        finals[dtype] = x.double()
    torch.testing.assert_close(x_ours.double(), finals[torch.float64], rtol=0, atol=1e-5)
    assert (finals[torch.float32] - finals[torch.float64]).abs().max() > 3e-5


def test_pinned_no_noise_drawn_for_the_last_step():
    """Euler ancestral on N steps draws N − 1 noise tensors (none for σ → 0, where diffusers draws one times 0)."""
    diffusion = GaussianDiffusion("linear")
    sampler = EulerAncestralSampler(diffusion=diffusion, steps=5, clip_denoised=False)
    g = torch.Generator().manual_seed(3)
    sample_loop(lambda x, t: torch.zeros_like(x), sampler, (1, 1, 2, 2), generator=g)
    reference = torch.Generator().manual_seed(3)
    for _ in range(1 + 4):  # x_T, then one per step except the last
        torch.randn((1, 1, 2, 2), generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())

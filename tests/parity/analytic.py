"""Shared inputs of the parity tests: one deterministic model function and deterministic tensors, fed identically to
difflab and to the reference (diffusers, or improved-diffusion's formulas for the pinned values).

Reuse them for every new sampler's parity test:

    model = AnalyticModel(diffusion.alphas_cumprod_64, "v")      # any parameterisation, optional variance channel
    x_T = pattern((2, 3, 8, 8), seed=1)                           # no RNG: the same numbers on every platform
    out = model(x_T, 999)                                         # t: int or (B,) long tensor of original steps

The pinned improved-diffusion values in ``test_improved_diffusion.py`` were computed from exactly these formulas:
changing :func:`pattern`, :func:`quantized_image` or :class:`AnalyticModel` means recomputing them.
"""

from __future__ import annotations

import math

import torch

MU, STD = 0.3, 0.5  # the per-pixel data distribution N(MU, STD²) whose ε the model knows


def pattern(shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Deterministic, RNG-free, roughly unit-variance values of ``shape`` (float32): sqrt(2) sin of an irrational
    multiple of the flat index, so pinned reference values never depend on a random stream."""
    n = math.prod(shape)
    index = torch.arange(n, dtype=torch.float64) + 1.0
    values = math.sqrt(2.0) * torch.sin(index * (math.sqrt(2.0) + seed) * 12.9898 + 0.7 * seed)
    return (scale * values).reshape(shape).float()


def quantized_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """x_0 in [-1, 1] on the 256 levels k/127.5 − 1 (what the discretised decoder L_0 expects), edges included."""
    levels = torch.round((pattern(shape, seed).double() / math.sqrt(2.0) + 1.0) * 127.5).clamp(0, 255)
    levels.view(-1)[:2] = torch.tensor([0.0, 255.0], dtype=torch.float64)  # both edge bins of the decoder
    return (levels / 127.5 - 1.0).float()


class AnalyticModel:
    """A deterministic stand-in for a trained network: ε(x, t) in closed form, as a network of the given
    parameterisation would output it.

    ε(x, t) = sqrt(1 − ᾱ_t) (x − sqrt(ᾱ_t) MU) / (ᾱ_t STD² + 1 − ᾱ_t)  +  0.2 sqrt(ᾱ_t) sin(3x) cos(π t/T):
    the exact ε of N(MU, STD²) data plus a smooth t-dependent term (scaled so that x̂_0 stays within ±0.2/sqrt(1−ᾱ)
    of the exact posterior mean, some of it outside [-1, 1]), so that a wrong timestep or coefficient changes the
    output. It is converted to x_0 or v with float64 ᾱ; with ``learned_variance`` a second block of
    C channels holds v_var = tanh(x + t/T − 0.5) ∈ (−1, 1) (the learned-range interpolation weight).

    Args:
        alphas_cumprod: ᾱ, (T,) float64 (``GaussianDiffusion.alphas_cumprod_64``).
        parameterization: ``eps`` | ``x0`` | ``v``.
        learned_variance: append the variance channels (output (B, 2C, H, W)).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, parameterization: str = "eps", learned_variance: bool = False):
        self.alphas_cumprod = alphas_cumprod.double()
        self.parameterization = parameterization
        self.learned_variance = learned_variance

    def eps(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """ε(x, t) in float64, x: (B, C, H, W), t: int or (B,)."""
        ab, tt = self._per_example(t, x)
        T = self.alphas_cumprod.shape[0]
        xd = x.double()
        exact = (1.0 - ab).sqrt() * (xd - ab.sqrt() * MU) / (ab * STD**2 + 1.0 - ab)
        return exact + 0.2 * ab.sqrt() * torch.sin(3.0 * xd) * torch.cos(math.pi * tt / T)

    def __call__(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The network output (B, C or 2C, H, W), float32."""
        ab, tt = self._per_example(t, x)
        eps = self.eps(x, t)
        x0 = (x.double() - (1.0 - ab).sqrt() * eps) / ab.sqrt()
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1.0 - ab).sqrt() * x0}[self.parameterization]
        if self.learned_variance:
            T = self.alphas_cumprod.shape[0]
            out = torch.cat([out, torch.tanh(x.double() + tt / T - 0.5)], dim=1)
        return out.float()

    def _per_example(self, t: int | torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, t) as float64 (B, 1, 1, 1) tensors."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).expand(x.shape[0])
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return self.alphas_cumprod[t].reshape(shape), t.double().reshape(shape)


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator; pass one with the same seed to difflab and to the reference so their z are the same."""
    return torch.Generator().manual_seed(seed)


def with_range_ends(model_output: torch.Tensor) -> torch.Tensor:
    """Set the learned-range channels (the second half) of the first two pixels of every example to v = +1 and
    v = −1 exactly: the two ends of the range, log β_t and log β̃_t (B, 2C, H, W with H·W ≥ 2)."""
    out = model_output.clone()
    channels = out.shape[1] // 2
    flat = out[:, channels:].reshape(out.shape[0], -1)
    flat[:, 0], flat[:, 1] = 1.0, -1.0
    out[:, channels:] = flat.reshape(out[:, channels:].shape)
    return out


def flow_velocity(x: torch.Tensor, tau: float | torch.Tensor, wiggle: float = 0.2) -> torch.Tensor:
    """A rectified flow's velocity v(x, τ) = E[ε − x_0 | x_τ = x] for per-pixel N(MU, STD²) data and x_τ = (1 − τ) x_0
    + τ ε, float64, plus ``wiggle`` sin(3x) cos(πτ), a smooth term that makes a wrong τ or update visible
    (``wiggle=0``: the exact, oracle velocity).

    With var = (1 − τ)² STD² + τ² and r = x − (1 − τ) MU: E[x_0 | x] = MU + (1 − τ) STD² r/var, E[ε | x] = τ r/var.
    """
    tau = torch.as_tensor(tau, dtype=torch.float64)
    if tau.ndim == 1:  # (B,) per example
        tau = tau.reshape(-1, *([1] * (x.ndim - 1)))
    xd = x.double()
    var = (1 - tau) ** 2 * STD**2 + tau**2
    r = xd - (1 - tau) * MU
    exact = tau * r / var - (MU + (1 - tau) * STD**2 * r / var)
    return exact + wiggle * torch.sin(3.0 * xd) * torch.cos(math.pi * tau)


class GaussianClasses(torch.nn.Module):
    """An exact noise-conditional classifier for classifier guidance: K classes with p(x_0 | k) = N(μ_k, τ² I) and equal
    priors. Under q, x_t | k ~ N(α_t μ_k, v_t I) with v_t = α_t² τ² + s_t², so (logits up to a constant)
        log p(k | x_t) = −|x_t − α_t μ_k|² / (2 v_t) − logsumexp,
        ∇_{x_t} log p(y | x_t) = (α_t/v_t)(μ_y − Σ_k p_k μ_k).
    ``forward(x_t, t)`` takes t as the network does (long, or float between the model's steps: α_t, s_t by the
    schedule's log-σ interpolation, ``GaussianDiffusion.noise_level``). ``means``: (K, C, H, W).
    """

    def __init__(self, diffusion, means: torch.Tensor, tau: float = 0.4) -> None:
        super().__init__()
        self.diffusion, self.means, self.tau = diffusion, means, tau

    def alpha_var(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, v_t), each (B,)."""
        level = self.diffusion.noise_level(t, x)
        return level.alpha.flatten(), (level.alpha**2 * self.tau**2 + level.std**2).flatten()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, var = self.alpha_var(x, t)
        diff = x[:, None] - alpha.reshape(-1, 1, *[1] * (x.ndim - 1)) * self.means[None]
        return -diff.pow(2).flatten(2).sum(-1) / (2 * var[:, None])

    def grad(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The closed-form ∇_{x_t} log p(y | x_t, t), (B, C, H, W)."""
        alpha, var = self.alpha_var(x, t)
        p = self(x, t).softmax(dim=1)
        mean = torch.einsum("bk,k...->b...", p, self.means)
        return (alpha / var).reshape(-1, *[1] * (x.ndim - 1)) * (self.means[y] - mean)

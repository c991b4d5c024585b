"""Negative log-likelihood bound of the full chain, in bits/dim (Ho et al. Table 2; Nichol & Dhariwal Table 1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.losses.vlb import prior_bpd, vlb_term
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType


@torch.no_grad()
def full_chain_bpd(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    parameterization: Parameterization,
    variance_type: VarianceType,
    x_start: torch.Tensor,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """−log p(x_0) ≤ L_0 + Σ_t L_t + L_T for x_start (B, C, H, W) in [-1, 1], one noise draw per term.

    Returns per-example (B,) ``total_bpd``, ``prior_bpd`` (L_T), ``decoder_bpd`` (L_0), ``terms_bpd`` (the T − 1 KL
    terms summed) and ``vb`` (B, T) with every term, indexed by t. Costs T network evaluations per batch.
    """
    batch = x_start.shape[0]
    vb = torch.empty(batch, diffusion.num_timesteps, device=x_start.device)
    for t in range(diffusion.num_timesteps - 1, -1, -1):
        t_batch = torch.full((batch,), t, device=x_start.device, dtype=torch.long)
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = diffusion.q_sample(x_start, t_batch, noise)
        vb[:, t] = vlb_term(diffusion, parameterization, variance_type, model_fn(x_t, t_batch), x_start, x_t, t_batch)
    prior = prior_bpd(diffusion, x_start)
    return {
        "total_bpd": vb.sum(dim=1) + prior,
        "prior_bpd": prior,
        "decoder_bpd": vb[:, 0],
        "terms_bpd": vb[:, 1:].sum(dim=1),
        "vb": vb,
    }

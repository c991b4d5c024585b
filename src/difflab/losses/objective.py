"""The training objectives: L_simple (Ho et al.), L_hybrid and L_vlb (Nichol & Dhariwal 2021 §3)."""

from __future__ import annotations

import torch
from torch import nn

from difflab.losses.vlb import mean_flat, vlb_term
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType
from difflab.utils.enums import StrEnumChoice, parse_enum


class LossType(StrEnumChoice):
    SIMPLE = "simple"  # ||target − f_θ||² (Ho et al. eq. 14); fixed variances only
    HYBRID = "hybrid"  # L_simple + λ L_vlb with a stop-gradient on the mean (Nichol & Dhariwal eq. 16)
    VLB = "vlb"  # the variational bound alone (trains mean and variance)


class DiffusionLoss(nn.Module):
    """Per-example training loss terms.

    Args:
        loss_type: ``simple`` | ``hybrid`` | ``vlb``.
        vlb_weight: λ of L_hybrid = L_simple + λ L_vlb. The paper's λ = 0.001 multiplies the VLB *summed over the T
            terms*; one sampled t per example estimates that sum as T · L_t, so the per-example term is weighted
            λ · T (= T/1000, as improved-diffusion's ``num_timesteps / 1000``). Applying λ to L_t alone is 1000x
            too weak at T = 1000.
        reduce_mean: L_simple as the mean (True) or the sum over C·H·W.
    """

    def __init__(
        self, loss_type: str | LossType = LossType.SIMPLE, vlb_weight: float = 0.001, reduce_mean: bool = True
    ):
        super().__init__()
        self.loss_type = parse_enum(LossType, loss_type, "model.loss.loss_type")
        if vlb_weight < 0:
            raise ValueError(f"model.loss.vlb_weight={vlb_weight}: expected >= 0")
        self.vlb_weight, self.reduce_mean = vlb_weight, reduce_mean

    def check(self, variance_type: VarianceType) -> None:
        """Reject combinations that would silently not train something."""
        if variance_type.learned and self.loss_type is LossType.SIMPLE:
            raise ValueError(
                "model.variance_type=learned_range needs model.loss.loss_type=hybrid or vlb: L_simple does not train Σ"
            )
        if not variance_type.learned and self.loss_type is LossType.HYBRID:
            raise ValueError(
                f"model.loss.loss_type=hybrid needs model.variance_type=learned_range (got {variance_type.value}): "
                "with a fixed variance its VLB term has nothing to train"
            )

    def forward(
        self,
        diffusion: GaussianDiffusion,
        parameterization: Parameterization,
        variance_type: VarianceType,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Return per-example (B,) terms: ``loss`` plus ``mse`` and/or ``vb`` (bits/dim)."""
        terms: dict[str, torch.Tensor] = {}
        mean_output, var_output = diffusion.split_output(model_output, variance_type)
        if self.loss_type is LossType.VLB:
            terms["vb"] = vlb_term(diffusion, parameterization, variance_type, model_output, x_start, x_t, t)
            terms["loss"] = terms["vb"]
            return terms
        target = diffusion.training_target(parameterization, x_start, noise, t)
        sq = (mean_output.float() - target.float()) ** 2
        terms["mse"] = mean_flat(sq) if self.reduce_mean else sq.flatten(1).sum(1)
        terms["loss"] = terms["mse"]
        if self.loss_type is LossType.HYBRID:
            # stop-gradient on the mean: L_vlb trains only the variance channels (Nichol & Dhariwal §3.1)
            frozen = torch.cat([mean_output.detach(), var_output], dim=1)
            terms["vb"] = vlb_term(diffusion, parameterization, variance_type, frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + self.vlb_weight * diffusion.num_timesteps * terms["vb"]
        return terms

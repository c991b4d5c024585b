"""What the network predicts (parameterisation) and how the reverse variance is chosen."""

from __future__ import annotations

from difflab.utils.enums import StrEnumChoice


class Parameterization(StrEnumChoice):
    """The network's regression target: ε (Ho et al.), x_0, or v = sqrt(ᾱ) ε − sqrt(1−ᾱ) x_0 (Salimans & Ho)."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


class VarianceType(StrEnumChoice):
    """Σ_θ(x_t, t) of the reverse step.

    FIXED_SMALL: σ_t² = β̃_t (posterior variance); FIXED_LARGE: σ_t² = β_t (DDPM §3.2, both fixed);
    LEARNED_RANGE: log Σ = v log β_t + (1 − v) log β̃_t with v predicted (Nichol & Dhariwal eq. 15);
    ANALYTIC: the optimal σ*_t² of Analytic-DPM (Bao et al. 2022, eq. 7) from the model's Γ_t moment
    (:mod:`difflab.samplers.analytic`): a sampling choice for fixed-variance models (``sampler.variance_type``),
    never a training one (``model.variance_type=analytic`` is refused where the model builds its sampler).
    """

    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"
    ANALYTIC = "analytic"

    @property
    def learned(self) -> bool:
        return self is VarianceType.LEARNED_RANGE

    @property
    def trainable(self) -> bool:
        """Whether a model can be trained with it (``model.variance_type``): all but ``analytic``."""
        return self is not VarianceType.ANALYTIC

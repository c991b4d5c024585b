"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, S_churn = 0).

With x̃ = x_t/α_t and d(x̃, σ) = (x̃ − x̂_0)/σ = ε̂, a step σ_i → σ_{i+1} is
    x̃' = x̃_i + (σ_{i+1} − σ_i) d_i                                   (Euler predictor)
    x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i) (d_i + d(x̃', σ_{i+1}))/2          (trapezoidal corrector)
except the last step to σ = 0, which stays Euler (EDM: "if σ_{i+1} ≠ 0"; d at σ = 0 is undefined).
N steps cost 2N − 1 network evaluations; ``timesteps`` lists each evaluation (interior levels twice), as diffusers'
HeunDiscreteScheduler, so the usual loop runs unchanged. Karras σ steps (ρ = 7) are EDM's own choice.
"""

from __future__ import annotations

from difflab.samplers.continuous import ContinuousSampler
from difflab.samplers.euler import euler_update


class HeunSampler(ContinuousSampler):
    """``sampler=heun``: EDM's deterministic 2nd-order sampler; ``steps`` counts σ levels (NFE = 2·steps − 1)."""

    def evaluation_plan(self, num_steps: int) -> list[int]:
        """Level 0 once, then each later level twice: the corrector of the step into it, then its own predictor."""
        return [0] + [i for i in range(1, num_steps) for _ in (0, 1)]

    def solve(self, i, x, x0, eps, generator):
        level = self.levels[i]
        if "pending" in self.state:  # corrector: x is the Euler prediction x̃' at level i
            x_pred, d_start, start = self.state.pop("pending")
            # x̃_i + Δσ (d_i + d')/2 = x̃' + Δσ (d' − d_i)/2: no difference of large numbers
            return (x_pred + (level.sigma - self.levels[start].sigma) * (eps - d_start) / 2) * level.alpha
        to = self.levels[i + 1]
        x_pred = euler_update(x0, eps, to.sigma)
        if to.sigma > 0:  # keep x̃' and d_i for the corrector at level i + 1
            self.state["pending"] = (x_pred, eps, i)
        return x_pred * to.alpha

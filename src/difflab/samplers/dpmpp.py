"""DPM-Solver++ multistep (Lu et al. 2022b, "DPM-Solver++", Algorithms 2 and §4; data prediction).

In λ = log(α/s) the exact solution from level i to i+1 is (eq. 9 of the paper)
    x_{i+1} = (s_{i+1}/s_i) x_i + α_{i+1} ∫_{λ_i}^{λ_{i+1}} e^{−(λ_{i+1} − λ)} x̂_0(x_λ, λ) dλ,
and the multistep solvers replace x̂_0 by its polynomial through the last k evaluations (h = λ_{i+1} − λ_i,
r_j = h_{i−j}/h, m_j = x̂_0 at level i − j):
    order 1:  x_{i+1} = (s'/s) x_i − α' (e^{−h} − 1) m_0                                 (= DDIM, η = 0)
    order 2:  … − α' (e^{−h} − 1) (D_0 + D_1/2),  D_1 = (m_0 − m_1)/r_0                    (2M, Algorithm 2)
    order 3:  … + α' ((e^{−h} − 1)/h + 1) D_1 − α' ((e^{−h} − 1 + h)/h² − ½) D_2            (3M)
The first steps warm up at lower order (the history is short); the last step lands on σ = 0 where every order
gives x̂_0; with ``lower_order_final`` and fewer than 15 steps the second-to-last step of 3M uses order 2
(diffusers' ``lower_order_final``: the high-order extrapolation is unstable on the last, long λ steps).
One network evaluation per step; the x̂_0 history (k − 1 tensors) is the sampler's state.
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.continuous import ContinuousSampler

LOWER_ORDER_FINAL_BELOW = 15  # steps under which the second-to-last step drops to order 2 (diffusers' choice)


def multistep_terms(history: list[torch.Tensor], lambdas: list[float], order: int) -> tuple[torch.Tensor, ...]:
    """(D_0, D_1, D_2)[:order] of the last ``order`` x̂_0 (``history``, oldest first) at ``lambdas`` (λ_{i−k+1} …
    λ_{i+1}; the last entry is the target level)."""
    h = lambdas[-1] - lambdas[-2]
    m0 = history[-1]
    if order == 1:
        return (m0,)
    r0 = (lambdas[-2] - lambdas[-3]) / h
    d1_0 = (m0 - history[-2]) / r0
    if order == 2:
        return m0, d1_0
    r1 = (lambdas[-3] - lambdas[-4]) / h
    d1_1 = (history[-2] - history[-3]) / r1
    return m0, d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


class MultistepSampler(ContinuousSampler):
    """What the multistep solvers share: ``order`` (one of ``orders``), ``lower_order_final``, steps >= order."""

    orders: tuple[int, ...] = (1, 2, 3)

    def __init__(self, *args, order: int = 2, lower_order_final: bool = True, **kwargs) -> None:
        if order not in self.orders:
            raise ValueError(f"sampler.order={order}: {type(self).__name__} has orders {list(self.orders)}")
        self.order, self.lower_order_final = int(order), bool(lower_order_final)
        self.min_steps = self.order  # the order-k update needs k − 1 earlier evaluations
        super().__init__(*args, **kwargs)

    def describe(self) -> str:
        return f"(order={self.order})"


class DPMSolverMultistepSampler(MultistepSampler):
    """``sampler=dpmpp_2m`` (order 2) and ``dpmpp_3m`` (order 3); order 1 is DDIM. The other arguments as
    :class:`ContinuousSampler`; ``lower_order_final`` as above (default true, as diffusers)."""

    def order_at(self, i: int) -> int:
        """The order of step i: warm-up, the lower-order final steps, else ``self.order``."""
        n = self.num_steps_run
        order = min(self.order, i + 1)
        if self.lower_order_final and n < LOWER_ORDER_FINAL_BELOW and i == n - 2:
            order = min(order, 2)
        return order

    def solve(self, i, x, x0, eps, generator):
        history = self.state.setdefault("x0", [])
        history.append(x0)
        del history[: -self.order]
        if self.levels[i + 1].sigma == 0:  # the limit λ → ∞ of every order
            return x0
        order = self.order_at(i)
        lambdas = [self.levels[j].lambda_ for j in range(i - order + 1, i + 2)]
        return self.update(x, multistep_terms(history, lambdas, order), i, generator)

    def update(
        self, x: torch.Tensor, terms: tuple[torch.Tensor, ...], i: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """DPM-Solver++(order) from level i to i + 1 (the equations above; midpoint form for order 2)."""
        s, to = self.levels[i], self.levels[i + 1]
        h = to.lambda_ - s.lambda_
        phi_1 = math.expm1(-h)  # e^{−h} − 1
        out = (to.std / s.std) * x - (to.alpha * phi_1) * terms[0]
        if len(terms) == 2:
            out = out - (0.5 * to.alpha * phi_1) * terms[1]
        elif len(terms) == 3:
            out = out + (to.alpha * (phi_1 / h + 1.0)) * terms[1]
            out = out - (to.alpha * ((phi_1 + h) / h**2 - 0.5)) * terms[2]
        return out

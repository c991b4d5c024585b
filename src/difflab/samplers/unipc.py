"""UniPC multistep, B(h) = e^h − 1 ("bh2"), data prediction (Zhao et al. 2023, Algorithms 1–3; diffusers'
UniPCMultistepScheduler with ``predict_x0=True, solver_type="bh2"``).

Each step evaluates the network once at the predicted x_i, then
  UniC (corrector, order p + 1, no extra evaluation): re-does the previous step i−1 → i with the new x̂_0(x_i) in
       the polynomial, and replaces x_i by the corrected value;
  UniP (predictor, order p): x_{i+1} = (s'/s) x_i − α' (e^{−h} − 1) m_0 − α' B(h) Σ_k ρ_k D_k,
       D_k = (m_k − m_0)/r_k, r_k = (λ_{i−k} − λ_i)/h,
where ρ solves the order conditions R ρ = b with R_{jk} = r_k^{j−1}, b_j = j! φ_{j+1}(h)/B(h) (φ in −h; eq. 8 and
Theorem 3.1), ρ = ½ for the second order. The order warms up over the first steps and, with ``lower_order_final``,
falls to min(order, steps left) at the end (the last step to σ = 0 returns x̂_0). One evaluation per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab.samplers.dpmpp import MultistepSampler


def unipc_coefficients(rks: list[float], hh: float, order: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(R, b, hφ_1, B(h)) of the UniPC order conditions for ratios ``rks`` (r_1 … r_{p−1}, 1) and hh = −h: float64
    NumPy on the host (a ≤ 3×3 system per step; no device work, no sync)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)  # bh2
    factorial = 1
    rows, b = [], []
    r = np.asarray(rks, dtype=np.float64)
    for j in range(1, order + 1):
        rows.append(r ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.asarray(b), h_phi_1, b_h


class UniPCSampler(MultistepSampler):
    """``sampler=unipc``; ``order`` 2 or 3 (the predictor's; the corrector adds one), ``corrector`` (default true;
    false: UniP alone), ``lower_order_final``; the others as :class:`ContinuousSampler`."""

    orders = (2, 3)

    def __init__(self, *args, corrector: bool = True, **kwargs) -> None:
        self.corrector = bool(corrector)
        super().__init__(*args, **kwargs)

    def order_at(self, i: int) -> int:
        order = min(self.order, self.num_steps_run - i) if self.lower_order_final else self.order
        return min(order, i + 1)

    def _update(self, x: torch.Tensor, history: list[torch.Tensor], i: int, order: int, new_x0=None) -> torch.Tensor:
        """UniP from level i to i+1 with ``history`` (x̂_0 at levels i − order + 1 … i); with ``new_x0`` (x̂_0 at
        level i + 1) UniC instead: the same step with the new evaluation added to the polynomial."""
        s, to = self.levels[i], self.levels[i + 1]
        h = to.lambda_ - s.lambda_
        m0 = history[-1]
        rks = [(self.levels[i - k].lambda_ - s.lambda_) / h for k in range(1, order)] + [1.0]
        d1s = [(history[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
        R, b, h_phi_1, b_h = unipc_coefficients(rks, -h, order)
        out = (to.std / s.std) * x - (to.alpha * h_phi_1) * m0
        if new_x0 is None:
            if order == 1:
                return out
            rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            res = sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
        else:
            rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
            res = sum((rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)), rhos[-1] * (new_x0 - m0))
        return out - (to.alpha * b_h) * res

    def solve(self, i, x, x0, eps, generator):
        history = self.state.setdefault("x0", [])
        if self.corrector and history:  # UniC: correct x_i with x̂_0(x_i) (evaluated at the uncorrected x_i)
            x = self._update(self.state["last_x"], history, i - 1, self.state["last_order"], new_x0=x0)
        history.append(x0)
        del history[: -self.order]
        if self.levels[i + 1].sigma == 0:
            return x0
        order = self.order_at(i)
        self.state["last_x"], self.state["last_order"] = x, order
        return self._update(x, history, i, order)

"""Toy data whose exact noise prediction is known: ground truth for testing and benchmarking solvers.

If x_0 ~ N(μ, diag(s²)) then x_t ~ N(α_t μ, diag(α_t² s² + σ_t²)) and the exact noise prediction is
ε(x, t) = −σ_t ∇log p_t(x) = σ_t (x − α_t μ)/(α_t² s² + σ_t²). The probability-flow ODE keeps the
standardised coordinate (x − α_t μ)/√(α_t² s² + σ_t²) fixed, so its solution is known in closed form.

A mixture Σ_k w_k N(μ_k, s_k² I) has ε(x, t) = σ_t Σ_k r_k(x) (x − α_t μ_k)/(α_t² s_k² + σ_t²) with
the posterior responsibilities r_k(x) ∝ w_k N(x; α_t μ_k, (α_t² s_k² + σ_t²) I); its flow has no
closed form (integrate it tightly with the ``ode`` solver for a reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import NoiseSchedule


def _coefficients(schedule: NoiseSchedule, t: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
    """α_t and σ_t shaped (B, 1) (or scalars) in ``like``'s dtype."""
    t = torch.as_tensor(t, dtype=torch.float64)
    log_alpha = schedule.marginal_log_mean_coeff(t)
    alpha, sigma = torch.exp(log_alpha), torch.sqrt(-torch.expm1(2.0 * log_alpha))
    if t.dim() == 1:
        alpha, sigma = alpha[:, None], sigma[:, None]
    return alpha.to(like), sigma.to(like)


class GaussianOracle:
    """Data ~ N(mean, diag(std²)) on vectors of size D: exact ε̂, marginals and probability flow."""

    def __init__(self, schedule: NoiseSchedule, mean: Tensor, std: Tensor):
        self.schedule, self.mean, self.std = schedule, mean, std

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact noise prediction for x of shape (B, D) and t of shape (B,)."""
        alpha, sigma = _coefficients(self.schedule, t, x)
        return sigma * (x - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)

    def marginal(self, t: float) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of x_t."""
        alpha, sigma = _coefficients(self.schedule, t, self.mean)
        return alpha * self.mean, torch.sqrt(alpha**2 * self.std**2 + sigma**2)

    def flow(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact probability-flow ODE map from time ``t_from`` to ``t_to``."""
        mean_from, std_from = self.marginal(t_from)
        mean_to, std_to = self.marginal(t_to)
        return mean_to + std_to * (x - mean_from) / std_from

    def denoised_marginal(self, t: float) -> tuple[Tensor, Tensor]:
        """Mean and std of x̂0 = E[x_0 | x_t] for x_t ~ p_t (what ancestral DDPM returns at its last step)."""
        alpha, sigma = _coefficients(self.schedule, t, self.mean)
        shrink = alpha**2 * self.std**2 / (alpha**2 * self.std**2 + sigma**2)
        return self.mean, self.std * torch.sqrt(shrink)


class GaussianMixtureOracle:
    """Data ~ Σ_k w_k N(means[k], stds[k]² I): exact ε̂ through the posterior responsibilities."""

    def __init__(self, schedule: NoiseSchedule, weights: Tensor, means: Tensor, stds: Tensor):
        self.schedule, self.weights, self.means, self.stds = schedule, weights / weights.sum(), means, stds

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact noise prediction for x of shape (B, D) and t of shape (B,)."""
        alpha, sigma = _coefficients(self.schedule, t, x)  # (B, 1)
        var = alpha**2 * self.stds**2 + sigma**2  # (B, K)
        diff = x[:, None, :] - alpha[:, :, None] * self.means  # (B, K, D)
        log_joint = (torch.log(self.weights) - 0.5 * x.shape[1] * torch.log(var)
                     - 0.5 * diff.square().sum(-1) / var)
        resp = torch.softmax(log_joint, dim=1)  # r_k(x)
        return sigma * torch.einsum("bk,bkd->bd", resp / var, diff)

    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean and per-coordinate standard deviation of the data."""
        mean = torch.einsum("k,kd->d", self.weights, self.means)
        second = torch.einsum("k,kd->d", self.weights, self.means**2 + self.stds[:, None] ** 2)
        return mean, torch.sqrt(second - mean**2)

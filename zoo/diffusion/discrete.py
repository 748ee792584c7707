"""DDPM quantities of a discrete β schedule, for the variational-bound terms (iDDPM §2–3.1).

Index n = 0..N−1 is DiT's 0-based DDPM step: ᾱ_n = ∏_{i≤n} (1 − β_i), ᾱ_{−1} = 1. Tables are
float64 (as the official code keeps them) and gathered per sample, then cast to the data dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from zoo.solvers.schedules import NoiseSchedule


class DiscreteDiffusion:
    """Forward-process marginals and the Gaussian posterior q(x_{n−1} | x_n, x_0).

    Posterior (DDPM eq. 6–7): mean μ̃ = c0·x_0 + c1·x_n with
    c0 = β_n·√ᾱ_{n−1}/(1 − ᾱ_n), c1 = (1 − ᾱ_{n−1})·√α_n/(1 − ᾱ_n), and variance
    β̃_n = β_n·(1 − ᾱ_{n−1})/(1 − ᾱ_n). β̃_0 = 0, so its log is clipped to log β̃_1 (iDDPM).
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D schedule of at least 2 values in (0, 1)")
        self.num_steps = betas.numel()
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev = prev
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef_x0 = betas * prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1.0 - prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        # √ᾱ, √(1 − ᾱ) and x_0's coefficients in float64, gathered then cast (as iDDPM's tables): taken after
        # the cast, 1 − ᾱ cancelled in fp32 at the first steps (σ off by 2.6e-4 relative under the cosine table)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self._moved: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}  # (table, its copy) per device

    def _on(self, table: Tensor, device: torch.device) -> Tensor:
        """``table`` on ``device``, copied there once: a copy from the CPU waits for everything queued on
        the GPU, and a training step gathers from these tables up to ten times (the hybrid loss)."""
        if table.device == device:
            return table
        key = (id(table), device)
        kept = self._moved.get(key)
        if kept is None or kept[0] is not table:  # (the identity check: an id is reused once its tensor is gone)
            kept = self._moved[key] = (table, table.to(device))
        return kept[1]

    def _take(self, table: Tensor, index: Tensor, like: Tensor) -> Tensor:
        """``table[index]`` shaped (B, 1, ..., 1) to broadcast over ``like``, in its dtype/device."""
        v = self._on(table, like.device)[index.to(like.device)]
        return v.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, index: Tensor, noise: Tensor) -> Tensor:
        """x_n = √ᾱ_n·x_0 + √(1 − ᾱ_n)·ε (DDPM eq. 4)."""
        return (self._take(self.sqrt_alphas_cumprod, index, x0) * x0
                + self._take(self.sqrt_one_minus_alphas_cumprod, index, x0) * noise)

    def predict_x0(self, x_t: Tensor, index: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_n − √(1 − ᾱ_n)·ε)/√ᾱ_n = √(1/ᾱ_n)·x_n − √(1/ᾱ_n − 1)·ε (iDDPM's form)."""
        return (self._take(self.sqrt_recip_alphas_cumprod, index, x_t) * x_t
                - self._take(self.sqrt_recipm1_alphas_cumprod, index, x_t) * eps)

    def posterior(self, x0: Tensor, x_t: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{n−1} | x_n, x_0)."""
        mean = self._take(self.posterior_mean_coef_x0, index, x_t) * x0 + self._take(
            self.posterior_mean_coef_xt, index, x_t
        ) * x_t
        return mean, self._take(self.posterior_log_variance_clipped, index, x_t).expand_as(x_t)

    def model_log_variance(self, v: Tensor, index: Tensor) -> Tensor:
        """iDDPM eq. 15: log Σ = f·log β_n + (1 − f)·log β̃_n with f = (v + 1)/2, v the model output."""
        frac = (v + 1.0) / 2.0
        max_log = self._take(self.log_betas, index, v)
        min_log = self._take(self.posterior_log_variance_clipped, index, v)
        return frac * max_log + (1.0 - frac) * min_log


def betas_from_schedule(schedule: "NoiseSchedule", num_steps: int) -> Tensor:
    """The float64 β_1..β_N of a discrete schedule object.

    Uses the schedule's own ``betas`` when it exposes them; otherwise recovers them from
    ``marginal_alpha`` at the knots t_n = (n+1)/N (ᾱ_n = α(t_n)²; β_n = 1 − ᾱ_n/ᾱ_{n−1}).
    """
    betas = getattr(schedule, "betas", None)
    if betas is not None:
        return torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
    knots = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    abar = schedule.marginal_alpha(knots).to(torch.float64).cpu() ** 2
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / prev

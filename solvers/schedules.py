"""Noise schedules of variance-preserving diffusions, in DPM-Solver's continuous-time form.

    x_t = α_t x_0 + σ_t ε,   α_t² + σ_t² = 1,   λ_t = log α_t − log σ_t  (half log-SNR)

Every schedule gives ``marginal_log_mean_coeff`` (log α_t), ``marginal_alpha``, ``marginal_std``,
``marginal_lambda`` and ``inverse_lambda`` on continuous t (Lu et al. 2022, "DPM-Solver", the
``NoiseScheduleVP`` conventions), plus ``T`` (where sampling starts) and ``eps`` (where it ends).

Discrete-time models trained on n = 0..N−1 live at t_n = (n + 1)/N, and log α(t) is the
piecewise-linear interpolation of ½·log ᾱ_n between these knots (linear extrapolation outside),
so sampling runs from t = 1 to t = 1/N. DPM-Solver's latest release truncates discrete tables
whose λ falls below −5.1 (cosine-like ones): at λ ≈ −10 the first steps of its higher-order
updates blow up. :meth:`NoiseSchedule.stable_start` gives the knot where that truncated table ends;
the DPM-Solver family starts there by default (DDPM's linear table ends at λ = −5.06 and is not
cut; iDDPM's discrete cosine, ``cosine_discrete``, ends at λ ≈ −10 and is). The tables themselves
are never cut: DDPM/DDIM on the respaced chain and the other solvers start at t = 1.

All functions are vectorised and keep the dtype of a floating ``t`` (float64 works end to end);
tables are float64 and are moved to ``t``'s device and dtype on use.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from zoo.domains import MAX_SOLVER_STEPS, Doc, Range, Rule

Beta = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]  # a DDPM β_n
STABLE_LAMBDA = -5.1  # DPM-Solver's reference starts a discrete table no lower in λ (numerical_clip_alpha)
# One step leaves a sampler no span of time to integrate over (t runs from 1/N to 1).
TableSteps = Annotated[int, Range(2, MAX_SOLVER_STEPS), Doc("steps of the discrete table (at least 2)")]
BETAS_GROW = Rule("beta_start <= beta_end", lambda beta_start, beta_end: beta_start <= beta_end,
                  ("beta_start", "beta_end"))


def _alpha_bar_underflow(alphas_cumprod: Tensor) -> str | None:
    """Where ᾱ leaves float64's normal range (β rebuilt from it goes wrong, then λ is −inf), said."""
    if alphas_cumprod.is_meta:  # a table made on meta (no values): nothing to check
        return None
    small = (alphas_cumprod < torch.finfo(torch.float64).tiny).nonzero()
    if not small.numel():
        return None
    return (f"ᾱ falls below float64's smallest normal number at step {int(small[0])} of "
            f"{alphas_cumprod.numel()}: too many steps for these betas (use fewer num_steps or a "
            "smaller beta_end)")


def _alpha_bar_stays_normal(make_betas) -> Rule:
    """The recipe check of :func:`_alpha_bar_underflow` for a table built by ``make_betas``."""
    def test(num_steps: int, beta_start: float, beta_end: float) -> str | None:
        return _alpha_bar_underflow(torch.cumprod(1.0 - make_betas(num_steps, beta_start, beta_end), 0))
    return Rule("ᾱ above float64's smallest normal number at every step", test,
                ("num_steps", "beta_start", "beta_end"))


def _as_time(t: Tensor | float) -> Tensor:
    """``t`` as a floating tensor: floating tensors keep their dtype, anything else becomes float64."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t
    return torch.as_tensor(t, dtype=torch.float64)


class PiecewiseLinear:
    """f(x) through the knots (xp increasing, float64), extended linearly at both ends.

    Tables are converted once per (device, dtype) and cached, so evaluation is a search and one
    multiply-add.
    """

    def __init__(self, xp: Tensor, fp: Tensor):
        self.xp, self.fp = xp, fp
        self.slope = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(v.to(x.device, x.dtype) for v in (self.xp, self.fp, self.slope))
        xp, fp, slope = self._cache[key]
        i = torch.searchsorted(xp, x.detach().contiguous()).clamp_(1, xp.numel() - 1) - 1
        return fp[i] + (x - xp[i]) * slope[i]


def log_alpha_from_lambda(lam: Tensor) -> Tensor:
    """log α = −½·log(1 + e^{−2λ}), from α² = sigmoid(2λ)."""
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class NoiseSchedule:
    """Base of the VP schedules: everything follows from log α(t) and its inverse."""

    discrete: bool = False
    T: float = 1.0
    eps: float = 1e-3

    def marginal_log_mean_coeff(self, t: Tensor | float) -> Tensor:
        """log α_t."""
        raise NotImplementedError

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def marginal_alpha(self, t: Tensor | float) -> Tensor:
        """α_t, the scale of the data in x_t."""
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: Tensor | float) -> Tensor:
        """σ_t = √(1 − α_t²), the scale of the noise in x_t."""
        return torch.sqrt(-torch.expm1(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Tensor | float) -> Tensor:
        """λ_t = log α_t − log σ_t."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam: Tensor | float) -> Tensor:
        """The t with λ_t = lam (λ is decreasing in t)."""
        return self._t_from_log_alpha(log_alpha_from_lambda(_as_time(lam)))

    def stable_start(self, min_lambda: float = STABLE_LAMBDA) -> float:
        """Where DPM-Solver starts by default: ``T``, or for a discrete table whose λ falls below
        ``min_lambda`` the last knot at or above it (the end of the reference's truncated table)."""
        return self.T


class DiscreteSchedule(NoiseSchedule):
    """A discrete-time table ᾱ_0..ᾱ_{N−1} seen in continuous time (knots t_n = (n + 1)/N)."""

    discrete = True

    def __init__(self, alphas_cumprod: Tensor, betas: Tensor | None = None):
        device = alphas_cumprod.device if isinstance(alphas_cumprod, Tensor) else "cpu"  # not a torch.device()'s
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device=device)
        problem = _alpha_bar_underflow(alphas_cumprod)
        if problem:
            raise ValueError(problem)
        self.alphas_cumprod = alphas_cumprod
        self._betas = None if betas is None else torch.as_tensor(betas, dtype=torch.float64, device=device)
        self.num_steps = alphas_cumprod.numel()
        self.T = 1.0
        self.eps = 1.0 / self.num_steps
        t_knots = torch.arange(1, self.num_steps + 1, dtype=torch.float64, device=alphas_cumprod.device) / self.num_steps
        log_alpha_knots = 0.5 * torch.log(alphas_cumprod)
        self._log_alpha_of_t = PiecewiseLinear(t_knots, log_alpha_knots)
        self._t_of_log_alpha = PiecewiseLinear(log_alpha_knots.flip(0), t_knots.flip(0))

    @property
    def betas(self) -> Tensor:
        """β_n: the table's own when it was built from betas, else 1 − ᾱ_n/ᾱ_{n−1} (ᾱ_{−1} = 1)."""
        if self._betas is not None:
            return self._betas
        previous = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / previous

    def marginal_log_mean_coeff(self, t: Tensor | float) -> Tensor:
        return self._log_alpha_of_t(_as_time(t))

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        return self._t_of_log_alpha(log_alpha)

    def stable_start(self, min_lambda: float = STABLE_LAMBDA) -> float:
        log_alpha = 0.5 * torch.log(self.alphas_cumprod)
        lam = log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))
        kept = int((lam >= min_lambda).sum())  # λ falls with n: the knots below come last
        return self.T if kept in (0, self.num_steps) else kept / self.num_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps})"


class LinearSchedule(DiscreteSchedule):
    """DDPM's linear betas (Ho et al. 2020): β_n linear from beta_start to beta_end, ᾱ_n = Π(1 − β)."""

    @staticmethod
    def make_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64, device="cpu")

    constraints = (BETAS_GROW, _alpha_bar_stays_normal(make_betas))

    def __init__(self, num_steps: TableSteps = 1000, beta_start: Beta = 1e-4, beta_end: Beta = 0.02):
        betas = self.make_betas(num_steps, beta_start, beta_end)
        super().__init__(torch.cumprod(1.0 - betas, dim=0), betas)
        self.beta_start, self.beta_end = beta_start, beta_end


class ScaledLinearSchedule(DiscreteSchedule):
    """Stable Diffusion's betas: √β_n linear from √beta_start to √beta_end (LDM, U-ViT-H, DiMR)."""

    @staticmethod
    def make_betas(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64, device="cpu") ** 2

    constraints = (BETAS_GROW, _alpha_bar_stays_normal(make_betas))

    def __init__(self, num_steps: TableSteps = 1000, beta_start: Beta = 0.00085, beta_end: Beta = 0.012):
        betas = self.make_betas(num_steps, beta_start, beta_end)
        super().__init__(torch.cumprod(1.0 - betas, dim=0), betas)
        self.beta_start, self.beta_end = beta_start, beta_end


class CosineDiscreteSchedule(DiscreteSchedule):
    """iDDPM's cosine betas (Nichol & Dhariwal 2021, eq. 17; diffusers' ``squaredcos_cap_v2``).

    ᾱ(τ) = f(τ)/f(0) with f(τ) = cos²((τ + s)/(1 + s)·π/2) on τ = n/N, and
    β_n = min(1 − ᾱ((n + 1)/N)/ᾱ(n/N), max_beta). Against DDPM's linear table it spends far
    fewer of the N steps at noise levels where nothing but the class mean is left (at 32x32 the
    linear table has σ > 0.96 for half its steps; this one for about a fifth), which is what
    pixel models at low resolution need. Its last ᾱ is ~2e-9 (λ ≈ −10): DDPM starts there from
    pure noise; DPM-Solver at λ = −5.1 (:meth:`stable_start`), as its reference does.
    """

    def __init__(self, num_steps: TableSteps = 1000, s: Annotated[float, Range(0, 1)] = 0.008,
                 max_beta: Beta = 0.999):
        tau = torch.arange(num_steps + 1, dtype=torch.float64, device="cpu") / num_steps
        f = torch.cos((tau + s) / (1.0 + s) * math.pi / 2.0) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
        super().__init__(torch.cumprod(1.0 - betas, dim=0), betas)
        self.s, self.max_beta = s, max_beta


class VPLinearSchedule(NoiseSchedule):
    """Continuous VP-SDE (Song et al. 2021) with β(t) = β_0 + (β_1 − β_0)·t on t in [eps, 1].

    log α_t = −¼·t²·(β_1 − β_0) − ½·t·β_0; the inverse solves that quadratic in t.
    """

    constraints = (Rule("beta_0 < beta_1", lambda beta_0, beta_1: beta_0 < beta_1, ("beta_0", "beta_1")),)

    def __init__(self, beta_0: Annotated[float, Range(0, 1000, lo_open=True)] = 0.1,
                 beta_1: Annotated[float, Range(0, 1000, lo_open=True)] = 20.0):
        self.beta_0, self.beta_1 = beta_0, beta_1
        self.T, self.eps = 1.0, 1e-3

    def beta(self, t: Tensor | float) -> Tensor:
        """β(t), the SDE's noise rate."""
        return self.beta_0 + (self.beta_1 - self.beta_0) * _as_time(t)

    def marginal_log_mean_coeff(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # Root of (β_1 − β_0)/4·t² + β_0/2·t + log α = 0 in the cancellation-free form
        # t = c / (β_0 + √(β_0² + c)) / (β_1 − β_0) with c = −4·(β_1 − β_0)·log α.
        c = -4.0 * (self.beta_1 - self.beta_0) * log_alpha
        return c / (torch.sqrt(self.beta_0**2 + c) + self.beta_0) / (self.beta_1 - self.beta_0)

    def __repr__(self) -> str:
        return f"VPLinearSchedule(beta_0={self.beta_0}, beta_1={self.beta_1})"


class CosineSchedule(NoiseSchedule):
    """Nichol & Dhariwal's cosine schedule in continuous time: α_t = cos((t + s)/(1 + s)·π/2) / cos(s/(1 + s)·π/2).

    As in DPM-Solver, sampling starts at T = 0.9946 (α_T vanishes near t = 1).
    """

    def __init__(self, s: Annotated[float, Range(0, 1)] = 0.008):
        self.s = s
        self.T, self.eps = 0.9946, 1e-3
        self._log_alpha_0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))

    def marginal_log_mean_coeff(self, t: Tensor | float) -> Tensor:
        t = _as_time(t)
        log_alpha = torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha_0
        # At t ≲ 1e-16 the two logs round to log α = +1e-20, and σ = √(1 − α²) to NaN: α ≤ 1 always.
        return log_alpha.clamp(max=0.0)

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        return torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) * 2.0 * (1.0 + self.s) / math.pi - self.s

    def __repr__(self) -> str:
        return f"CosineSchedule(s={self.s})"

"""Samplers for VP diffusion models: one API for DDPM, DDIM, DPM-Solver(++), Euler/Heun and ODE.

    from zoo.solvers import build_solver, build_schedule
    sched = build_schedule("linear", num_steps=1000, beta_start=1e-4, beta_end=0.02)
    solver = build_solver("dpm_solver++", steps=20, order=2, skip="logSNR", method="multistep")
    x0 = solver.sample(eps_fn, x_T, schedule=sched)     # solver.nfe: model calls of this sample

Schedules (``zoo.schedules`` entry points): ``linear`` (DDPM betas), ``scaled_linear`` (Stable
Diffusion), ``vp_linear`` (continuous VP-SDE, β(t) = 0.1 + 19.9t), ``cosine`` (continuous cosine).
They expose ``marginal_log_mean_coeff`` (log α_t), ``marginal_alpha``, ``marginal_std``,
``marginal_lambda``, ``inverse_lambda``, ``T`` and ``eps``; discrete ones also ``num_steps``,
``alphas_cumprod`` and ``betas``. Time is DPM-Solver's continuous t: for a discrete table, step n is
t = (n + 1)/N and sampling runs from t = 1 to t = 1/N.

The model contract: ``eps_fn(x, t)`` gets ``x`` (B, ...) and continuous ``t`` as a (B,) tensor
(float32, float64 when x is; always float64 from ``ddpm`` and ``ddim``, whose kept training steps
float32 cannot hold exactly), and returns the noise prediction ε̂ (B, ...), cast to x's dtype. The model wrapper maps
t to the backbone's own time input (DiT: 1000·(t − 1/N); classifier-free guidance happens there
too). A model with a learned variance may return ``(eps, v)`` or one tensor with 2C channels
``[eps | v]`` (v in [−1, 1], iDDPM's interpolation weight); ``ddpm`` with ``variance="learned"``
uses v, every other solver ignores it. Stochastic solvers (``ddpm``, ``ddim``/``ddim_grid`` with
eta > 0) take ``sample(..., generator=...)``: one ``torch.Generator``, or one per sample (each draws
one standard normal of the sample's shape per noisy step, in step order). ``sample`` runs under
``torch.no_grad()``.

Solvers (``zoo.solvers`` entry points), each with ``steps`` and, except ddpm/ddim on discrete
schedules, ``skip`` ∈ {time_uniform, logSNR, time_quadratic, karras}, ``t_start``, ``t_end``
(defaults: the schedule's T and eps):

- ``dpm_solver`` / ``dpm_solver++``: noise / data form; ``order`` 1–3, ``method`` ∈ {multistep,
  singlestep, singlestep_fixed, adaptive}, ``lower_order_final``, ``solver_type``, ``denoise_to_zero``,
  ``atol``/``rtol`` (adaptive) — the reference's ``DPM_Solver.sample`` semantics.
- ``ddpm``: ADM/DiT's ``p_sample_loop``: ancestral on the respaced chain (``steps``, or a
  ``respacing`` string "250", "10,15,20", "ddim25"); ``variance`` ∈ {fixed_small, fixed_large,
  learned}; ``clip_denoised``.
- ``ddim``: ADM/DiT's ``ddim_sample_loop`` on the same respaced chain, ending with x̂0; ``eta``,
  ``clip_denoised``. ``ddim_grid``: DDIM on a DPM-Solver time grid ending at t_end (η = 0 is
  DPM-Solver-1).
- ``euler`` / ``heun``: Karras-style steps in σ = σ_t/α_t, default ρ = 7 grid; heun makes 2 calls per step.
- ``ode``: torchdiffeq ``odeint`` in λ; ``method`` (dopri5), ``rtol``, ``atol``.

``zoo.solvers.oracles`` holds Gaussian and Gaussian-mixture data with exact ε̂ for testing.
Importing this package imports nothing heavy; solver modules load when built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package imports nothing heavy (module doc)
    from .base import Solver
    from .schedules import NoiseSchedule


def build_solver(name: str, **kwargs: Any) -> "Solver":
    """The solver registered as ``name`` (kind ``solver``), built with ``kwargs`` checked as a recipe's
    ``sample.solver`` is (an unknown option, NaN or a value out of its domain is a one-line UserError)."""
    import zoo

    return zoo.build_component("solver", {"type": name, **kwargs})


def build_schedule(name: str, **kwargs: Any) -> "NoiseSchedule":
    """The noise schedule registered as ``name`` (kind ``schedule``), built with ``kwargs`` checked as a
    recipe's ``diffusion.schedule`` is."""
    import zoo

    return zoo.build_component("schedule", {"type": name, **kwargs})


__all__ = ["build_solver", "build_schedule"]

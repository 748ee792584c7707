"""The probability-flow ODE (Song et al. 2021) integrated by torchdiffeq in half log-SNR λ.

In λ the VP probability-flow ODE reads (α_λ² = sigmoid(2λ), σ_λ² = sigmoid(−2λ))

    dx/dλ = σ_λ²·x − σ_λ·ε̂(x, t(λ)),     t(λ) = schedule.inverse_lambda(λ)

integrated from λ(t_start) up to λ(t_end). Integrating in λ rather than t keeps adaptive solvers
safe: they may evaluate past the end (torchdiffeq steps over it and interpolates), and past
λ(t_end) the equation stays well defined, whereas in t they would reach t < t_end or t < 0.
Adaptive methods (``dopri5``, ``dopri8``, ``bosh3``, ...) take ``rtol``/``atol``; fixed-grid
methods (``euler``, ``midpoint``, ``rk4``, ...) need ``steps`` and step on that λ grid.
``nfe`` counts every evaluation of ε̂.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from zoo.domains import OneOf, PositiveFloat, SolverSteps, Time
from zoo.errors import UserError

from .base import EpsFn, Generators, ScheduledModel, Skip, Solver, check_choice, point, refuse_unused, time_grid
from .schedules import NoiseSchedule

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")


class ODESolver(Solver):
    """Black-box ODE solve (torchdiffeq ``odeint``) of the probability-flow ODE in λ."""

    def __init__(self, method: Annotated[str, OneOf(ADAPTIVE_METHODS + FIXED_GRID_METHODS, "method")] = "dopri5",
                 rtol: PositiveFloat | None = None, atol: PositiveFloat | None = None, steps: SolverSteps | None = None,
                 skip: Skip = "logSNR", t_start: Time | None = None, t_end: Time | None = None):
        """``steps`` and ``skip`` set the grid of fixed-grid methods, ``rtol``/``atol`` (1e-5) the steps of
        adaptive ones."""
        check_choice("ode method", method, ADAPTIVE_METHODS + FIXED_GRID_METHODS)
        if method in FIXED_GRID_METHODS:
            refuse_unused({"rtol": rtol, "atol": atol}, f"ode method {method!r} steps on a fixed grid",
                          "drop them, or pick an adaptive method (dopri5, ...)")
        if method in FIXED_GRID_METHODS and steps is None:
            raise UserError(f"ode method {method!r} steps on a fixed grid: give steps")
        if method in ADAPTIVE_METHODS and steps is not None:  # it would be ignored: the tolerances set the steps
            raise UserError(f"ode method {method!r} is adaptive: rtol and atol set its steps, not steps={steps}",
                            suggestion=f"drop its steps, or pick a fixed-grid method ({', '.join(FIXED_GRID_METHODS[:5])}, ...)"
                            " with --set sample.solver.method=rk4")
        super().__init__(steps=steps or 1, skip=skip, t_start=t_start, t_end=t_end)
        self.method, self.rtol, self.atol = method, 1e-5 if rtol is None else rtol, 1e-5 if atol is None else atol
        self.fixed_grid = method in FIXED_GRID_METHODS

    @property
    def batch_coupled(self) -> bool:
        return not self.fixed_grid  # torchdiffeq: one error norm, so one step size, for the whole batch

    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        from torchdiffeq import odeint  # imported on use: keeps `import zoo.solvers` light

        model = ScheduledModel(eps_fn, schedule)
        work_dtype = torch.promote_types(x_T.dtype, torch.float32)

        t_start, t_end = self.time_range(schedule)
        lam_end = torch.tensor(point(schedule, t_end).lam, dtype=torch.float64)

        def velocity(lam: Tensor, x: Tensor) -> Tensor:
            sigma2 = torch.sigmoid(-2.0 * lam)
            # An adaptive step may evaluate past the end, where t(λ) can reach σ(t) = 0 (no noise
            # level to give the network): the network sees the end's time there instead.
            lam_net = torch.minimum(lam.detach().to("cpu", torch.float64), lam_end)
            t = schedule.inverse_lambda(lam_net).item()
            eps = model.eps(x.to(x_T.dtype), point(schedule, t)).to(x.dtype)
            return sigma2 * x - sigma2.sqrt() * eps

        options = None
        lams = torch.tensor([point(schedule, t_start).lam, point(schedule, t_end).lam], dtype=work_dtype,
                            device=x_T.device)
        if self.fixed_grid:  # step on the grid, output only its ends: not (steps + 1) states held to the end
            times = time_grid(schedule, self.skip, t_start, t_end, self.steps)
            grid = torch.tensor([point(schedule, t).lam for t in times], dtype=work_dtype, device=x_T.device)
            lams = grid[[0, -1]]  # torchdiffeq asserts the grid's ends equal these: a λ→t→λ round trip is 1 ulp off
            options = {"grid_constructor": lambda func, y0, t: grid}
        path = odeint(velocity, x_T.to(work_dtype), lams, rtol=self.rtol, atol=self.atol, method=self.method,
                      options=options)
        self.nfe = model.nfe
        return path[-1].to(x_T.dtype)

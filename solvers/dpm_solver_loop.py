"""The step loops DPM-Solver and DPM-Solver++ share: time grids, order schedules, adaptive steps.

These follow ``DPM_Solver.sample`` of the reference implementation (LuChengTHU/dpm-solver) rule
for rule, so that the same settings give the same samples up to rounding:

- multistep: ``steps`` intervals of one grid, one model call per interval (NFE = steps); the first
  ``order − 1`` steps warm up with orders 1, 2, ...; with ``lower_order_final`` and steps < 10 the
  last steps drop back to orders ..., 2, 1.
- singlestep ("DPM-Solver-fast", ``steps`` is the NFE budget): order-3 steps plus one order-2/1 step
  (or order-2 steps plus one order-1 step) that use up exactly ``steps`` calls; the outer grid is
  K + 1 points uniform in λ for skip='logSNR', else the points of the ``steps``-grid at the
  cumulative orders. Intermediate points r1, r2 come from the same skip type inside each step.
- singlestep_fixed: steps // order steps of singlestep order ``order``.
- adaptive: DPM-Solver-12 (order 2) or -23 (order 3) with the lower-order estimate as error
  control (h_init 0.05, θ 0.9, stop when |t − t_end| ≤ 1e-5); ``steps`` is ignored.

The update rules themselves (noise or data form) are in :mod:`zoo.solvers.dpm_solver`.
The reference's ``correcting_x0_fn`` (dynamic thresholding) and ``correcting_xt_fn`` hooks are
not implemented.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated

import torch
from torch import Tensor

from zoo.domains import OneOf, PositiveFloat, Range, SolverSteps, Time
from zoo.errors import UserError

from .base import EpsFn, Generators, Point, ScheduledModel, Skip, Solver, check_choice, refuse_unused, time_grid
from .schedules import NoiseSchedule

METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive")
SOLVER_TYPES = ("dpmsolver", "taylor")


def multistep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """The order used on each of the ``steps`` intervals by multistep DPM-Solver."""
    orders = []
    for step in range(1, steps + 1):
        if step < order:
            orders.append(step)  # warm-up: not enough history yet
        elif lower_order_final and steps < 10:
            orders.append(min(order, steps + 1 - step))
        else:
            orders.append(order)
    return orders


def singlestep_orders(steps: int, order: int) -> list[int]:
    """The orders of 'DPM-Solver-fast': they sum to ``steps``, the NFE budget."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    return [1] * steps


class DPMSolverBase(Solver):
    """Options and loops of DPM-Solver(++); subclasses give ``model_output`` and the updates."""

    def __init__(self, steps: SolverSteps | None = None, order: Annotated[int, Range(1, 3)] = 2, skip: Skip = "time_uniform",
                 method: Annotated[str, OneOf(METHODS, "method")] = "multistep",
                 lower_order_final: bool | None = None, t_start: Time | None = None, t_end: Time | None = None,
                 denoise_to_zero: bool = False, solver_type: Annotated[str, OneOf(SOLVER_TYPES, "solver_type")] = "dpmsolver",
                 atol: PositiveFloat | None = None, rtol: PositiveFloat | None = None):
        """``lower_order_final`` (default true) is multistep's; ``atol``/``rtol`` (0.0078, 0.05) adaptive's."""
        check_choice("method", method, METHODS)
        if method != "adaptive":
            refuse_unused({"atol": atol, "rtol": rtol},
                          f"the tolerances set the steps of method adaptive only, not {method}'s",
                          "drop them, or set method: adaptive")
        if method != "multistep" and lower_order_final is False:  # its default, true, is what a call copied
            # from DPM-Solver's sample() spells out for every method: it asks for nothing that would not happen
            refuse_unused({"lower_order_final": lower_order_final}, f"it shapes only method multistep's last steps, "
                          f"not {method}'s", "drop it, or set method: multistep")
        if method == "adaptive" and steps is not None:  # it would be ignored: atol and rtol set the steps
            raise UserError(f"adaptive DPM-Solver: atol and rtol set its steps, not steps={steps}",
                            key_path="sample.solver.steps",
                            suggestion="drop steps, or use method multistep / singlestep for a fixed number of steps")
        steps = 20 if steps is None else steps
        super().__init__(steps=steps, skip=skip, t_start=t_start, t_end=t_end)
        check_choice("order", order, (2, 3) if method == "adaptive" else (1, 2, 3))
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        if method in ("multistep", "singlestep_fixed") and steps < order:
            what = "multistep DPM-Solver" if method == "multistep" else "singlestep_fixed"
            raise UserError(f"{what} of order {order} needs steps >= {order}, got {steps}",
                            suggestion=f"--set sample.solver.order={steps} for {steps} step{'s' * (steps > 1)}")
        self.order, self.method = order, method
        self.lower_order_final = True if lower_order_final is None else lower_order_final
        self.denoise_to_zero, self.solver_type = denoise_to_zero, solver_type
        self.atol, self.rtol = 0.0078 if atol is None else atol, 0.05 if rtol is None else rtol

    def time_range(self, schedule: NoiseSchedule) -> tuple[float, float]:
        """As every solver's, except that an unset ``t_start`` is the schedule's :meth:`stable_start`: a
        discrete table reaching below λ = −5.1 (``cosine_discrete``, λ ≈ −10 at t = 1) is started where the
        reference's truncated table ends, else singlestep order 3 and adaptive steps blow up there."""
        if self.t_start is not None:
            return super().time_range(schedule)
        t_end = super().time_range(schedule)[1]
        t_start = schedule.stable_start()
        if t_end >= t_start:
            raise UserError(f"t_end {t_end} is not below where DPM-Solver starts on {schedule!r} "
                            f"(t = {t_start}, λ = −5.1)", key_path="sample.solver.t_end",
                            suggestion=f"use t_end < {t_start}, or set t_start")
        return t_start, t_end

    @property
    def batch_coupled(self) -> bool:
        return self.method == "adaptive"  # the official rule: the largest error in the batch sets the step

    # -- supplied by the noise / data form -------------------------------------------------
    def model_output(self, model: ScheduledModel, x: Tensor, p: Point) -> Tensor:
        raise NotImplementedError

    def first_update(self, x: Tensor, s: Point, t: Point, m_s: Tensor) -> Tensor:
        raise NotImplementedError

    def second_update(self, model: ScheduledModel, x: Tensor, s: Point, t: Point, r1: float,
                      m_s: Tensor) -> tuple[Tensor, Tensor]:
        """Singlestep order 2 via λ_s + r1·h; returns x_t and the model value at the intermediate point."""
        raise NotImplementedError

    def third_update(self, model: ScheduledModel, x: Tensor, s: Point, t: Point, r1: float, r2: float,
                     m_s: Tensor, m_s1: Tensor | None = None) -> Tensor:
        """Singlestep order 3 via λ_s + r1·h and λ_s + r2·h (``m_s1`` reuses a value at r1)."""
        raise NotImplementedError

    def multistep_update(self, x: Tensor, history: list[Tensor], points: list[Point], t: Point, order: int) -> Tensor:
        raise NotImplementedError

    # -- loops --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, eps_fn: EpsFn, x_T: Tensor, schedule: NoiseSchedule,
               generator: Generators = None) -> Tensor:
        model = ScheduledModel(eps_fn, schedule)
        if self.method == "multistep":
            x = self._multistep(model, x_T)
        elif self.method == "adaptive":
            x = self._adaptive(model, x_T)
        else:
            x = self._singlestep(model, x_T)
        if self.denoise_to_zero:  # one more call: the data prediction at t_end
            x = model.x0(x, model.at(self.time_range(schedule)[1]))
        self.nfe = model.nfe
        return x

    def _multistep(self, model: ScheduledModel, x: Tensor) -> Tensor:
        grid = self.grid(model.schedule)
        points, history = [grid[0]], [self.model_output(model, x, grid[0])]
        for step, order in enumerate(multistep_orders(self.steps, self.order, self.lower_order_final), start=1):
            x = self.multistep_update(x, history, points, grid[step], order)
            points = (points + [grid[step]])[-self.order:]
            if step < self.steps:  # the model value at t_end is never needed
                history = (history + [self.model_output(model, x, grid[step])])[-self.order:]
        return x

    def singlestep_plan(self, schedule: NoiseSchedule) -> tuple[list[Point], list[int]]:
        """The outer grid (K + 1 points) and the order of each of the K singlestep steps."""
        if self.method == "singlestep_fixed":
            orders = [self.order] * (self.steps // self.order)
            return self.grid(schedule, len(orders)), orders
        orders = singlestep_orders(self.steps, self.order)
        if self.skip == "logSNR":  # as in the DPM-Solver paper: K steps uniform in λ
            return self.grid(schedule, len(orders)), orders
        grid = self.grid(schedule, self.steps)
        return [grid[i] for i in itertools.accumulate(orders, initial=0)], orders

    def _singlestep(self, model: ScheduledModel, x: Tensor) -> Tensor:
        outer, orders = self.singlestep_plan(model.schedule)
        for s, t, order in zip(outer[:-1], outer[1:], orders):
            if order == 1:
                x = self.first_update(x, s, t, self.model_output(model, x, s))
                continue
            inner = [model.at(u) for u in time_grid(model.schedule, self.skip, s.t, t.t, order)]
            h = inner[-1].lam - inner[0].lam
            r1 = (inner[1].lam - inner[0].lam) / h
            m_s = self.model_output(model, x, s)
            if order == 2:
                x, _ = self.second_update(model, x, s, t, r1, m_s)
            else:
                x = self.third_update(model, x, s, t, r1, (inner[2].lam - inner[0].lam) / h, m_s)
        return x

    def _adaptive(self, model: ScheduledModel, x: Tensor) -> Tensor:
        t_start, t_end = self.time_range(model.schedule)
        s, lam_end = model.at(t_start), model.at(t_end).lam
        h, theta, t_err = 0.05, 0.9, 1e-5
        x_prev = x
        while abs(s.t - t_end) > t_err:
            t = model.at_lambda(s.lam + h)
            m_s = self.model_output(model, x, s)
            if self.order == 2:  # DPM-Solver-12: first order vs second order (r1 = 1/2)
                x_lower = self.first_update(x, s, t, m_s)
                x_higher, _ = self.second_update(model, x, s, t, 0.5, m_s)
            else:  # DPM-Solver-23: second order (r1 = 1/3) vs third order (r1, r2 = 1/3, 2/3)
                x_lower, m_s1 = self.second_update(model, x, s, t, 1.0 / 3.0, m_s)
                x_higher = self.third_update(model, x, s, t, 1.0 / 3.0, 2.0 / 3.0, m_s, m_s1)
            tol = torch.clamp(self.rtol * torch.maximum(x_lower.abs(), x_prev.abs()), min=self.atol)
            err = ((x_higher - x_lower) / tol).flatten(1).square().mean(dim=1).sqrt().max().item()
            if not math.isfinite(err):
                raise FloatingPointError(f"adaptive DPM-Solver: non-finite error estimate at t={s.t}")
            if err <= 1.0:
                x, x_prev, s = x_higher, x_lower, t
            growth = theta * err ** (-1.0 / self.order) if err > 0 else math.inf
            h = min(h * growth, lam_end - s.lam)
        return x

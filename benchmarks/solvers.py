"""Solver accuracy against NFE on toy data with exact noise predictions (runs in well under a minute on CPU).

    python benchmarks/solvers.py [--schedule linear] [--batch 64]

Two oracles (``zoo.solvers.oracles``), float64, each solver sampling its own interval (t = T to t = eps;
DPM-Solver starts at the schedule's ``stable_start``, 0.996 on ``cosine_discrete``), against the flow
over that same interval:
- Gaussian data N(μ, diag(s²)) in 4-D: the exact probability-flow solution is closed form;
- a 3-component Gaussian mixture in 2-D: the reference is ``ode`` (dopri5 in λ) at rtol = atol = 1e-10.
Deterministic solvers report the RMS error of x_end against the exact/reference flow at NFE 5, 10, 20,
50, 100 ("a*" marks a run whose NFE differs from the column: heun uses NFE//2 steps, singlestep_fixed
rounds down to a multiple of the order). Tolerance-driven solvers (DPM-Solver adaptive, ode) are listed
per tolerance with the NFE they used. Stochastic solvers (ddpm, ddim eta=1) report the error of the
output's per-coordinate mean and std (sum of absolute errors, averaged over coordinates) on 8000
samples, against the data moments (mixture) or the exact x̂0 distribution (Gaussian).
"""

from __future__ import annotations

import argparse
import time

import torch

from zoo.solvers import build_schedule, build_solver
from zoo.solvers.oracles import GaussianMixtureOracle, GaussianOracle

NFES = (5, 10, 20, 50, 100)
F64 = torch.float64

# (label, solver name, kwargs; "steps" is filled in from the NFE)
DETERMINISTIC = [
    ("ddim (time grid)", "ddim_grid", {}),
    ("euler (karras)", "euler", {}),
    ("heun (karras)", "heun", {}),
    ("dpm_solver 1 multistep", "dpm_solver", dict(order=1, skip="logSNR")),
    ("dpm_solver 2M logSNR", "dpm_solver", dict(order=2, skip="logSNR")),
    ("dpm_solver 3M logSNR", "dpm_solver", dict(order=3, skip="logSNR")),
    ("dpm_solver 2S fast logSNR", "dpm_solver", dict(order=2, method="singlestep", skip="logSNR")),
    ("dpm_solver 3S fast logSNR", "dpm_solver", dict(order=3, method="singlestep", skip="logSNR")),
    ("dpm_solver 3S fast time_uniform", "dpm_solver", dict(order=3, method="singlestep")),
    ("dpm_solver 3S fixed logSNR", "dpm_solver", dict(order=3, method="singlestep_fixed", skip="logSNR")),
    ("dpm_solver++ 2M logSNR", "dpm_solver++", dict(order=2, skip="logSNR")),
    ("dpm_solver++ 2M time_uniform", "dpm_solver++", dict(order=2)),
    ("dpm_solver++ 2M karras", "dpm_solver++", dict(order=2, skip="karras")),
    ("dpm_solver++ 3M logSNR", "dpm_solver++", dict(order=3, skip="logSNR")),
    ("dpm_solver++ 2S fast logSNR", "dpm_solver++", dict(order=2, method="singlestep", skip="logSNR")),
    ("dpm_solver++ 3S fast logSNR", "dpm_solver++", dict(order=3, method="singlestep", skip="logSNR")),
    ("dpm_solver++ 3S fast time_uniform", "dpm_solver++", dict(order=3, method="singlestep")),
]
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5)
ADAPTIVE = [
    ("dpm_solver 12 adaptive", "dpm_solver", lambda tol: dict(order=2, method="adaptive", atol=tol, rtol=tol)),
    ("dpm_solver 23 adaptive", "dpm_solver", lambda tol: dict(order=3, method="adaptive", atol=tol, rtol=tol)),
    ("dpm_solver++ 23 adaptive", "dpm_solver++", lambda tol: dict(order=3, method="adaptive", atol=tol, rtol=tol)),
    ("ode dopri5", "ode", lambda tol: dict(rtol=tol, atol=tol)),
]
STOCHASTIC = [("ddpm fixed_small", "ddpm", {}), ("ddpm fixed_large", "ddpm", dict(variance="fixed_large")),
              ("ddim eta=1 (time grid)", "ddim_grid", dict(eta=1.0))]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


def make_oracles(schedule):
    gauss = GaussianOracle(schedule, torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64),
                           torch.tensor([0.3, 1.5, 0.05, 1.0], dtype=F64))
    mixture = GaussianMixtureOracle(schedule, torch.tensor([0.5, 0.3, 0.2], dtype=F64),
                                    torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64),
                                    torch.tensor([0.3, 0.5, 0.2], dtype=F64))
    return gauss, mixture


def main() -> None:
    from zoo import registry
    from zoo.cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="linear", choices=registry.names("schedule"))
    parser.add_argument("--batch", type=positive_int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    start = time.perf_counter()
    schedule = build_schedule(args.schedule)
    gauss, mixture = make_oracles(schedule)
    gen = torch.Generator().manual_seed(0)
    x_gauss = torch.randn(args.batch, 4, dtype=F64, generator=gen)
    x_mix = torch.randn(args.batch, 2, dtype=F64, generator=gen)
    references: dict[tuple[str, float, float], torch.Tensor] = {}

    def error(solver, oracle_name: str, oracle, x_T: torch.Tensor) -> float:
        """RMS error of the solver's sample against the flow over the solver's own interval."""
        out = solver.sample(oracle.eps, x_T, schedule)
        t_start, t_end = solver.time_range(schedule)
        key = (oracle_name, t_start, t_end)
        if key not in references:
            references[key] = (gauss.flow(x_T, t_start, t_end) if oracle_name == "gaussian" else
                               build_solver("ode", rtol=1e-10, atol=1e-10, t_start=t_start, t_end=t_end)
                               .sample(oracle.eps, x_T, schedule))
        return rms(out, references[key])

    print(f"schedule {schedule!r}, t {schedule.T} -> {schedule.eps}, batch {args.batch}, float64\n")

    for oracle_name, (oracle, x_T) in {"gaussian": (gauss, x_gauss), "mixture": (mixture, x_mix)}.items():
        print(f"== {oracle_name}: RMS error of x_end vs NFE")
        print(f"{'solver':36s}" + "".join(f"{n:>11d}" for n in NFES))
        for label, name, kwargs in DETERMINISTIC:
            cells = []
            for nfe in NFES:
                steps = nfe // 2 if name == "heun" else nfe
                order = kwargs.get("order", 1)
                if (kwargs.get("method", "multistep") in ("multistep", "singlestep_fixed") and steps < order) or steps < 1:
                    cells.append(f"{'-':>11s}")
                    continue
                solver = build_solver(name, steps=steps, **kwargs)
                err = error(solver, oracle_name, oracle, x_T)
                cells.append(f"{err:10.2e}" + ("*" if solver.nfe != nfe else " "))
            print(f"{label:36s}" + "".join(cells))
        print(f"\n{'tolerance-driven':36s}" + "".join(f"{'tol ' + format(t, '.0e'):>18s}" for t in TOLERANCES))
        for label, name, kwargs_of in ADAPTIVE:
            cells = []
            for tol in TOLERANCES:
                solver = build_solver(name, **kwargs_of(tol))
                err = error(solver, oracle_name, oracle, x_T)
                cells.append(f"{err:10.2e} ({solver.nfe:4d})")
            print(f"{label:36s}" + "".join(cells))
        print()

    print("== stochastic solvers: moment error of 8000 samples vs NFE")
    print(f"{'solver':36s}{'oracle':>10s}" + "".join(f"{n:>11d}" for n in NFES))
    for label, name, kwargs in STOCHASTIC:
        for oracle_name, oracle in (("gaussian", gauss), ("mixture", mixture)):
            dim = oracle.mean.numel() if oracle_name == "gaussian" else oracle.means.shape[1]
            x_T = torch.randn(8000, dim, dtype=F64, generator=torch.Generator().manual_seed(1))
            if oracle_name == "mixture":
                mean, std = oracle.moments()
            elif name == "ddpm":
                mean, std = oracle.denoised_marginal(schedule.eps)
            else:
                mean, std = oracle.marginal(schedule.eps)
            cells = []
            for nfe in NFES:
                out = build_solver(name, steps=nfe, **kwargs).sample(
                    oracle.eps, x_T, schedule, generator=torch.Generator().manual_seed(2))
                err = ((out.mean(0) - mean).abs() + (out.std(0) - std).abs()).mean().item()
                cells.append(f"{err:10.2e} ")
            print(f"{label:36s}{oracle_name:>10s}" + "".join(cells))
    print(f"\n(total {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()

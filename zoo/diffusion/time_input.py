"""Maps from the diffusion process's continuous time to each backbone's time input.

Solvers work in DPM-Solver's discrete-time convention: continuous t in [1/N, 1],
the DDPM step with 0-based index n (noise level ᾱ_n = ∏_{i≤n} (1 − β_i)) sits at the knot
t_n = (n + 1)/N, sampling runs from t = 1 to t = 1/N. Backbones receive exactly the value their
official network was trained on, so official checkpoints work unchanged. Each map below is
what the official sampler feeds its network, and the trainer uses the same map (through
:func:`training_times`) so training and sampling agree by construction:

* ``dit_index``       — DiT: the DDPM index 0..N−1, ``1000·(t − 1/N)`` (DPM-Solver's
  ``model_wrapper`` for discrete models; with N = 1000 the knot t_n gives exactly n).
* ``uvit_discrete``   — U-ViT discrete-time models (latent U-ViT-H): the 1-based step
  ``N·t`` ∈ 1..N for N = 1000 (its sampler: ``t = t_continuous * N``; its trainer draws n ∈ {1..N}).
* ``uvit_continuous`` — U-ViT VP-SDE models (U-ViT-M/L): ``999·t`` for t ∈ (0, 1].
* ``dimr_log_snr``    — DiMR: ``8·n/1000 − 4`` with n = N·t ∈ 1..N = 1000 (not a real log-SNR; its
  sampler computes ``t = t_continuous * N`` then ``t/1000·8 − 4``, its trainer the same on
  n ∈ {1..N}).

The official models all use N = 1000. For another N (iDDPM's 4000, a short schedule of 100) the
discrete maps keep the range the network and its time-dependent norms were built for, as
``dit_index`` does: ``uvit_discrete`` gives ``1000·n/N`` ∈ (0, 1000] and ``dimr_log_snr``
``8·n/N − 4`` ∈ (−4, 4] (``8·n/1000 − 4`` reached 28 at N = 4000 and only −3.2 at N = 100).
With N = 1000 each is the official value to the bit.

For discrete schedules the trainer draws the 0-based index n uniformly and uses t = (n+1)/N;
for the continuous VP-SDE it draws t uniformly in [t_min, 1] (U-ViT: t_min = 0); a recipe's
``diffusion.time_sampling`` can draw them otherwise (:mod:`~zoo.diffusion.time_sampling`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .time_sampling import TimeSampling

TimeMap = Callable[[Tensor, int], Tensor]


def dit_index(t: Tensor, num_steps: int) -> Tensor:
    """DiT's DDPM index: 1000·(t − 1/N) (0 at t = 1/N, 999 at t = 1 for N = 1000)."""
    return 1000.0 * (t - 1.0 / num_steps)


def uvit_discrete(t: Tensor, num_steps: int) -> Tensor:
    """U-ViT discrete-time step n = N·t on the scale of 1000 steps: 1000·n/N (1 at t = 1/N, 1000 at t = 1 for
    N = 1000)."""
    return (num_steps * t) * (1000.0 / num_steps)


def uvit_continuous(t: Tensor, num_steps: int) -> Tensor:
    """U-ViT continuous-time (VP-SDE) input 999·t; ``num_steps`` is unused."""
    return 999.0 * t


def dimr_log_snr(t: Tensor, num_steps: int) -> Tensor:
    """DiMR's ``log_snr`` input 8·n/N − 4 with n = N·t (−3.992 at n = 1, 4 at n = N = 1000)."""
    return (num_steps * t) / float(num_steps) * 8.0 - 4.0


TIME_INPUTS: dict[str, TimeMap] = {
    "dit_index": dit_index,
    "uvit_discrete": uvit_discrete,
    "uvit_continuous": uvit_continuous,
    "dimr_log_snr": dimr_log_snr,
}

#: Time maps whose model was trained on continuous t (no discrete knots).
CONTINUOUS_TIME_INPUTS = frozenset({"uvit_continuous"})


def get_time_input(name: str) -> TimeMap:
    """The named map ``(t, num_steps) -> backbone time input``; a typo is a ``UserError``."""
    try:
        return TIME_INPUTS[name]
    except KeyError:
        from zoo.errors import UserError
        import difflib

        close = difflib.get_close_matches(str(name), TIME_INPUTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"diffusion.time_input: unknown time mapping {name!r}{hint}; "
            f"choose one of {', '.join(sorted(TIME_INPUTS))}"
        ) from None


def model_time(name: str, t: Tensor, num_steps: int) -> Tensor:
    """Map continuous solver time ``t`` to the backbone's input with the named map."""
    return get_time_input(name)(t, num_steps)


def index_to_time(index: Tensor, num_steps: int) -> Tensor:
    """Continuous time of the 0-based DDPM step ``index``: the knot t_n = (n + 1)/N."""
    return (index.to(torch.float64) + 1.0) / num_steps


def training_times(
    batch_size: int,
    num_steps: int,
    continuous: bool = False,
    t_min: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    sampling: "TimeSampling | None" = None,
) -> Tensor:
    """Draw the training times t (float64, shape (B,)) the trainer and sampler share.

    Discrete models: a 0-based DDPM index n uniform in 0..N−1, returned as its knot (n+1)/N —
    so ``dit_index`` gives n, ``uvit_discrete``/``dimr_log_snr`` the official 1-based step n+1.
    Continuous (VP-SDE) models: t uniform in [t_min, 1] (U-ViT's trainer uses t_min = 0).
    ``sampling`` (a :class:`~zoo.diffusion.time_sampling.TimeSampling`) replaces the uniform draw.
    """
    from .time_sampling import UNIFORM

    return (sampling or UNIFORM).draw((batch_size,), num_steps, continuous, t_min, generator, device)


def time_to_index(t: Tensor, num_steps: int) -> Tensor:
    """The 0-based DDPM index of a knot time t = (n+1)/N (rounded; for discrete objectives)."""
    return torch.round(t * num_steps - 1.0).long().clamp_(0, num_steps - 1)

"""Per-sample seeds: every random draw of sample i comes from its own generator.

Sample ``i`` of a run seeded ``seed`` draws from a generator seeded ``sample_seed(seed, i, stream)``
(noise 0, label 1, solver noise 2; training uses further streams), so images, labels and training
draws do not depend on the batch size, on how samples are split across processes, or on where a
run was resumed.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from zoo.errors import UserError


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective scramble of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The 32-bit generator seed of sample ``index`` (PyTorch's CPU generator keeps only 32 bits).

    ``(scramble(seed, stream) + index) mod 2³²``: distinct for every index of one run (below 2³²
    samples). Two seeds start at pseudo-random offsets in the 2³² generator seeds, so two runs of N
    samples each share a stretch of draws, shifted, with probability about 2N/2³² (1 in ~20 for
    two DiT-XL/2 training runs of 10⁸ samples; their data order differs, so a sample's image and
    its noise still pair differently). ``stream`` separates independent draws (noise, labels, solver
    noise) of the same sample.
    """
    return (_mix64((int(seed) << 8) ^ stream) + int(index)) & 0xFFFFFFFF


SEEDS = 2**56  # sample_seed keeps the seed's low 56 bits (8 go to the stream): larger ones alias smaller ones


def recipe_seed(recipe: Mapping[str, Any], seed: int | None) -> int:
    """The sampling seed: ``seed`` (``--seed``) where given, else the recipe's ``sample.seed``, else 0."""
    from zoo.diffusion.sections import SAMPLE_UNSET_MEANS

    return seed if seed is not None else int((recipe.get("sample") or {}).get("seed") or SAMPLE_UNSET_MEANS["seed"])


def check_seed(seed: int, what: str = "--seed", draws: str = "the images") -> None:
    """Refuse a seed outside [0, 2^56): seed + 2^56 (or a negative one) drew the images of another seed.
    ``draws``: what the seed draws, for the message."""
    if not 0 <= seed < SEEDS:
        raise UserError(f"{what} {seed} is outside 0..{SEEDS - 1} (a seed outside draws {draws} of one inside)",
                        suggestion="give a seed in that range")


def _generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, index, stream))


def solver_generators(seed: int, start: int, n: int) -> list[torch.Generator]:
    """The generators of samples ``start .. start+n−1`` that a stochastic solver draws its step noise from."""
    return [_generator(seed, start + i, stream=2) for i in range(n)]


def initial_noise(n: int, shape: tuple[int, ...], seed: int, start: int = 0) -> Tensor:
    """x_T of samples ``start .. start+n−1``, each from its own generator (float32, CPU)."""
    return torch.stack([torch.randn(shape, generator=_generator(seed, start + i)) for i in range(n)])


def label_draw(recipe: Mapping[str, Any]) -> str:
    """How classes are drawn where none are given: the recipe's ``sample.labels``, else ``random``."""
    from zoo.diffusion.sections import SAMPLE_UNSET_MEANS

    return (recipe.get("sample") or {}).get("labels") or SAMPLE_UNSET_MEANS["labels"]


def sample_labels(n: int, num_classes: int, seed: int, start: int = 0, draw: str = "random") -> Tensor:
    """Classes of samples ``start .. start+n−1``. ``random``: each from its own generator (stream 1, independent
    of x_T); ``balanced``: sample i gets class ``i % num_classes``, so every class is drawn equally often (50 each
    of 1000 at 50K, as DiMR's evaluation) and a shorter run's labels are the start of a longer one's."""
    if draw == "balanced":
        return torch.arange(start, start + n) % num_classes
    return torch.stack(
        [torch.randint(num_classes, (), generator=_generator(seed, start + i, stream=1)) for i in range(n)]
    )

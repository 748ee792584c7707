"""The random draws of one training sample, a function of (seed, global sample index) only.

Sample ``g`` of the run (``g = step · batch_size + position in the global batch``) gets its own
generator, seeded like the sampler's per-sample generators (:func:`zoo.seeds.sample_seed`)
on a stream of its own, and draws from it in a fixed order: its diffusion time, its noise,
the uniform that decides its label drop and the one that decides its flip. So the losses
and the weights of a run do not depend on how the global batch is split into processes or
micro-batches, and a resumed run draws what the uninterrupted one would have. (A seed per
sample is a Python loop over the batch: one generator, re-seeded for each sample, fills the
batch's rows in place, and the times are mapped once for the batch: ~0.08 ms per sample of
4×32×32 noise, on the CPU.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TRAIN_STREAM = 16  # streams 0-2 are the sampler's (noise, labels, solver noise), 17 the datasets' own draws,
                  # 18-20 the validation loss's (zoo.training.val_loss)


@dataclass
class Draws:
    """Per-sample draws of a (micro-)batch, made on the CPU: time t (float64), noise, and two uniforms."""

    t: Tensor
    noise: Tensor
    drop: Tensor
    flip: Tensor

    def for_objective(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.t, self.noise, self.drop

    def to(self, device: torch.device) -> Draws:
        """The draws on ``device``. To a GPU they go from pinned memory without waiting: a copy from
        ordinary (pageable) memory first waits for everything already queued on the GPU, so the CPU
        could not prepare the next micro-batch while the GPU still works on the last one."""
        if device.type == "cpu":
            return self
        pinned = device.type == "cuda"
        fields = (self.t, self.noise, self.drop, self.flip)
        return Draws(*((v.pin_memory() if pinned else v).to(device, non_blocking=pinned) for v in fields))


def draw(indices: range, seed: int, shape: tuple[int, ...], objective) -> Draws:
    """The draws of the samples with global indices ``indices`` (see the module doc), times from
    ``objective``'s schedule and time sampling (a :class:`~zoo.diffusion.objectives.DiffusionObjective`)."""
    from zoo.seeds import sample_seed

    sampling, n = objective.time_sampling, len(indices)
    gen = torch.Generator()
    raw, noise, u = [], torch.empty((n, *shape)), torch.empty((n, 2))
    for i, g in enumerate(indices):  # one generator re-seeded, each sample's rows filled in place: no allocations
        gen.manual_seed(sample_seed(seed, g, TRAIN_STREAM))
        raw.append(sampling.draw_raw((), objective.num_steps, objective.continuous, gen))
        torch.randn(shape, generator=gen, out=noise[i])
        torch.rand(2, generator=gen, out=u[i])
    t = sampling.to_time(torch.stack(raw), objective.num_steps, objective.continuous, objective.t_min)
    return Draws(t, noise, u[:, 0], u[:, 1])

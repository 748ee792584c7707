"""Exponential moving average of a model's parameters, kept in fp32 whatever the model's dtype.

Under FSDP2 the parameters are DTensor shards and so are the shadows: each rank averages its part.

ema ← d·ema + (1 − d)·param, i.e. ``lerp(ema, param, 1 − d)``. A bf16 shadow updated in place
freezes once (1 − d)·(param − ema) falls below bf16's resolution, hence fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """fp32 shadow copies of every parameter of ``model`` (frozen ones too, so the EMA is a full model)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        current = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], source: str = "EMA state") -> None:
        """Load shadows strictly: a missing, unexpected or mis-shaped key is a one-line
        :class:`~zoo.errors.UserError` naming ``source`` (a copy would broadcast a wrong shape)."""
        from zoo.weights import check_keys

        check_keys(self.state_dict(), state, source)
        for n, s in zip(self.names, self.shadow):
            value = state[n].to(s.device)
            if hasattr(s, "device_mesh"):  # an FSDP2 shard: keep this rank's part of the full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, s.device_mesh, s.placements)
            s.copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (a copy of the trained model)."""
        params = dict(model.named_parameters())
        for n, s in zip(self.names, self.shadow):
            params[n].copy_(s)

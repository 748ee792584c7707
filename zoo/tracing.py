"""Whether a forward runs under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...).

Such a forward sees wrapped tensors: hand-written autograd Functions without a functorch rule
cannot run there, values cannot be read (``int(y.max())``) and memory-format queries are not
implemented under ``vmap``. The layers that use those take their plain path instead.
"""

from __future__ import annotations

import torch


def under_func_transform() -> bool:
    """True inside ``torch.func.grad``/``vmap``/``jacrev``/``jvp`` and their compositions."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # private: absent in a future torch
    return bool(active()) if active is not None else False

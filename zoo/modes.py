"""Running a module in eval mode for a while and handing it back in the modes it came in.

Sampling, validation and accuracy checks run a model that a caller may still be training: each
submodule's own mode comes back (a frozen part kept in eval mode stays there).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's mode restored after, also on error."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training

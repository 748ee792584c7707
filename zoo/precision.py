"""The arithmetic a model runs in: fp32, TF32 matmuls, or bf16/fp16 autocast.

Training takes it from ``train.precision`` and ``train.tf32``; sampling (``zoo sample``, ``zoo
eval``) from ``--precision`` or the recipe's ``sample.precision``. On a GPU, fp32 without TF32 is
several times slower than the official samplers, which run with TF32 (DiT's ``sample.py``) or
under autocast; on a CPU ``tf32`` is plain fp32.

Importing this module does not import torch (recipe validation names :data:`PRECISIONS`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def autocast_dtype(precision: str) -> "torch.dtype | None":
    """The autocast dtype of ``precision`` (bf16, fp16), or ``None`` where it computes in float32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def effective_precision(precision: str | None, device: "torch.device | str") -> str | None:
    """What ``precision`` computes on ``device``: TF32 exists on CUDA only, elsewhere it is fp32.
    ``None`` (the process's own settings) stays ``None`` on CUDA and is fp32 elsewhere."""
    import torch

    if precision is None:
        return None if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return "fp32" if precision == "tf32" and torch.device(device).type != "cuda" else precision


def arithmetic_key(precision: str | None, device: "torch.device | str") -> str | None:
    """How the model calls at ``precision`` on ``device`` compute, for keying samples: ``None`` for exact
    float32, else the precision. ``None`` on CUDA reads the process's TF32 switches: PyTorch's default
    leaves matmuls exact but lets cuDNN convolutions use TF32 (``tf32-convolutions``)."""
    import torch

    computed = effective_precision(precision, device)
    if computed is None:
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        computed = ("tf32" if matmul and cudnn else "tf32-convolutions" if cudnn else "tf32-matmuls" if matmul
                    else "fp32")
    return None if computed == "fp32" else computed


def set_tf32(enabled: bool) -> tuple[bool, bool]:
    """Switch TF32 for CUDA matmuls and cuDNN convolutions together; returns the previous (matmul, cuDNN)
    switches. Process-wide flags (settable without a GPU)."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    return before


@contextmanager
def inference_precision(precision: str | None, device: "torch.device | str") -> Iterator[None]:
    """Run the model calls inside at ``precision`` on ``device``, restoring the TF32 switches after.

    ``None`` changes nothing; ``fp32`` switches TF32 off for matmuls and cuDNN convolutions (exact
    float32; PyTorch's default lets cuDNN use TF32); ``tf32`` on; ``bf16`` and ``fp16`` autocast the
    model's matmuls and convolutions, with TF32 for what autocast leaves in float32. Callers cast the
    model's output back to float32 before a solver uses it.
    """
    import torch

    device = torch.device(device)
    precision = effective_precision(precision, device)
    dtype = autocast_dtype(precision) if precision else None
    if precision is None or device.type != "cuda":  # no TF32 switch to set
        if dtype is None:
            yield
        else:
            with torch.autocast(device.type, dtype=dtype):
                yield
        return
    matmul, cudnn = set_tf32(precision != "fp32")
    try:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

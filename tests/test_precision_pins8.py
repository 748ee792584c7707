"""Pins of zoo.precision that mutation testing found the rest of the suite let through.

* ``inference_precision("fp32" | "tf32", "cuda")`` autocasts nothing: only bf16/fp16 enable autocast. CUDA
  autocast to float32 is a real mode in PyTorch (it casts the autocast-listed ops' inputs to float32), so
  enabling it would compute a float64 parity model's matmuls in float32; on a machine without CUDA,
  enabling it warns "CUDA is not available ... Disabling autocast" at every sampling call.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from zoo.precision import inference_precision


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_fp32_and_tf32_on_cuda_enable_no_autocast(precision):
    """Mutation: ``enabled=dtype is not None`` -> ``enabled=True``. On a GPU a float64 matmul inside came out
    float32 (CUDA autocast to float32); without one, entering the context warned. Either way a wrong
    implementation is seen: no warning here, and on CUDA the float64 product stays float64, bit for bit."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with inference_precision(precision, "cuda"):
                assert not torch.is_autocast_enabled("cuda")
                if torch.cuda.is_available():
                    a = torch.randn(8, 8, dtype=torch.float64, device="cuda")
                    out = a @ a
                    assert out.dtype == torch.float64
                    assert torch.equal(out.cpu(), a.cpu() @ a.cpu()) or torch.allclose(out.cpu(), a.cpu() @ a.cpu(),
                                                                                       rtol=1e-12, atol=1e-12)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

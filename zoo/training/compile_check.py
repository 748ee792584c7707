"""What ``train.compile: true`` needs on this machine, checked before the run starts.

Inductor turns a CPU graph into C++ and a CUDA graph into Triton kernels. Without a C++ compiler
(a slim container) or without Triton, the first training step fails deep inside torch with a
long traceback; this check says it in one line, with the fix, before any work is done.
"""

from __future__ import annotations

import os
import shutil

import torch

from zoo.errors import UserError

_FIX_OFF = "or set train.compile=false to train without compiling"


def check_compile_toolchain(device: torch.device) -> None:
    """Raise a :class:`UserError` when inductor cannot compile for ``device`` on this machine."""
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # a torch without this helper: its own error at the first step
            return
        if not has_triton():
            raise UserError("compiling for CUDA needs Triton (inductor's GPU code generator), "
                            "which is not installed", key_path="train.compile",
                            suggestion=f"pip install triton (PyTorch's Linux CUDA wheels bring it), {_FIX_OFF}")
        if not _c_compiler():
            raise UserError("compiling for CUDA needs a C compiler (Triton builds its kernel launcher with one), "
                            "and none is on PATH ($CC, cc, gcc or clang)", key_path="train.compile",
                            suggestion=f"install gcc or clang or point $CC at one, {_FIX_OFF}")
        return
    if device.type != "cpu":
        return
    try:
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except Exception:  # torch._inductor.exc.InvalidCxxCompiler, or what a later torch raises instead
        tried = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        names = ", ".join(str(c) for c in tried if c)
        raise UserError(f"compiling on the CPU needs a C++ compiler (inductor compiles the model "
                        f"to C++), and none works here (tried: {names or 'none configured'})",
                        key_path="train.compile",
                        suggestion=f"install g++ or clang++ or point $CXX at one, {_FIX_OFF}") from None


def _c_compiler() -> str | None:
    """The C compiler Triton would find: ``$CC``, else cc, gcc or clang on PATH."""
    return shutil.which(os.environ.get("CC") or "") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)

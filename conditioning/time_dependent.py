"""Time-dependent norms (DiMR, Liu et al. 2024): time enters through the norms' own parameters.

A time-dependent parameter interpolates between two learned vectors with a sigmoid of time:

    θ(τ) = p1 + σ((1 + w)·τ + b) · (p0 − p1),     τ = t · time_scale

(the paper's eq. 5-6 with ``s(τ) = σ((1 + w)·τ + b)``). The released DiMR code makes the gate
per channel (``w``, ``b`` of width C, both initialised to 0, so the slope starts at 1) and feeds
``τ = log_snr / 4`` — ``t`` is the backbone's time input (DiMR's ``log_snr`` = 8n/1000 − 4), hence
``time_scale = 0.25``; DiT and U-ViT, whose time input is the DDPM step (0..999), bind
:data:`STEP_TIME_SCALE` unless a recipe sets ``time_scale``. The paper's TD-LN uses one scalar gate
per parameter instead (``PaperTimeDependentLayerNorm``). ``w`` and ``b`` get no weight decay: their names are in
``TimeDependentParameter.no_weight_decay`` and :func:`no_weight_decay_names` lists them for a model.

θ(τ) is evaluated once per forward per parameter (shape ``(B, C)``, or ``(C,)`` for a scalar t),
then broadcast over tokens / pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.domains import Eps, TimeScale, Width
from zoo.errors import UserError

from .base import Conditioning, check_conditioning, per_sample
from .fused_rmsnorm import scaled_rms_norm


#: ``time_scale`` of time-dependent norms in backbones whose time input is a DDPM step 0..999 (DiT, U-ViT).
#: τ = t/500 spans [0, 2) over the chain, as DiMR's τ = log_snr/4 spans [−1, 1): with DiMR's 0.25 the
#: gate σ(τ) would be 1 to float precision from t ≈ 50 on, a time-blind norm whose w, b get no gradient.
STEP_TIME_SCALE = 1 / 500


class InterpolatedPair(nn.Module):
    """``p1 + s·(p0 − p1)`` for a gate value ``s``: what every time-dependent parameter interpolates
    (``p0 = p1 = init`` at first, so it starts time-independent). On its own it reads a gate another
    parameter owns (the paper's β(t), which shares γ's)."""

    def __init__(self, dim: int, init: float = 0.0):
        super().__init__()
        self.init = init
        self.p0 = nn.Parameter(torch.full((dim,), float(init)))
        self.p1 = nn.Parameter(torch.full((dim,), float(init)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.p0, self.init)
        nn.init.constant_(self.p1, self.init)

    def at(self, s: Tensor) -> Tensor:
        """``p1 + s·(p0 − p1)`` at gate value ``s``."""
        return torch.lerp(self.p1, self.p0, s)

    def extra_repr(self) -> str:
        return f"dim={self.p0.shape[0]}, init={self.init}"


class TimeDependentParameter(InterpolatedPair):
    """``θ(τ) = p1 + σ((1 + w)·τ + b)·(p0 − p1)`` for a vector parameter of width ``dim``.

    Args:
        dim: width of the parameter.
        init: the usual initial value (1 for a scale, 0 for a shift); ``p0 = p1 = init``.
        per_channel_gate: ``w``, ``b`` per channel (released DiMR) or one scalar pair (paper eq. 5).
    """

    no_weight_decay = ("w", "b")

    def __init__(self, dim: int, init: float = 1.0, per_channel_gate: bool = True):
        super().__init__(dim, init)  # p0, p1 first: the parameter order optimizer states were saved in
        self.per_channel_gate = per_channel_gate
        gate = dim if per_channel_gate else 1
        self.w = nn.Parameter(torch.zeros(gate))
        self.b = nn.Parameter(torch.zeros(gate))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.w)
        nn.init.zeros_(self.b)

    def forward(self, tau: Tensor) -> Tensor:
        """θ at ``tau`` of shape ``(B,)`` -> ``(B, dim)``, or a scalar -> ``(dim,)``."""
        return self.at(self.gate(tau))

    def gate(self, tau: Tensor) -> Tensor:
        """``s(τ) = σ((1 + w)·τ + b)``: ``(B, gates)`` for ``tau`` of shape ``(B,)``, ``(gates,)`` for a scalar."""
        return torch.sigmoid(torch.addcmul(self.b, tau.to(self.p0.dtype).unsqueeze(-1), 1 + self.w))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel_gate={self.per_channel_gate}"


class _TimeDependentNorm(nn.Module):
    """Shared parts of the time-dependent norms: the conditioner flags and τ from ``cond.t``."""

    needs_embedding = False
    adds_time_token = False

    def __init__(self, dim: int, eps: float, time_scale: float):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.time_scale = time_scale

    def tau(self, cond: Conditioning) -> Tensor:
        """τ = t · time_scale, one value per sample (or a scalar)."""
        check_conditioning(cond, f"{type(self).__name__}'s cond")
        if cond is None or cond.t is None:  # a block used on its own: was "'NoneType' object has no attribute 't'"
            raise UserError(f"{type(self).__name__}(dim={self.dim}) reads the time from Conditioning.t, got "
                            f"{'no cond' if cond is None else 'Conditioning.t None'}",
                            suggestion="pass Conditioning(t=t) with t the backbone's time input, (B,) or a scalar")
        return torch.as_tensor(cond.t) * self.time_scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, time_scale={self.time_scale}"


class TimeDependentLayerNorm(_TimeDependentNorm):
    """TD-LN as released with DiMR: ``LN(x)·γ(τ) + β(τ)`` with per-channel gates (8C parameters).

    Used around DiMR's upsample and in each branch's output head (LayerNorm eps 1e-5).
    """

    def __init__(self, dim: Width, cond_dim: Width | None = None, eps: Eps = 1e-5, time_scale: TimeScale = 0.25):
        super().__init__(dim, eps, time_scale)
        self.weight = TimeDependentParameter(dim, 1.0)
        self.bias = TimeDependentParameter(dim, 0.0)

    def forward(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, None]:
        tau = self.tau(cond)
        return self._affine_norm(x, self.weight(tau), self.bias(tau)), None

    def _affine_norm(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        """``LN(x)·γ + β`` with ``γ``, ``β`` of shape ``(dim,)`` (one time) or ``(B, dim)`` (one per sample)."""
        if gamma.ndim == 1:  # one time for the whole batch: the fused affine LayerNorm
            return F.layer_norm(x, (self.dim,), gamma, beta, self.eps)
        h = F.layer_norm(x, (self.dim,), eps=self.eps)
        return torch.addcmul(per_sample(beta, h), h, per_sample(gamma, h))


class TimeDependentRMSNorm(_TimeDependentNorm):
    """DiMR's in-block pre-norm: ``x / (‖x‖₂/√C + eps) · γ(τ)``, scale only (4C parameters).

    Note ``eps`` is added to the RMS, not inside the square root (as released).
    """

    def __init__(self, dim: Width, cond_dim: Width | None = None, eps: Eps = 1e-8, time_scale: TimeScale = 0.25):
        super().__init__(dim, eps, time_scale)
        self.weight = TimeDependentParameter(dim, 1.0)

    def forward(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, None]:
        return scaled_rms_norm(x, self.weight(self.tau(cond)), self.eps), None  # one fused autograd node


class PaperTimeDependentLayerNorm(TimeDependentLayerNorm):
    """TD-LN as the paper writes it (eq. 5-7): one scalar gate ``s(τ) = σ(w·τ + b)`` for both parameters.

    ``γ(τ) = s·p_1 + (1 − s)·p_2`` and ``β(τ) = s·p_3 + (1 − s)·p_4`` with the same ``s`` ("β(t) is
    formulated similarly with another two parameters p3 and p4": 4C + 2 parameters). ``w`` is stored
    as an offset from 1, as in the released per-channel form; the gate is ``weight.w``, ``weight.b``.
    """

    def __init__(self, dim: Width, cond_dim: Width | None = None, eps: Eps = 1e-5, time_scale: TimeScale = 0.25):
        _TimeDependentNorm.__init__(self, dim, eps, time_scale)
        self.weight = TimeDependentParameter(dim, 1.0, per_channel_gate=False)  # p1, p2 and the one gate
        self.bias = InterpolatedPair(dim, 0.0)  # p3, p4, read at the weight's gate

    def forward(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, None]:
        s = self.weight.gate(self.tau(cond))
        return self._affine_norm(x, self.weight.at(s), self.bias.at(s)), None


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that must not be weight-decayed (the gates ``w``, ``b``).

    Collected from every submodule that declares a ``no_weight_decay`` tuple of its own
    parameter names (as :class:`TimeDependentParameter` does).
    """
    names = set()
    for prefix, module in model.named_modules():
        own = getattr(type(module), "no_weight_decay", ())
        if not isinstance(own, (tuple, list, set, frozenset)):
            continue  # e.g. a timm-style ``no_weight_decay()`` method on the model itself
        for name in own:
            if isinstance(getattr(module, name, None), nn.Parameter):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names

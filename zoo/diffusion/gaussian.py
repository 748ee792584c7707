"""Gaussian log-likelihood terms of the diffusion variational bound (DDPM §3.3, iDDPM §2–3).

All functions are elementwise (they broadcast) and return nats; callers average over the
data dimensions and divide by ln 2 for bits per dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats.

    KL = ½·(logvar2 − logvar1 + e^(logvar1 − logvar2) + (mean1 − mean2)²·e^(−logvar2) − 1).
    """
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


#: How the decoder term computes the Gaussian CDF: ``tanh``, iDDPM's and DiT's (the tanh approximation of
#: Φ, each probability floored at 1e-12, so no element scores below log 1e-12 = −27.6 nats), or ``exact``.
DECODER_CDFS = ("tanh", "exact")


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor, num_bins: int = 256, cdf: str = "exact"
) -> Tensor:
    """log P(x) under N(mean, e^(2·log_scale)) discretized to ``num_bins`` bins over [−1, 1].

    The decoder term L_0 of DDPM eq. 13: the bin of a data value x (bin width 2/(num_bins−1))
    is [x − 1/(num_bins−1), x + 1/(num_bins−1)], with the outermost bins extended to ±∞.
    ``cdf="exact"``: Φ by ``log_ndtr``, the interior difference of CDFs computed in the tail that keeps
    it accurate; ``cdf="tanh"``: the official code's approximation and floor, to the digit.
    """
    if cdf not in DECODER_CDFS:
        raise ValueError(f"decoder cdf {cdf!r}: one of {', '.join(DECODER_CDFS)}")
    half_bin = 1.0 / (num_bins - 1)
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_std
    lower = (x - mean - half_bin) * inv_std
    if cdf == "tanh":
        cdf_upper, cdf_lower = _tanh_normal_cdf(upper), _tanh_normal_cdf(lower)
        log_cdf_upper = cdf_upper.clamp(min=1e-12).log()
        log_sf_lower = (1.0 - cdf_lower).clamp(min=1e-12).log()
        log_mid = (cdf_upper - cdf_lower).clamp(min=1e-12).log()
    else:
        log_cdf_upper = torch.special.log_ndtr(upper)
        log_sf_lower = torch.special.log_ndtr(-lower)  # log(1 − Φ(lower))
        # log(Φ(upper) − Φ(lower)): use the side away from the mean so neither term rounds to 1.
        upper_side = torch.where(lower > 0, -lower, upper)  # argument whose CDF is the larger one
        lower_side = torch.where(lower > 0, -upper, lower)
        log_big = torch.special.log_ndtr(upper_side)
        log_small = torch.special.log_ndtr(lower_side)
        log_mid = log_big + torch.log1p(-torch.exp(log_small - log_big).clamp(max=1.0 - 1e-12))
    # iDDPM's and DiT's edge, ±0.999 at 256 bins (between the last two bin centres of 8-bit data, where any edge
    # gives the same result; on continuous VAE latents, which DiT scores too, values in (0.996, 0.999] tell edges apart)
    edge = 1.0 - 0.255 / (num_bins - 1)
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, log_mid))


def _tanh_normal_cdf(z: Tensor) -> Tensor:
    """Φ(z) ≈ ½·(1 + tanh(√(2/π)·(z + 0.044715·z³))), the approximation iDDPM's and DiT's decoder term uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))


def to_bits_per_dim(nats: Tensor) -> Tensor:
    """Mean over all but the batch dimension, converted from nats to bits."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)

"""Feature statistics and the Fréchet distance between two Gaussians, in float64.

    FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½

The trace of the matrix square root is taken as ``Σᵢ √λᵢ`` over the eigenvalues of the
symmetric positive semi-definite matrix ``√Σ₁ Σ₂ √Σ₁``, which has the same eigenvalues as
``Σ₁ Σ₂`` (similar matrices when Σ₁ is invertible, and by continuity otherwise). Both steps
are symmetric eigen-decompositions (``eigh``), whose eigenvalues are real; rounding can leave
them a hair below zero, so they are clipped at 0. Unlike ``scipy.linalg.sqrtm`` of the
non-symmetric product, this never returns NaN or a complex number, also for the singular
covariances of fewer samples than feature dimensions. A sigma that is no covariance (not
symmetric, or an eigenvalue below zero by more than rounding) is refused: clipping its
eigenvalues would return a number, 0 for ``-Σ``, that measures nothing.

From features themselves, :func:`frechet_distance_of_features` takes the same number in the
samples' space when there are fewer samples than dimensions (per-class FD), without a D×D
decomposition.
"""

from __future__ import annotations

import numpy as np


#: How far below zero rounding alone takes a covariance's smallest eigenvalue, as a fraction of its largest
#: in magnitude. Measured on rank-deficient covariances (fewer samples than dimensions, D = 1280 and 2048) of
#: float32 features: ~4e-16 computed in float64, ~5e-9 once stored as float32, ~6e-8 computed wholly in
#: float32; 1e-6 leaves a margin of 15x over the worst, and a sign flipped in sigma is far past it.
PSD_TOLERANCE = 1e-6


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2.0


def covariance_problem(sigma: np.ndarray) -> str | None:
    """Why a finite ``sigma`` (D, D) is no covariance matrix, in words: asymmetric or with a negative
    eigenvalue beyond rounding (:data:`PSD_TOLERANCE`); ``None`` when it is one."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return _asymmetry_problem(sigma) or _eigenvalue_problem(np.linalg.eigvalsh(_symmetric(sigma)))


def _asymmetry_problem(sigma: np.ndarray) -> str | None:
    scale = float(np.abs(sigma).max(initial=0.0))
    asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
    if asymmetry > PSD_TOLERANCE * scale:
        return f"sigma is not symmetric (entries differ from their transposes by up to {asymmetry:.3g})"
    return None


def _eigenvalue_problem(values: np.ndarray) -> str | None:
    """Of a symmetric sigma's eigenvalues (ascending): a negative one beyond rounding, in words."""
    largest = float(np.abs(values).max(initial=0.0))
    if values.size and values[0] < -PSD_TOLERANCE * largest:
        return (f"sigma is not positive semi-definite (an eigenvalue of {values[0]:.3g}, the largest in "
                f"magnitude {largest:.3g}): no covariance matrix")
    return None


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues -> 0); a ValueError
    where an eigenvalue is negative beyond rounding (checked on the decomposition it takes anyway)."""
    values, vectors = np.linalg.eigh(matrix)
    problem = _eigenvalue_problem(values)
    if problem is not None:
        raise ValueError(problem)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _as_stats(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: mu and sigma must be finite (NaN or inf in the features?)")
    problem = _asymmetry_problem(sigma)  # (its eigenvalues are checked where they are decomposed)
    if problem is not None:
        raise ValueError(f"{which}: {problem}")
    return mu, _symmetric(sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Inputs are array-likes of shape (D,) and (D, D), in any float dtype; a sigma that is no
    covariance (:func:`covariance_problem`) is a ValueError. The result is a finite float >= 0
    (a difference that rounds below zero is returned as 0).
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} and {mu2.shape[0]}")
    try:
        root1 = _psd_sqrt(sigma1)
    except ValueError as err:
        raise ValueError(f"first: {err}") from None
    problem = _eigenvalue_problem(np.linalg.eigvalsh(sigma2))
    if problem is not None:
        raise ValueError(f"second: {problem}")
    product = _symmetric(root1 @ sigma2 @ root1)
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(product), 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (N >= 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_of_features(features1, features2) -> float:
    """FD between the Gaussians fitted to features (N₁, D) and (N₂, D), in float64.

    With N₁ + N₂ <= D (a class of Inception features: tens of samples, D = 2048) the covariances
    Σ = AAᵀ have rank < N, A the centred features (D × N) over √(N−1). The nonzero eigenvalues of
    Σ₁Σ₂ = A₁A₁ᵀA₂A₂ᵀ are those of (A₁ᵀA₂)(A₁ᵀA₂)ᵀ, so tr (Σ₁Σ₂)^½ is the sum of the singular
    values of the N₁ × N₂ matrix A₁ᵀA₂, and tr Σ = ‖A‖²_F: O(N₁N₂D) work instead of two D × D
    eigen-decompositions (seconds each at D = 2048). More samples take :func:`frechet_distance`.
    """
    x1, x2 = (np.asarray(f, dtype=np.float64) for f in (features1, features2))
    if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
        raise ValueError(f"need features (N, D) with the same D on both sides, got {x1.shape} and {x2.shape}")
    if len(x1) + len(x2) > x1.shape[1]:
        return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    if min(len(x1), len(x2)) < 2:
        raise ValueError(f"need N >= 2 features on each side, got {len(x1)} and {len(x2)}")
    if not (np.isfinite(x1).all() and np.isfinite(x2).all()):
        raise ValueError("features must be finite (NaN or inf in the features?)")
    a1, a2 = ((x - x.mean(axis=0)) / np.sqrt(len(x) - 1) for x in (x1, x2))
    trace_sqrt = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())
    diff = x1.mean(axis=0) - x2.mean(axis=0)
    value = float(diff @ diff + np.sum(a1 * a1) + np.sum(a2 * a2) - 2.0 * trace_sqrt)
    return max(value, 0.0)

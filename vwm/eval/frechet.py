"""Fréchet distance between two feature distributions (FID, FVD) and the running Gaussian statistics behind it.

For Gaussians N(mu1, S1) and N(mu2, S2) the squared 2-Wasserstein (Fréchet) distance is (Dowson & Landau 1982;
Heusel et al. 2017, eq. 6)

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).

The cross term is computed as the trace of the square root of the symmetric positive semi-definite matrix
S1^1/2 S2 S1^1/2 (it equals tr((S1 S2)^1/2), the form most FID code uses, because S1 S2 is similar to it),
with both square roots from symmetric eigendecompositions in float64 whose eigenvalues are clamped at zero. So
the result is real and finite for singular or near-singular covariances (fewer samples than dimensions), where
a general `sqrtm` of the non-symmetric S1 S2 returns complex values or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _clean(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: those below n * eps * max |l| (numpy's matrix_rank
    tolerance) are zero. Without this, the sqrt of the ~eps-sized noise of each null direction adds
    sqrt(eps) to the trace, and identical feature sets would not be at distance 0."""
    info = torch.finfo(values.dtype)
    tol = values.numel() * info.eps * values.abs().max().clamp(min=info.tiny)
    return torch.where(values > tol, values, torch.zeros_like(values))


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric positive semi-definite matrix: V diag(sqrt(l)) V^T, with eigenvalues
    below the round-off tolerance (negative ones included) set to zero."""
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * _clean(values).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> float:
    """tr((S1^1/2 S2 S1^1/2)^1/2) = tr((S1 S2)^1/2) for symmetric PSD S1, S2 (float64, eigendecompositions)."""
    root = sqrtm_psd(sigma1)
    inner = root @ sigma2 @ root
    inner = 0.5 * (inner + inner.T)
    return float(_clean(torch.linalg.eigvalsh(inner)).sqrt().sum())


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Squared Fréchet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed in float64."""
    m1, m2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if m1.ndim != 1 or m1.shape != m2.shape or s1.shape != (m1.numel(),) * 2 or s2.shape != s1.shape:
        raise ValueError(f"frechet_distance: means {tuple(m1.shape)}, {tuple(m2.shape)} and covariances "
                         f"{tuple(s1.shape)}, {tuple(s2.shape)} do not describe two Gaussians of one dimension")
    for name, value in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"frechet_distance: {name} holds non-finite values")
    mean_term = float((m1 - m2).square().sum())
    trace_term = float(torch.trace(s1) + torch.trace(s2)) - 2.0 * trace_sqrt_product(s1, s2)
    return mean_term + trace_term


@dataclass
class GaussianStats:
    """Mean and (unbiased) covariance of a feature set, with its sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


class RunningStats:
    """Streaming first and second moments of feature vectors in float64: add batches in any order, merge shards,
    and read the mean and the unbiased covariance (the statistics FID / FVD compare).

    Sums are taken around a fixed shift (the first batch's mean) so the covariance of features with a large
    mean keeps its precision: S = (sum d d^T - n m m^T) / (n - 1) with d = x - shift and m = mean(d).
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"RunningStats: dim={dim} is invalid; allowed: >= 1")
        self.dim = dim
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def add(self, features: np.ndarray | torch.Tensor) -> None:
        """Accumulate a batch of feature vectors (N, dim)."""
        x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else \
            np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"RunningStats.add: features of shape {x.shape}; expected (N, {self.dim})")
        if len(x) == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("RunningStats.add: features hold non-finite values")
        if self.shift is None:
            self.shift = x.mean(axis=0)
        d = x - self.shift
        self.count += len(x)
        self.sum += d.sum(axis=0)
        self.outer += d.T @ d

    def merge(self, other: RunningStats) -> None:
        """Add the samples accumulated by another RunningStats of the same dimension."""
        if other.dim != self.dim:
            raise ValueError(f"RunningStats.merge: dim {other.dim} != {self.dim}")
        if other.count == 0:
            return
        if self.shift is None:
            self.shift = other.shift.copy()
        delta = other.shift - self.shift  # re-centre the other's sums on our shift
        self.outer += other.outer + np.outer(other.sum, delta) + np.outer(delta, other.sum) + \
            other.count * np.outer(delta, delta)
        self.sum += other.sum + other.count * delta
        self.count += other.count

    def stats(self) -> GaussianStats:
        """Mean and unbiased covariance; needs at least two samples."""
        if self.count < 2:
            raise ValueError(f"RunningStats: {self.count} sample(s); the covariance needs at least 2")
        m = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(m, m)) / (self.count - 1)
        return GaussianStats(mu=m + self.shift, sigma=0.5 * (sigma + sigma.T), count=self.count)


def feature_distance(real: RunningStats | GaussianStats, generated: RunningStats | GaussianStats) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (FID / FVD)."""
    a = real.stats() if isinstance(real, RunningStats) else real
    b = generated.stats() if isinstance(generated, RunningStats) else generated
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)

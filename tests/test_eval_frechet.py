"""Fréchet distance (FID / FVD) against closed forms, and the streaming statistics behind it (DESIGN.md §5 layer 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vwm.eval.frechet import RunningStats, feature_distance, frechet_distance, sqrtm_psd, trace_sqrt_product


def _random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or dim))
    return a @ a.T / (rank or dim)


def test_diagonal_covariances_match_the_closed_form():
    # commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_non_commuting_2x2_covariances_match_the_closed_form():
    # For 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)); with M = S1^1/2 S2 S1^1/2, tr M = tr(S1 S2) and
    # det M = det S1 det S2.
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.0, 2.0])
    cross = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-12)  # symmetric


def test_sample_statistics_converge_to_the_distance_of_the_true_gaussians():
    rng = np.random.default_rng(0)
    dim = 6
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    exact = frechet_distance(mu1, s1, mu2, s2)
    real, fake = RunningStats(dim), RunningStats(dim)
    for _ in range(20):  # 200k samples each, in batches
        real.add(rng.multivariate_normal(mu1, s1, size=10_000))
        fake.add(rng.multivariate_normal(mu2, s2, size=10_000))
    assert feature_distance(real, fake) == pytest.approx(exact, rel=0.02)


def test_identical_feature_sets_are_at_distance_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 64)) * 3 + 7
    a, b = RunningStats(64), RunningStats(64)
    a.add(x)
    b.add(x.copy())
    assert abs(feature_distance(a, b)) < 1e-8
    # fewer samples than dimensions: singular covariance, still zero and real
    y = rng.standard_normal((20, 64))
    c, d = RunningStats(64), RunningStats(64)
    c.add(y)
    d.add(y)
    assert abs(feature_distance(c, d)) < 1e-8


def test_near_singular_covariances_give_a_finite_real_nonnegative_distance():
    rng = np.random.default_rng(2)
    dim = 128
    s1 = _random_spd(rng, dim, rank=10) + 1e-12 * np.eye(dim)  # rank 10 plus round-off-sized noise
    s2 = _random_spd(rng, dim, rank=7)
    d = frechet_distance(np.zeros(dim), s1, np.zeros(dim), s2)
    assert math.isfinite(d) and d >= -1e-9
    # the matrix square root is real, symmetric and squares back for a PSD matrix with negative round-off
    m = _random_spd(rng, 32, rank=3)
    m[0, 0] -= 1e-14
    root = sqrtm_psd(torch.tensor(m))
    assert torch.isfinite(root).all() and torch.allclose(root, root.T)
    assert torch.allclose(root @ root, torch.tensor(m), atol=1e-10)
    assert trace_sqrt_product(torch.tensor(m), torch.tensor(m)) == pytest.approx(np.trace(m), rel=1e-6)


def test_the_order_of_samples_and_of_batches_does_not_matter():
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((300, 16)), rng.standard_normal((400, 16)) + 0.3
    a, b = RunningStats(16), RunningStats(16)
    a.add(real)
    b.add(fake)
    reference = feature_distance(a, b)
    p, q = RunningStats(16), RunningStats(16)
    for chunk in np.array_split(real[rng.permutation(300)], 7):
        p.add(chunk)
    shards = [RunningStats(16) for _ in range(3)]  # merged shards, as ranks of an evaluation run produce them
    for i, chunk in enumerate(np.array_split(fake[rng.permutation(400)], 5)):
        shards[i % 3].add(chunk)
    for shard in shards:
        q.merge(shard)
    assert feature_distance(p, q) == pytest.approx(reference, rel=1e-9, abs=1e-12)


def test_statistics_keep_their_precision_far_from_the_origin():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 3)) + 1e6  # a naive sum of squares loses the variance at this offset
    stats = RunningStats(3)
    for chunk in np.array_split(x, 4):
        stats.add(chunk)
    assert np.allclose(stats.stats().sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_user_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not describe two Gaussians"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    stats = RunningStats(4)
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        stats.add(np.zeros((2, 3)))
    stats.add(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.stats()

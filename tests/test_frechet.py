"""Frechet distance vs pytorch-fid, kernel distance vs an explicit double loop, input validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from harness.metrics import feature_stats, frechet_distance, frechet_distance_from_stats, kernel_distance
from harness.metrics.frechet import (
    KernelDistance,
    bootstrap_indices,
    frechet_distance_replicates,
    jackknife_indices,
    kernel_distance_replicates,
    paired_bootstrap_se,
    resampled_distances,
)


def _random_features(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features ``(n, dim)`` (random mixing matrix), optionally mean-shifted."""
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + shift


# ---------------------------------------------------------------------------------------------------
# Frechet distance.


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid calls sqrtm(disp=False)
@pytest.mark.parametrize(
    ("seed", "dim", "n_a", "n_b"), [(0, 16, 100, 120), (1, 32, 200, 150), (2, 64, 300, 250)]
)
def test_frechet_matches_pytorch_fid(seed: int, dim: int, n_a: int, n_b: int) -> None:
    rng = np.random.default_rng(seed)
    feats_a = _random_features(rng, n_a, dim)
    feats_b = _random_features(rng, n_b, dim, shift=0.3)
    mu_a, sigma_a = np.mean(feats_a, axis=0), np.cov(feats_a, rowvar=False)
    mu_b, sigma_b = np.mean(feats_b, axis=0), np.cov(feats_b, rowvar=False)
    expected = calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    assert frechet_distance(feats_a, feats_b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-6)


def test_frechet_pytorch_fid_reference_case() -> None:
    """pytorch-fid's own test: mu 0 vs 1 in 2048-d with identity covariances gives 2048."""
    dim = 2048
    distance = frechet_distance_from_stats(np.zeros(dim), np.eye(dim), np.ones(dim), np.eye(dim))
    assert distance == pytest.approx(dim, rel=1e-12)


def test_frechet_closed_form_diagonal() -> None:
    """N(0, diag a) vs N(m, diag b): |m|^2 + sum (sqrt a - sqrt b)^2."""
    a, b, m = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0]), np.array([1.0, 2.0, 0.0])
    expected = m @ m + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(np.zeros(3), np.diag(a), m, np.diag(b)) == pytest.approx(expected)


def test_frechet_closed_form_rotated() -> None:
    """The diagonal case rotated by one orthogonal Q (general eigensolver path) keeps its distance."""
    rng = np.random.default_rng(12)
    a, b, m = rng.uniform(0.5, 3.0, 32), rng.uniform(0.5, 3.0, 32), rng.standard_normal(32)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    expected = m @ m + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    rotated = frechet_distance_from_stats(np.zeros(32), q @ np.diag(a) @ q.T, q @ m, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_same_set_is_zero_and_symmetric() -> None:
    rng = np.random.default_rng(3)
    feats_a, feats_b = _random_features(rng, 150, 24), _random_features(rng, 180, 24, shift=0.5)
    assert abs(frechet_distance(feats_a, feats_a)) < 1e-9
    assert frechet_distance(feats_a, feats_b) == pytest.approx(frechet_distance(feats_b, feats_a), rel=1e-9)


def test_frechet_accepts_torch_tensors() -> None:
    rng = np.random.default_rng(4)
    feats_a, feats_b = _random_features(rng, 120, 16), _random_features(rng, 110, 16, shift=0.2)
    from_numpy = frechet_distance(feats_a, feats_b)
    from_torch = frechet_distance(torch.from_numpy(feats_a), torch.from_numpy(feats_b))
    assert from_torch == from_numpy
    float32 = frechet_distance(torch.from_numpy(feats_a).float(), torch.from_numpy(feats_b).float())
    assert float32 == pytest.approx(from_numpy, rel=1e-5)


def test_feature_stats_float64_unbiased() -> None:
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    mu, sigma = feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    assert mu.shape == (8,) and sigma.shape == (8, 8)
    centered = feats.double().numpy() - mu
    np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Kernel distance.


def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(u, v) = (u . v / d + 1)^3 written as explicit double loops."""
    dim = x.shape[1]

    def kernel(u: np.ndarray, v: np.ndarray) -> float:
        return float((np.dot(u, v) / dim + 1.0) ** 3)

    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


@pytest.mark.parametrize(("seed", "n_a", "n_b", "dim"), [(0, 12, 15, 4), (1, 20, 9, 7)])
def test_kernel_distance_matches_double_loop(seed: int, n_a: int, n_b: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    feats_a, feats_b = rng.standard_normal((n_a, dim)), rng.standard_normal((n_b, dim)) + 0.4
    assert kernel_distance(feats_a, feats_b) == pytest.approx(_naive_mmd2(feats_a, feats_b), rel=1e-10)


def test_one_subset_of_full_size_equals_full_set() -> None:
    rng = np.random.default_rng(7)
    feats_a, feats_b = rng.standard_normal((64, 16)), rng.standard_normal((64, 16)) + 0.2
    result = kernel_distance(feats_a, feats_b, subsets=1, subset_size=64)
    assert isinstance(result, KernelDistance)
    assert result.mean == pytest.approx(kernel_distance(feats_a, feats_b), rel=1e-12)
    assert result.std == 0.0


def test_subsets_are_seeded() -> None:
    rng = np.random.default_rng(8)
    feats_a, feats_b = rng.standard_normal((80, 8)), rng.standard_normal((90, 8))
    first = kernel_distance(feats_a, feats_b, subsets=5, subset_size=30, seed=3)
    assert first == kernel_distance(feats_a, feats_b, subsets=5, subset_size=30, seed=3)
    assert first != kernel_distance(feats_a, feats_b, subsets=5, subset_size=30, seed=4)
    assert first.std > 0.0


def test_kernel_distance_separates_distributions() -> None:
    """Two samples of one Gaussian give ~0; a mean shift gives a clearly larger value."""
    rng = np.random.default_rng(9)
    dim = 16
    same_a, same_b = _features_pair(rng, dim, shift=0.0)
    shifted_a, shifted_b = _features_pair(rng, dim, shift=0.5)
    same = kernel_distance(same_a, same_b)
    shifted = kernel_distance(shifted_a, shifted_b)
    assert abs(same) < 0.01
    assert shifted > 0.05
    assert shifted > 10 * abs(same)


def _features_pair(rng: np.random.Generator, dim: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Two independent samples ``(400, dim)`` of N(0, I) and N(shift, I)."""
    return rng.standard_normal((400, dim)), rng.standard_normal((400, dim)) + shift


# ---------------------------------------------------------------------------------------------------
# Bootstrap replicates.


def test_bootstrap_indices_depend_only_on_n_replicates_and_seed() -> None:
    first = bootstrap_indices(32, 50, 7)
    assert first.shape == (50, 32) and first.min() >= 0 and first.max() < 32
    np.testing.assert_array_equal(first, bootstrap_indices(32, 50, 7))
    assert not np.array_equal(first, bootstrap_indices(32, 50, 8))
    assert not np.array_equal(first[:, :16], bootstrap_indices(16, 50, 7))
    with pytest.raises(ValueError, match="replicates >= 2"):
        bootstrap_indices(32, 1, 0)


@pytest.mark.parametrize(("n_fake", "dim"), [(12, 32), (40, 16)])  # fewer and more fake rows than D
@pytest.mark.parametrize("resample", ["bootstrap", "jackknife"])
def test_replicates_equal_the_distances_of_the_resamples(n_fake: int, dim: int, resample: str) -> None:
    rng = np.random.default_rng(20)
    real, fake = _random_features(rng, 90, dim), _random_features(rng, n_fake, dim, shift=0.3)
    indices = bootstrap_indices(n_fake, 6, 1) if resample == "bootstrap" else jackknife_indices(n_fake)
    fvd = frechet_distance_replicates(real, fake, indices)
    kvd = kernel_distance_replicates(real, fake, indices)
    for b, rows in enumerate(indices[:6]):
        assert fvd[b] == pytest.approx(frechet_distance(real, fake[rows]), rel=1e-7)
        assert kvd[b] == pytest.approx(_naive_mmd2(real, fake[rows]), rel=1e-9, abs=1e-12)
    scored = resampled_distances(real, fake, resample, 6, 1)
    assert scored["fvd"] == frechet_distance(real, fake) and scored["kvd"] == kernel_distance(real, fake)
    if resample == "bootstrap":
        np.testing.assert_array_equal(scored["fvd_boot"], fvd)
    else:  # scaled pseudo-values: their std is the jackknife SE sqrt((n - 1) / n * sum (theta_(i) - mean)^2)
        jackknife_se = np.sqrt((n_fake - 1) / n_fake * np.sum((kvd - kvd.mean()) ** 2))
        assert np.std(scored["kvd_boot"], ddof=1) == pytest.approx(jackknife_se, rel=1e-9)
        assert np.mean(scored["fvd_boot"]) == pytest.approx(scored["fvd"], rel=1e-9)


def test_jackknife_indices_leave_one_out() -> None:
    indices = jackknife_indices(5)
    assert indices.shape == (5, 4) and all(
        i not in row and len(set(row)) == 4 for i, row in enumerate(indices)
    )
    with pytest.raises(ValueError, match="n >= 3"):
        jackknife_indices(2)
    with pytest.raises(ValueError, match="unknown resampling"):
        resampled_distances(np.zeros((4, 2)), np.ones((4, 2)), "subsampling")


def test_paired_bootstrap_se() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert paired_bootstrap_se(a, a + 5.0) == 0.0
    assert paired_bootstrap_se(a, -a) == pytest.approx(np.std(2 * a, ddof=1))
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap_se(a, a[:3])


# ---------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("metric", [frechet_distance, kernel_distance])
def test_bad_input_errors(metric: Callable[..., object]) -> None:
    good = np.random.default_rng(10).standard_normal((20, 4))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        metric(good, np.zeros((20, 5)))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        metric(good, np.zeros((1, 4)))
    nan_feats = good.copy()
    nan_feats[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        metric(nan_feats, good)
    with pytest.raises(ValueError, match="2-D"):
        metric(good[0], good)


def test_bad_subset_arguments() -> None:
    feats = np.random.default_rng(11).standard_normal((20, 4))
    with pytest.raises(ValueError, match="subset_size"):
        kernel_distance(feats, feats[:10], subsets=2, subset_size=11)
    with pytest.raises(ValueError, match="subsets must be"):
        kernel_distance(feats, feats, subsets=0)


def test_bad_stats_errors() -> None:
    with pytest.raises(ValueError, match="inconsistent statistics shapes"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))

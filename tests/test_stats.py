"""Streaming statistics: shards merge to exactly the single-pass result, and match numpy directly."""

import numpy as np
import torch

from layerguard.stats import CentroidSums, SimilarityMoments, WindowHistograms, window_matrix


def _data(seed=0, n=300, k=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n, k)), rng.integers(0, classes, size=n)


def test_moments_merge_equals_single_pass():
    sims, labels = _data()
    whole = SimilarityMoments(4, 5)
    whole.update(sims, labels)
    a, b = SimilarityMoments(4, 5), SimilarityMoments(4, 5)
    for lo, hi in [(0, 50), (50, 120)]:
        a.update(sims[lo:hi], labels[lo:hi])
    b.update(sims[120:], labels[120:])
    a.merge(b)
    assert np.array_equal(a.count, whole.count)
    assert np.allclose(a.mean, whole.mean, rtol=0, atol=1e-12)
    assert np.allclose(a.comoment, whole.comoment, rtol=0, atol=1e-10)


def test_window_stats_match_numpy():
    sims, labels = _data(1)
    m = SimilarityMoments(4, 5)
    for lo in range(0, 300, 37):  # uneven batches
        m.update(sims[lo:lo + 37], labels[lo:lo + 37])
    loi = np.array([2, 3, 4, 4])
    weights = window_matrix(5)[loi]
    mean, std = m.window_stats(weights)
    for c in range(4):
        scores = sims[labels == c] @ weights[c]
        assert np.isclose(mean[c], scores.mean())
        assert np.isclose(std[c], scores.std())


def test_centroid_merge_equals_single_pass():
    rng = np.random.default_rng(2)
    feats = {"x": torch.from_numpy(rng.normal(size=(100, 7))).float()}
    labels = torch.from_numpy(rng.integers(0, 3, size=100))
    whole = CentroidSums(3, {"x": 7})
    whole.update(feats, labels)
    a, b = CentroidSums(3, {"x": 7}), CentroidSums(3, {"x": 7})
    a.update({"x": feats["x"][:40]}, labels[:40])
    b.update({"x": feats["x"][40:]}, labels[40:])
    a.merge(b)
    assert torch.equal(a.counts, whole.counts)
    assert torch.allclose(a.centroids()["x"], whole.centroids()["x"], atol=1e-6)
    expected = torch.stack([feats["x"][labels == c].mean(0) for c in range(3)])
    assert torch.allclose(whole.centroids()["x"], expected, atol=1e-6)


def test_histograms_merge_exactly():
    sims, labels = _data(3)
    whole = WindowHistograms(4, 5)
    whole.update(sims, labels)
    a, b = WindowHistograms(4, 5), WindowHistograms(4, 5)
    a.update(sims[:111], labels[:111])
    b.update(sims[111:], labels[111:])
    a.merge(b)
    assert np.array_equal(a.counts, whole.counts)
    assert whole.counts.sum() == 300 * 5

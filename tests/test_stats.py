"""Streaming statistics: shards merge (and folds subtract) to exactly the single-pass result, matching numpy."""

import numpy as np
import pytest
import torch

from layerguard.core.stats import ClassScatter, ClassSums, FoldAssigner


def _data(seed=0, n=300, d=6, classes=4):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=(n, d))), torch.from_numpy(rng.integers(0, classes, size=n))


def test_class_sums_merge_equals_single_pass_and_numpy():
    x, y = _data()
    whole = ClassSums(4, 6)
    whole.update(x, y)
    a, b = ClassSums(4, 6), ClassSums(4, 6)
    a.update(x[:40], y[:40])
    b.update(x[40:], y[40:])
    a.merge(b)
    assert torch.equal(a.counts, whole.counts)
    assert torch.allclose(a.means(), whole.means(), atol=1e-12)
    expected = torch.stack([x[y == c].mean(0) for c in range(4)])
    assert torch.allclose(whole.means(), expected, atol=1e-12)


def test_scatter_tied_covariance_matches_numpy_and_subtracts_exactly():
    x, y = _data(1)
    whole = ClassScatter(4, 6)
    whole.update(x, y)
    centred = x - whole.means()[y]
    expected = (centred.T @ centred) / len(x)
    assert torch.allclose(whole.tied_covariance(), expected, atol=1e-10)
    part = ClassScatter(4, 6)
    part.update(x[:100], y[:100])
    rest = ClassScatter(4, 6)
    rest.update(x[100:], y[100:])
    left = whole.minus(part)
    assert torch.allclose(left.tied_covariance(), rest.tied_covariance(), atol=1e-10)
    assert torch.allclose(left.means(), rest.means(), atol=1e-10)
    assert torch.allclose(left.class_variances(), rest.class_variances(), atol=1e-10)
    per_class = torch.stack([x[y == c].var(dim=0, unbiased=False) for c in range(4)])
    assert torch.allclose(whole.class_variances(), per_class, atol=1e-10)


def test_folds_are_stratified_round_robin_and_repeatable():
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 2])
    a, b = FoldAssigner(3, 2), FoldAssigner(3, 2)
    first = np.concatenate([a.assign(labels[:3]), a.assign(labels[3:])])
    assert first.tolist() == [0, 1, 0, 0, 1, 0, 1, 0]
    assert b.assign(labels).tolist() == first.tolist()  # batching does not change the folds
    with pytest.raises(ValueError):
        FoldAssigner(3, 0)

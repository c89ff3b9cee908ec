"""Layer of interest, thresholds and batch scoring on hand-made numbers."""

import numpy as np
import pytest
import torch

from layerguard.detector import Detector, ThresholdPolicy, layer_of_interest, thresholds_for
from layerguard.stats import quantile_threshold, window_matrix


def test_loi_is_largest_jump_in_window():
    curve = [0.1, 0.2, 0.9, 0.95, 0.96, 0.97]
    # the jump at index 2 is the largest overall but lies before the window
    assert layer_of_interest(curve, search_start=3) == 3
    assert layer_of_interest(curve, search_start=1) == 2


def test_loi_at_last_layer():
    assert layer_of_interest([0.5, 0.55, 0.6, 0.99], search_start=2) == 3


def test_loi_edges_short_curves():
    assert layer_of_interest([0.7], search_start=0) == 0
    assert layer_of_interest([0.2, 0.8], search_start=0) == 1  # start raised to 1
    assert layer_of_interest([0.2, 0.8, 0.3], search_start=5) == 2  # empty window -> last layer


def test_loi_ties_go_to_earliest():
    assert layer_of_interest([0.0, 0.1, 0.2, 0.3], search_start=1) == 1


def test_window_matrix_clips_at_first_layer():
    w = window_matrix(4)
    assert w[0].tolist() == [1, 0, 0, 0]
    assert w[1].tolist() == [1, 1, 0, 0]
    assert w[3].tolist() == [0, 1, 1, 1]


def test_policy_validation():
    with pytest.raises(ValueError):
        ThresholdPolicy(tau=None, target_fpr=None)
    with pytest.raises(ValueError):
        ThresholdPolicy(tau=2.0, target_fpr=0.1)
    with pytest.raises(ValueError):
        ThresholdPolicy(tau=-1)
    with pytest.raises(ValueError):
        ThresholdPolicy(tau=None, target_fpr=0.9)


def test_quantile_threshold_keeps_fpr_at_or_below_target():
    rng = np.random.default_rng(0)
    scores = rng.normal(2.5, 0.1, size=2000)
    edges = np.linspace(-3, 3, 6001)
    hist, _ = np.histogram(scores, bins=edges)
    t = quantile_threshold(hist, edges, 0.05)
    rate = np.mean(scores < t)
    assert rate <= 0.05
    assert rate > 0.04  # and not needlessly lower than asked


def test_tau_thresholds():
    t = thresholds_for(ThresholdPolicy(tau=2.0), np.array([2.0, 1.0]), np.array([0.1, 0.2]),
                       np.zeros((2, 10)), np.linspace(0, 1, 11))
    assert np.allclose(t, [1.8, 0.6])


def test_detector_scores_against_predicted_class():
    # two classes, two layers of width 2; class 0 points along x, class 1 along y
    centroids = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[2.0, 0.0], [0.0, 3.0]])}
    det = Detector(("a", "b"), centroids, loi=np.array([1, 1]), thresholds=np.array([1.5, 1.5]))
    feats = {"a": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "b": torch.tensor([[5.0, 0.0], [1.0, 1.0]])}
    out = det.score(feats, torch.tensor([0, 1]))
    assert torch.allclose(out.similarities[0], torch.tensor([1.0, 1.0]))
    assert torch.allclose(out.similarities[1], torch.tensor([0.0, 2 ** -0.5]), atol=1e-6)
    assert torch.allclose(out.scores, torch.tensor([2.0, 2 ** -0.5]), atol=1e-6)
    assert out.poisoned.tolist() == [False, True]
    item = out.item(1, ("a", "b"))
    assert item["poisoned"] is True and item["layer_of_interest"] == "b"
    assert set(item["similarities"]) == {"a", "b"}
    assert out.items(("a", "b")) == [out.item(i, ("a", "b")) for i in range(2)]
    # the same verdicts from similarities computed elsewhere (how an evaluation rescoring one pass uses it)
    again = det.score_similarities(out.similarities, out.predicted)
    assert torch.equal(again.poisoned, out.poisoned) and torch.allclose(again.scores, out.scores)
    with pytest.raises(ValueError, match="do not match"):
        det.score_similarities(out.similarities[:, :1], out.predicted)


def test_detector_refuses_out_of_range_prediction():
    det = Detector(("a",), {"a": torch.ones(2, 3)}, loi=np.array([0, 0]), thresholds=np.zeros(2))
    with pytest.raises(ValueError):
        det.score({"a": torch.ones(1, 3)}, torch.tensor([5]))


def test_many_class_path_matches_few_class_path():
    """Above MATMUL_MAX_CLASSES the detector gathers centroids instead; both give the same cosines."""
    from layerguard.detector import MATMUL_MAX_CLASSES

    gen = torch.Generator().manual_seed(0)
    c = MATMUL_MAX_CLASSES + 6
    centroids = {"a": torch.randn(c, 9, generator=gen)}
    feats = {"a": torch.randn(5, 9, generator=gen)}
    classes = torch.tensor([0, 3, c - 1, 7, 3])
    many = Detector(("a",), centroids, loi=np.zeros(c, dtype=np.int64), thresholds=np.zeros(c))
    few = Detector(("a",), {"a": centroids["a"][:MATMUL_MAX_CLASSES]}, loi=np.zeros(MATMUL_MAX_CLASSES,
                   dtype=np.int64), thresholds=np.zeros(MATMUL_MAX_CLASSES))
    expected = torch.nn.functional.cosine_similarity(feats["a"], centroids["a"][classes], dim=1)
    assert torch.allclose(many.similarities(feats, classes)[:, 0], expected, atol=1e-6)
    keep = classes < MATMUL_MAX_CLASSES
    assert torch.allclose(few.similarities({"a": feats["a"][keep]}, classes[keep])[:, 0], expected[keep], atol=1e-6)

"""End to end on real data: a BadNets-backdoored MNIST CNN, calibrated on held-out benign digits."""

import numpy as np
import pytest
import torch

from layerguard.core.layers import default_plan, discover_layers
from layerguard.core.thresholds import ThresholdPolicy
from layerguard.demo.mnist import TARGET_CLASS, apply_trigger
from layerguard.tooling.calibration import CalibrationConfig, calibrate, calibrate_many
from layerguard.tooling.data import ArraySource, ImageTransform
from layerguard.tooling.evaluation import detection_quality, score_batches


@pytest.fixture(scope="module")
def calibrated(backdoored_mnist, mnist_splits):
    model = backdoored_mnist
    transform = ImageTransform(channels=1)
    ref = ArraySource(mnist_splits.x_ref, mnist_splits.y_ref, transform)
    plan = default_plan(discover_layers(model, torch.zeros(1, 1, 28, 28)))
    artifact = calibrate(model, lambda: ref.batches(64), plan, 10, CalibrationConfig())
    benign = ArraySource(mnist_splits.x_test, mnist_splits.y_test, transform)
    poisoned = ArraySource(apply_trigger(mnist_splits.x_test), mnist_splits.y_test, transform)
    return model, artifact, benign, poisoned


def test_triggered_digits_are_flagged_on_held_out_data(calibrated):
    """The default (Mahalanobis rule, 1% target FPR from 10-fold cross-fitted references)."""
    model, artifact, benign, poisoned = calibrated
    det = artifact.detector()
    quality = detection_quality(score_batches(model, det, benign.batches(128)),
                                score_batches(model, det, poisoned.batches(128)), TARGET_CLASS)
    assert quality.attacks_scored > 800  # the backdoor really works
    assert quality.tpr >= 0.98, quality
    assert quality.fpr <= 0.03, quality
    assert quality.auroc > 0.99, quality


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_target_fpr_is_delivered_on_held_out_data(calibrated, target):
    """500 references (50 a class), cross-fitted: the held-out FPR lands near what was asked."""
    model, artifact, benign, _ = calibrated
    scored = score_batches(model, artifact.detector(ThresholdPolicy(target_fpr=target)), benign.batches(128))
    assert abs(scored.poisoned.mean() - target) <= max(0.01, target / 2), scored.poisoned.mean()


def test_papers_rule_is_one_flag_away(backdoored_mnist, mnist_splits):
    """cosine-loi with tau 2.5 and one fold: the paper's notebook (centroids, LOI and statistics in-sample)."""
    ref = ArraySource(mnist_splits.x_ref, mnist_splits.y_ref, ImageTransform(channels=1))
    plan = default_plan(discover_layers(backdoored_mnist, torch.zeros(1, 1, 28, 28)))
    config = CalibrationConfig(rule="cosine-loi", policy=ThresholdPolicy.from_options(tau=2.5), folds=1)
    artifact = calibrate(backdoored_mnist, lambda: ref.batches(64), plan, 10, config)
    det = artifact.detector()
    assert artifact.meta.rule == "cosine-loi" and artifact.meta.folds == 1
    # in-sample statistics: mean - 2.5 std of the references' own window sums
    for c in range(10):
        scores = det.benign.scores[det.benign.labels == c]
        assert det.thresholds[c] == pytest.approx(scores.mean() - 2.5 * scores.std(), abs=1e-9)
    benign = ArraySource(mnist_splits.x_test, mnist_splits.y_test, ImageTransform(channels=1))
    poisoned = ArraySource(apply_trigger(mnist_splits.x_test), mnist_splits.y_test, ImageTransform(channels=1))
    quality = detection_quality(score_batches(backdoored_mnist, det, benign.batches(128)),
                                score_batches(backdoored_mnist, det, poisoned.batches(128)), TARGET_CLASS)
    assert quality.tpr >= 0.95 and quality.fpr <= 0.10, quality


def test_calibration_is_deterministic_and_batch_size_free(backdoored_mnist, mnist_splits, calibrated):
    _, artifact, _, _ = calibrated
    ref = ArraySource(mnist_splits.x_ref, mnist_splits.y_ref, ImageTransform(channels=1))
    plan = default_plan(discover_layers(backdoored_mnist, torch.zeros(1, 1, 28, 28)))
    again = calibrate(backdoored_mnist, lambda: ref.batches(17), plan, 10, CalibrationConfig())
    a, b = again.detector(), artifact.detector()
    assert np.array_equal(a.loi, b.loi) and np.array_equal(a.counts, b.counts)
    assert np.allclose(a.benign.score_mean, b.benign.score_mean, atol=1e-3)
    assert np.allclose(a.thresholds, b.thresholds, atol=1e-3)


def test_calibrate_many_equals_one_calibration_per_job(backdoored_mnist, mnist_splits):
    """Rules, options and layer plans calibrated from one shared pair of passes give, byte for byte, the
    artifacts `calibrate` gives each alone (bench/detection.py relies on this to compare 12 configurations)."""
    ref = ArraySource(mnist_splits.x_ref, mnist_splits.y_ref, ImageTransform(channels=1))
    candidates = discover_layers(backdoored_mnist, torch.zeros(1, 1, 28, 28))
    jobs = [
        (default_plan(candidates), CalibrationConfig()),
        (default_plan(candidates), CalibrationConfig(rule="cosine-loi", policy=ThresholdPolicy.from_options(tau=2.5),
                                                     folds=1)),
        (default_plan(candidates, exclude_logits=True), CalibrationConfig(rule="mahalanobis",
                                                                          rule_options={"layers": "penultimate"})),
    ]
    assert jobs[2][0].layers != jobs[0][0].layers  # the capture watches the union, each fitter its own layers
    shared = calibrate_many(backdoored_mnist, lambda: ref.batches(64), jobs, 10)
    for (plan, config), artifact in zip(jobs, shared):
        alone = calibrate(backdoored_mnist, lambda: ref.batches(64), plan, 10, config)
        assert artifact.meta == alone.meta
        assert artifact.digest() == alone.digest()

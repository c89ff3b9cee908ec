"""End to end on real data: a BadNets-backdoored MNIST CNN, calibrated on held-out benign digits."""

import numpy as np
import pytest
import torch

from layerguard.calibration import CalibrationConfig, calibrate
from layerguard.data import ArraySource, ImageTransform
from layerguard.demo.mnist import TARGET_CLASS, apply_trigger
from layerguard.detector import ThresholdPolicy
from layerguard.layers import default_plan, discover_layers
from layerguard.offline import detection_quality, score_batches


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
    model, artifact, benign, poisoned = calibrated
    det = artifact.detector()
    quality = detection_quality(score_batches(model, det, benign.batches(128)),
                                score_batches(model, det, poisoned.batches(128)), TARGET_CLASS)
    assert quality.attacks_scored > 800  # the backdoor really works
    assert quality.tpr >= 0.95, quality
    assert quality.fpr <= 0.10, quality
    assert quality.auroc > 0.97, quality


def test_target_fpr_policy_holds_on_held_out_data(calibrated):
    model, artifact, benign, _ = calibrated
    scored = score_batches(model, artifact.detector(ThresholdPolicy(tau=None, target_fpr=0.05)),
                           benign.batches(128))
    # 25 references per class set the quantile; held-out FPR stays in the neighbourhood of the target
    assert scored.poisoned.mean() <= 0.12


def test_calibration_is_deterministic_and_batch_size_free(backdoored_mnist, mnist_splits, calibrated):
    _, artifact, _, _ = calibrated
    ref = ArraySource(mnist_splits.x_ref, mnist_splits.y_ref, ImageTransform(channels=1))
    plan = default_plan(discover_layers(backdoored_mnist, torch.zeros(1, 1, 28, 28)))
    again = calibrate(backdoored_mnist, lambda: ref.batches(17), plan, 10, CalibrationConfig())
    assert np.array_equal(again.loi, artifact.loi)
    assert np.array_equal(again.counts_threshold, artifact.counts_threshold)
    assert np.allclose(again.score_mean, artifact.score_mean, atol=1e-5)
    assert np.allclose(again.score_std, artifact.score_std, atol=1e-5)

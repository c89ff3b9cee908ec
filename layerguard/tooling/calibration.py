"""Calibration runs: two streaming passes of benign reference images through the model, fitting a detector.

Pass 1 feeds every reference's features into the fitter's per-fold statistics. Pass 2 scores every
reference with the statistics of the folds it was not in (k-fold cross-fitting, default 10 folds), against
the class the model predicts for it (as serving will), and the thresholds come from those out-of-fold
scores: no reference is lost, and none is scored by statistics it helped make. `folds=1` is the paper
notebook's in-sample way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..core.artifact import ArtifactMeta, CalibrationArtifact, model_fingerprint
from ..core.capture import LayerCapture
from ..core.detector import DEFAULT_FOLDS, DetectorFitter, DetectorSpec
from ..core.layers import LayerPlan
from ..core.rules import DEFAULT_RULE, RULES, FitError
from ..core.thresholds import ThresholdPolicy, references_for_confidence

__all__ = ["Batches", "CalibrationConfig", "CalibrationError", "calibrate", "calibrate_many", "model_device"]

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class CalibrationError(ValueError):
    """The reference data cannot give a sound calibration; the message says what to supply."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate: the scoring rule and its options, the threshold policy, cross-fitting folds."""

    rule: str = DEFAULT_RULE
    rule_options: dict[str, Any] = field(default_factory=dict)
    policy: ThresholdPolicy = ThresholdPolicy()
    folds: int = DEFAULT_FOLDS
    min_per_class: int = 10
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise CalibrationError(f"unknown rule {self.rule!r}; known rules: {', '.join(RULES)}")
        if not 1 <= self.folds <= 20:
            raise CalibrationError(f"folds must be in 1..20, got {self.folds}")


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _iterate(batches: Batches, num_classes: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in batches():
        labels = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64))
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise CalibrationError(f"label outside 0..{num_classes - 1} in reference data")
        yield x.to(device), labels


def calibrate(
    model: nn.Module,
    batches: Batches,
    plan: LayerPlan,
    num_classes: int,
    config: CalibrationConfig = CalibrationConfig(),
    input_shape: tuple[int, ...] | None = None,
    progress: Callable[[int], None] | None = None,
) -> CalibrationArtifact:
    """Run both passes and return the artifact (not yet saved). `batches()` must yield the same data twice.

    `progress(n)` is called with the number of images after every batch of either pass.
    """
    return calibrate_many(model, batches, [(plan, config)], num_classes, input_shape, progress)[0]


def calibrate_many(
    model: nn.Module,
    batches: Batches,
    jobs: Sequence[tuple[LayerPlan, CalibrationConfig]],
    num_classes: int,
    input_shape: tuple[int, ...] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[CalibrationArtifact]:
    """Several calibrations (rules, options, layer plans) from one pair of passes, one artifact per job.

    The forward passes are most of calibration's time, and they do not depend on the rule: comparing rules
    (bench/detection.py) needs them once, with each job's fitter fed its own layers. Each artifact is the one
    `calibrate` gives for that job alone.
    """
    if not jobs:
        return []
    model.eval()
    device = model_device(model)
    fitters = [_fitter(plan, config, num_classes) for plan, config in jobs]
    layers = tuple(dict.fromkeys(name for plan, _ in jobs for name in plan.layers))
    try:
        with LayerCapture(model, layers) as capture:
            for x, labels in _iterate(batches, num_classes, device):
                _, feats = capture.run(x)
                for (plan, _), fitter in zip(jobs, fitters):
                    fitter.update(_only(feats, plan), labels)
                if progress:
                    progress(len(labels))
            for (_, config), fitter in zip(jobs, fitters):
                _require_counts(fitter.seen_per_class, config, fitter.class_names)
                fitter.fit(device)
            for x, labels in _iterate(batches, num_classes, device):
                out, feats = capture.run(x)
                predicted = _logits(out).argmax(dim=1)
                for (plan, _), fitter in zip(jobs, fitters):
                    fitter.update_out_of_fold(_only(feats, plan), labels, predicted)
                if progress:
                    progress(len(labels))
        detectors = [fitter.detector(config.policy) for (_, config), fitter in zip(jobs, fitters)]
    except FitError as exc:
        raise CalibrationError(str(exc)) from exc
    fingerprint = model_fingerprint(model)
    return [CalibrationArtifact.from_detector(detector, _meta(plan, config, fitter.class_names, num_classes,
                                                              fingerprint, input_shape))
            for (plan, config), fitter, detector in zip(jobs, fitters, detectors)]


def _fitter(plan: LayerPlan, config: CalibrationConfig, num_classes: int) -> DetectorFitter:
    names = list(config.class_names) if config.class_names else [str(i) for i in range(num_classes)]
    spec = DetectorSpec(rule=config.rule, layer_names=plan.layers, num_classes=num_classes,
                        loi_search_start=plan.loi_search_start, penultimate=plan.penultimate,
                        rule_options=dict(config.rule_options), folds=config.folds)
    try:
        return DetectorFitter(spec, names)
    except ValueError as exc:  # a bad rule option
        raise CalibrationError(str(exc)) from exc


def _only(features: dict[str, torch.Tensor], plan: LayerPlan) -> dict[str, torch.Tensor]:
    """The plan's layers, in its order (the capture may watch more, for other jobs)."""
    return {name: features[name] for name in plan.layers}


def _meta(plan: LayerPlan, config: CalibrationConfig, names: list[str], num_classes: int, fingerprint: str,
          input_shape: tuple[int, ...] | None) -> ArtifactMeta:
    return ArtifactMeta(
        rule=config.rule, rule_options=dict(config.rule_options), layer_names=plan.layers,
        num_classes=num_classes, class_names=tuple(names), threshold=config.policy.as_dict(), folds=config.folds,
        loi_search_start=plan.loi_search_start, total_layers=plan.total_layers, penultimate=plan.penultimate,
        model_fingerprint=fingerprint, input_shape=tuple(input_shape) if input_shape else None,
        layer_computations=plan.computations,
        layerguard_version=__version__,
    )


def _logits(output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise CalibrationError(f"layerguard needs the model to return [batch, classes] logits, got {shape}")
    return output


def _require_counts(seen: np.ndarray, config: CalibrationConfig, names: list[str]) -> None:
    if seen.sum() == 0:
        raise CalibrationError("the reference data is empty")
    policy = config.policy
    if policy.confidence is not None and seen.sum() < references_for_confidence(policy.target_fpr, policy.confidence):
        raise CalibrationError(
            f"{int(seen.sum())} reference images cannot keep the FPR at most {100 * policy.target_fpr:g}% with "
            f"{100 * policy.confidence:g}% confidence: that needs at least "
            f"{references_for_confidence(policy.target_fpr, policy.confidence)} images the model never trained on. "
            "Add references, lower --fpr-confidence, or drop it (the target is then the expected rate)."
        )
    need = max(config.min_per_class, 2)  # with 2 a class is in every fold's complement, however many folds
    short = [i for i, n in enumerate(seen) if n < need]
    if short:
        detail = ", ".join(f"{names[i]} ({seen[i]})" for i in short)
        raise CalibrationError(
            f"too few reference samples for class(es) {detail}; need at least {need} per class "
            f"(--min-per-class {config.min_per_class}). "
            "Add benign images of those classes that the model never trained on."
        )

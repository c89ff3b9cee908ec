"""Score whole datasets offline with exactly the detector serving uses: for evaluations and reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .capture import LayerCapture
from .detector import Detector
from .evaluation import auroc


@dataclass
class ScoredSet:
    """Per-image results of one dataset, as numpy arrays."""

    labels: np.ndarray
    predicted: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    poisoned: np.ndarray
    similarities: np.ndarray  # [N, K]


def score_batches(model: nn.Module, detector: Detector, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> ScoredSet:
    """One forward pass per batch with hooks on the detector's layers; scored by predicted class."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ScoredSet.__dataclass_fields__}
    model.eval()
    with LayerCapture(model, detector.layer_names) as capture:
        for x, y in batches:
            logits, feats = capture.run(x.to(device))
            det = detector.score(feats, logits.argmax(dim=1))
            parts["labels"].append(np.asarray(y))
            parts["predicted"].append(det.predicted.numpy())
            parts["scores"].append(det.scores.numpy())
            parts["thresholds"].append(det.thresholds.numpy())
            parts["poisoned"].append(det.poisoned.numpy())
            parts["similarities"].append(det.similarities.numpy())
    if not parts["labels"]:
        raise ValueError("no images to score")
    return ScoredSet(**{k: np.concatenate(v) for k, v in parts.items()})


@dataclass(frozen=True)
class DetectionQuality:
    """The paper's counting: TPR over successful attacks, FPR over all benign inputs; plus AUROC."""

    tpr: float
    fpr: float
    auroc: float
    attacks_scored: int
    benign_scored: int

    def __str__(self) -> str:
        return (f"TPR {100 * self.tpr:.2f}% over {self.attacks_scored} successful attacks, "
                f"FPR {100 * self.fpr:.2f}% over {self.benign_scored} benign inputs, AUROC {self.auroc:.4f}")


def detection_quality(benign: ScoredSet, poisoned: ScoredSet, target_class: int | None = None) -> DetectionQuality:
    """With `target_class`, TPR counts only poisoned inputs predicted as the target whose true label is
    another class (successful attacks), as the paper does; without it, every poisoned input counts."""
    if target_class is None:
        mask = np.ones(len(poisoned.scores), dtype=bool)
    else:
        mask = (poisoned.predicted == target_class) & (poisoned.labels != target_class)
    tpr = float(poisoned.poisoned[mask].mean()) if mask.any() else float("nan")
    fpr = float(benign.poisoned.mean())
    return DetectionQuality(tpr, fpr, auroc(benign.scores, poisoned.scores[mask]), int(mask.sum()),
                            len(benign.scores))

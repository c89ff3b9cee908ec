"""Score whole datasets offline with exactly the detector serving uses, and count detection quality as the
paper does (TPR over successful attacks, FPR over benign inputs), plus AUROC.

Scores are "benign-likeness": lower means more suspicious, and an item is flagged when score < threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.capture import LayerCapture
from ..core.detector import Detector

__all__ = ["DetectionQuality", "ScoredSet", "attack_mask", "auroc", "detection_quality", "roc_curve",
           "score_batches"]


@dataclass
class ScoredSet:
    """Per-image results of one dataset, as numpy arrays."""

    labels: np.ndarray
    predicted: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    poisoned: np.ndarray
    similarities: np.ndarray  # [N, K] cosine similarity per monitored layer
    terms: np.ndarray  # [N, T] the rule's per-layer terms


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
            for key in ("predicted", "scores", "thresholds", "poisoned", "similarities", "terms"):
                parts[key].append(getattr(det, key))
    if not parts["labels"]:
        raise ValueError("no images to score")
    return ScoredSet(**{k: np.concatenate(v) for k, v in parts.items()})


def attack_mask(poisoned: ScoredSet, target_class: int | None) -> np.ndarray:
    """Poisoned inputs that count for the TPR: with a target class, successful attacks only (predicted as the
    target, true label another class), as the paper counts; without one, all of them."""
    if target_class is None:
        return np.ones(len(poisoned.scores), dtype=bool)
    return (poisoned.predicted == target_class) & (poisoned.labels != target_class)


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
    mask = attack_mask(poisoned, target_class)
    tpr = float(poisoned.poisoned[mask].mean()) if mask.any() else float("nan")
    fpr = float(benign.poisoned.mean())
    return DetectionQuality(tpr, fpr, auroc(benign.scores, poisoned.scores[mask]), int(mask.sum()),
                            len(benign.scores))


def auroc(benign_scores: np.ndarray, poisoned_scores: np.ndarray) -> float:
    """P(a poisoned score < a benign score), ties counting half: the Mann-Whitney statistic."""
    b = np.asarray(benign_scores, dtype=np.float64)
    p = np.asarray(poisoned_scores, dtype=np.float64)
    if b.size == 0 or p.size == 0:
        return float("nan")
    allv = np.concatenate([p, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    ranks[order] = np.arange(1, len(allv) + 1)
    sorted_v = allv[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_v))[0] + 1]
    ends = np.r_[starts[1:], len(allv)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2.0  # average ranks over ties
    u = ranks[len(p):].sum() - b.size * (b.size + 1) / 2.0  # rank-sum of benign: how often benign > poisoned
    return float(u / (b.size * p.size))


def roc_curve(benign_scores: np.ndarray, poisoned_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) as a single threshold sweeps all observed scores, flagging score < t."""
    b = np.sort(np.asarray(benign_scores, dtype=np.float64))
    p = np.sort(np.asarray(poisoned_scores, dtype=np.float64))
    cuts = np.unique(np.concatenate([b, p, [np.inf]]))
    fpr = np.searchsorted(b, cuts, side="left") / max(b.size, 1)
    tpr = np.searchsorted(p, cuts, side="left") / max(p.size, 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]

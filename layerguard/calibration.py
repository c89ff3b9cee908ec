"""Two streaming passes over benign reference data that produce a calibration artifact.

Pass 1 sums activations per true class into centroids (the "centroid split"). Pass 2 measures every
sample of the "threshold split" against those centroids and folds the similarities into mergeable
statistics. By default the splits are disjoint halves of each class (stratified and deterministic), so
the thresholds are not measured on the samples that made the centroids; `holdout_fraction=0` uses all
samples for both, as the paper's notebook does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .artifact import CalibrationArtifact, model_fingerprint
from .capture import LayerCapture
from .detector import Detector, ThresholdPolicy, layer_of_interest
from .layers import LayerPlan
from .stats import CentroidSums, SimilarityMoments, WindowHistograms, window_matrix

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class CalibrationError(ValueError):
    """The reference data cannot give a sound calibration; the message says what to supply."""


@dataclass(frozen=True)
class CalibrationConfig:
    policy: ThresholdPolicy = ThresholdPolicy()
    holdout_fraction: float = 0.5
    min_per_class: int = 10
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise CalibrationError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


class StratifiedSplit:
    """Streams samples into the threshold split at exactly `fraction` of each class, in arrival order.

    The k-th sample of a class (k = 0, 1, ...) is held out when floor((k+1)f) > floor(kf): deterministic,
    stratified and needing only a counter per class, so both passes agree without storing indices.
    """

    def __init__(self, num_classes: int, fraction: float) -> None:
        self.fraction = fraction
        self.seen = np.zeros(num_classes, dtype=np.int64)

    def held_out(self, labels: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(labels), dtype=bool)
        for i, c in enumerate(labels):
            k = self.seen[c]
            mask[i] = math.floor((k + 1) * self.fraction) > math.floor(k * self.fraction)
            self.seen[c] += 1
        return mask


def _iterate(batches: Batches, num_classes: int, device: torch.device) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    for x, y in batches():
        labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
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
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    fraction = config.holdout_fraction
    with LayerCapture(model, plan.layers) as capture:
        # ---- pass 1: centroids --------------------------------------------------------------------
        sums: CentroidSums | None = None
        split = StratifiedSplit(num_classes, fraction)
        for x, labels in _iterate(batches, num_classes, device):
            keep = ~split.held_out(labels) if fraction > 0 else np.ones(len(labels), dtype=bool)
            if keep.any():
                _, feats = capture.run(_rows(x, keep))
                if sums is None:
                    sums = CentroidSums(num_classes, {n: f.shape[1] for n, f in feats.items()}, device=device)
                sums.update(feats, torch.from_numpy(labels[keep]))
            if progress:
                progress(len(labels))
        if sums is None:
            raise CalibrationError("the reference data is empty (no sample reached the centroid split)")
        total_seen = split.seen.copy()
        _require_counts(sums.counts.numpy(), "centroid", config, total_seen)
        centroids = sums.centroids()

        # ---- pass 2: similarity statistics ---------------------------------------------------------
        k = len(plan.layers)
        scorer = Detector(plan.layers, centroids, np.zeros(num_classes, dtype=np.int64),
                          np.zeros(num_classes), device=device)
        moments = SimilarityMoments(num_classes, k)
        hists = WindowHistograms(num_classes, k)
        split = StratifiedSplit(num_classes, fraction)
        for x, labels in _iterate(batches, num_classes, device):
            keep = split.held_out(labels) if fraction > 0 else np.ones(len(labels), dtype=bool)
            if keep.any():
                _, feats = capture.run(_rows(x, keep))
                sims = scorer.similarities(feats, torch.from_numpy(labels[keep])).numpy()
                moments.update(sims, labels[keep])
                hists.update(sims, labels[keep])
            if progress:
                progress(len(labels))
    _require_counts(moments.count, "threshold", config, total_seen)

    loi = np.array([layer_of_interest(moments.mean[c], plan.loi_search_start) for c in range(num_classes)])
    weights = window_matrix(k)[loi]
    score_mean, score_std = moments.window_stats(weights)
    score_hist = hists.counts[np.arange(num_classes), loi]
    sim_std = np.sqrt(np.maximum(np.diagonal(moments.covariance(), axis1=1, axis2=2), 0.0))
    meta = {
        "num_classes": num_classes,
        "class_names": list(config.class_names) if config.class_names else [str(i) for i in range(num_classes)],
        "threshold": config.policy.as_dict(),
        "hist_range": [hists.lo, hists.hi, hists.bins],
        "loi_search_start": plan.loi_search_start,
        "total_layers": plan.total_layers,
        "holdout_fraction": fraction,
        "input_shape": list(input_shape) if input_shape else None,
        "model_fingerprint": model_fingerprint(model),
        "score": "sum of cosine similarities at LOI-2..LOI (clipped at the first monitored layer)",
    }
    return CalibrationArtifact(
        layer_names=plan.layers,
        centroids={n: c.cpu().numpy() for n, c in centroids.items()},
        sim_mean=moments.mean, sim_std=sim_std, loi=loi,
        score_mean=score_mean, score_std=score_std, score_hist=score_hist,
        counts_centroid=sums.counts.numpy().copy(), counts_threshold=moments.count.copy(),
        meta=meta,
    )


def _rows(x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """The kept rows of a batch, without a copy when all are kept."""
    return x if keep.all() else x[torch.from_numpy(np.nonzero(keep)[0]).to(x.device)]


def _require_counts(counts: np.ndarray, split: str, config: CalibrationConfig, seen: np.ndarray) -> None:
    names = config.class_names or [str(i) for i in range(len(counts))]
    need = 2 if split == "threshold" else 1
    short = [i for i, n in enumerate(seen) if n < config.min_per_class]
    if short:
        detail = ", ".join(f"{names[i]} ({seen[i]})" for i in short)
        raise CalibrationError(
            f"too few reference samples for class(es) {detail}; need at least {config.min_per_class} "
            "per class (set --min-per-class to change). Add benign images of those classes."
        )
    thin = [i for i, n in enumerate(counts) if n < need]
    if thin:
        detail = ", ".join(f"{names[i]} ({counts[i]})" for i in thin)
        raise CalibrationError(
            f"the {split} split has too few samples for class(es) {detail}; "
            "add reference images or lower --holdout-fraction."
        )

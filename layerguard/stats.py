"""Streaming, mergeable statistics for calibration, in memory that does not grow with the image count.

Three accumulators, each with `update` (one batch) and `merge` (another shard), so calibration can be
split across workers and combined exactly:
- `CentroidSums`: per-class sums of flattened activations per layer -> centroids. O(classes x widths).
- `SimilarityMoments`: per-class mean vector and co-moment matrix of the per-layer cosine similarities
  (Chan et al. pairwise update). The mean curve gives the layer of interest; the co-moments give the
  exact mean and variance of any window sum, so the score statistics need no third pass.
- `WindowHistograms`: per class and candidate window, a fixed-bin histogram of window-sum scores, for
  thresholds set by a target false-positive rate (scores are not Gaussian). O(classes x windows x bins).
"""

from __future__ import annotations

import numpy as np
import torch


class CentroidSums:
    """Per-class sums and counts of each layer's flattened activations (float64 for exact merges)."""

    def __init__(self, num_classes: int, widths: dict[str, int], device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self.sums = {
            name: torch.zeros(num_classes, width, dtype=torch.float64, device=device)
            for name, width in widths.items()
        }

    def update(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        labels = labels.to(torch.int64)
        self.counts += torch.bincount(labels.cpu(), minlength=self.num_classes)
        for name, total in self.sums.items():
            feats = features[name]
            total.index_add_(0, labels.to(total.device), feats.to(total.device, torch.float64))

    def merge(self, other: CentroidSums) -> None:
        self.counts += other.counts
        for name, total in self.sums.items():
            total += other.sums[name].to(total.device)

    def centroids(self) -> dict[str, torch.Tensor]:
        """Class means, float32; rows of classes with no sample are zero (callers check counts)."""
        denom = self.counts.clamp(min=1).to(torch.float64)
        return {
            name: (total / denom.to(total.device)[:, None]).to(torch.float32) for name, total in self.sums.items()
        }


class SimilarityMoments:
    """Per-class count, mean [K] and co-moment [K, K] of similarity vectors (population statistics)."""

    def __init__(self, num_classes: int, num_layers: int) -> None:
        self.count = np.zeros(num_classes, dtype=np.int64)
        self.mean = np.zeros((num_classes, num_layers), dtype=np.float64)
        self.comoment = np.zeros((num_classes, num_layers, num_layers), dtype=np.float64)

    def update(self, sims: np.ndarray, labels: np.ndarray) -> None:
        """Fold in a batch: sims [B, K], labels [B]."""
        for c in np.unique(labels):
            block = sims[labels == c].astype(np.float64)
            n = len(block)
            mean = block.mean(axis=0)
            centred = block - mean
            self._combine(int(c), n, mean, centred.T @ centred)

    def merge(self, other: SimilarityMoments) -> None:
        for c in np.nonzero(other.count)[0]:
            self._combine(int(c), int(other.count[c]), other.mean[c], other.comoment[c])

    def _combine(self, c: int, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count[c]
        n = n_a + n_b
        delta = mean_b - self.mean[c]
        self.mean[c] = self.mean[c] + delta * (n_b / n)
        self.comoment[c] = self.comoment[c] + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.count[c] = n

    def covariance(self) -> np.ndarray:
        """Population covariance [C, K, K] (ddof=0, as numpy's std)."""
        return self.comoment / np.maximum(self.count, 1)[:, None, None]

    def window_stats(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of the weighted sum `sims @ weights[c]` per class, exactly: w.mu, sqrt(w' S w)."""
        mean = np.einsum("ck,ck->c", self.mean, weights)
        var = np.einsum("ck,ckl,cl->c", weights, self.covariance(), weights)
        return mean, np.sqrt(np.maximum(var, 0.0))


class WindowHistograms:
    """Histograms of window-sum scores per (class, window). Window j sums similarity indices j-2..j."""

    def __init__(self, num_classes: int, num_layers: int, lo: float = -3.0, hi: float = 3.0, bins: int = 6000):
        self.lo, self.hi, self.bins = lo, hi, bins
        self.num_layers = num_layers
        self.counts = np.zeros((num_classes, num_layers, bins), dtype=np.int64)
        self._windows = window_matrix(num_layers)  # [K windows, K layers]

    def update(self, sims: np.ndarray, labels: np.ndarray) -> None:
        scores = sims.astype(np.float64) @ self._windows.T  # [B, K]
        idx = self.bin_index(scores)
        for j in range(self.num_layers):
            np.add.at(self.counts[:, j, :], (labels, idx[:, j]), 1)

    def merge(self, other: WindowHistograms) -> None:
        self.counts += other.counts

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        pos = np.floor((scores - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64)
        return np.clip(pos, 0, self.bins - 1)

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)


def window_matrix(num_layers: int) -> np.ndarray:
    """Row j is the 0/1 indicator of layers max(0, j-2)..j: the score window for a LOI at j."""
    w = np.zeros((num_layers, num_layers), dtype=np.float64)
    for j in range(num_layers):
        w[j, max(0, j - 2): j + 1] = 1.0
    return w


def quantile_threshold(hist: np.ndarray, edges: np.ndarray, target_fpr: float) -> float:
    """Largest bin edge t with (#scores < t) <= target_fpr * n: benign FPR on the reference set <= target."""
    n = int(hist.sum())
    if n == 0:
        return float("nan")
    below = np.concatenate([[0], np.cumsum(hist)])  # below[b] = #scores in bins < b = #scores < edges[b]
    allowed = np.nonzero(below <= target_fpr * n)[0]
    return float(edges[allowed[-1]])

"""Streaming, mergeable statistics for fitting a detector, in memory that does not grow with the image count.

Every accumulator has `update` (one batch), `merge` (another shard: a worker, a fold) and `minus` (what is
left without a shard), so calibration can be split across workers and k-fold cross-fitting needs one pass:
each fold's complement is the total minus that fold.
- `ClassSums`: per-class counts and sums of feature vectors -> class means. O(classes x width).
- `ClassScatter`: ClassSums plus the total scatter sum(x x^T) and per-class sums of squares -> class means,
  the tied (within-class) covariance and per-class variances. O(classes x width + width^2).
`FoldAssigner` deals samples into k stratified folds in arrival order, so both passes agree without
storing indices.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ClassScatter", "ClassSums", "FoldAssigner"]


class ClassSums:
    """Per-class sums and counts of [batch, width] features (float64 for exact merges)."""

    def __init__(self, num_classes: int, width: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(num_classes, width, dtype=torch.float64, device=device)

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(self.sums.device, torch.int64)
        self.counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64, device=self.sums.device))
        self.sums.index_add_(0, labels, feats.to(self.sums.device, torch.float64))

    def merge(self, other: ClassSums) -> None:
        self.counts += other.counts.to(self.counts.device)
        self.sums += other.sums.to(self.sums.device)

    def minus(self, other: ClassSums) -> ClassSums:
        out = ClassSums(self.num_classes, self.sums.shape[1], self.sums.device)
        out.counts = self.counts - other.counts.to(self.counts.device)
        out.sums = self.sums - other.sums.to(self.sums.device)
        return out

    def means(self) -> torch.Tensor:
        """Class means [C, width], float64; rows of classes with no sample are zero (callers check counts)."""
        return self.sums / self.counts.clamp(min=1.0)[:, None]


class ClassScatter(ClassSums):
    """ClassSums plus sum(x x^T), for the tied within-class covariance of Lee et al. (2018), and per-class
    sums of x*x, for per-class (diagonal) variances."""

    def __init__(self, num_classes: int, width: int, device: torch.device | str = "cpu") -> None:
        super().__init__(num_classes, width, device)
        self.scatter = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.squares = torch.zeros(num_classes, width, dtype=torch.float64, device=device)

    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        super().update(feats, labels)
        x = feats.to(self.scatter.device, torch.float64)
        self.scatter += x.T @ x
        self.squares.index_add_(0, labels.to(self.squares.device, torch.int64), x * x)

    def merge(self, other: ClassScatter) -> None:
        super().merge(other)
        self.scatter += other.scatter.to(self.scatter.device)
        self.squares += other.squares.to(self.squares.device)

    def minus(self, other: ClassScatter) -> ClassScatter:
        out = ClassScatter(self.num_classes, self.sums.shape[1], self.sums.device)
        out.counts = self.counts - other.counts.to(self.counts.device)
        out.sums = self.sums - other.sums.to(self.sums.device)
        out.scatter = self.scatter - other.scatter.to(self.scatter.device)
        out.squares = self.squares - other.squares.to(self.squares.device)
        return out

    def class_variances(self) -> torch.Tensor:
        """Per-class, per-feature population variances [C, width] (zero for classes with under 2 samples)."""
        n = self.counts.clamp(min=1.0)[:, None]
        mu = self.sums / n
        return (self.squares / n - mu * mu).clamp(min=0.0)

    def tied_covariance(self) -> torch.Tensor:
        """sum_c sum_i (x - mu_c)(x - mu_c)^T / N: one covariance shared by all classes (population form)."""
        n = float(self.counts.sum())
        between = (self.sums.T / self.counts.clamp(min=1.0)) @ self.sums  # sum_c n_c mu_c mu_c^T
        cov = (self.scatter - between) / max(n, 1.0)
        return (cov + cov.T) / 2.0


class FoldAssigner:
    """Deals each class's samples round-robin into k folds, in arrival order: deterministic, stratified, and
    needing only a counter per class, so two passes over the same data assign the same folds."""

    def __init__(self, num_classes: int, folds: int) -> None:
        if folds < 1:
            raise ValueError(f"folds must be at least 1, got {folds}")
        self.folds = folds
        self.seen = np.zeros(num_classes, dtype=np.int64)

    def assign(self, labels: np.ndarray) -> np.ndarray:
        """Fold index of each sample of a batch (all 0 with one fold)."""
        out = np.empty(len(labels), dtype=np.int64)
        for i, c in enumerate(labels):
            out[i] = self.seen[c] % self.folds
            self.seen[c] += 1
        return out

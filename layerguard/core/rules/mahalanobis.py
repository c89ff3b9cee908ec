"""`mahalanobis`: class-conditional Gaussians with one tied, shrunk covariance per layer (Lee et al., NeurIPS
2018), on spatially pooled features of the monitored layers, combined across layers.

Per layer l, the term is the Mahalanobis distance of the input's pooled features to the predicted class's
mean (option `reference: nearest` uses the nearest class mean instead, as Lee et al. do). A backdoored
input is predicted as the target class but its middle-layer features still look like its source class, so
its distance to the target's mean is large there. Terms are standardised per layer with the mean and std
of out-of-fold benign distances and summed; the score is minus that sum. `layers: penultimate` keeps only
the last layer before the logits (the common single-layer form).

The covariance is shrunk towards a scaled identity with the Oracle Approximating Shrinkage weight (Chen
et al. 2010), computed from the covariance and the sample count alone, so fitting stays streaming: class
sums and one scatter matrix per layer, mergeable across shards and folds.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..similarity import pool, pool_host
from ..stats import ClassScatter
from .base import FitError, LayerStatistics, ScoringRule

__all__ = ["PACKED_MAX_WIDTH", "MahalanobisRule", "PackedLayers", "layer_indicator", "oas_shrinkage",
           "sqrt_clamped"]

# Up to this total pooled width (all monitored layers), the precision is applied as one block-diagonal matrix
# (4 MiB at most, one matmul); wider ones (ResNet-18's 1674, ResNet-50's stages) one matmul per layer on its
# slice of the difference, which reads each precision once instead of a mostly-zero dense matrix.
PACKED_MAX_WIDTH = 1024


@dataclass
class PackedLayers:
    """The monitored layers' pooled features side by side (width W = sum of the K layers' widths): class means
    [C, W], the [W, K] layer indicator that sums each layer's block in one matmul, and the precision as one
    block-diagonal [W, W] matrix (`dense`, narrow layer sets) or per layer ((start, stop, [D, D]) slices).
    At serving batch sizes the op count, not the arithmetic, is what scoring costs (bench/guard_profile.py)."""

    means: np.ndarray
    blocks: np.ndarray
    dense: np.ndarray | None
    layers: list[tuple[int, int, np.ndarray]]

    def precision_times(self, diff: np.ndarray) -> np.ndarray:
        """[B, W] -> [B, W]: diff @ block_diag(P_1, ..., P_K)."""
        if self.dense is not None:
            return diff @ self.dense
        return np.concatenate([diff[:, a:b] @ p for a, b, p in self.layers], axis=1)


def layer_indicator(widths: list[int]) -> np.ndarray:
    """[sum(widths), K] float32 with a 1 where feature w belongs to layer k: sums each layer's block in one matmul."""
    return np.repeat(np.eye(len(widths), dtype=np.float32), widths, axis=0)


def sqrt_clamped(x: np.ndarray) -> np.ndarray:
    """sqrt(max(x, 0)) in place: a sum of squares that rounding took just below zero counts as zero."""
    return np.sqrt(np.maximum(x, 0.0, out=x), out=x)


def oas_shrinkage(cov: torch.Tensor, n: float) -> float:
    """OAS weight rho in [0, 1] of the target tr(S)/p * I."""
    p = cov.shape[0]
    tr = float(torch.trace(cov))
    tr2 = float((cov * cov).sum())
    num = (1.0 - 2.0 / p) * tr2 + tr * tr
    den = (n + 1.0 - 2.0 / p) * (tr2 - tr * tr / p)
    return 1.0 if den <= 0 else float(min(1.0, max(0.0, num / den)))


class MahalanobisRule(ScoringRule):
    name = "mahalanobis"
    summary = ("minus the sum over layers of standardised Mahalanobis distances (tied, shrunk covariance) of "
               "pooled features to the predicted class's mean")
    term_label = "Mahalanobis distance to the class mean (pooled features)"
    option_defaults = {"layers": "all", "reference": "predicted"}
    per_class_thresholds = False  # one tied covariance and per-layer standardisation: one scale for all classes

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.options["layers"] not in ("all", "penultimate"):
            raise ValueError(f"mahalanobis option layers must be all or penultimate, got {self.options['layers']!r}")
        if self.options["reference"] not in ("predicted", "nearest"):
            raise ValueError("mahalanobis option reference must be predicted or nearest, got "
                             f"{self.options['reference']!r}")
        self.means: dict[str, np.ndarray] = {}  # [C, D] float32 per layer
        self.precisions: dict[str, np.ndarray] = {}  # [D, D] float32 per layer
        self._term_set = frozenset(self.term_layers)
        self._groups: list | None = None
        self._packed: PackedLayers | None = None
        self.term_mean = np.zeros(len(self.term_layers))
        self.term_std = np.ones(len(self.term_layers))
        self._standardise = (np.float32(0.0), -np.ones(len(self.term_layers), dtype=np.float32))

    @property
    def term_layers(self) -> tuple[str, ...]:
        return (self.penultimate,) if self.options["layers"] == "penultimate" else self.layer_names

    # ---- fit ----
    def new_statistics(self, features: dict[str, torch.Tensor]) -> LayerStatistics:
        return LayerStatistics({n: ClassScatter(self.num_classes, pool(features[n]).shape[1], "cpu")
                                for n in self.term_layers})

    def update(self, stats: LayerStatistics, features, labels) -> None:
        for name in self.term_layers:
            stats[name].update(pool(features[name]).cpu(), labels.cpu())

    def fit(self, stats: LayerStatistics, class_names: list[str]) -> None:
        for name in self.term_layers:
            acc: ClassScatter = stats[name]
            empty = [class_names[c] for c in range(self.num_classes) if float(acc.counts[c]) < 1]
            if empty:
                raise FitError(f"no reference images of class(es) {', '.join(empty)} to fit the Mahalanobis means; "
                               "add benign images of every class")
            n = float(acc.counts.sum())
            cov = acc.tied_covariance()
            scale = float(torch.trace(cov)) / cov.shape[0]
            if not np.isfinite(scale) or scale <= 1e-12:
                raise FitError(f"layer {name}: the pooled features are constant over all reference images, so no "
                               "covariance can be fitted; monitor other layers with --layers or use --rule cosine-loi")
            rho = oas_shrinkage(cov, n)
            shrunk = (1.0 - rho) * cov + rho * scale * torch.eye(cov.shape[0], dtype=cov.dtype)
            self.means[name] = acc.means().numpy().astype(np.float32)
            self.precisions[name] = torch.linalg.inv(shrunk).numpy().astype(np.float32)
        self._groups = self._packed = None

    def reduction_key(self, name: str) -> Hashable:
        return name in self._term_set  # pooled, or nothing

    def reduce(self, name: str, output: torch.Tensor) -> torch.Tensor | None:
        if name not in self._term_set:
            return None
        pooled = pool(output)
        return pooled if pooled.dtype == torch.float32 else pooled.float()

    def reduce_host(self, name: str, output: np.ndarray) -> np.ndarray | None:
        return pool_host(output) if name in self._term_set else None

    def _layer_groups(self) -> list[tuple[list[int], list[str], np.ndarray, np.ndarray]]:
        """Layers of equal width, stacked (for the nearest-class reference): one batched matmul per width instead
        of a few ops per layer (at serving batch sizes the per-op dispatch, not the arithmetic, is the cost)."""
        if self._groups is None:
            by_width: dict[int, list[int]] = {}
            for i, name in enumerate(self.term_layers):
                by_width.setdefault(int(self.means[name].shape[1]), []).append(i)
            self._groups = []
            for idx in by_width.values():
                names = [self.term_layers[i] for i in idx]
                self._groups.append((idx, names, np.stack([self.means[n] for n in names]),
                                     np.stack([self.precisions[n] for n in names])))
        return self._groups

    def _packed_layers(self) -> PackedLayers:
        """All layers side by side, built once per fit (see `PackedLayers`)."""
        if self._packed is None:
            widths = [int(self.means[n].shape[1]) for n in self.term_layers]
            precisions = [self.precisions[n] for n in self.term_layers]
            dense = None
            if sum(widths) <= PACKED_MAX_WIDTH:
                dense = np.zeros((sum(widths), sum(widths)), dtype=np.float32)
                for a, b, p in zip(np.cumsum([0, *widths[:-1]]), np.cumsum(widths), precisions):
                    dense[a:b, a:b] = p
            starts = np.cumsum([0, *widths])
            self._packed = PackedLayers(np.concatenate([self.means[n] for n in self.term_layers], axis=1),
                                        layer_indicator(widths), dense,
                                        [(int(a), int(b), p) for a, b, p in zip(starts[:-1], starts[1:], precisions)])
        return self._packed

    def terms(self, reduced, classes, similarities) -> np.ndarray:
        if self.options["reference"] == "nearest":
            return self._nearest_terms(reduced)
        packed = self._packed_layers()
        diff = np.concatenate([reduced[n] for n in self.term_layers], axis=1) - packed.means.take(classes, axis=0)
        return sqrt_clamped((packed.precision_times(diff) * diff) @ packed.blocks)

    def _nearest_terms(self, reduced) -> np.ndarray:
        """Distance to the nearest class mean per layer: every class's distance, one batched product per width."""
        batch = next(reduced[n] for n in self.term_layers).shape[0]
        d2 = np.empty((batch, len(self.term_layers)), dtype=np.float32)
        for idx, names, mu, prec in self._layer_groups():
            feats = np.stack([reduced[n] for n in names])  # [G, B, D]
            fp = feats @ prec
            every = ((fp * feats).sum(2)[:, :, None] - 2.0 * (fp @ mu.transpose(0, 2, 1))
                     + ((mu @ prec) * mu).sum(2)[:, None, :])  # [G, B, C]
            d2[:, idx] = every.min(axis=2).T
        return sqrt_clamped(d2)

    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        self._set_standardisation(terms.mean(axis=0), np.maximum(terms.std(axis=0), 1e-6))

    def _set_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.term_mean, self.term_std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        # -sum_l (t_l - mean_l) / std_l  =  bias + t @ weights: one op per batch
        self._standardise = (np.float32((self.term_mean / self.term_std).sum()),
                             (-1.0 / self.term_std).astype(np.float32))

    def combine(self, terms: np.ndarray, classes: np.ndarray) -> np.ndarray:
        bias, weights = self._standardise
        return terms @ weights + bias

    # ---- persistence ----
    def arrays(self) -> dict[str, np.ndarray]:
        out = {"term_mean": self.term_mean, "term_std": self.term_std}
        for name in self.term_layers:
            out[f"mean/{name}"] = self.means[name]
            out[f"precision/{name}"] = self.precisions[name]
        return out

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._set_standardisation(arrays["term_mean"], arrays["term_std"])
        self.means = {n: np.asarray(arrays[f"mean/{n}"], dtype=np.float32) for n in self.term_layers}
        self.precisions = {n: np.asarray(arrays[f"precision/{n}"], dtype=np.float32) for n in self.term_layers}
        self._groups = self._packed = None

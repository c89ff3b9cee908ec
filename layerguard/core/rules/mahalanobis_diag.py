"""`mahalanobis-diag`: the `mahalanobis` score plus the worst layer's per-class diagonal z-score.

Why a second view: a sum over layers dilutes a backdoor that shows in one or two layers only, and a tied
covariance is blind to a class whose spread differs from the others'. Warping and adaptive triggers (WaNet,
Adap-Blend) shift a few middle layers' pooled features by an amount that is small against the shared
covariance but large against the predicted class's own per-feature spread. Per monitored layer l the second
term is the RMS over pooled features of z = (x - mu_k) / sd_k, k the predicted class, with sd_k^2 half the
class's own variance and half the pooled within-class variance (a fixed shrinkage, so classes with few
references stay usable). Each layer's term is standardised with its out-of-fold benign mean and std and
the score takes the worst (largest) layer: S_diag = -max_l z_l. The `mahalanobis` score S_maha is kept
unchanged, and both are standardised with their out-of-fold benign mean and std and summed:
score = (S_maha - m1) / s1 + (S_diag - m2) / s2, lower is more suspicious.

Statistics stay streaming and mergeable: the same per-layer `ClassScatter` as `mahalanobis` (class sums,
per-class sums of squares, one scatter matrix). Serving cost: a handful of ops on the pooled features the
hooks already keep. The measurement that justified it is in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..stats import ClassScatter
from .base import LayerStatistics
from .mahalanobis import MahalanobisRule, sqrt_clamped

__all__ = ["DIAGONAL_SHRINKAGE", "MahalanobisDiagRule", "diagonal_inverse_sd"]

DIAGONAL_SHRINKAGE = 0.5  # sd_k^2 = (1 - w) * class variance + w * pooled variance; fixed a priori, not tuned
DIAGONAL_SUFFIX = "/diagonal-z"


def diagonal_inverse_sd(acc: ClassScatter) -> np.ndarray:
    """[C, W] 1 / sd_k per class and feature: half the class's own variance, half the pooled within-class
    variance (so a class with few references stays usable), floored for a feature constant within every class."""
    pooled = torch.diagonal(acc.tied_covariance())
    var = (1.0 - DIAGONAL_SHRINKAGE) * acc.class_variances() + DIAGONAL_SHRINKAGE * pooled[None, :]
    floor = max(float(pooled.mean()), 1e-12) * 1e-6
    return var.clamp(min=floor).rsqrt().numpy().astype(np.float32)


class MahalanobisDiagRule(MahalanobisRule):
    name = "mahalanobis-diag"
    summary = ("the mahalanobis score plus minus the largest per-layer RMS z-score of pooled features against the "
               "predicted class's own per-feature spread, each standardised, summed")
    term_label = ("per layer: Mahalanobis distance to the class mean, then RMS z-score against the class's own "
                  "spread (pooled features)")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inv_sd: dict[str, np.ndarray] = {}  # [C, D] float32 per layer
        self.diag_mean = np.zeros(len(self.term_layers))
        self.diag_std = np.ones(len(self.term_layers))
        self.view_stats = np.array([0.0, 1.0, 0.0, 1.0])  # mean, std of S_maha; mean, std of S_diag
        self._diag_packed: tuple[np.ndarray, np.ndarray] | None = None
        self._fused_combine: tuple | None = None

    @property
    def term_names(self) -> tuple[str, ...]:
        return self.term_layers + tuple(n + DIAGONAL_SUFFIX for n in self.term_layers)

    # ---- fit ----
    def fit(self, stats: LayerStatistics, class_names: list[str]) -> None:
        super().fit(stats, class_names)
        for name in self.term_layers:
            self.inv_sd[name] = diagonal_inverse_sd(stats[name])
        self._diag_packed = None

    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        k = len(self.term_layers)
        super().fit_combination(terms[:, :k], labels, loi)
        diag = terms[:, k:]
        self.diag_mean, self.diag_std = diag.mean(axis=0), np.maximum(diag.std(axis=0), 1e-6)
        self._fused_combine = None
        t = terms.astype(np.float32)
        s_maha = super().combine(t[:, :k], labels).astype(np.float64)
        s_diag = self._diag_score(t[:, k:]).astype(np.float64)
        self.view_stats = np.array([s_maha.mean(), max(s_maha.std(), 1e-6), s_diag.mean(), max(s_diag.std(), 1e-6)])
        self._fused_combine = None

    def _set_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        super()._set_standardisation(mean, std)
        self._fused_combine = None

    # ---- score ----
    def _class_columns(self) -> list[np.ndarray]:
        """[C, *] per-class constants that scoring gathers for each item's class, all in one index op: the pooled
        features' means of every layer side by side [C, W], then their inverse sds [C, W] (subclasses append)."""
        return [self._packed_layers().means, *(self.inv_sd[n] for n in self.term_layers)]

    def _diag_layers(self) -> tuple[np.ndarray, np.ndarray]:
        """(the class columns side by side; [2W, 2K] the matrix that turns [quadratic form | squared z] per pooled
        feature into both views' terms per layer: the Mahalanobis sum, and the mean of squared z, i.e. the layer
        indicator over its width)."""
        if self._diag_packed is None:
            blocks = self._packed_layers().blocks
            both = np.zeros((2 * blocks.shape[0], 2 * blocks.shape[1]), dtype=np.float32)
            both[:blocks.shape[0], :blocks.shape[1]] = blocks
            both[blocks.shape[0]:, blocks.shape[1]:] = blocks / blocks.sum(axis=0)
            self._diag_packed = (np.concatenate(self._class_columns(), axis=1), both)
        return self._diag_packed

    def _gather(self, reduced, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([B, W] the monitored layers' pooled features side by side, [B, *] each item's class columns)."""
        class_rows, _ = self._diag_layers()
        return np.concatenate([reduced[n] for n in self.term_layers], axis=1), class_rows.take(classes, axis=0)

    def terms(self, reduced, classes, similarities) -> np.ndarray:
        features, rows = self._gather(reduced, classes)
        return self._both_views(features, rows, reduced, classes, similarities)

    def _both_views(self, features: np.ndarray, rows: np.ndarray, reduced, classes, similarities) -> np.ndarray:
        """[B, 2K]: the Mahalanobis distance and the RMS z-score per layer, from `_gather`'s output."""
        packed = self._packed_layers()
        width = packed.means.shape[1]
        diff = features - rows[:, :width]
        z = diff * rows[:, width:2 * width]
        _, both_sums = self._diag_layers()
        if self.options["reference"] == "nearest":
            maha = super().terms(reduced, classes, similarities)
            k = len(self.term_layers)
            return np.concatenate([maha, sqrt_clamped((z * z) @ both_sums[width:, k:])], axis=1)
        # Both views from one difference and one layer-sum matmul: at serving batch sizes the op count, not
        # the arithmetic, is what scoring costs (bench/guard_profile.py)
        quad = np.concatenate([packed.precision_times(diff) * diff, z * z], axis=1)
        return sqrt_clamped(quad @ both_sums)

    def _diag_score(self, diag_terms: np.ndarray) -> np.ndarray:
        return -((diag_terms - self.diag_mean.astype(np.float32)) / self.diag_std.astype(np.float32)).max(axis=1)

    def _combine_constants(self) -> tuple:
        """The combination with every constant folded in: score = c + t_maha @ w - a * max_l(t_diag_l * u_l - v_l),
        with w = weights / s1, c = (bias - m1) / s1 - m2 / s2, u = 1 / diag_std, v = diag_mean / diag_std and
        a = 1 / s2 (see the module docstring): four ops per batch."""
        if self._fused_combine is None:
            bias, weights = self._standardise
            m1, s1, m2, s2 = (float(v) for v in self.view_stats)
            inv_std = 1.0 / self.diag_std
            self._fused_combine = (np.float32((float(bias) - m1) / s1 - m2 / s2),
                                   (weights.astype(np.float64) / s1).astype(np.float32), inv_std.astype(np.float32),
                                   (-self.diag_mean * inv_std).astype(np.float32), np.float32(1.0 / s2))
        return self._fused_combine

    def combine(self, terms: np.ndarray, classes: np.ndarray) -> np.ndarray:
        k = len(self.term_layers)
        const, weights, inv_std, shift, scale = self._combine_constants()
        worst = (terms[:, k:2 * k] * inv_std + shift).max(axis=1)
        return terms[:, :k] @ weights + const - scale * worst

    # ---- persistence ----
    def arrays(self) -> dict[str, np.ndarray]:
        out = super().arrays()
        out.update({"diag_mean": self.diag_mean, "diag_std": self.diag_std, "view_stats": self.view_stats})
        out.update({f"inv_sd/{n}": self.inv_sd[n] for n in self.term_layers})
        return out

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().load_arrays(arrays)
        self.diag_mean = np.asarray(arrays["diag_mean"], dtype=np.float64)
        self.diag_std = np.asarray(arrays["diag_std"], dtype=np.float64)
        self.view_stats = np.asarray(arrays["view_stats"], dtype=np.float64)
        self.inv_sd = {n: np.asarray(arrays[f"inv_sd/{n}"], dtype=np.float32) for n in self.term_layers}
        self._diag_packed = self._fused_combine = None

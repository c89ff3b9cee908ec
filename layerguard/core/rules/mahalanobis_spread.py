"""`mahalanobis-spread`: `mahalanobis-diag` plus a third view, the worst layer's per-class z-score of each
channel's spatial spread.

Why a third view: pooled features keep a feature map's mean and drop its texture. A warping trigger (WaNet)
moves a layer's per-channel means by little but changes how unevenly each channel fires across the map; the
spread, the standard deviation of a channel over its spatial positions, is the square root of the diagonal of
the centred Gram matrix of that layer's feature map (Beatrix, Ma et al. NDSS 2023, uses Gram matrices; this
keeps only their diagonal, one number per channel, so it stays a pooled statistic). Per monitored layer whose
output has a spatial extent, the term is the RMS over channels of z = (spread - mu_k) / sd_k against the
predicted class's own per-channel spread statistics (the same half-class, half-pooled variance as
`mahalanobis-diag`). Each layer's term is standardised with its out-of-fold benign mean and std, the view takes
the worst layer, S_spread = -max_l z_l, and the score adds it, standardised, to `mahalanobis-diag`'s two views:
score = (S_maha - m1) / s1 + (S_diag - m2) / s2 + (S_spread - m3) / s3, lower is more suspicious.

Layers without a spatial extent (the logits, a flattened penultimate) get no spread term. Statistics stay
streaming and mergeable (one more `ClassScatter` per spatial layer). Serving cost: the hooks reduce each
spatial layer to its channels' first two moments instead of the first alone, and scoring adds a few ops per
batch. The measurement that decided it (and what it costs) is in docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch

from ..host import host, last_axis_dots
from ..stats import ClassScatter
from .base import LayerStatistics
from .mahalanobis import layer_indicator, sqrt_clamped
from .mahalanobis_diag import MahalanobisDiagRule, diagonal_inverse_sd

__all__ = ["SPREAD_SUFFIX", "MahalanobisSpreadRule", "channel_moments", "channel_spread", "spread_from_moments"]

SPREAD_SUFFIX = "/spread-z"


def has_spatial_extent(output: torch.Tensor) -> bool:
    """A [B, C, ...] output with more than one position per channel (a feature map, not a vector)."""
    return output.dim() >= 3 and output[0, 0].numel() > 1


def channel_moments(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """([B, C] spatial mean, [B, C] spatial L2 norm, positions per channel) of a [B, C, ...] feature map, float32:
    what a hook keeps of a spatial layer, in two plain reductions (the spread is derived from them for all
    layers at once). Not `torch.std_mean`: it runs a Welford loop about 100x slower than a mean on CPU (1.2 ms
    against 13 us for a [32, 32, 16, 16] map, one thread). A vector norm is as fast as a mean on a contiguous map
    but not on a channels_last one, where squaring and summing is."""
    dims = tuple(range(2, output.dim()))
    mean = output.mean(dim=dims, dtype=torch.float32)
    if output.is_contiguous():
        norm = torch.linalg.vector_norm(output, dim=dims, dtype=torch.float32)
    else:
        norm = (output if output.dtype == torch.float32 else output.float()).square().sum(dim=dims).sqrt_()
    return mean, norm, math.prod(output.shape[2:])


def spread_from_moments(mean, norm, inv_positions):
    """Population standard deviation sqrt(|x|^2 / n - mean^2), clamped at 0 against rounding (torch tensors or
    numpy arrays: calibration fits on the first, serving scores on the second)."""
    if isinstance(mean, np.ndarray):
        return sqrt_clamped(norm * norm * inv_positions - mean * mean)
    return torch.addcmul(norm.square().mul_(inv_positions), mean, mean, value=-1.0).clamp_min_(0.0).sqrt_()


def channel_spread(output: torch.Tensor) -> torch.Tensor:
    """[B, C] spatial standard deviation of each channel of a [B, C, ...] feature map (what calibration fits)."""
    mean, norm, positions = channel_moments(output)
    return spread_from_moments(mean, norm, 1.0 / positions)


class MahalanobisSpreadRule(MahalanobisDiagRule):
    name = "mahalanobis-spread"
    summary = ("the mahalanobis-diag score plus minus the largest per-layer RMS z-score of each channel's spatial "
               "standard deviation against the predicted class's own spread, standardised, summed")
    term_label = ("per layer: Mahalanobis distance to the class mean, RMS z-score against the class's own spread "
                  "(pooled features), then RMS z-score of the channels' spatial standard deviations")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spread_layers: tuple[str, ...] = ()
        self.spread_means: dict[str, np.ndarray] = {}  # [C, channels] float32 per spatial layer
        self.spread_inv_sd: dict[str, np.ndarray] = {}
        self.spread_term_mean = np.zeros(0)
        self.spread_term_std = np.ones(0)
        self.spread_view = np.array([0.0, 1.0])  # mean, std of S_spread
        self._spread_packed: np.ndarray | None = None
        self._spread_combine: tuple[np.ndarray, np.ndarray, float, float] | None = None
        self._inv_positions: tuple[tuple[int, ...], np.ndarray] | None = None

    @property
    def term_names(self) -> tuple[str, ...]:
        return super().term_names + tuple(n + SPREAD_SUFFIX for n in self.spread_layers)

    def _set_spread_layers(self, names: tuple[str, ...]) -> None:
        self.spread_layers = tuple(n for n in self.term_layers if n in names)
        self._spread_packed = self._spread_combine = self._inv_positions = self._diag_packed = None

    # ---- fit ----
    def new_statistics(self, features: dict[str, torch.Tensor]) -> LayerStatistics:
        stats = super().new_statistics(features)
        for name in self.term_layers:
            if has_spatial_extent(features[name]):
                stats.accumulators[name + SPREAD_SUFFIX] = ClassScatter(self.num_classes, features[name].shape[1],
                                                                        "cpu")
        return stats

    def update(self, stats: LayerStatistics, features, labels) -> None:
        super().update(stats, features, labels)
        for name in self.term_layers:
            key = name + SPREAD_SUFFIX
            if key in stats.accumulators:
                stats[key].update(channel_spread(features[name]).cpu(), labels.cpu())

    def fit(self, stats: LayerStatistics, class_names: list[str]) -> None:
        super().fit(stats, class_names)
        self._set_spread_layers(tuple(n for n in self.term_layers if n + SPREAD_SUFFIX in stats.accumulators))
        for name in self.spread_layers:
            acc: ClassScatter = stats[name + SPREAD_SUFFIX]
            self.spread_means[name] = acc.means().numpy().astype(np.float32)
            self.spread_inv_sd[name] = diagonal_inverse_sd(acc)

    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        k = 2 * len(self.term_layers)
        super().fit_combination(terms[:, :k], labels, loi)
        spread = terms[:, k:]
        if spread.shape[1] == 0:
            return
        self.spread_term_mean, self.spread_term_std = spread.mean(axis=0), np.maximum(spread.std(axis=0), 1e-6)
        self._spread_combine = None
        worst = self._worst_spread(spread.astype(np.float32)).astype(np.float64)
        self.spread_view = np.array([-worst.mean(), max(worst.std(), 1e-6)])
        self._spread_combine = None

    # ---- score ----
    def reduction_key(self, name: str) -> Hashable:
        return super().reduction_key(name), name in self.spread_layers  # moments, pooled, or nothing

    def reduce(self, name: str, output: torch.Tensor):
        """For a spatial layer, its channels' (mean, L2 norm, positions); the spreads are derived for all layers at
        once in `terms` (at batch 1 the op count, not the arithmetic, is the cost)."""
        if name not in self.spread_layers:
            return super().reduce(name, output)
        if output.dim() < 3:
            raise ValueError(f"layer {name} was calibrated on a feature map, but returned shape "
                             f"{tuple(output.shape)}; the model does not match the calibration")
        return channel_moments(output)

    def reduce_host(self, name: str, output: np.ndarray):
        """A spatial layer's two moments by torch's reductions, on a zero-copy tensor of the kept output: the same
        arithmetic as the hooks' and calibration's. Why not numpy: the spread is sqrt(|x|^2 / n - mean^2), whose
        cancellation amplifies rounding on a near-constant channel; numpy's BLAS sums round differently, and on a 1x1
        image upscaled to the input size the score moved by 1e-4 relative (tests/test_reliability_input.py), while
        float64 sums cost about 4x torch's time at 32 rows."""
        if name not in self.spread_layers:
            return super().reduce_host(name, output)
        return host(self.reduce(name, torch.from_numpy(output)))

    def output_norms(self, name: str, reduced) -> torch.Tensor | np.ndarray | None:
        """The whole map's norm from its channels' norms: sqrt(sum_c |x_c|^2), an op on [B, C] instead of a pass
        over the activation."""
        if name not in self.spread_layers:
            return None
        norms = reduced[1]
        if isinstance(norms, np.ndarray):
            return np.sqrt(last_axis_dots(norms, norms))
        return torch.linalg.vector_norm(norms, dim=1)

    def _class_columns(self) -> list[np.ndarray]:
        """The pooled views' class columns, then the spread means [C, S] and inverse sds [C, S] of all spatial
        layers side by side: one gather per batch for all three views."""
        columns = super()._class_columns()
        if self.spread_layers:
            columns += [np.concatenate([self.spread_means[n] for n in self.spread_layers], axis=1),
                        np.concatenate([self.spread_inv_sd[n] for n in self.spread_layers], axis=1)]
        return columns

    def _spread_widths(self) -> list[int]:
        return [int(self.spread_means[n].shape[1]) for n in self.spread_layers]

    def _spread_layer_mean(self) -> np.ndarray:
        """[S, L] the indicator of each spread feature's layer divided by that layer's width: every layer's mean
        squared z in one matmul."""
        if self._spread_packed is None:
            widths = self._spread_widths()
            self._spread_packed = layer_indicator(widths) / np.asarray(widths, dtype=np.float32)
        return self._spread_packed

    def terms(self, reduced, classes, similarities) -> np.ndarray:
        if not self.spread_layers:
            return super().terms(reduced, classes, similarities)
        pooled = dict(reduced)
        norms, positions = [], []
        for name in self.spread_layers:
            moments = reduced[name]
            width = int(self.spread_means[name].shape[1])
            if not isinstance(moments, tuple) or moments[0].shape[1] != width:
                got = moments[0].shape[1] if isinstance(moments, tuple) else "no"
                raise ValueError(f"layer {name}: expected the moments of a feature map of {width} channels, got "
                                 f"{got}; the model does not match the calibration")
            pooled[name], norm, count = moments
            norms.append(norm)
            positions.append(count)
        features, rows = self._gather(pooled, classes)
        base = self._both_views(features, rows, pooled, classes, similarities)
        layer_mean = self._spread_layer_mean()
        spread_width = layer_mean.shape[0]
        # the spatial layers usually come first among the monitored ones: their channel means are then a slice
        means = features[:, :spread_width] if self.spread_layers == self.term_layers[:len(self.spread_layers)] \
            else np.concatenate([pooled[n] for n in self.spread_layers], axis=1)
        spread = spread_from_moments(means, np.concatenate(norms, axis=1), self._inverse_positions(tuple(positions)))
        spread_rows = rows[:, 2 * features.shape[1]:]
        z = (spread - spread_rows[:, :spread_width]) * spread_rows[:, spread_width:]
        return np.concatenate([base, sqrt_clamped((z * z) @ layer_mean)], axis=1)

    def _inverse_positions(self, positions: tuple[int, ...]) -> np.ndarray:
        """[W] 1 / positions of each spread feature's layer, cached per feature-map size."""
        if self._inv_positions is None or self._inv_positions[0] != positions:
            per_layer = np.asarray([1.0 / p for p in positions], dtype=np.float32)
            self._inv_positions = (positions, np.repeat(per_layer, self._spread_widths()))
        return self._inv_positions[1]

    def _spread_constants(self) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(1 / std per layer, -mean / std per layer, m3, 1 / s3): S_spread's standardised form in three ops."""
        if self._spread_combine is None:
            inv_std = 1.0 / np.asarray(self.spread_term_std, dtype=np.float64)
            shift = -np.asarray(self.spread_term_mean, dtype=np.float64) * inv_std
            self._spread_combine = (inv_std.astype(np.float32), shift.astype(np.float32),
                                    float(self.spread_view[0]), 1.0 / float(self.spread_view[1]))
        return self._spread_combine

    def _worst_spread(self, spread_terms: np.ndarray) -> np.ndarray:
        """[B] the largest standardised spread term: -S_spread."""
        inv_std, shift, _, _ = self._spread_constants()
        return (spread_terms * inv_std + shift).max(axis=1)

    def combine(self, terms: np.ndarray, classes: np.ndarray) -> np.ndarray:
        k = 2 * len(self.term_layers)
        score = super().combine(terms[:, :k], classes)
        if not self.spread_layers:
            return score
        _, _, m3, inv_s3 = self._spread_constants()
        # + (S_spread - m3) / s3 with S_spread = -worst
        score -= (self._worst_spread(terms[:, k:]) + np.float32(m3)) * np.float32(inv_s3)
        return score

    # ---- persistence ----
    def arrays(self) -> dict[str, np.ndarray]:
        out = super().arrays()
        out["spread_layers"] = np.array([self.term_layers.index(n) for n in self.spread_layers], dtype=np.int64)
        out.update({"spread_term_mean": self.spread_term_mean, "spread_term_std": self.spread_term_std,
                    "spread_view": self.spread_view})
        for name in self.spread_layers:
            out[f"spread_mean/{name}"] = self.spread_means[name]
            out[f"spread_inv_sd/{name}"] = self.spread_inv_sd[name]
        return out

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().load_arrays(arrays)
        index = np.asarray(arrays["spread_layers"], dtype=np.int64)
        self._set_spread_layers(tuple(self.term_layers[i] for i in index))
        self.spread_term_mean = np.asarray(arrays["spread_term_mean"], dtype=np.float64)
        self.spread_term_std = np.asarray(arrays["spread_term_std"], dtype=np.float64)
        self.spread_view = np.asarray(arrays["spread_view"], dtype=np.float64)
        self.spread_means = {n: np.asarray(arrays[f"spread_mean/{n}"], dtype=np.float32) for n in self.spread_layers}
        self.spread_inv_sd = {n: np.asarray(arrays[f"spread_inv_sd/{n}"], dtype=np.float32)
                              for n in self.spread_layers}

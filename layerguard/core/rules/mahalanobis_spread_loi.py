"""`mahalanobis-spread-loi`: `mahalanobis-spread` plus a fourth view, the paper's own score (the cosine
similarities summed over the predicted class's window LOI-2..LOI), standardised per class.

Why a fourth view: the three Mahalanobis views model each layer's pooled features and channel spreads, one class
at a time; the paper's score reads the whole flattened activation against the class centroid, where the layer of
interest is. The two fail on different attacks. On the zoo, a sticker trigger fine-tuned into a clean model
(BadNets, fine-tuned) moves the paper's score far more than the pooled statistics, and the pooled statistics see
blends and warps the paper's score misses (docs/benchmarks.md has the table that decided it).

The view: s = sum of the similarities to the predicted class k at layers LOI_k-2..LOI_k (the paper's score,
`cosine-loi`); z = (s - mu_k) / sd_k with mu_k and sd_k from the out-of-fold references the model assigns to k,
sd_k^2 half the class's own variance and half the pooled within-class variance (the shrinkage of
`mahalanobis-diag`: a class with a dozen references still gets a usable spread); standardised once more over
all references, (z - m4) / s4, and added to `mahalanobis-spread`'s score. Out of fold the similarities are
against the class the model predicts, as serving computes them, so the thresholds hold for misread inputs.

Terms: `mahalanobis-spread`'s, then each layer's similarity (`<layer>/cosine`), which the window reads.
The similarities are computed for every response, compact ones included: this rule is built on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .cosine_loi import window_matrix
from .mahalanobis_diag import DIAGONAL_SHRINKAGE
from .mahalanobis_spread import MahalanobisSpreadRule

__all__ = ["COSINE_SUFFIX", "MahalanobisSpreadLoiRule", "shrunk_class_moments"]

COSINE_SUFFIX = "/cosine"


def shrunk_class_moments(values: np.ndarray, classes: np.ndarray, num_classes: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """([C] mean, [C] 1 / sd) of `values` per class, sd^2 half the class's own variance and half the pooled
    within-class variance. A class no reference was assigned to gets the pooled mean and spread."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.bincount(classes, minlength=num_classes).astype(np.float64)
    pooled_mean = values.mean() if len(values) else 0.0
    sums = np.bincount(classes, weights=values, minlength=num_classes)
    mean = np.where(counts > 0, sums / np.maximum(counts, 1.0), pooled_mean)
    centred = values - mean[classes]
    own = np.bincount(classes, weights=centred ** 2, minlength=num_classes) / np.maximum(counts, 1.0)
    pooled_var = float((centred ** 2).mean()) if len(values) else 1.0
    var = np.where(counts > 0, (1.0 - DIAGONAL_SHRINKAGE) * own + DIAGONAL_SHRINKAGE * pooled_var, pooled_var)
    return mean, 1.0 / np.sqrt(np.maximum(var, 1e-12))


class MahalanobisSpreadLoiRule(MahalanobisSpreadRule):
    name = "mahalanobis-spread-loi"
    summary = ("the mahalanobis-spread score plus the paper's cosine score at the predicted class's LOI-2..LOI, "
               "standardised per class, summed")
    term_label = ("per layer: the mahalanobis-spread terms, then the cosine similarity to the predicted class's "
                  "centroid")
    needs_similarities = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loi = np.full(self.num_classes, len(self.layer_names) - 1, dtype=np.int64)
        self.cosine_mean = np.zeros(self.num_classes)
        self.cosine_inv_sd = np.ones(self.num_classes)
        self.cosine_view = np.array([0.0, 1.0])  # mean, std of the per-class z over all references
        self._cosine_combine: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def term_names(self) -> tuple[str, ...]:
        return super().term_names + tuple(n + COSINE_SUFFIX for n in self.layer_names)

    # ---- score ----
    def terms(self, reduced, classes, similarities) -> np.ndarray:
        if similarities is None:
            raise ValueError(f"rule {self.name} scores the cosine similarities; they were not computed")
        base = super().terms(reduced, classes, similarities)
        return np.concatenate([base, similarities.astype(np.float32, copy=False)], axis=1)

    def _cosine_z(self, similarities: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """[B] the paper's score against each item's class, standardised with that class's statistics."""
        windows, mean, inv_sd = self._cosine_constants()
        score = (similarities * windows.take(classes, axis=0)).sum(axis=1)
        return (score - mean.take(classes)) * inv_sd.take(classes)

    def _cosine_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[C, K] window per class, [C] mean and [C] 1 / sd with the view's standardisation folded in:
        ((s - mu_k) / sd_k - m4) / s4 = (s - (mu_k + m4 sd_k)) / (sd_k s4)."""
        if self._cosine_combine is None:
            m4, s4 = (float(v) for v in self.cosine_view)
            windows = window_matrix(len(self.layer_names)).astype(np.float32)[self.loi]
            self._cosine_combine = (windows, (self.cosine_mean + m4 / self.cosine_inv_sd).astype(np.float32),
                                    (self.cosine_inv_sd / s4).astype(np.float32))
        return self._cosine_combine

    # ---- fit ----
    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        k = len(self.layer_names)
        super().fit_combination(terms[:, :-k], labels, loi)
        self.loi = np.asarray(loi, dtype=np.int64)
        sims = terms[:, -k:].astype(np.float64)
        score = (sims * window_matrix(k)[self.loi].take(labels, axis=0)).sum(axis=1)
        self.cosine_mean, self.cosine_inv_sd = shrunk_class_moments(score, labels, self.num_classes)
        z = (score - self.cosine_mean[labels]) * self.cosine_inv_sd[labels]
        self.cosine_view = np.array([z.mean(), max(z.std(), 1e-6)])
        self._cosine_combine = None

    def combine(self, terms: np.ndarray, classes: np.ndarray) -> np.ndarray:
        k = len(self.layer_names)
        score = super().combine(terms[:, :-k], classes)
        score += self._cosine_z(terms[:, -k:], classes)
        return score

    # ---- persistence ----
    def arrays(self) -> dict[str, np.ndarray]:
        out = super().arrays()
        out.update({"loi": self.loi, "cosine_mean": self.cosine_mean, "cosine_inv_sd": self.cosine_inv_sd,
                    "cosine_view": self.cosine_view})
        return out

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        super().load_arrays(arrays)
        self.loi = np.asarray(arrays["loi"], dtype=np.int64)
        self.cosine_mean = np.asarray(arrays["cosine_mean"], dtype=np.float64)
        self.cosine_inv_sd = np.asarray(arrays["cosine_inv_sd"], dtype=np.float64)
        self.cosine_view = np.asarray(arrays["cosine_view"], dtype=np.float64)
        self._cosine_combine = None

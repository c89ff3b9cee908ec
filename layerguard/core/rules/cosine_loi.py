"""`cosine-loi`: the paper's rule (Jebreel et al., PAKDD 2023), exactly.

Terms are the cosine similarities to the predicted class's centroid; the score sums them over the
predicted class's window LOI-2..LOI (clipped at the first monitored layer). With `--folds 1 --tau 2.5` the
centroids, LOI and score statistics all come from the same references, as in the official notebook.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch

from .base import LayerStatistics, ScoringRule

__all__ = ["CosineLoiRule", "window_matrix"]


def window_matrix(num_layers: int) -> np.ndarray:
    """Row j is the 0/1 indicator of layers max(0, j-2)..j: the score window for a LOI at j."""
    w = np.zeros((num_layers, num_layers), dtype=np.float64)
    for j in range(num_layers):
        w[j, max(0, j - 2): j + 1] = 1.0
    return w


class CosineLoiRule(ScoringRule):
    name = "cosine-loi"
    summary = "sum of cosine similarities to the predicted class's centroid at LOI-2..LOI (the paper)"
    term_label = "cosine similarity to the class centroid"
    needs_similarities = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loi = np.zeros(self.num_classes, dtype=np.int64)
        self._windows = np.zeros((self.num_classes, len(self.layer_names)), dtype=np.float32)

    def new_statistics(self, features: dict[str, torch.Tensor]) -> LayerStatistics | None:
        return None  # the cosine profile's centroids are this rule's whole state

    def update(self, stats, features, labels) -> None:
        return None

    def fit(self, stats, class_names) -> None:
        return None

    def reduction_key(self, name: str) -> Hashable:
        return None  # nothing of any layer: the cosine profile is all this rule reads

    def terms(self, reduced, classes, similarities) -> np.ndarray:
        return similarities

    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        self.load_arrays({"loi": np.asarray(loi, dtype=np.int64)})

    def combine(self, terms: np.ndarray, classes: np.ndarray) -> np.ndarray:
        return (terms * self._windows.take(classes, axis=0)).sum(axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"loi": self.loi}

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.loi = np.asarray(arrays["loi"], dtype=np.int64)
        self._windows = window_matrix(len(self.layer_names)).astype(np.float32)[self.loi]

"""Layer-wise feature analysis (Jebreel et al., PAKDD 2023): cosine similarity of an input's flattened
activations to its class's benign centroid at every monitored layer, and each class's layer of interest.

Every artifact carries this profile whatever its scoring rule: responses always report the per-layer
similarities and the layer of interest, as the design promises.

Scoring works on a batch at once: one matmul (few classes) or one gather (many) per layer, O(batch x sum
of widths) - far less than the forward pass that made the features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .host import last_axis_sums
from .stats import ClassSums

__all__ = ["CosineProfile", "flatten", "layer_of_interest", "pool", "pool_host"]

MATMUL_MAX_CLASSES = 64  # up to here, scoring against all centroids at once is the cheaper way


def flatten(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D] (a view when the tensor is contiguous)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t[:, None]


def pool(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (or any [B, C, ...]) -> [B, C] by averaging over the spatial dims; [B, D] as is."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() > 2:
        return t.flatten(2).mean(dim=2)
    return t if t.dim() == 2 else t[:, None]


def pool_host(a: np.ndarray) -> np.ndarray:
    """`pool` for a host array: [B, C, ...] -> [B, C] float32 spatial means; [B, D] as is (float32)."""
    if a.ndim > 2:
        a = a.reshape(a.shape[0], a.shape[1], -1)
        return last_axis_sums(a) * np.float32(1.0 / a.shape[2])
    a = a if a.ndim == 2 else a[:, None]
    return a if a.dtype == np.float32 else a.astype(np.float32)


def layer_of_interest(mean_curve: np.ndarray, search_start: int) -> int:
    """Index l in [search_start, K-1] of the largest jump mean_curve[l] - mean_curve[l-1].

    Edges: a search start below 1 is raised to 1 (a jump needs a previous layer); with a single layer,
    or a window that is empty, the LOI is the last layer. Ties go to the earliest layer.
    """
    k = len(mean_curve)
    start = max(1, search_start)
    if k < 2 or start > k - 1:
        return k - 1
    jumps = np.diff(np.asarray(mean_curve, dtype=np.float64))[start - 1:]
    return start + int(np.argmax(jumps))


class CosineProfile:
    """Per-class centroids of flattened activations per layer, and cosine similarity to them."""

    def __init__(self, layer_names: tuple[str, ...], centroids: dict[str, torch.Tensor],
                 device: torch.device | str = "cpu") -> None:
        self.layer_names = tuple(layer_names)
        self.device = torch.device(device)
        self.centroids = {n: centroids[n].to(self.device, torch.float32) for n in self.layer_names}
        # Unit-length centroids: the cosine then needs only the sample's norm.
        self.unit_centroids = {n: F.normalize(c, dim=1) for n, c in self.centroids.items()}
        self.num_classes = int(next(iter(self.centroids.values())).shape[0]) if self.centroids else 0

    @staticmethod
    def new_sums(features: dict[str, torch.Tensor], num_classes: int) -> dict[str, ClassSums]:
        """Empty accumulators shaped for these (flattened) features."""
        return {n: ClassSums(num_classes, flatten(f).shape[1], f.device) for n, f in features.items()}

    @staticmethod
    def update_sums(sums: dict[str, ClassSums], features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        for name, acc in sums.items():
            acc.update(flatten(features[name]), labels)

    @classmethod
    def from_sums(cls, layer_names: tuple[str, ...], sums: dict[str, ClassSums],
                  device: torch.device | str = "cpu") -> CosineProfile:
        return cls(layer_names, {n: sums[n].means().to(torch.float32) for n in layer_names}, device)

    def reduce(self, name: str, output: torch.Tensor, norms: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cosine needs of one layer's output, computed while it is still in cache (serving does this
        inside the layer's hook, so no activation outlives its layer): the dot products with every unit
        centroid [C, B] (or, with many classes, the flattened output itself [B, D]) and the norms [B] (given
        when the rule's own reduction already holds them: one pass over the activation fewer)."""
        f = flatten(output)
        if f.dtype != torch.float32 or f.device != self.device:
            f = f.to(self.device, torch.float32)
        if norms is None:
            norms = torch.linalg.vector_norm(f, dim=1)
        elif norms.dtype != torch.float32 or norms.device != self.device:
            norms = norms.to(self.device, torch.float32)
        if self.num_classes <= MATMUL_MAX_CLASSES:
            # One BLAS call against every centroid beats gathering a [B, D] copy when classes are few.
            # centroids @ f.T, not f @ centroids.T: the same numbers, and about 1.5x faster on CPU for these
            # short-and-wide shapes (bench/guard_profile.py measures the hook)
            return torch.mm(self.unit_centroids[name], f.T), norms
        # Many classes: the dot product waits for the predicted class, so the features are kept until then - as
        # a copy, since `f` may be a view of the layer's output, which the rest of the forward pass may still
        # change in place (a ReLU(inplace=True) after the layer). B x D floats, far fewer than C x D centroids.
        return (f.clone() if f.data_ptr() == output.data_ptr() else f), norms

    def similarities_from(self, reduced: dict[str, tuple[torch.Tensor, torch.Tensor]], classes: torch.Tensor
                          ) -> torch.Tensor:
        """[B, K] cosine similarities from `reduce`'s output per layer, against the given classes."""
        classes = classes.to(self.device, torch.int64)
        parts = [reduced[n] for n in self.layer_names]
        if self.num_classes <= MATMUL_MAX_CLASSES:
            every = torch.stack([dots for dots, _ in parts])  # [K, C, B]
            dots = every.gather(1, classes[None, None, :].expand(len(parts), 1, -1))[:, 0].T
        else:
            dots = torch.stack([(f * self.unit_centroids[n].index_select(0, classes)).sum(dim=1)
                                for n, (f, _) in zip(self.layer_names, parts)], dim=1)
        norms = torch.stack([norm for _, norm in parts], dim=1)
        return dots / norms.clamp_min(1e-12)

    def similarities(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """[B, K] cosine similarity of each item's features to its class's centroid at every layer."""
        return self.similarities_from({n: self.reduce(n, features[n]) for n in self.layer_names}, classes)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"centroid/{n}": self.centroids[n].cpu().numpy() for n in self.layer_names}

    @classmethod
    def from_arrays(cls, layer_names: tuple[str, ...], arrays: dict[str, np.ndarray],
                    device: torch.device | str = "cpu") -> CosineProfile:
        return cls(layer_names, {n: torch.from_numpy(np.asarray(arrays[f"centroid/{n}"])) for n in layer_names},
                   device)

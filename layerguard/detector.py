"""Layer of interest, scores and thresholds: the decision part of layer-wise feature analysis.

Scoring works on a batch at once: one gather of each layer's centroids for the predicted classes and one
row-wise dot product per layer, O(batch x sum of widths) - far less than the forward pass that made the
features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .stats import quantile_threshold, window_matrix

DEFAULT_TAU = 2.5
MATMUL_MAX_CLASSES = 64  # up to here, scoring against all centroids at once is the cheaper way


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


@dataclass(frozen=True)
class ThresholdPolicy:
    """How a class's threshold is set: mean - tau*std (the paper) or a target benign false-positive rate."""

    tau: float | None = DEFAULT_TAU
    target_fpr: float | None = None

    def __post_init__(self) -> None:
        if (self.tau is None) == (self.target_fpr is None):
            raise ValueError("set exactly one of tau and target_fpr")
        if self.tau is not None and not (0.0 <= self.tau <= 10.0):
            raise ValueError(f"tau must be in [0, 10], got {self.tau}")
        if self.target_fpr is not None and not (0.0 < self.target_fpr < 0.5):
            raise ValueError(f"target_fpr must be in (0, 0.5), got {self.target_fpr}")

    def describe(self) -> str:
        return f"tau={self.tau}" if self.tau is not None else f"target_fpr={self.target_fpr}"

    def as_dict(self) -> dict:
        return {"tau": self.tau} if self.tau is not None else {"target_fpr": self.target_fpr}


def thresholds_for(
    policy: ThresholdPolicy,
    score_mean: np.ndarray,
    score_std: np.ndarray,
    score_hist: np.ndarray,
    hist_edges: np.ndarray,
) -> np.ndarray:
    """Per-class thresholds [C]; a score strictly below its class threshold is flagged."""
    if policy.tau is not None:
        return score_mean - policy.tau * score_std
    return np.array([quantile_threshold(h, hist_edges, policy.target_fpr) for h in score_hist])


@dataclass
class Detection:
    """Per-item results of one batch, all tensors on the CPU."""

    predicted: torch.Tensor  # [B] class used for scoring
    similarities: torch.Tensor  # [B, K] cosine similarity to the predicted class's centroid per layer
    scores: torch.Tensor  # [B]
    thresholds: torch.Tensor  # [B]
    layer_of_interest: torch.Tensor  # [B] index into layer_names
    poisoned: torch.Tensor  # [B] bool

    def item(self, i: int, layer_names: tuple[str, ...]) -> dict:
        """JSON-ready annotation for one item (for a whole batch, `items` converts once)."""
        return {
            "poisoned": bool(self.poisoned[i]),
            "score": float(self.scores[i]),
            "threshold": float(self.thresholds[i]),
            "layer_of_interest": layer_names[int(self.layer_of_interest[i])],
            "similarities": dict(zip(layer_names, self.similarities[i].tolist())),
        }

    def items(self, layer_names: tuple[str, ...]) -> list[dict]:
        """JSON-ready annotations for the whole batch: one conversion to Python lists, not one per value."""
        poisoned, scores = self.poisoned.tolist(), self.scores.tolist()
        thresholds, lois, sims = self.thresholds.tolist(), self.layer_of_interest.tolist(), self.similarities.tolist()
        return [
            {
                "poisoned": poisoned[i],
                "score": scores[i],
                "threshold": thresholds[i],
                "layer_of_interest": layer_names[lois[i]],
                "similarities": dict(zip(layer_names, sims[i])),
            }
            for i in range(len(poisoned))
        ]


class Detector:
    """Scores captured features against calibrated centroids. Build it once per worker; reuse per batch."""

    def __init__(
        self,
        layer_names: tuple[str, ...],
        centroids: dict[str, torch.Tensor],
        loi: np.ndarray,
        thresholds: np.ndarray,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layer_names = tuple(layer_names)
        self.device = torch.device(device)
        # Unit-length centroids: the cosine then needs only the sample's norm.
        self.unit_centroids = {
            n: F.normalize(centroids[n].to(self.device, torch.float32), dim=1) for n in self.layer_names
        }
        self.loi = torch.as_tensor(np.asarray(loi), dtype=torch.int64)
        self.thresholds = torch.as_tensor(np.asarray(thresholds), dtype=torch.float32)
        windows = torch.as_tensor(window_matrix(len(self.layer_names)), dtype=torch.float32)
        self.class_windows = windows[self.loi]  # [C, K]
        self.num_classes = len(self.loi)

    def similarities(self, features: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """[B, K] cosine similarity of each item's features to its class's centroid at every layer.

        Two tensor ops per layer (dot products, norms) and a constant few for the batch: at serving batch
        sizes the per-op dispatch, not the arithmetic, is what scoring costs."""
        classes = classes.to(self.device, torch.int64)
        feats = [features[name].to(self.device, torch.float32) for name in self.layer_names]
        if self.num_classes <= MATMUL_MAX_CLASSES:
            # one BLAS call per layer against every centroid beats gathering a [B, D] copy when classes are few
            every = torch.stack([f @ self.unit_centroids[n].T for n, f in zip(self.layer_names, feats)], dim=1)
            index = classes[:, None, None].expand(-1, len(feats), 1)
            dots = every.gather(2, index)[..., 0]  # [B, K]
        else:
            dots = torch.stack([(f * self.unit_centroids[n][classes]).sum(dim=1)
                                for n, f in zip(self.layer_names, feats)], dim=1)
        norms = torch.stack([torch.linalg.vector_norm(f, dim=1) for f in feats], dim=1)
        return (dots / norms.clamp_min(1e-12)).cpu()

    def score(self, features: dict[str, torch.Tensor], predicted: torch.Tensor) -> Detection:
        """Verdicts for one batch from its captured features and the classes the model predicted."""
        predicted = predicted.detach().cpu().to(torch.int64)
        if predicted.numel() and (predicted.min() < 0 or predicted.max() >= self.num_classes):
            raise ValueError(f"predicted class outside 0..{self.num_classes - 1}")
        return self.score_similarities(self.similarities(features, predicted), predicted)

    def score_similarities(self, sims: torch.Tensor, predicted: torch.Tensor) -> Detection:
        """Verdicts from similarities already computed ([B, K], columns in `layer_names` order): lets an
        evaluation score one forward pass's similarities under several calibrations."""
        sims = torch.as_tensor(sims, dtype=torch.float32).cpu()
        predicted = torch.as_tensor(predicted).cpu().to(torch.int64)
        if sims.dim() != 2 or sims.shape[1] != len(self.layer_names) or sims.shape[0] != predicted.shape[0]:
            raise ValueError(f"similarities of shape {tuple(sims.shape)} do not match {predicted.shape[0]} items "
                             f"x {len(self.layer_names)} layers")
        scores = (sims * self.class_windows[predicted]).sum(dim=1)
        thresholds = self.thresholds[predicted]
        return Detection(
            predicted=predicted,
            similarities=sims,
            scores=scores,
            thresholds=thresholds,
            layer_of_interest=self.loi[predicted],
            poisoned=scores < thresholds,
        )

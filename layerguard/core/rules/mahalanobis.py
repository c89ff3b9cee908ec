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

from collections.abc import Mapping

import numpy as np
import torch

from ..similarity import pool
from ..stats import ClassScatter
from .base import FitError, LayerStatistics, ScoringRule

__all__ = ["MahalanobisRule", "oas_shrinkage"]


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
        self.means: dict[str, torch.Tensor] = {}
        self.precisions: dict[str, torch.Tensor] = {}
        self.term_mean = np.zeros(len(self.term_layers))
        self.term_std = np.ones(len(self.term_layers))

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
            self.means[name] = acc.means().to(torch.float32)
            self.precisions[name] = torch.linalg.inv(shrunk).to(torch.float32)

    def reduce(self, name: str, output: torch.Tensor) -> torch.Tensor | None:
        return pool(output).to(torch.float32) if name in self.term_layers else None

    def terms(self, reduced, classes, similarities) -> torch.Tensor:
        cols = []
        for name in self.term_layers:
            f = reduced[name]
            mu, prec = self.means[name].to(f.device), self.precisions[name].to(f.device)
            if self.options["reference"] == "predicted":
                diff = f - mu[classes.to(f.device)]
                d2 = ((diff @ prec) * diff).sum(dim=1)
            else:
                fp = f @ prec
                d2 = ((fp * f).sum(1)[:, None] - 2.0 * fp @ mu.T + ((mu @ prec) * mu).sum(1)[None, :]).min(dim=1).values
            cols.append(d2.clamp_min(0.0).sqrt())
        return torch.stack(cols, dim=1)

    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        self.term_mean = terms.mean(axis=0)
        self.term_std = np.maximum(terms.std(axis=0), 1e-6)

    def combine(self, terms: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.term_mean, dtype=terms.dtype, device=terms.device)
        std = torch.as_tensor(self.term_std, dtype=terms.dtype, device=terms.device)
        return -((terms - mean) / std).sum(dim=1)

    # ---- persistence ----
    def arrays(self) -> dict[str, np.ndarray]:
        out = {"term_mean": self.term_mean, "term_std": self.term_std}
        for name in self.term_layers:
            out[f"mean/{name}"] = self.means[name].cpu().numpy()
            out[f"precision/{name}"] = self.precisions[name].cpu().numpy()
        return out

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.term_mean = np.asarray(arrays["term_mean"], dtype=np.float64)
        self.term_std = np.asarray(arrays["term_std"], dtype=np.float64)
        self.means = {n: torch.from_numpy(np.asarray(arrays[f"mean/{n}"], dtype=np.float32)) for n in self.term_layers}
        self.precisions = {n: torch.from_numpy(np.asarray(arrays[f"precision/{n}"], dtype=np.float32))
                           for n in self.term_layers}

    def to(self, device):
        self.means = {n: t.to(device) for n, t in self.means.items()}
        self.precisions = {n: t.to(device) for n, t in self.precisions.items()}
        return self

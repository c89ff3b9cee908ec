"""Peer inference-time backdoor detectors, run side by side with layerguard on the same models and images.

Why these three: STRIP and SCALE-UP are the black-box, multi-pass detectors a user would pick instead
(REFERENCE.md), and a per-class Mahalanobis detector on the penultimate features is the single-pass,
latent-space kind of defence (Lee et al. 2018; Beatrix and the latent-separability defences look at the
same layer) that adaptive attacks such as Adap-Blend are built to defeat.

Conventions shared with layerguard so every detector goes through the same metric code:
  - inputs are float [0, 1] NCHW tensors, exactly what the model takes (normalisation is inside it);
  - ``score`` returns one float per input and **a lower score is more suspicious**;
  - ``forward_passes`` is the number of model forward passes the detector costs per input, counting the
    one that produces the served prediction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from layerguard.core.capture import LayerCapture


def _chunks(x: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch):
        yield x[i : i + batch]


def _model_format(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Match the memory format of the model's first conv weight (channels_last runs ~25% faster on CPU)."""
    for p in model.parameters():
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
            return x.contiguous(memory_format=torch.channels_last)
        break
    return x


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Logits for a whole tensor in batches (eval mode, no autograd)."""
    model.eval()
    outs = [model(_model_format(model, xb)) for xb in _chunks(x, batch)]
    return torch.cat(outs) if outs else torch.zeros(0)


class Strip:
    """STRIP (Gao et al., ACSAC 2019): entropy of the predictions on the input superimposed with N clean images.

    A trigger dominates whatever it is blended with, so a triggered input keeps predicting the target and
    its mean prediction entropy is low. Superimposition follows the authors' code,
    ``cv2.addWeighted(background, 1, overlay, 1, 0)``, i.e. ``clip(alpha*x + beta*clean, 0, 1)`` with
    alpha = beta = 1 (the BackdoorBench/BackdoorBox default). The clean overlays are drawn at random (fixed
    seed) from the reference pool. Score = mean-of-entropies (lower = more suspicious).
    """

    name = "STRIP"

    def __init__(
        self,
        model: nn.Module,
        pool: torch.Tensor,
        n: int = 20,
        alpha: float = 1.0,
        beta: float = 1.0,
        seed: int = 0,
        batch: int = 250,
    ) -> None:
        if len(pool) == 0:
            raise ValueError("STRIP needs a non-empty pool of clean images")
        self.model, self.pool, self.n, self.alpha, self.beta, self.batch = model, pool, n, alpha, beta, batch
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def forward_passes(self) -> int:
        return 1 + self.n

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> np.ndarray:
        self.model.eval()
        per_chunk = max(1, self.batch // self.n)  # inputs per forward batch of per_chunk * n blends
        out = []
        for xb in _chunks(x, per_chunk):
            idx = torch.randint(0, len(self.pool), (len(xb), self.n), generator=self.gen)
            blended = (self.alpha * xb[:, None] + self.beta * self.pool[idx]).clamp_(0, 1)
            logits = self.model(_model_format(self.model, blended.flatten(0, 1)))
            p = F.softmax(logits.float(), dim=1)
            ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1).view(len(xb), self.n)
            out.append(ent.mean(dim=1))
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class ScaleUp:
    """SCALE-UP (Guo et al., ICLR 2023): prediction consistency when pixel values are multiplied by 3..11.

    Triggered images keep predicting the target under amplification; benign ones drift. SPC = fraction of
    the scaled copies whose prediction equals the original prediction. With benign reference data (the
    paper's "data-limited" variant, also BackdoorBox's ``with_clean_data``) SPC is standardised by the mean
    and std of benign SPC of the predicted class. Score = -(standardised SPC) (lower = more suspicious).
    """

    name = "SCALE-UP"

    def __init__(self, model: nn.Module, scales: Sequence[float] = (3, 5, 7, 9, 11), batch: int = 250) -> None:
        self.model, self.scales, self.batch = model, tuple(scales), batch
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @property
    def forward_passes(self) -> int:
        return 1 + len(self.scales)

    @torch.no_grad()
    def spc(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(SPC in [0, 1], original prediction) per input."""
        self.model.eval()
        per_chunk = max(1, self.batch // (1 + len(self.scales)))
        spcs, preds = [], []
        for xb in _chunks(x, per_chunk):
            copies = torch.cat([xb] + [(xb * s).clamp(0, 1) for s in self.scales])
            pred = self.model(_model_format(self.model, copies)).argmax(dim=1).view(1 + len(self.scales), -1)
            spcs.append((pred[1:] == pred[:1]).float().mean(dim=0))
            preds.append(pred[0])
        if not spcs:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        return torch.cat(spcs).numpy(), torch.cat(preds).numpy()

    def fit(self, x_ref: torch.Tensor, num_classes: int) -> np.ndarray:
        """Per-predicted-class benign SPC mean and std (classes never predicted fall back to the global ones).

        Returns the reference images' own scores, so callers need not run the 6 passes over them twice.
        """
        s, pred = self.spc(x_ref)
        self.mean = np.full(num_classes, s.mean())
        self.std = np.full(num_classes, max(s.std(), 1e-3))
        for c in range(num_classes):
            sc = s[pred == c]
            if len(sc) >= 2:
                self.mean[c], self.std[c] = sc.mean(), max(sc.std(), 1e-3)
        return -(s - self.mean[pred]) / self.std[pred]

    def score(self, x: torch.Tensor) -> np.ndarray:
        s, pred = self.spc(x)
        if self.mean is None or self.std is None:
            return -s
        return -(s - self.mean[pred]) / self.std[pred]


class Mahalanobis:
    """Per-class Gaussian with a shared covariance on one layer's features (Lee et al., NeurIPS 2018).

    Single pass: the features come from the same forward pass that makes the prediction. Score = minus the
    squared Mahalanobis distance of the features to the mean of the *predicted* class (a triggered input is
    predicted as the target but its features need not look like the target's benign ones). The covariance
    is shrunk towards its diagonal (``shrinkage``) because 100 images a class barely cover 64+ dimensions.
    """

    name = "Mahalanobis"

    def __init__(self, layer: str = "pool", shrinkage: float = 0.1) -> None:
        self.layer, self.shrinkage = layer, shrinkage
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    forward_passes = 1

    def fit(self, features: torch.Tensor, labels: np.ndarray | torch.Tensor, num_classes: int) -> Mahalanobis:
        f = features.double().reshape(len(features), -1)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        means = torch.stack([f[y == c].mean(dim=0) for c in range(num_classes)])
        centred = f - means[y]
        cov = centred.T @ centred / max(len(f) - num_classes, 1)
        cov = (1 - self.shrinkage) * cov + self.shrinkage * torch.diag(torch.diagonal(cov))
        cov += 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype) * torch.diagonal(cov).mean()
        self.means, self.precision = means, torch.linalg.inv(cov)
        return self

    def score_features(self, features: torch.Tensor, predicted: np.ndarray | torch.Tensor) -> np.ndarray:
        if self.means is None or self.precision is None:
            raise RuntimeError("Mahalanobis.fit must be called first")
        f = features.double().reshape(len(features), -1)
        d = f - self.means[torch.as_tensor(np.asarray(predicted), dtype=torch.int64)]
        return -((d @ self.precision) * d).sum(dim=1).numpy()

    @torch.no_grad()
    def score(self, model: nn.Module, x: torch.Tensor, batch: int = 250) -> np.ndarray:
        """Forward pass with a hook on ``layer``; score by predicted class (what serving would do)."""
        out = []
        with LayerCapture(model, [self.layer]) as cap:
            for xb in _chunks(x, batch):
                logits, feats = cap.run(_model_format(model, xb))
                out.append(self.score_features(feats[self.layer], logits.argmax(dim=1)))
        return np.concatenate(out) if out else np.zeros(0)

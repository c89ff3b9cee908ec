"""Thresholds: the one place a score becomes a verdict.

Every rule's score is "benign-likeness" (lower is more suspicious). Benign reference scores that were not
used to fit the statistics (out-of-fold, see detector.py) are standardised, z = (s - mean_c) / std_c, and
kept sorted: per class for rules whose scores differ in scale between classes (the paper's cosine sum),
with one mean and std for all classes for rules whose scores are already comparable (Mahalanobis with a
tied covariance), where per-class statistics of a few dozen references would only add noise. Then:
- `tau` (the paper): flag when z < -tau, i.e. score < mean_c - tau * std_c, one threshold per class.
- `target_fpr` (the default): flag when z is below the target quantile of the pooled out-of-fold z, so
  the share of benign references flagged is at most the target. Pooling across classes gives the quantile
  enough samples (a 1% quantile of 50 images per class is one image) while the standardisation keeps
  classes comparable. The FPR this delivers on new traffic is the target on average and spreads around it
  by about sqrt(p(1-p)/n) (`fpr_spread`): half of all calibrations deliver a little more than asked.
- `target_fpr` with `confidence` (e.g. 0.95): flag fewer references, so that the delivered FPR is *at most*
  the target with that probability over the draw of the references. The FPR of the cut just below the
  (k+1)-th smallest reference is the (k+1)-th order statistic of n uniforms, and P(U_(k+1) > p) =
  P(Binomial(n, p) <= k); the cut flags the largest k for which that is at most 1 - confidence. It costs
  detection power (the expected FPR is lower than the target) and needs at least
  log(1 - confidence) / log(1 - p) references (`references_for_confidence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_TARGET_FPR", "DEFAULT_TAU", "BenignScores", "ThresholdPolicy", "binomial_cdf",
           "flagged_references", "fpr_spread", "references_for_confidence", "references_for_spread"]

DEFAULT_TAU = 2.5
DEFAULT_TARGET_FPR = 0.01


def fpr_spread(target_fpr: float, n_references: int) -> float:
    """Standard deviation of the FPR a target-FPR threshold delivers on new benign traffic, when it is the
    target quantile of n benign reference scores: the FPR of an order statistic is Beta distributed with
    variance about p(1-p)/n. With 1,000 references at 1% this is 0.31 points: the references' count, not the
    rule, sets how close to the target the delivered rate can be promised."""
    return float(np.sqrt(target_fpr * (1.0 - target_fpr) / max(n_references, 1)))


def references_for_spread(target_fpr: float, spread: float) -> int:
    """Benign references needed for `fpr_spread` to be at most `spread` (both as fractions)."""
    return int(np.ceil(target_fpr * (1.0 - target_fpr) / spread ** 2))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (no scipy; n is a reference count, at most ~1e6)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    return min(1.0, sum(math.exp(log_n - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q)
                        for j in range(k + 1)))


def references_for_confidence(target_fpr: float, confidence: float) -> int:
    """Fewest references with which some cut keeps the FPR at most `target_fpr` with probability `confidence`
    (flagging none of them: (1 - p)^n <= 1 - confidence)."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log1p(-target_fpr)))


def flagged_references(target_fpr: float, n: int, confidence: float | None = None) -> int:
    """How many of n benign references the target-FPR cut flags: floor(p n) for the expected rate; with a
    confidence, the largest k with P(Binomial(n, p) <= k) <= 1 - confidence (module docstring)."""
    if confidence is None:
        return min(int(math.floor(target_fpr * n)), max(n - 1, 0))
    if n < references_for_confidence(target_fpr, confidence):
        raise ValueError(
            f"{n} benign references cannot keep the FPR at most {100 * target_fpr:g}% with "
            f"{100 * confidence:g}% confidence: that needs at least "
            f"{references_for_confidence(target_fpr, confidence)}. Calibrate on more held-out images, or lower "
            "the confidence, or drop it (the target is then the expected rate)")
    k, tail = 0, 1.0 - confidence
    while k + 1 < n and binomial_cdf(k + 1, n, target_fpr) <= tail:
        k += 1
    return k


@dataclass(frozen=True)
class ThresholdPolicy:
    """How the threshold is set: a target benign false-positive rate (default 1%, the expected rate; with
    `confidence`, a rate not exceeded with that probability) or the paper's mean - tau * std per class."""

    tau: float | None = None
    target_fpr: float | None = DEFAULT_TARGET_FPR
    confidence: float | None = None

    def __post_init__(self) -> None:
        if (self.tau is None) == (self.target_fpr is None):
            raise ValueError("set exactly one of tau and target_fpr")
        if self.tau is not None and not (0.0 <= self.tau <= 10.0):
            raise ValueError(f"tau must be in [0, 10], got {self.tau}")
        if self.target_fpr is not None and not (0.0 < self.target_fpr < 0.5):
            raise ValueError(f"target_fpr must be in (0, 0.5), got {self.target_fpr}")
        if self.confidence is not None:
            if self.target_fpr is None:
                raise ValueError("fpr_confidence applies to a target FPR, not to tau")
            if not (0.5 <= self.confidence <= 0.999):
                raise ValueError(f"fpr_confidence must be in [0.5, 0.999], got {self.confidence}")

    @classmethod
    def from_options(cls, tau: float | None = None, target_fpr: float | None = None,
                     confidence: float | None = None) -> ThresholdPolicy:
        """The policy a user asked for with --tau / --target-fpr (at most one) and --fpr-confidence, else the
        default."""
        if tau is not None and target_fpr is not None:
            raise ValueError("give --tau or --target-fpr, not both")
        if tau is not None:
            if confidence is not None:
                raise ValueError("fpr_confidence applies to a target FPR, not to tau")
            return cls(tau=tau, target_fpr=None)
        return cls(tau=None, target_fpr=DEFAULT_TARGET_FPR if target_fpr is None else target_fpr,
                   confidence=confidence)

    @classmethod
    def from_dict(cls, data: dict) -> ThresholdPolicy:
        return cls(tau=data.get("tau"), target_fpr=data.get("target_fpr"), confidence=data.get("fpr_confidence"))

    def describe(self) -> str:
        if self.tau is not None:
            return f"tau={self.tau}"
        if self.confidence is not None:
            return f"target_fpr={self.target_fpr} (at most, with {100 * self.confidence:g}% confidence)"
        return f"target_fpr={self.target_fpr}"

    def as_dict(self) -> dict:
        if self.tau is not None:
            return {"tau": self.tau}
        if self.confidence is not None:
            return {"target_fpr": self.target_fpr, "fpr_confidence": self.confidence}
        return {"target_fpr": self.target_fpr}


class BenignScores:
    """What thresholds are inferred from: out-of-fold benign scores with their true classes. Keeps their
    per-class mean and std and all standardised values, sorted."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, num_classes: int, per_class: bool = True) -> None:
        self.scores = np.asarray(scores, dtype=np.float64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.per_class = per_class
        if per_class:
            counts = np.maximum(np.bincount(self.labels, minlength=num_classes).astype(np.float64), 1.0)
            self.score_mean = np.bincount(self.labels, weights=self.scores, minlength=num_classes) / counts
            centred = self.scores - self.score_mean[self.labels]
            var = np.bincount(self.labels, weights=centred ** 2, minlength=num_classes) / counts
            self.score_std = np.sqrt(var)  # population std, as the paper's numpy code
        else:  # one mean and std for all classes: the rule's scores are comparable across classes
            self.score_mean = np.full(num_classes, self.scores.mean() if len(self.scores) else 0.0)
            self.score_std = np.full(num_classes, self.scores.std() if len(self.scores) else 0.0)
        self.sorted_z = np.sort(self.standardize(self.scores, self.labels))

    def z_cut(self, policy: ThresholdPolicy) -> float:
        """Flag when z < this value."""
        if policy.tau is not None:
            return -float(policy.tau)
        n = len(self.sorted_z)
        if n == 0:
            return float("nan")
        k = flagged_references(policy.target_fpr, n, policy.confidence)  # flag k of the n benign references
        upper = float(self.sorted_z[k])
        lower = float(self.sorted_z[k - 1]) if k > 0 else upper - 1.0
        return (lower + upper) / 2.0  # midway: rounding in score units cannot flag the k+1-th reference

    def thresholds(self, policy: ThresholdPolicy) -> np.ndarray:
        """Per-class thresholds [C] in score units; an input scoring strictly below is flagged."""
        return self.score_mean + self.z_cut(policy) * self.score_std

    def standardize(self, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """z of scores measured against the given classes' benign statistics."""
        return (np.asarray(scores) - self.score_mean[classes]) / np.maximum(self.score_std[classes], 1e-12)

    def flagged_share(self, policy: ThresholdPolicy) -> float:
        """Share of these benign scores the policy flags (at most the target for target_fpr, by construction)."""
        return float(np.mean(self.scores < self.thresholds(policy)[self.labels])) if len(self.scores) else float("nan")

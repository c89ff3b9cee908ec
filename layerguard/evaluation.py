"""Detection quality as the paper counts it, plus AUROC: small, dependency-free functions.

Scores are "benign-likeness": lower means more suspicious, and an item is flagged when score < threshold.
"""

from __future__ import annotations

import numpy as np


def flag_rate(scores: np.ndarray, thresholds: np.ndarray) -> float:
    """Fraction flagged (score strictly below its threshold); NaN for an empty set."""
    scores = np.asarray(scores)
    return float(np.mean(scores < thresholds)) if scores.size else float("nan")


def auroc(benign_scores: np.ndarray, poisoned_scores: np.ndarray) -> float:
    """P(a poisoned score < a benign score), ties counting half: the Mann-Whitney statistic."""
    b = np.asarray(benign_scores, dtype=np.float64)
    p = np.asarray(poisoned_scores, dtype=np.float64)
    if b.size == 0 or p.size == 0:
        return float("nan")
    allv = np.concatenate([p, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks over ties
    sorted_v = allv[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_v))[0] + 1]
    ends = np.r_[starts[1:], len(allv)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2.0
    # rank-sum of benign: how often benign > poisoned
    u = ranks[len(p):].sum() - b.size * (b.size + 1) / 2.0
    return float(u / (b.size * p.size))


def roc_curve(benign_scores: np.ndarray, poisoned_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) as a single threshold sweeps all observed scores, flagging score < t."""
    b = np.sort(np.asarray(benign_scores, dtype=np.float64))
    p = np.sort(np.asarray(poisoned_scores, dtype=np.float64))
    cuts = np.unique(np.concatenate([b, p, [np.inf]]))
    fpr = np.searchsorted(b, cuts, side="left") / max(b.size, 1)
    tpr = np.searchsorted(p, cuts, side="left") / max(p.size, 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]

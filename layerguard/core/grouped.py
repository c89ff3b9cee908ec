"""Reduce whole layer outputs kept past the forward pass, layers of equal shape as one stacked batch.

Why a second way to reduce: inside a hook, each monitored layer is reduced on its own, a few small ops per
layer. At serving batch sizes those ops cost their dispatch, not their arithmetic, so seven monitored layers
pay for some thirty ops. After the forward pass, layers of the same shape (the blocks of one ResNet stage) can
be reduced as one batch, and the predicted class is known, so the cosine needs one centroid per item instead of
every class's. Measured on the CIFAR ResNet-20 and ResNet-18 (bench/guard_profile.py's crossover: the whole
guarded path both ways, paired against the plain pass): cheaper up to batch 16, no cheaper at batch 32, where the
activations are large and reducing each one while it is still in cache catches up. `KEEP_WHOLE_UP_TO` is that
crossover; `LayerCapture(keep_whole_up_to=...)` applies it.

The result is the same as the hooks' reductions (the rules' reductions are row by row; tested), only computed
in fewer ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .host import host
from .rules.base import ScoringRule
from .similarity import CosineProfile

__all__ = ["KEEP_WHOLE_UP_TO", "GroupedReduction"]

KEEP_WHOLE_UP_TO = 16  # batches of at most this many rows are reduced after the forward pass


def _split_rows(value: Any, parts: int) -> list[Any]:
    """One reduction of `parts` stacked layers -> one per layer: arrays split along rows (views), tuples
    element by element, anything else (a position count, None) repeated."""
    if isinstance(value, np.ndarray):
        rows = value.shape[0] // parts
        return [value[i * rows:(i + 1) * rows] for i in range(parts)]
    if isinstance(value, tuple):
        return [tuple(items) for items in zip(*(_split_rows(v, parts) for v in value))]
    return [value] * parts


class GroupedReduction:
    """Per batch: the rule's reduction of every monitored layer and the cosine similarities to the predicted
    classes, from the layers' whole outputs."""

    def __init__(self, profile: CosineProfile, rule: ScoringRule) -> None:
        self.profile = profile
        self.rule = rule
        self.layer_names = profile.layer_names
        self._plan: tuple[tuple, list[tuple[str, ...]], torch.Tensor | None] | None = None
        self._centroids: dict[tuple[str, ...], torch.Tensor] = {}

    def _groups(self, outputs: dict[str, torch.Tensor]) -> tuple[list[tuple[str, ...]], torch.Tensor | None]:
        """Layers grouped by (shape, dtype, device, the rule's reduction key), in forward order; and the order
        that puts the groups' rows back in layer order (None: they already are). Cached per batch shape."""
        signature = tuple((tuple(outputs[n].shape), outputs[n].dtype, outputs[n].device) for n in self.layer_names)
        if self._plan is None or self._plan[0] != signature:
            by_key: dict[tuple, list[str]] = {}
            for name, (shape, dtype, device) in zip(self.layer_names, signature):
                by_key.setdefault((shape, dtype, device, self.rule.reduction_key(name)), []).append(name)
            groups = [tuple(names) for names in by_key.values()]
            stacked_order = [n for names in groups for n in names]
            order = None if stacked_order == list(self.layer_names) else torch.tensor(
                [stacked_order.index(n) for n in self.layer_names], device=self.profile.device)
            self._plan = (signature, groups, order)
        return self._plan[1], self._plan[2]

    def _unit_centroids(self, names: tuple[str, ...]) -> torch.Tensor:
        """[G, C, D] the group's unit centroids, stacked once."""
        if names not in self._centroids:
            self._centroids[names] = torch.stack([self.profile.unit_centroids[n] for n in names])
        return self._centroids[names]

    def reduce(self, outputs: dict[str, torch.Tensor], classes: torch.Tensor, similarities: bool = True
               ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """(the rule's reduction per layer, as `rule.reduce` would give it; [B, K] cosine similarities to
        `classes`' centroids, or None without `similarities`)."""
        groups, order = self._groups(outputs)
        reduced: dict[str, Any] = {}
        dots: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for names in groups:
            parts: Sequence[torch.Tensor] = [outputs[n] for n in names]
            stacked = torch.cat(parts) if len(parts) > 1 else parts[0]  # [G * B, ...]
            ruled = self.rule.reduce(names[0], stacked)
            reduced.update(zip(names, _split_rows(host(ruled), len(names))))  # to the host once per group
            if not similarities:
                continue
            flat = stacked.reshape(len(names), parts[0].shape[0], -1)
            if flat.dtype != torch.float32 or flat.device != self.profile.device:
                flat = flat.to(self.profile.device, torch.float32)
            norm = self.rule.output_norms(names[0], ruled)
            norms.append(torch.linalg.vector_norm(flat, dim=2) if norm is None
                         else norm.to(self.profile.device, torch.float32).view(len(names), -1))
            # the predicted class's centroid only: one row per item, not C
            # (index_select, not [:, classes]: advanced indexing costs about 7x more at these sizes)
            dots.append(torch.linalg.vecdot(flat, self._unit_centroids(names).index_select(1, classes)))
        if not similarities:
            return reduced, None
        sims = torch.cat(dots).div_(torch.cat(norms).clamp_min_(1e-12))  # [K, B] in group order
        return reduced, (sims if order is None else sims.index_select(0, order)).T

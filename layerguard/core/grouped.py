"""Reduce whole layer outputs kept past the forward pass, layers of equal shape as one stacked batch.

Why a second way to reduce: inside a hook, each monitored layer is reduced on its own, a few small ops per
layer. At serving batch sizes those ops cost their dispatch, not their arithmetic, so seven monitored layers
pay for some thirty ops. After the forward pass, layers of the same shape (the blocks of one ResNet stage) can
be reduced as one batch, and the predicted class is known, so the cosine needs one centroid per item instead of
every class's. Measured on the CIFAR ResNet-20 and ResNet-18 (bench/guard_profile.py's crossover: the whole
guarded path both ways, paired against the plain pass; docs/benchmarks.md): with the numpy reductions below,
cheaper on the ResNet-20 up to batch 32 and no dearer on the ResNet-18 when the cosine profile is computed (the
full response), which after the pass needs one centroid per item instead of every class's. Without it (the
compact response) a hook's two moments of a still-cached activation cost less from batch 32 on. Hence
`KEEP_WHOLE_UP_TO` rows with the cosine, `KEEP_WHOLE_UP_TO_NO_COSINE` without; `LayerCapture(keep_whole_up_to=...)`
applies the limit. Kept outputs stay in memory until scoring, so a model whose monitored outputs are large keeps
fewer rows: `keep_whole_limit` holds them under `KEEP_WHOLE_BYTES` (the serving handler applies it from its
load-time probe).

The result is the same as the hooks' reductions (the rules' reductions are row by row; tested), only computed
in fewer ops.

Kept outputs in host memory (a CPU model's float32 activations) are reduced in numpy, on zero-copy views
(`ScoringRule.reduce_host`; a rule may keep a reduction in torch there, on the same memory, as
`mahalanobis-spread` does for its moments): a numpy op on these small batches costs a fraction of a torch op's
dispatch, which is what this path pays for (core/host.py). bench/guard_profile.py measures both ("keep + score"
and its torch form, docs/benchmarks.md). Other outputs (a GPU, half precision) are reduced in torch on their
device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .host import host, last_axis_dots
from .rules.base import ScoringRule
from .similarity import CosineProfile

__all__ = ["KEEP_WHOLE_BYTES", "KEEP_WHOLE_UP_TO", "KEEP_WHOLE_UP_TO_NO_COSINE", "GroupedReduction",
           "keep_whole_limit"]

KEEP_WHOLE_UP_TO = 32  # batches of at most this many rows are reduced after the forward pass, with the cosine
KEEP_WHOLE_UP_TO_NO_COSINE = 16  # ... without it (compact responses of rules not built on it)
KEEP_WHOLE_BYTES = 32 * 2**20  # ... as long as their monitored outputs take at most this much memory


def keep_whole_limit(outputs: dict[str, torch.Tensor], similarities: bool = True, up_to: int | None = None,
                     budget: int | None = None) -> int:
    """The largest batch that keeps whole outputs: `up_to` rows (`KEEP_WHOLE_UP_TO` when the cosine profile is
    computed on contiguous outputs, else `KEEP_WHOLE_UP_TO_NO_COSINE`: a channels_last output is copied into NCHW
    order to be reduced after the pass, which the hooks' reductions need not), fewer when that many rows of these
    monitored outputs (one forward pass's, any batch size) would take more than `budget` bytes
    (`KEEP_WHOLE_BYTES`); 0 when one row would."""
    if up_to is None:
        contiguous = all(t.is_contiguous() for t in outputs.values())
        up_to = KEEP_WHOLE_UP_TO if similarities and contiguous else KEEP_WHOLE_UP_TO_NO_COSINE
    budget = KEEP_WHOLE_BYTES if budget is None else budget
    rows = max(1, next(iter(outputs.values())).shape[0]) if outputs else 1
    per_row = sum(t.numel() * t.element_size() for t in outputs.values()) / rows
    return up_to if per_row == 0 else int(min(up_to, budget // per_row))


def _split_rows(value: Any, parts: int) -> list[Any]:
    """One reduction of `parts` stacked layers -> one per layer: arrays split along rows (views), tuples
    element by element, anything else (a position count, None) repeated."""
    if isinstance(value, np.ndarray):
        rows = value.shape[0] // parts
        return [value[i * rows:(i + 1) * rows] for i in range(parts)]
    if isinstance(value, tuple):
        return [tuple(items) for items in zip(*(_split_rows(v, parts) for v in value))]
    return [value] * parts


class _Plan(NamedTuple):
    """How one batch shape is reduced, worked out once per shape."""

    signature: tuple  # (shape, dtype, device) of every monitored output
    groups: list[tuple[str, ...]]  # layers reduced together, in forward order
    order: torch.Tensor | None  # puts the groups' rows back in layer order (None: they already are)
    host_order: np.ndarray | None  # the same, for the numpy path
    on_host: bool  # float32 outputs in CPU memory and a CPU profile: reduced in numpy


class GroupedReduction:
    """Per batch: the rule's reduction of every monitored layer and the cosine similarities to the predicted
    classes, from the layers' whole outputs."""

    def __init__(self, profile: CosineProfile, rule: ScoringRule) -> None:
        self.profile = profile
        self.rule = rule
        self.layer_names = profile.layer_names
        self._plan: _Plan | None = None
        self._centroids: dict[tuple[str, ...], torch.Tensor] = {}
        self._host_centroids: dict[tuple[str, ...], np.ndarray] = {}

    def _groups(self, outputs: dict[str, torch.Tensor]) -> tuple[list[tuple[str, ...]], torch.Tensor | None]:
        """Layers grouped by (shape, dtype, device, the rule's reduction key), in forward order; and the order
        that puts the groups' rows back in layer order (None: they already are)."""
        plan = self._planned(outputs)
        return plan.groups, plan.order

    def _planned(self, outputs: dict[str, torch.Tensor]) -> _Plan:
        """The plan for these outputs' shapes, dtypes and devices (cached: a worker sees few batch shapes)."""
        signature = tuple((tuple(outputs[n].shape), outputs[n].dtype, outputs[n].device) for n in self.layer_names)
        if self._plan is None or self._plan.signature != signature:
            by_key: dict[tuple, list[str]] = {}
            for name, (shape, dtype, device) in zip(self.layer_names, signature):
                by_key.setdefault((shape, dtype, device, self.rule.reduction_key(name)), []).append(name)
            groups = [tuple(names) for names in by_key.values()]
            stacked_order = [n for names in groups for n in names]
            index = [stacked_order.index(n) for n in self.layer_names]
            same = stacked_order == list(self.layer_names)
            on_host = self.profile.device.type == "cpu" and all(
                dtype == torch.float32 and device.type == "cpu" for _, dtype, device in signature)
            self._plan = _Plan(signature, groups, None if same else torch.tensor(index, device=self.profile.device),
                               None if same else np.asarray(index, dtype=np.int64), on_host)
        return self._plan

    def _unit_centroids(self, names: tuple[str, ...]) -> torch.Tensor:
        """[G, C, D] the group's unit centroids, stacked once."""
        if names not in self._centroids:
            self._centroids[names] = torch.stack([self.profile.unit_centroids[n] for n in names])
        return self._centroids[names]

    def _unit_centroids_host(self, names: tuple[str, ...]) -> np.ndarray:
        """[G, C, D] the group's unit centroids as one numpy array (the profile is on the CPU)."""
        if names not in self._host_centroids:
            self._host_centroids[names] = self._unit_centroids(names).numpy()
        return self._host_centroids[names]

    def reduce(self, outputs: dict[str, torch.Tensor], classes: np.ndarray, similarities: bool = True,
               on_host: bool | None = None) -> tuple[dict[str, Any], np.ndarray | torch.Tensor | None]:
        """(the rule's reduction per layer, as `rule.reduce` would give it; [B, K] cosine similarities to the
        centroids of `classes` ([B] int64), or None without `similarities`). In numpy when the outputs allow it
        (see `_Plan.on_host`), else in torch on their device; `on_host=False` forces torch (tests compare)."""
        plan = self._planned(outputs)
        if plan.on_host and on_host is not False:
            return self._reduce_host(plan, outputs, classes, similarities)
        targets = torch.from_numpy(classes).to(self.profile.device) if similarities else None
        return self._reduce_torch(plan, outputs, targets, similarities)

    def _reduce_host(self, plan: _Plan, outputs: dict[str, torch.Tensor], classes: np.ndarray, similarities: bool
                     ) -> tuple[dict[str, Any], np.ndarray | None]:
        """In numpy, on zero-copy views of the CPU outputs."""
        reduced: dict[str, Any] = {}
        dots: list[np.ndarray] = []
        norms: list[np.ndarray] = []
        for names in plan.groups:
            arrays = [outputs[n].numpy() for n in names]
            stacked = np.stack(arrays) if len(arrays) > 1 else arrays[0][None]  # [G, B, ...]
            parts, batch = stacked.shape[:2]
            ruled = self.rule.reduce_host(names[0], stacked.reshape(parts * batch, *stacked.shape[2:]))
            reduced.update(zip(names, _split_rows(ruled, parts)))
            if not similarities:
                continue
            flat = stacked.reshape(parts, batch, -1)
            norm = self.rule.output_norms(names[0], ruled)
            norms.append(np.sqrt(last_axis_dots(flat, flat)) if norm is None
                         else np.asarray(norm, dtype=np.float32).reshape(parts, batch))
            # the predicted class's centroid only: one row per item, not C
            dots.append(last_axis_dots(flat, self._unit_centroids_host(names).take(classes, axis=1)))
        if not similarities:
            return reduced, None
        sims = np.concatenate(dots) / np.maximum(np.concatenate(norms), np.float32(1e-12))  # [K, B] in group order
        return reduced, (sims if plan.host_order is None else sims.take(plan.host_order, axis=0)).T

    def _reduce_torch(self, plan: _Plan, outputs: dict[str, torch.Tensor], classes: torch.Tensor | None,
                      similarities: bool) -> tuple[dict[str, Any], torch.Tensor | None]:
        """In torch, on the outputs' device (a GPU, half precision)."""
        groups, order = plan.groups, plan.order
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

"""What a scoring rule is: per-layer terms from one forward pass's features, combined into one score.

A rule is fitted in two steps, both from benign references only:
1. `new_statistics` / `fit`: streaming, mergeable statistics of the features (class means, covariances...)
   and the rule's state computed from them. Statistics support `merge` and `minus`, so k-fold
   cross-fitting fits each fold's complement from one pass.
2. `fit_combination`: how the per-layer terms become one score, from out-of-fold terms (terms of
   references the statistics were not fitted on), e.g. the paper's layer of interest per class.
Scores are benign-likeness: lower is more suspicious. Thresholds are not a rule's business (thresholds.py).

Where the work runs: `reduce` is torch, on the model's device, because it reads whole activations. Everything
after it (`terms`, `combine`) is numpy on the host, on a few hundred numbers per input (why: core/host.py). A
fitted rule's state is numpy for the same reason.

A new rule is one file defining a subclass, plus one line in rules/__init__.py's registry; the artifact
stores whatever `arrays()` returns and the report draws `terms` by layer, so neither needs an edit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from ..host import host

__all__ = ["FitError", "LayerStatistics", "ScoringRule"]


class FitError(ValueError):
    """Benign statistics a rule cannot be fitted on; the message names the class or layer and the fix."""


class LayerStatistics:
    """One mergeable accumulator per layer (any object with update/merge/minus)."""

    def __init__(self, accumulators: dict[str, Any]) -> None:
        self.accumulators = accumulators

    def merge(self, other: LayerStatistics) -> None:
        for name, acc in self.accumulators.items():
            acc.merge(other.accumulators[name])

    def minus(self, other: LayerStatistics) -> LayerStatistics:
        return LayerStatistics({n: acc.minus(other.accumulators[n]) for n, acc in self.accumulators.items()})

    def __getitem__(self, name: str) -> Any:
        return self.accumulators[name]


class ScoringRule(ABC):
    """Base class of every rule. `options` are the rule's own settings (validated by `__init__`)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: what the score is
    term_label: ClassVar[str]  # what each per-layer term is, for the report and the docs
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    per_class_thresholds: ClassVar[bool] = True  # False: scores are comparable across classes (one threshold)
    needs_similarities: ClassVar[bool] = False  # True: `terms` reads the cosine profile, computed for every response

    def __init__(self, layer_names: tuple[str, ...], num_classes: int, options: Mapping[str, Any] | None = None,
                 penultimate: str | None = None) -> None:
        self.layer_names = tuple(layer_names)
        self.num_classes = num_classes
        self.penultimate = penultimate or self.layer_names[-1]
        unknown = sorted(set(options or {}) - set(self.option_defaults))
        if unknown:
            known = ", ".join(self.option_defaults) or "none"
            raise ValueError(f"rule {self.name} has no option(s) {', '.join(unknown)} (known: {known})")
        self.options = {**self.option_defaults, **(options or {})}

    @property
    def term_layers(self) -> tuple[str, ...]:
        """The layers whose terms the score uses, in forward order."""
        return self.layer_names

    @property
    def term_names(self) -> tuple[str, ...]:
        """One name per column of `terms` (what the response's "terms" are keyed by): the term layers, unless
        a rule computes more than one term per layer."""
        return self.term_layers

    # ---- fit ----
    @abstractmethod
    def new_statistics(self, features: dict[str, torch.Tensor]) -> LayerStatistics | None:
        """Empty accumulators shaped for these features (None: the rule needs only the cosine profile)."""

    @abstractmethod
    def update(self, stats: LayerStatistics | None, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Fold one batch of benign features with their true labels into `stats`."""

    @abstractmethod
    def fit(self, stats: LayerStatistics | None, class_names: list[str]) -> None:
        """Compute the rule's state from the statistics; raise FitError naming what is wrong."""

    def reduce(self, name: str, output: torch.Tensor) -> Any:
        """What the rule needs of one layer's output, as small as possible: a tensor or a tuple of tensors (serving
        computes it inside the layer's hook, so the activation itself is not kept). None: nothing of this layer.
        `terms` receives it as numpy (`core.host.host`)."""
        return None

    def reduce_host(self, name: str, output: np.ndarray) -> Any:
        """`reduce` for an output already in host memory (a CPU layer output kept past the forward pass, as a numpy
        view), returning numpy. Why a second form: at serving's small batches a numpy op costs a fraction of a torch
        op's dispatch (core/host.py), so the kept outputs are reduced in numpy (`GroupedReduction`). This default
        goes through `reduce` and is right for any rule; rules override it with the same arithmetic in numpy where
        numpy's rounding does not matter (see `mahalanobis-spread`'s, where it does)."""
        return host(self.reduce(name, torch.from_numpy(output)))

    def reduction_key(self, name: str) -> Hashable:
        """Layers with equal keys and equal output shapes are reduced the same way, row by row, so serving may
        reduce them as one stacked batch (`GroupedReduction`). The default, the layer's own name, never groups:
        a rule opts in by saying which layers its `reduce` treats alike."""
        return name

    def output_norms(self, name: str, reduced: Any) -> torch.Tensor | np.ndarray | None:
        """[B] L2 norm of the layer's whole output when `reduce`'s (or `reduce_host`'s) result already determines
        it, as a tensor or a numpy array like that result (the cosine profile then skips its own pass over the
        activation); None: it does not."""
        return None

    @abstractmethod
    def terms(self, reduced: dict[str, Any], classes: np.ndarray, similarities: np.ndarray | None) -> np.ndarray:
        """[B, len(term_names)] float32 per-layer terms of a batch against the given classes (int64), from
        `reduce`'s output per layer as numpy (`core.host.host`); the [B, K] cosine similarities are given when
        computed, so rules built on them need not recompute them."""

    @abstractmethod
    def fit_combination(self, terms: np.ndarray, labels: np.ndarray, loi: np.ndarray) -> None:
        """Fit how terms combine, on out-of-fold benign terms [N, len(term_names)] with true labels; `loi` [C] is the
        per-class layer of interest from the cosine profile."""

    @abstractmethod
    def combine(self, terms: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """[B] float32 scores from [B, T] terms: benign-likeness, lower is more suspicious."""

    # ---- persistence ----
    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted state as plain arrays (saved in the artifact, never pickled)."""

    @abstractmethod
    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore the fitted state from `arrays()`'s output."""

    def to(self, device: torch.device | str) -> ScoringRule:
        """Move any tensors `reduce` reads to `device` (the rules here read none: their state is numpy)."""
        return self

    @staticmethod
    def check_finite(features: dict[str, torch.Tensor], labels: torch.Tensor, class_names: list[str] | None = None
                     ) -> None:
        """Refuse NaN or infinite activations, naming the layer and the class of the first bad sample."""
        for name, t in features.items():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                c = int(labels[bad.nonzero()[0, 0]])
                label = class_names[c] if class_names else str(c)
                raise FitError(f"layer {name} produced NaN or infinite activations for a reference image of class "
                               f"{label}; check the image and the model's preprocessing (normalisation), or "
                               "monitor other layers with --layers")

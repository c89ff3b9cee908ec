"""The detector: one object that owns the whole rule, split as alibi-detect splits its detectors.

- fit: `DetectorFitter.update` streams benign features (mergeable across shards), `fit` computes the
  statistics of every fold's complement and of all references;
- out-of-fold scores: `update_out_of_fold` scores each reference with the statistics of the folds it was not
  in (k-fold cross-fitting: no image is lost, none scores itself);
- infer_threshold: `detector(policy)` fits the rule's combination and the benign score statistics on the
  out-of-fold results and returns a `Detector`;
- score / predict: `Detector.score` gives each item's per-layer similarities, rule terms, score, threshold
  and verdict.
The model's forward pass is not this module's business: it works on captured features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .capture import LayerCapture
from .grouped import GroupedReduction
from .host import host
from .rules import ScoringRule, create_rule
from .rules.base import FitError, LayerStatistics
from .similarity import CosineProfile, layer_of_interest
from .stats import ClassSums, FoldAssigner
from .thresholds import BenignScores, ThresholdPolicy

__all__ = ["DEFAULT_FOLDS", "Detection", "Detector", "DetectorFitter", "DetectorSpec"]

ROUND_DECIMALS = 6  # in responses
# Cross-fitting folds. Each out-of-fold score comes from statistics fitted on (k-1)/k of the references, a
# little noisier than the detector that serves (fitted on all), so out-of-fold scores run slightly extreme and
# the threshold slightly loose: on GTSRB, 10 folds instead of 5 moved the FPR delivered on held-out images
# about 0.1 point up towards the target, 20 little further (bench/reference_share.py, docs/method.md).
DEFAULT_FOLDS = 10


@dataclass(frozen=True)
class DetectorSpec:
    """Everything that defines a detector before it sees data: rule, its options, layers, classes, folds."""

    rule: str
    layer_names: tuple[str, ...]
    num_classes: int
    loi_search_start: int
    penultimate: str
    rule_options: Mapping[str, Any] = field(default_factory=dict)
    folds: int = DEFAULT_FOLDS

    def new_rule(self) -> ScoringRule:
        return create_rule(self.rule, self.layer_names, self.num_classes, dict(self.rule_options), self.penultimate)


@dataclass
class Detection:
    """Per-item results of one batch, numpy arrays on the host."""

    predicted: np.ndarray  # [B] int64 class used for scoring
    similarities: np.ndarray | None  # [B, K] cosine similarity to the predicted class's centroid per layer
    terms: np.ndarray  # [B, T] the rule's per-layer terms
    scores: np.ndarray  # [B] float32
    thresholds: np.ndarray  # [B] float32
    layer_of_interest: np.ndarray  # [B] index into layer_names
    poisoned: np.ndarray  # [B] bool

    def items(self, layer_names: tuple[str, ...], term_names: tuple[str, ...], compact: bool = False) -> list[dict]:
        """JSON-ready annotations for the whole batch: one conversion to Python lists, not one per value.
        With `compact`, only the verdict, score, threshold and layer of interest. Values are rounded to 6
        decimals: short float reprs keep the JSON small and cheap to write, with no loss that matters."""
        with_sims = self.similarities is not None and not compact
        columns = [self.scores[:, None], self.thresholds[:, None]]
        if not compact:
            columns += [self.similarities, self.terms] if with_sims else [self.terms]
        rows = _rounded(np.concatenate(columns, axis=1))  # one conversion for every number of the batch
        poisoned, lois = self.poisoned.tolist(), self.layer_of_interest.tolist()
        k = len(layer_names)
        notes = []
        for i, row in enumerate(rows):
            note = {"poisoned": poisoned[i], "score": row[0], "threshold": row[1],
                    "layer_of_interest": layer_names[lois[i]]}
            if not compact:
                if with_sims:
                    note["similarities"] = dict(zip(layer_names, row[2:2 + k]))
                note["terms"] = dict(zip(term_names, row[2 + k:] if with_sims else row[2:]))
            notes.append(note)
        return notes


class Detector:
    """A fitted detector: build it once per worker (from an artifact) and reuse it for every batch."""

    def __init__(self, spec: DetectorSpec, profile: CosineProfile, rule: ScoringRule, loi: np.ndarray,
                 benign: BenignScores, policy: ThresholdPolicy, sim_mean: np.ndarray, sim_std: np.ndarray,
                 counts: np.ndarray) -> None:
        self.spec = spec
        self.layer_names: tuple[str, ...] = spec.layer_names
        self.num_classes: int = spec.num_classes
        self.profile = profile
        self.rule = rule
        self.loi = np.asarray(loi, dtype=np.int64)
        self.benign = benign
        self.sim_mean, self.sim_std, self.counts = sim_mean, sim_std, counts
        self._grouped: GroupedReduction | None = None
        self.set_policy(policy)

    def set_policy(self, policy: ThresholdPolicy) -> None:
        """Threshold under another policy (serving's model-config.yaml override): no refit needed."""
        self.policy = policy
        self.thresholds = self.benign.thresholds(policy)
        self._thresholds32 = self.thresholds.astype(np.float32)

    def to(self, device: torch.device | str) -> Detector:
        self.profile = CosineProfile(self.layer_names, self.profile.centroids, device)
        self._grouped = None
        self.rule.to(device)
        return self

    def computes_similarities(self, similarities: bool) -> bool:
        """Whether the cosine profile is computed: when the response shows it, or the rule is built on it."""
        return similarities or self.rule.needs_similarities

    def reducer(self, similarities: bool = True):
        """`reduce(name, output)` for `LayerCapture(reducer=...)`: each layer's output is reduced to what
        scoring needs inside its hook (a few numbers per input), so no activation is kept past its layer.
        `similarities=False` skips the cosine profile when the rule does not need it (compact responses)."""
        cosine = self.computes_similarities(similarities)

        def reduce(name: str, output: torch.Tensor) -> tuple:
            ruled = self.rule.reduce(name, output)
            if not cosine:
                return None, ruled
            return self.profile.reduce(name, output, self.rule.output_norms(name, ruled)), ruled

        return reduce

    def _classes(self, predicted: torch.Tensor | np.ndarray) -> np.ndarray:
        """The predicted classes as int64 on the host, refused when outside the calibrated ones."""
        classes = host(predicted).astype(np.int64, copy=False)
        listed = classes.tolist()  # Python's min and max: cheaper than numpy's on a few values
        if listed and (min(listed) < 0 or max(listed) >= self.num_classes):
            raise ValueError(f"predicted class outside 0..{self.num_classes - 1}")
        return classes

    def _on_device(self, classes: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(classes).to(self.profile.device)

    def _verdicts(self, ruled: dict[str, Any], classes: np.ndarray, sims: torch.Tensor | None) -> Detection:
        """Terms, scores and verdicts on the host, from the rule's reductions and the similarities (torch)."""
        sims_np = None if sims is None else host(sims)
        terms = self.rule.terms({n: host(r) for n, r in ruled.items()}, classes, sims_np)
        scores = self.rule.combine(terms, classes)
        thresholds = self._thresholds32.take(classes)
        return Detection(predicted=classes, similarities=sims_np, terms=terms, scores=scores, thresholds=thresholds,
                         layer_of_interest=self.loi.take(classes), poisoned=scores < thresholds)

    def score_reduced(self, reduced: dict[str, tuple], predicted: torch.Tensor) -> Detection:
        """Verdicts for one batch from its reduced layer outputs (see `reducer`) and the predicted classes."""
        classes = self._classes(predicted)
        with_sims = all(reduced[n][0] is not None for n in self.layer_names)
        sims = self.profile.similarities_from({n: reduced[n][0] for n in self.layer_names}, self._on_device(classes)) \
            if with_sims else None
        return self._verdicts({n: reduced[n][1] for n in self.layer_names}, classes, sims)

    def score_outputs(self, outputs: dict[str, torch.Tensor], predicted: torch.Tensor, similarities: bool = True,
                      on_host: bool | None = None) -> Detection:
        """Verdicts for one batch from its monitored layers' whole outputs, reduced after the forward pass with
        layers of equal shape together (`GroupedReduction`: the cheaper way at small batches). The same
        verdicts as `score_reduced` on the hooks' reductions. `on_host=False` reduces in torch even where numpy
        could (for comparisons)."""
        classes = self._classes(predicted)
        if self._grouped is None:
            self._grouped = GroupedReduction(self.profile, self.rule)
        with_sims = self.computes_similarities(similarities)
        ruled, sims = self._grouped.reduce(outputs, classes, with_sims, on_host)
        return self._verdicts(ruled, classes, sims)

    def score_capture(self, capture: LayerCapture, predicted: torch.Tensor, similarities: bool = True) -> Detection:
        """Verdicts for the batch `capture` watched, whichever way it kept the layers (reduced in the hooks or
        whole, see `LayerCapture(keep_whole_up_to=...)`)."""
        features = capture.features()
        if capture.kept_whole:
            return self.score_outputs(features, predicted, similarities)
        return self.score_reduced(features, predicted)

    def score(self, features: dict[str, torch.Tensor], predicted: torch.Tensor) -> Detection:
        """Verdicts for one batch from its captured layer outputs and the classes the model predicted."""
        reduce = self.reducer()
        return self.score_reduced({n: reduce(n, features[n]) for n in self.layer_names}, predicted)

    def predict(self, features: dict[str, torch.Tensor], predicted: torch.Tensor) -> torch.Tensor:
        """[B] bool: flagged as backdoor-triggered."""
        return self.score(features, predicted).poisoned

    # ---- persistence: plain arrays, read back by `from_arrays` ----
    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"profile/{k}": v for k, v in self.profile.arrays().items()}
        out.update({f"rule/{k}": np.asarray(v) for k, v in self.rule.arrays().items()})
        out.update({
            "calibration/loi": self.loi, "calibration/sim_mean": self.sim_mean, "calibration/sim_std": self.sim_std,
            "calibration/counts": self.counts, "calibration/benign_scores": self.benign.scores,
            "calibration/benign_labels": self.benign.labels,
        })
        return out

    @classmethod
    def from_arrays(cls, spec: DetectorSpec, arrays: Mapping[str, np.ndarray], policy: ThresholdPolicy,
                    device: torch.device | str = "cpu") -> Detector:
        def group(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        profile = CosineProfile.from_arrays(spec.layer_names, group("profile/"), device)
        rule = spec.new_rule()
        rule.load_arrays(group("rule/"))
        rule.to(device)
        cal = group("calibration/")
        benign = BenignScores(cal["benign_scores"], cal["benign_labels"], spec.num_classes, rule.per_class_thresholds)
        return cls(spec, profile, rule, cal["loi"], benign, policy, cal["sim_mean"], cal["sim_std"], cal["counts"])


class DetectorFitter:
    """Fits a `Detector` from benign features in two streaming passes over the same references.

    Pass 1 (`update`): per-fold class sums of flattened features (the cosine profile) and the rule's own
    statistics, by true class. `fit()` then builds, for each fold, the profile and rule from all other folds
    (one fold: from all references, the paper's in-sample way). Pass 2 (`update_out_of_fold`): each reference
    is scored by the models of the folds it was not in, against the class the model predicts for it, as
    serving scores. `detector(policy)` finishes: layer of interest per class, the rule's combination and the
    benign score statistics, all from out-of-fold values.
    """

    def __init__(self, spec: DetectorSpec, class_names: list[str] | None = None) -> None:
        self.spec = spec
        self.class_names = class_names or [str(i) for i in range(spec.num_classes)]
        self._folds = FoldAssigner(spec.num_classes, spec.folds)
        self._profile_sums: list[dict[str, ClassSums]] | None = None
        self._rule_stats: list[LayerStatistics | None] = []
        self._fold_models: list[tuple[CosineProfile, ScoringRule]] = []
        self._full: tuple[CosineProfile, ScoringRule] | None = None
        self._oof: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._oof_folds: FoldAssigner | None = None

    # ---- pass 1 ----
    def update(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        labels = labels.to(torch.int64)
        ScoringRule.check_finite(features, labels, self.class_names)
        folds = self._folds.assign(labels.cpu().numpy())
        if self._profile_sums is None:
            rule = self.spec.new_rule()
            self._profile_sums = [CosineProfile.new_sums(features, self.spec.num_classes)
                                  for _ in range(self.spec.folds)]
            self._rule_stats = [rule.new_statistics(features) for _ in range(self.spec.folds)]
        rule = self.spec.new_rule()
        for f in np.unique(folds):
            rows = torch.from_numpy(np.nonzero(folds == f)[0])
            part = {n: t[rows.to(t.device)] for n, t in features.items()}
            part_labels = labels[rows.to(labels.device)]
            CosineProfile.update_sums(self._profile_sums[f], part, part_labels)
            rule.update(self._rule_stats[f], part, part_labels)

    def merge(self, other: DetectorFitter) -> None:
        """Add another shard's pass-1 statistics (same spec, disjoint references)."""
        if other._profile_sums is None:
            return
        if self._profile_sums is None:
            self._profile_sums, self._rule_stats = other._profile_sums, other._rule_stats
            self._folds.seen += other._folds.seen
            return
        for mine, theirs in zip(self._profile_sums, other._profile_sums):
            for name, acc in mine.items():
                acc.merge(theirs[name])
        for mine, theirs in zip(self._rule_stats, other._rule_stats):
            if mine is not None:
                mine.merge(theirs)
        self._folds.seen += other._folds.seen

    @property
    def seen_per_class(self) -> np.ndarray:
        return self._folds.seen.copy()

    def fit(self, device: torch.device | str = "cpu") -> None:
        """Fit the full model and each fold's complement model from the pass-1 statistics."""
        if self._profile_sums is None:
            raise FitError("the reference data is empty")
        total_sums = {n: _sum(s[n] for s in self._profile_sums) for n in self.spec.layer_names}
        stats = [s for s in self._rule_stats if s is not None]
        total_stats = None
        if stats:
            total_stats = stats[0].minus(stats[0])  # an empty copy of the same shape
            for s in stats:
                total_stats.merge(s)
        self._full = self._model(total_sums, total_stats, device)
        if self.spec.folds == 1:
            self._fold_models = [self._full]
            return
        self._fold_models = []
        for f in range(self.spec.folds):
            sums = {n: total_sums[n].minus(self._profile_sums[f][n]) for n in self.spec.layer_names}
            rest = total_stats.minus(self._rule_stats[f]) if total_stats is not None else None
            self._fold_models.append(self._model(sums, rest, device))

    def _model(self, sums: dict[str, ClassSums], stats: LayerStatistics | None, device) -> tuple:
        rule = self.spec.new_rule()
        rule.fit(stats, self.class_names)
        rule.to(device)
        return CosineProfile.from_sums(self.spec.layer_names, sums, device), rule

    # ---- pass 2 ----
    def update_out_of_fold(self, features: dict[str, torch.Tensor], labels: torch.Tensor,
                           predicted: torch.Tensor | None = None) -> None:
        """Score one batch of the same references, in the same order as pass 1, with out-of-fold models.

        `predicted` (the model's classes for these references) makes the scores the ones serving would give,
        for rules with one threshold for all classes: serving scores every input against the class the model
        predicts, so a threshold inferred from scores against the true class would not deliver the asked
        false-positive rate on a model that misreads some benign inputs. Rules with per-class thresholds
        (the paper's) keep scoring each reference against its own class. The class similarity curves (and
        so the layer of interest) are always by true class."""
        if not self._fold_models:
            raise RuntimeError("call fit() after the first pass")
        if self._oof_folds is None:
            self._oof_folds = FoldAssigner(self.spec.num_classes, self.spec.folds)
        labels = labels.to(torch.int64)
        if predicted is None or self.spec.new_rule().per_class_thresholds:
            # per-class thresholds are estimated from each class's own images: a few misread references of
            # another class would inflate a small class's spread and disarm its threshold
            predicted = labels
        predicted = predicted.to(labels.device, torch.int64)
        folds = self._oof_folds.assign(labels.cpu().numpy())
        for f in np.unique(folds):
            rows = torch.from_numpy(np.nonzero(folds == f)[0])
            part = {n: t[rows.to(t.device)] for n, t in features.items()}
            part_labels, part_pred = labels[rows.to(labels.device)], predicted[rows.to(predicted.device)]
            profile, rule = self._fold_models[f]
            sims_true = profile.similarities(part, part_labels)
            sims_pred = sims_true if torch.equal(part_labels, part_pred) else profile.similarities(part, part_pred)
            reduced = {n: host(rule.reduce(n, t)) for n, t in part.items()}
            sims_true_np, pred_np = host(sims_true), host(part_pred)
            sims_pred_np = sims_true_np if sims_pred is sims_true else host(sims_pred)
            terms = rule.terms(reduced, pred_np, sims_pred_np)
            self._oof.append((sims_true_np, terms, host(part_labels), pred_np))

    def detector(self, policy: ThresholdPolicy) -> Detector:
        """Infer the combination and thresholds from the out-of-fold results; return the fitted detector."""
        if not self._oof or self._full is None:
            raise RuntimeError("run both passes before asking for the detector")
        sims = np.concatenate([part[0] for part in self._oof])
        terms = np.concatenate([part[1] for part in self._oof])
        labels = np.concatenate([part[2] for part in self._oof])
        scored_as = np.concatenate([part[3] for part in self._oof])
        c, k = self.spec.num_classes, len(self.spec.layer_names)
        counts = np.bincount(labels, minlength=c)
        sim_mean = np.zeros((c, k))
        sim_std = np.zeros((c, k))
        for cls in range(c):
            mine = sims[labels == cls]
            if len(mine):
                sim_mean[cls], sim_std[cls] = mine.mean(axis=0), mine.std(axis=0)
        loi = np.array([layer_of_interest(sim_mean[cls], self.spec.loi_search_start) for cls in range(c)],
                       dtype=np.int64)
        profile, rule = self._full
        rule.fit_combination(terms, scored_as, loi)
        scores = rule.combine(terms.astype(np.float32), scored_as)
        benign = BenignScores(scores, scored_as, c, rule.per_class_thresholds)
        return Detector(self.spec, profile, rule, loi, benign, policy, sim_mean, sim_std, counts)


def _rounded(values: np.ndarray) -> list:
    return np.round(values.astype(np.float64), ROUND_DECIMALS).tolist()


def _sum(accumulators) -> ClassSums:
    items = list(accumulators)
    total = items[0].minus(items[0])
    for acc in items:
        total.merge(acc)
    return total

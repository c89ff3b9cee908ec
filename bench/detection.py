"""Detection quality on real data: which scoring rule should be the default, and how it compares to peers.

Why this protocol (issue 11): the default rule must be chosen by measurement, with the threshold a user
actually gets. Per dataset (cifar10_full: the well-trained CIFAR-10 ResNet-20 zoo, from scratch and by
poisoned fine-tuning; cifar10_vgg: the well-trained CIFAR-10 fast-VGG zoo, from scratch; gtsrb: the compact-VGG
zoo; cifar10: the weakly trained 6-epoch ResNet-20 zoo; whichever models are trained) and per model:

  1. split the test set (seed): a per-class share of it is the benign reference set (calibration, and every
     peer's benign statistics) and is never scored; the model never trained on any test image;
  2. of the rest, a fixed random subset of ``--n-benign`` images is the held-out benign test set, and
     ``--n-poison`` other-than-target images with the model's own trigger are the attacks. TPR counts
     successful attacks only (predicted as the target, true label not the target), as the paper does;
  3. every rule configuration (`CONFIGS`) is calibrated as shipped (`layerguard.tooling.calibration`:
     k-fold cross-fitted benign scores, 10 folds; the paper's notebook is 1 fold, in-sample), all of them
     from one pair of passes (`calibrate_many`; each artifact equals `calibrate`'s for that configuration);
  4. one forward pass per scored image, hooks on every configuration's layers and the peers' penultimate
     layer, scores the image under every configuration. Thresholds: ``target_fpr`` 1% and 5% from the
     cross-fitted reference scores (`detector.benign.thresholds(policy)`, no refit), the 1% target held as
     an upper bound with 95% confidence (``fpr_confidence``), and tau 2.5; the FPR they deliver is measured
     on the held-out benign images. AUROC uses the per-class standardised score
     z = (score - mean_c) / std_c, which is what every threshold cuts;
  5. peers (bench/peers.py): penultimate Mahalanobis (one pass), SCALE-UP (6 passes) and STRIP (1 + N
     passes) on capped prefixes of the same images (``--n-scaleup``, ``--n-strip``), thresholded at the
     1% / 5% quantile of their scores on reference images (equal target FPR), plus the TPR read off their
     ROC at exactly 1% / 5% FPR.

Writes bench/results/detection_<dataset>.json (one per dataset); bench/run_all.py renders docs/benchmarks.md.

Usage:  .venv/bin/python bench/detection.py [--datasets cifar10_full,cifar10_vgg,gtsrb,cifar10] [--models badnets,...]
        [--quick]

A model row is a name (``badnets``; in cifar10_full ``badnets_scratch``, ``badnets_ft``) mapped to a weights
stem in bench/weights and the attack it carries (`ModelRow`); ``--models`` takes row names or attack names
(``badnets`` selects every BadNets row).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attacks import ATTACKS as ATTACK_CLASSES  # noqa: E402
from bench.attacks import TARGET, Attack, attack_from_params, build_attack  # noqa: E402
from bench.benchutil import REPO_ROOT, RESULTS_DIR, command_line, log, machine_info, now_utc, write_result  # noqa: E402
from bench.data import default_data_path, default_gtsrb_path, load_cifar, load_gtsrb, to_tensor  # noqa: E402
from bench.peers import Mahalanobis, ScaleUp, Strip  # noqa: E402
from layerguard.core.capture import LayerCapture  # noqa: E402
from layerguard.core.detector import DEFAULT_FOLDS  # noqa: E402
from layerguard.core.layers import default_plan, discover_layers  # noqa: E402
from layerguard.core.rules.mahalanobis_spread import SPREAD_SUFFIX  # noqa: E402
from layerguard.core.thresholds import BenignScores, ThresholdPolicy, references_for_confidence  # noqa: E402
from layerguard.tooling.calibration import CalibrationConfig, calibrate_many  # noqa: E402
from layerguard.tooling.evaluation import auroc  # noqa: E402

ATTACKS = ["badnets", "blended", "wanet", "sig", "adapblend"]
MODEL_ORDER = ["clean", *ATTACKS]
TARGET_FPRS = (0.01, 0.05)
BOUND_CONFIDENCE = 0.95  # `fpr_confidence` of the bounded rows: the 1% target held as an upper bound
TAU = 2.5
# FPR grid at which ROC curves are stored in the JSON (plots are redrawn from it, never from raw scores).
ROC_GRID = np.unique(np.r_[0.0, np.logspace(-3, 0, 61)])
PEER_LAYER = "pool"  # the zoo models' pooled penultimate features (ResNet-20: 64-d, compact VGG: 256-d)
PEER_MAHALANOBIS = "Mahalanobis (peer)"
PEERS = [PEER_MAHALANOBIS, "SCALE-UP", "STRIP"]


@dataclass(frozen=True)
class RuleConfig:
    """One calibration of layerguard to compare: rule, its options, folds, window, calibration policy."""

    key: str
    label: str
    rule: str
    options: dict[str, str] = field(default_factory=dict)
    folds: int = DEFAULT_FOLDS
    exclude_logits: bool = False
    tau: float | None = None  # the calibration policy (tau 2.5 for the paper's notebook, else target FPR 1%)

    @property
    def policy(self) -> ThresholdPolicy:
        return ThresholdPolicy.from_options(tau=self.tau)


CONFIGS: list[RuleConfig] = [
    RuleConfig("cosine-loi/paper", "cosine-loi, paper notebook (1 fold, tau 2.5)", "cosine-loi", folds=1, tau=TAU),
    RuleConfig("cosine-loi", f"cosine-loi ({DEFAULT_FOLDS} folds)", "cosine-loi"),
    RuleConfig("cosine-loi/no-logits", "cosine-loi, exclude-logits", "cosine-loi", exclude_logits=True),
    RuleConfig("mahalanobis", "mahalanobis (all layers, predicted)", "mahalanobis",
               {"layers": "all", "reference": "predicted"}),
    RuleConfig("mahalanobis/no-logits", "mahalanobis, exclude-logits", "mahalanobis",
               {"layers": "all", "reference": "predicted"}, exclude_logits=True),
    RuleConfig("mahalanobis/penultimate", "mahalanobis, layers=penultimate", "mahalanobis",
               {"layers": "penultimate", "reference": "predicted"}),
    RuleConfig("mahalanobis/nearest", "mahalanobis, reference=nearest", "mahalanobis",
               {"layers": "all", "reference": "nearest"}),
    RuleConfig("mahalanobis-diag", "mahalanobis-diag (+ worst layer's per-class z)", "mahalanobis-diag",
               {"layers": "all", "reference": "predicted"}),
    RuleConfig("mahalanobis-diag/no-logits", "mahalanobis-diag, exclude-logits", "mahalanobis-diag",
               {"layers": "all", "reference": "predicted"}, exclude_logits=True),
    RuleConfig("mahalanobis-spread", "mahalanobis-spread (+ worst layer's channel-spread z)", "mahalanobis-spread",
               {"layers": "all", "reference": "predicted"}),
    RuleConfig("mahalanobis-spread/no-logits", "mahalanobis-spread, exclude-logits", "mahalanobis-spread",
               {"layers": "all", "reference": "predicted"}, exclude_logits=True),
    RuleConfig("mahalanobis-spread-loi", "mahalanobis-spread-loi (+ the paper's score, per-class z)",
               "mahalanobis-spread-loi", {"layers": "all", "reference": "predicted"}),
]


@dataclass(frozen=True)
class ModelRow:
    """One model of a dataset's table: its weights, the attack it carries, and how it was trained."""

    stem: str  # weights file stem in bench/weights (<stem>.pt and <stem>.json)
    attack: str  # "clean" or a key of ATTACKS
    route: str = ""  # short training route shown next to the attack ("from scratch", "fine-tuned"); "" = the zoo's one


@dataclass(frozen=True)
class Dataset:
    key: str
    label: str
    prefix: str  # weights file prefix of the default rows (<prefix><attack>): "" (CIFAR-10 zoo) or "gtsrb_"
    loader: Callable[[Path | None], dict[str, np.ndarray]]
    default_path: Callable[[], Path]
    ref_share: float  # share of each class's test images kept as benign references
    ref_min: int  # ... but at least this many
    rows: dict[str, ModelRow] | None = None  # None: one row per MODEL_ORDER name, weights <prefix><name>

    def model_rows(self) -> dict[str, ModelRow]:
        """{row name: ModelRow} in table order."""
        if self.rows is not None:
            return dict(self.rows)
        return {name: ModelRow(self.prefix + name, name) for name in MODEL_ORDER}

    def stem(self, row: str) -> str:
        """The weights stem of a row (a row no longer defined keeps the default naming)."""
        spec = self.model_rows().get(row)
        return spec.stem if spec is not None else self.prefix + row

    def select(self, wanted: list[str]) -> dict[str, ModelRow]:
        """The rows named in ``wanted`` by row name or by attack (``badnets`` selects every BadNets row)."""
        keep = set(wanted)
        return {r: spec for r, spec in self.model_rows().items() if r in keep or spec.attack in keep}


FROM_SCRATCH, FINE_TUNED = "from scratch", "fine-tuned"
# The well-trained CIFAR-10 zoo (bench/README.md): 50k training images, ResNet-20, two routes. From scratch
# (recipe cifar_full, 45 epochs): clean, BadNets, Blended; poisoned fine-tuning of cifar_full_clean (recipe
# cifar_ft, 6 epochs, WaNet 12): every attack. Rows "<attack>_scratch" and "<attack>_ft", so that a row name is
# never an attack name: --models badnets selects both BadNets rows, --models badnets_scratch one.
CIFAR_FULL_ROWS = {
    "clean": ModelRow("cifar_full_clean", "clean"),
    "badnets_scratch": ModelRow("cifar_full_badnets", "badnets", FROM_SCRATCH),
    "badnets_ft": ModelRow("cifar_ft_badnets", "badnets", FINE_TUNED),
    "blended_scratch": ModelRow("cifar_full_blended", "blended", FROM_SCRATCH),
    "blended_ft": ModelRow("cifar_ft_blended", "blended", FINE_TUNED),
    "wanet_scratch": ModelRow("cifar_full_wanet", "wanet", FROM_SCRATCH),
    "wanet_ft": ModelRow("cifar_ft_wanet", "wanet", FINE_TUNED),
    "sig_scratch": ModelRow("cifar_full_sig", "sig", FROM_SCRATCH),
    "sig_ft": ModelRow("cifar_ft_sig", "sig", FINE_TUNED),
    "adapblend_ft": ModelRow("cifar_ft_adapblend", "adapblend", FINE_TUNED),
}

# References: 20% of each class's test images. Two measured reasons (docs/benchmarks.md, "Protocol"): the
# delivered FPR of a threshold set from n references spreads by sqrt(p(1-p)/n) around the target (0.31 points
# at 1% with 1,000 references, 0.22 with 2,000), and one threshold for all classes needs the references' class
# mix to be the traffic's: with 10% and a floor of 10, GTSRB's 13 smallest classes (60-90 test images) were
# over-represented and the delivered FPR fell to 0.5%; at 20% every GTSRB class has at least 12 (> 10, the
# least calibration takes), so the floor never binds and the mix is the test set's.
REF_SHARE = 0.2
DATASETS = {
    "cifar10_full": Dataset("cifar10_full", "CIFAR-10, well-trained ResNet-20", "cifar_full_", load_cifar,
                            default_data_path, REF_SHARE, 20, rows=CIFAR_FULL_ROWS),
    # the fast VGG (bench/models.py FastCifarVGG, recipe cifar_vgg): every attack from scratch, 20 epochs in bf16
    "cifar10_vgg": Dataset("cifar10_vgg", "CIFAR-10, well-trained fast VGG", "cifar_vgg_", load_cifar,
                           default_data_path, REF_SHARE, 20),
    "gtsrb": Dataset("gtsrb", "GTSRB", "gtsrb_", load_gtsrb, default_gtsrb_path, REF_SHARE, 10),
    "cifar10": Dataset("cifar10", "CIFAR-10", "", load_cifar, default_data_path, REF_SHARE, 20),
}
DEFAULT_DATASETS = "cifar10_full,cifar10_vgg,gtsrb,cifar10"


# ---- protocol helpers (unit-tested in tests/test_peers.py) ----------------------------------------------
def reference_counts(labels: np.ndarray, share: float, minimum: int) -> np.ndarray:
    """Reference images per class: ``share`` of the class's images, at least ``minimum`` (and at most all
    but one, so every class keeps a scored image)."""
    counts = np.bincount(labels)
    want = np.maximum(np.round(share * counts).astype(int), minimum)
    return np.minimum(want, np.maximum(counts - 1, 0))


def split_reference(labels: np.ndarray, per_class: int | np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference indices sorted by class then position, the other indices in a seeded random order).

    ``per_class`` is one count for every class or an array of counts indexed by class."""
    rng = np.random.default_rng(seed)
    ref = []
    for c in np.unique(labels):
        k = int(per_class if np.isscalar(per_class) else per_class[c])
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {k} reference images")
        ref.append(np.sort(rng.choice(idx, size=k, replace=False)))
    ref_idx = np.concatenate(ref)
    rest = np.setdiff1d(np.arange(len(labels)), ref_idx)
    return ref_idx, rng.permutation(rest)


def reference_threshold(ref_scores: np.ndarray, fpr: float) -> float:
    """Threshold flagging (score < t) about ``fpr`` of the reference benign scores."""
    return float(np.quantile(np.asarray(ref_scores, dtype=np.float64), fpr))


def rates_at(threshold: float | np.ndarray, benign: np.ndarray, attacks: np.ndarray) -> dict[str, float]:
    """Measured FPR over benign scores and TPR over attack scores when flagging score < threshold."""
    return {
        "fpr": float(np.mean(benign < threshold)) if len(benign) else float("nan"),
        "tpr": float(np.mean(attacks < threshold)) if len(attacks) else float("nan"),
    }


def tpr_at_fpr(benign: np.ndarray, attacks: np.ndarray, fpr: float | np.ndarray) -> np.ndarray:
    """TPR of the best threshold whose FPR on these benign scores is at most ``fpr`` (ROC read-off)."""
    b = np.sort(np.asarray(benign, dtype=np.float64))
    a = np.asarray(attacks, dtype=np.float64)
    fpr = np.atleast_1d(np.asarray(fpr, dtype=np.float64))
    if len(b) == 0 or len(a) == 0:
        return np.full(fpr.shape, np.nan)
    k = np.floor(fpr * len(b) + 1e-9).astype(int)  # at most k benign scores may lie below the threshold
    thr = np.where(k >= len(b), np.inf, b[np.minimum(k, len(b) - 1)])
    return np.mean(a[None, :] < thr[:, None], axis=1)


def roc_summary(benign: np.ndarray, attacks: np.ndarray | None) -> dict[str, Any]:
    """AUROC, the oracle TPR at exactly 1% / 5% FPR and the ROC on ROC_GRID (empty without attacks)."""
    if attacks is None or not len(attacks):
        return {}
    out: dict[str, Any] = {"auroc": auroc(benign, attacks)}
    for q in TARGET_FPRS:
        out[f"roc_tpr_at_{q:g}"] = float(tpr_at_fpr(benign, attacks, q)[0])
    out["roc"] = {"fpr": ROC_GRID.round(6).tolist(), "tpr": tpr_at_fpr(benign, attacks, ROC_GRID).round(5).tolist()}
    return out


def summarise(
    ref: np.ndarray, benign: np.ndarray, attacks: np.ndarray | None, passes: int, seconds: float
) -> dict[str, Any]:
    """A peer on one model (lower score = more suspicious): thresholds at the 1% / 5% quantile of its
    reference scores, the FPR and TPR they deliver, and the ROC."""
    out: dict[str, Any] = {
        "forward_passes": passes,
        "seconds": round(seconds, 1),
        "n_reference": int(len(ref)),
        "n_benign": int(len(benign)),
        "n_attacks": int(len(attacks)) if attacks is not None else 0,
    }
    for q in TARGET_FPRS:
        thr = reference_threshold(ref, q)
        out[f"ref_fpr_{q:g}"] = {"threshold": thr, **rates_at(thr, benign, attacks if attacks is not None
                                                              else np.zeros(0))}
    out.update(roc_summary(benign, attacks))
    return out


def rule_rates(scores: np.ndarray, pred: np.ndarray, thresholds: np.ndarray, success: np.ndarray | None,
               att_scores: np.ndarray | None, att_pred: np.ndarray | None) -> dict[str, float]:
    """FPR over benign and TPR over successful attacks under per-class thresholds (flag score < thr[pred])."""
    out = {"fpr": float(np.mean(scores < thresholds[pred])) if len(scores) else float("nan"), "tpr": float("nan")}
    if att_scores is not None and success is not None and success.any():
        out["tpr"] = float(np.mean((att_scores < thresholds[att_pred])[success]))
    return out


def oof_mahalanobis(features: torch.Tensor, labels: np.ndarray, num_classes: int, folds: int, seed: int
                    ) -> np.ndarray:
    """Out-of-fold peer-Mahalanobis scores of the reference images (each scored by a fit without it), so its
    reference quantile is not the optimistic in-sample one."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=int)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold[idx] = np.arange(len(idx)) % folds
    out = np.zeros(len(labels))
    for f in range(folds):
        test = fold == f
        maha = Mahalanobis(PEER_LAYER).fit(features[~test], labels[~test], num_classes)
        out[test] = maha.score_features(features[test], labels[test])
    return out


# ---- running ------------------------------------------------------------------------------------------
def _batches(x: np.ndarray, y: np.ndarray, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(x), batch):
        xb = to_tensor(x[i : i + batch]).contiguous(memory_format=torch.channels_last)
        yield xb, torch.from_numpy(y[i : i + batch])


def attack_from_meta(name: str, meta: dict[str, Any] | None) -> Attack:
    """The attack ``name`` (a key of ATTACKS, not a row name) with the settings the model was trained with
    (``meta["attack"]`` of the weights' json); without a record, the attack's class defaults. Unknown keys in
    the record are ignored; a record of another attack is an error (the row points at the wrong weights)."""
    params = (meta or {}).get("attack")
    if params:
        if params.get("name", name) != name:
            raise ValueError(f"the weights' record holds attack {params['name']!r}, the row expects {name!r}")
        accepted = inspect.signature(ATTACK_CLASSES[name].__init__).parameters
        return attack_from_params({"name": name, **{k: v for k, v in params.items() if k in accepted}})
    return build_attack(name)


@torch.no_grad()
def forward_all(model: torch.nn.Module, detectors: dict[str, Any], x: np.ndarray, batch: int
                ) -> dict[str, Any]:
    """One forward pass per batch with hooks on every detector's layers and the peer layer; every detector
    scores the same features. Returns predictions, per-detector scores / terms / similarities, peer features."""
    names = tuple(dict.fromkeys([n for d in detectors.values() for n in d.layer_names] + [PEER_LAYER]))
    pred, pen = [], []
    parts: dict[str, dict[str, list[np.ndarray]]] = {k: {"scores": [], "terms": [], "sims": []} for k in detectors}
    with LayerCapture(model, names) as cap:
        for xb, _ in _batches(x, np.zeros(len(x), dtype=np.int64), batch):
            logits, feats = cap.run(xb)
            p = logits.argmax(dim=1)
            pred.append(p.numpy())
            pen.append(feats[PEER_LAYER].float().reshape(len(xb), -1).clone())
            for key, det in detectors.items():
                d = det.score({n: feats[n] for n in det.layer_names}, p)
                parts[key]["scores"].append(d.scores)
                parts[key]["terms"].append(d.terms)
                parts[key]["sims"].append(d.similarities)
    return {"pred": np.concatenate(pred), "pen": torch.cat(pen),
            **{key: {k: np.concatenate(v) for k, v in p.items()} for key, p in parts.items()}}


def rule_result(cfg: RuleConfig, det: Any, ref: dict[str, Any], ben: dict[str, Any], att: dict[str, Any] | None,
                success: np.ndarray | None, layers: tuple[str, ...]) -> dict[str, Any]:
    """One configuration on one model: delivered FPR / TPR at each target FPR and at tau 2.5, AUROC, ROC.

    Diagnostic ``target_fpr_by_predicted``: the same policies with thresholds inferred instead from the
    reference images scored against their *predicted* class by the final detector (in-sample), as serving
    scores every input; calibration scores references against their true class."""
    b, a = ben[cfg.key], att[cfg.key] if att is not None else None
    z_ben = det.benign.standardize(b["scores"], ben["pred"])
    z_att = det.benign.standardize(a["scores"], att["pred"])[success] if a is not None else None
    out: dict[str, Any] = {
        "layers": list(layers),
        "term_layers": list(det.rule.term_names),
        "n_reference_scores": int(len(det.benign.scores)),
    }
    if cfg.rule == "cosine-loi":
        out["loi"] = [layers[i] for i in det.loi]
    a_scores, a_pred = (a["scores"], att["pred"]) if a is not None else (None, None)
    out["target_fpr"] = {}
    for q in TARGET_FPRS:
        policy = ThresholdPolicy(tau=None, target_fpr=q)
        out["target_fpr"][f"{q:g}"] = {**rule_rates(b["scores"], ben["pred"], det.benign.thresholds(policy),
                                                    success, a_scores, a_pred),
                                       "reference_fpr": det.benign.flagged_share(policy)}
    bounded = ThresholdPolicy(target_fpr=TARGET_FPRS[0], confidence=BOUND_CONFIDENCE)
    out["bounded_fpr"] = {}
    if len(det.benign.scores) >= references_for_confidence(TARGET_FPRS[0], BOUND_CONFIDENCE):  # else no bound
        out["bounded_fpr"][f"{TARGET_FPRS[0]:g}"] = {
            **rule_rates(b["scores"], ben["pred"], det.benign.thresholds(bounded), success, a_scores, a_pred),
            "reference_fpr": det.benign.flagged_share(bounded), "confidence": BOUND_CONFIDENCE}
    by_pred = BenignScores(ref[cfg.key]["scores"], ref["pred"], det.num_classes)
    out["target_fpr_by_predicted"] = {
        f"{q:g}": rule_rates(b["scores"], ben["pred"], by_pred.thresholds(ThresholdPolicy(tau=None, target_fpr=q)),
                             success, a_scores, a_pred) for q in TARGET_FPRS}
    policy = ThresholdPolicy(tau=TAU, target_fpr=None)
    out["tau"] = {f"{TAU:g}": {**rule_rates(b["scores"], ben["pred"], det.benign.thresholds(policy), success,
                                            a_scores, a_pred), "reference_fpr": det.benign.flagged_share(policy)}}
    out.update(roc_summary(z_ben, z_att))
    return out


def layer_diagnostic(det_cos: Any, det_maha: Any, ben: dict[str, Any], att: dict[str, Any], success: np.ndarray,
                     target: int, cos_key: str, maha_key: str, det_spread: Any = None, spread_key: str = ""
                     ) -> dict[str, Any]:
    """Which monitored layer separates successful attacks from benign images: per layer, AUROC of the cosine
    similarity to the target's centroid (benign = scored images predicted as the target), of the
    Mahalanobis distance to the predicted class's mean and, with `det_spread`, of the spread term (RMS z of the
    channels' spatial standard deviations against the predicted class; benign = all scored images)."""
    ben_t = ben["pred"] == target
    sims_b, sims_a = ben[cos_key]["sims"][ben_t], att[cos_key]["sims"][success]
    terms_b, terms_a = ben[maha_key]["terms"], att[maha_key]["terms"][success]
    loi = int(det_cos.loi[target])
    layers = list(det_cos.layer_names)
    out = {
        "layers": layers,
        "cosine": [auroc(sims_b[:, k], sims_a[:, k]) for k in range(len(layers))],
        "cosine_benign_n": int(ben_t.sum()),
        "mahalanobis": [auroc(-terms_b[:, k], -terms_a[:, k]) for k in range(terms_b.shape[1])],
        "mahalanobis_layers": list(det_maha.rule.term_names),
        "window_target": layers[max(0, loi - 2): loi + 1],
    }
    if det_spread is not None:
        names = list(det_spread.rule.term_names)
        columns = [k for k, n in enumerate(names) if n.endswith(SPREAD_SUFFIX)]
        spread_b, spread_a = ben[spread_key]["terms"], att[spread_key]["terms"][success]
        out["spread"] = [auroc(-spread_b[:, k], -spread_a[:, k]) for k in columns]
        out["spread_layers"] = [names[k][: -len(SPREAD_SUFFIX)] for k in columns]
    return out


def evaluate_model(name: str, ds: Dataset, model: torch.nn.Module, data: dict[str, np.ndarray],
                   args: argparse.Namespace, meta: dict[str, Any], attack_name: str | None = None
                   ) -> dict[str, Any]:
    """Every rule configuration and every peer on one model (row ``name``, carrying ``attack_name``, by default
    the row name); the clean model reports benign FPRs only."""
    attack_name = attack_name or name
    t_model = time.time()
    model = model.eval().to(memory_format=torch.channels_last)
    num_classes = int(meta.get("num_classes", len(np.unique(data["y_test"]))))
    x_all, y_all = data["x_test"], data["y_test"]
    counts = reference_counts(y_all, ds.ref_share, ds.ref_min) if args.ref_per_class is None else args.ref_per_class
    ref_idx, scored = split_reference(y_all, counts, args.seed)
    attack = None if attack_name == "clean" else attack_from_meta(attack_name, meta)
    target = attack.target if attack is not None else TARGET
    ben_idx = scored[: args.n_benign]
    x_ref, y_ref = x_all[ref_idx], y_all[ref_idx]
    x_ben, y_ben = x_all[ben_idx], y_all[ben_idx]
    if attack is not None:
        att_idx = scored[y_all[scored] != target][: args.n_poison]
        x_att = attack.apply(x_all[att_idx], np.random.default_rng(args.seed + 1))
        y_att = y_all[att_idx]
    else:
        x_att = y_att = None

    # every configuration, calibrated as shipped
    candidates = discover_layers(model, to_tensor(x_ref[:2]).contiguous(memory_format=torch.channels_last))
    t0 = time.time()
    plans = {cfg.key: default_plan(candidates, exclude_logits=cfg.exclude_logits) for cfg in CONFIGS}
    jobs = [(plans[cfg.key], CalibrationConfig(rule=cfg.rule, rule_options=dict(cfg.options), policy=cfg.policy,
                                               folds=cfg.folds, min_per_class=10)) for cfg in CONFIGS]
    artifacts = calibrate_many(model, lambda: _batches(x_ref, y_ref, args.batch), jobs, num_classes)
    detectors = {cfg.key: artifact.detector(cfg.policy) for cfg, artifact in zip(CONFIGS, artifacts)}
    cal_seconds = time.time() - t0
    log(f"[{ds.key}/{name}] calibrated {len(CONFIGS)} configurations on {len(x_ref)} references in "
        f"{cal_seconds:.0f}s (one pair of passes)")

    t0 = time.time()
    ref = forward_all(model, detectors, x_ref, args.batch)
    ben = forward_all(model, detectors, x_ben, args.batch)
    att = forward_all(model, detectors, x_att, args.batch) if x_att is not None else None
    n_scored = len(x_ref) + len(x_ben) + (len(x_att) if x_att is not None else 0)
    t_single = time.time() - t0
    success = (att["pred"] == target) & (y_att != target) if att is not None else None
    result: dict[str, Any] = {
        "target": int(target),
        "num_classes": num_classes,
        "clean_acc_scored": float(np.mean(ben["pred"] == y_ben)),
        "reference_acc": float(np.mean(ref["pred"] == y_ref)),
        "n_reference": int(len(x_ref)),
        "n_benign": int(len(x_ben)),
        "n_triggered": int(len(x_att)) if x_att is not None else 0,
        "n_successful": int(success.sum()) if success is not None else 0,
        "asr_scored": float(success.mean()) if success is not None else None,
        "scoring_seconds_per_image_all_configs": t_single / max(n_scored, 1),
        "calibration_seconds_all_configs": round(cal_seconds, 1),
        "rules": {},
        "peers": {},
    }
    for cfg in CONFIGS:
        result["rules"][cfg.key] = rule_result(cfg, detectors[cfg.key], ref, ben, att, success, plans[cfg.key].layers)
    if att is not None and success.any():
        spread = "mahalanobis-spread" if "mahalanobis-spread" in detectors else ""
        result["layer_diagnostic"] = layer_diagnostic(detectors["cosine-loi"], detectors["mahalanobis"], ben, att,
                                                      success, target, "cosine-loi", "mahalanobis",
                                                      detectors.get(spread), spread)
    line = ", ".join(f"{k} {_fmt(r.get('auroc'))}/{_fmt(r['target_fpr']['0.01']['tpr'])}/"
                     f"{_fmt(r['target_fpr']['0.01']['fpr'])}" for k, r in result["rules"].items())
    log(f"[{ds.key}/{name}] AUROC/TPR@1%/FPR@1%: {line}")

    # peer: Mahalanobis on the penultimate (pooled) features of the same pass; out-of-fold reference scores
    t0 = time.time()
    maha = Mahalanobis(PEER_LAYER).fit(ref["pen"], y_ref, num_classes)
    m_ref = oof_mahalanobis(ref["pen"], y_ref, num_classes, DEFAULT_FOLDS, args.seed)
    m_ben = maha.score_features(ben["pen"], ben["pred"])
    m_att = maha.score_features(att["pen"], att["pred"])[success] if att is not None else None
    result["peers"][PEER_MAHALANOBIS] = summarise(m_ref, m_ben, m_att, 1, time.time() - t0)

    # SCALE-UP (data-limited variant): fitted on the references, scores capped prefixes
    t0 = time.time()
    n_su = min(args.n_scaleup, len(x_ben))
    su = ScaleUp(model, batch=args.batch)
    s_ref = su.fit(to_tensor(x_ref), num_classes)
    s_ben = su.score(to_tensor(x_ben[:n_su]))
    s_att = None
    if x_att is not None:
        n_su_att = min(n_su, len(x_att))
        s_att = su.score(to_tensor(x_att[:n_su_att]))[success[:n_su_att]]
    result["peers"]["SCALE-UP"] = summarise(s_ref, s_ben, s_att, su.forward_passes, time.time() - t0)

    # STRIP: clean overlays from the reference pool; reference entropies on a reference subset
    t0 = time.time()
    n_st = min(args.n_strip, len(x_ben))
    pool = to_tensor(x_ref)
    strip = Strip(model, pool, n=args.strip_n, seed=args.seed, batch=args.batch)
    ref_sub = np.random.default_rng(args.seed + 2).choice(len(x_ref), size=min(n_st, len(x_ref)), replace=False)
    t_ref = strip.score(pool[ref_sub])
    t_ben = strip.score(to_tensor(x_ben[:n_st]))
    t_att = None
    if x_att is not None:
        n_st_att = min(n_st, len(x_att))
        t_att = strip.score(to_tensor(x_att[:n_st_att]))[success[:n_st_att]]
    result["peers"]["STRIP"] = summarise(t_ref, t_ben, t_att, strip.forward_passes, time.time() - t0)
    result["peers"]["STRIP"]["n"] = args.strip_n
    log(f"[{ds.key}/{name}] peers: " + ", ".join(
        f"{k} AUROC {_fmt(v.get('auroc'))} ({v['seconds']:.0f}s)" for k, v in result["peers"].items()))
    result["seconds"] = round(time.time() - t_model, 1)
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def code_version() -> dict[str, Any]:
    """The commit and a digest of the layerguard package's sources as they were when this ran (the working
    tree may hold uncommitted edits): which library the numbers belong to."""
    import subprocess

    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "layerguard").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "layerguard"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit, "layerguard_uncommitted_edits": dirty, "layerguard_sources_sha256": digest.hexdigest()}


def weights_digest(stem: str, weights: Path) -> str | None:
    """sha256 of bench/weights/<stem>.pt, so merged results can tell a retrained model from the one scored."""
    path = weights / f"{stem}.pt"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def load_model(stem: str, weights: Path) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The zoo model and its json, or None when it is not trained yet."""
    from bench.train import load_zoo_model

    if not (weights / f"{stem}.pt").exists() or not (weights / f"{stem}.json").exists():
        return None
    return load_zoo_model(stem, weights)


def run_dataset(ds: Dataset, names: list[str], args: argparse.Namespace, data_path: Path | None) -> Path | None:
    t_start = time.time()
    path = data_path or ds.default_path()
    rows = ds.select(names)
    if not rows:
        log(f"[{ds.key}] no row matches --models {','.join(names)} (rows: {', '.join(ds.model_rows())}); skipped")
        return None
    data = ds.loader(path)
    models: dict[str, Any] = {}
    missing = []
    for name, spec in rows.items():
        stem = spec.stem
        loaded = load_model(stem, args.weights)
        if loaded is None:
            log(f"[{ds.key}/{name}] no weights {stem}.pt in {args.weights}; skipped (train with bench/train.py)")
            missing.append(name)
            continue
        model, meta = loaded
        log(f"[{ds.key}/{name}] evaluating (clean acc {meta.get('clean_acc')}, ASR {meta.get('asr')})")
        res = evaluate_model(name, ds, model, data, args, meta, spec.attack)
        zoo_asr, asr = meta.get("asr"), res["asr_scored"]
        if zoo_asr is not None and asr is not None and abs(zoo_asr - asr) > 0.1:
            log(f"[{ds.key}/{name}] WARNING: ASR on the scored images {asr:.3f} differs from the zoo's "
                f"{zoo_asr:.3f}: is the trigger the one the model was trained with?")
        res["zoo"] = {k: meta.get(k) for k in ("clean_acc", "asr", "epochs", "model", "n_poison", "n_cover",
                                               "attack")}
        res["weights_sha256"] = weights_digest(stem, args.weights)
        res["weights"] = stem
        res["attack"] = spec.attack
        res["route"] = meta.get("route")  # the record's full route, e.g. "poisoned fine-tuning of cifar_full_clean"
        models[name] = res
        log(f"[{ds.key}/{name}] done in {res['seconds']:.0f}s")
    payload = {
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(),
        "code": args.code,
        "seconds": round(time.time() - t_start, 1),
        "dataset": ds.key,
        "dataset_label": ds.label,
        "data": str(Path(path).name),
        "quick": bool(args.quick),
        "protocol": {
            "reference": (f"{args.ref_per_class} per class" if args.ref_per_class is not None else
                          f"{ds.ref_share:.0%} of each class's test images, at least {ds.ref_min}"),
            "n_benign": args.n_benign,
            "n_poison": args.n_poison,
            "n_scaleup": args.n_scaleup,
            "n_strip": args.n_strip,
            "strip_n": args.strip_n,
            "seed": args.seed,
            "min_per_class": 10,
            "target_fprs": list(TARGET_FPRS),
            "tau": TAU,
        },
        "configs": [{**asdict(c), "policy": c.policy.as_dict()} for c in CONFIGS],
        "rows": {r: asdict(spec) for r, spec in ds.model_rows().items()},  # every row, evaluated or not
        "missing": missing,
        "models": models,
    }
    out_dir = args.out
    previous = out_dir / f"detection_{ds.key}.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        # keep only earlier results whose weights are still the ones on disk (a retrained model is re-run)
        merged = {k: v for k, v in old.get("models", {}).items()
                  if k not in models and v.get("weights_sha256") is not None
                  and v.get("weights_sha256") == weights_digest(ds.stem(k), args.weights)}
        both = {**merged, **models}
        payload["models"] = {k: both[k] for k in [*ds.model_rows(), *both] if k in both}
        gone = [m for m in dict.fromkeys([*missing, *old.get("missing", [])]) if m not in both]
        payload["missing"] = sorted(gone, key=lambda m: list(ds.model_rows()).index(m) if m in ds.model_rows()
                                    else len(ds.model_rows()))
        payload["merged_from"] = old.get("date")
        payload["seconds"] = round(sum(m.get("seconds", 0.0) for m in payload["models"].values()), 1)
        payload["command"] = f"{command_line()} (merged: each model's own run; seconds = their sum)"
    out = write_result(f"detection_{ds.key}", payload, out_dir)
    log(f"wrote {out} ({payload['seconds']:.0f}s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=None,
                   help=f"comma list from {list(DATASETS)} (default {DEFAULT_DATASETS}; --quick: cifar10)")
    p.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 npz, for both CIFAR zoos (default: $LAYERGUARD_CIFAR or ../shared)")
    p.add_argument("--gtsrb-data", type=Path, default=None, help="GTSRB npz (default: $LAYERGUARD_GTSRB or ../shared)")
    p.add_argument("--weights", type=Path, default=REPO_ROOT / "bench" / "weights")
    p.add_argument("--models", default=",".join(MODEL_ORDER),
                   help="comma list of row names (badnets_ft) or attacks (badnets: every BadNets row); "
                   "'clean' = FPR only")
    p.add_argument("--ref-per-class", type=int, default=None,
                   help="reference images per class (default: 20%% of each class's test images)")
    p.add_argument("--n-benign", type=int, default=8000,
                   help="held-out benign test images scored (all that are left, up to this)")
    p.add_argument("--n-poison", type=int, default=2000, help="triggered test images (true label not the target)")
    p.add_argument("--n-scaleup", type=int, default=500, help="prefix of benign and triggered that SCALE-UP scores")
    p.add_argument("--n-strip", type=int, default=300, help="prefix that STRIP scores (and its reference count)")
    p.add_argument("--strip-n", type=int, default=20, help="STRIP's N (clean overlays per input)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: BadNets rows only (of CIFAR-10 unless --datasets is given), 20 references a "
                   "class, 200 + 100 images, tiny peers; writes to bench/cache/quick unless --out is given")
    p.add_argument("--out", type=Path, default=None, help="results dir (default bench/results)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other models already in detection_<dataset>.json (evaluate only --models)")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.models = args.datasets or "cifar10", "badnets"
        args.ref_per_class, args.n_benign, args.n_poison = 20, 200, 100
        args.n_scaleup, args.n_strip, args.strip_n = 50, 30, 8
        args.out = args.out or REPO_ROOT / "bench" / "cache" / "quick"
    args.out = args.out or RESULTS_DIR
    args.datasets = args.datasets or DEFAULT_DATASETS
    args.code = code_version()  # at start: the sources this process imported
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    keys = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [k for k in keys if k not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    known = {n for k in keys for r, spec in DATASETS[k].model_rows().items() for n in (r, spec.attack)}
    if [n for n in names if n not in known]:
        p.error(f"unknown model(s) {[n for n in names if n not in known]}; rows and attacks of {keys}: "
                f"{sorted(known)}")
    for key in keys:
        ds = DATASETS[key]
        run_dataset(ds, names, args, args.gtsrb_data if ds.loader is load_gtsrb else args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

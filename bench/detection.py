"""Detection quality on real CIFAR-10: layerguard and its peers on the same backdoored models and images.

Why this protocol (issue 5, REFERENCE.md): the reference (calibration) images come from a part of the
test set that is never scored; TPR counts successful attacks only (triggered, predicted as the target 0,
true label not 0) and FPR counts all benign scored images, as the paper does. Peers are compared at equal
FPR: every detector's threshold is the 1% / 5% quantile of its scores on *reference* benign images (what a
deployment can do), and the FPR it then gets on the scored benign images is reported next to the TPR. AUROC
and the TPR read off the scored ROC at exactly 1% / 5% FPR complete the picture.

Per model (bench/weights/<attack>.pt):
  1. split the 10k test set (seed): 100 reference images a class, the rest scored; a fixed random subset of
     the scored images is used (``--n-benign``), and the same images with the trigger are the attacks;
  2. calibrate layerguard on the reference images (tau 2.5, holdout 0.5, as shipped);
  3. one forward pass per image with hooks on layerguard's layers and the penultimate layer gives the
     prediction, layerguard's score and the Mahalanobis features;
  4. SCALE-UP and STRIP (multi-pass) run on prefixes of the same subset (``--n-scaleup``, ``--n-strip``).

layerguard's decision is per class (score < mean_c - tau * std_c), so its single benign-likeness number
for ROC/AUROC and for the reference-quantile thresholds is the standardised score
z = (score - mean_c) / std_c of the predicted class c; "tau" rows flag z < -tau. Its reference quantiles
use only the threshold half of the reference set (the centroid half would be optimistically scored).

Usage:  .venv/bin/python bench/detection.py [--data PATH] [--weights DIR] [--attacks badnets,...]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attacks import ATTACKS as ATTACK_CLASSES  # noqa: E402
from bench.attacks import TARGET, Attack, build_attack  # noqa: E402
from bench.benchutil import REPO_ROOT, RESULTS_DIR, command_line, log, machine_info, now_utc, write_result  # noqa: E402
from bench.data import default_data_path, load_cifar, to_tensor  # noqa: E402
from bench.peers import Mahalanobis, ScaleUp, Strip  # noqa: E402
from layerguard.calibration import CalibrationConfig, StratifiedSplit, calibrate  # noqa: E402
from layerguard.capture import LayerCapture  # noqa: E402
from layerguard.detector import ThresholdPolicy  # noqa: E402
from layerguard.evaluation import auroc  # noqa: E402
from layerguard.layers import default_plan, discover_layers  # noqa: E402

ATTACKS = ["badnets", "blended", "wanet", "sig", "adapblend"]
ATTACK_ORDER = ["clean", *ATTACKS]
TAUS = (1.5, 2.0, 2.5, 3.0)
TARGET_FPRS = (0.01, 0.05)
# FPR grid at which ROC curves are stored in the JSON (plots are redrawn from it, never from raw scores).
ROC_GRID = np.unique(np.r_[0.0, np.logspace(-3, 0, 61)])
PENULTIMATE = "pool"
NUM_CLASSES = 10


# ---- protocol helpers (unit-tested in tests/test_peers.py) ----------------------------------------------
def split_reference(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference indices sorted by class then position, the other indices in a seeded random order)."""
    rng = np.random.default_rng(seed)
    ref = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {per_class} reference images")
        ref.append(np.sort(rng.choice(idx, size=per_class, replace=False)))
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


def summarise(
    ref: np.ndarray, benign: np.ndarray, attacks: np.ndarray | None, passes: int, seconds: float
) -> dict[str, Any]:
    """Everything the report needs about one detector on one model (lower score = more suspicious)."""
    out: dict[str, Any] = {
        "forward_passes": passes,
        "seconds": round(seconds, 1),
        "n_reference": int(len(ref)),
        "n_benign": int(len(benign)),
        "n_attacks": int(len(attacks)) if attacks is not None else 0,
    }
    for q in TARGET_FPRS:
        thr = reference_threshold(ref, q)
        empty = np.zeros(0)
        out[f"ref_fpr_{q:g}"] = {"threshold": thr, **rates_at(thr, benign, attacks if attacks is not None else empty)}
    if attacks is not None and len(attacks):
        out["auroc"] = auroc(benign, attacks)
        for q in TARGET_FPRS:
            out[f"roc_tpr_at_{q:g}"] = float(tpr_at_fpr(benign, attacks, q)[0])
        out["roc"] = {"fpr": ROC_GRID.round(6).tolist(), "tpr": tpr_at_fpr(benign, attacks, ROC_GRID).round(5).tolist()}
    return out


# ---- running the detectors ---------------------------------------------------------------------------
def _batches(x: np.ndarray, y: np.ndarray, batch: int):
    for i in range(0, len(x), batch):
        xb = to_tensor(x[i : i + batch]).contiguous(memory_format=torch.channels_last)
        yield xb, torch.from_numpy(y[i : i + batch])


@torch.no_grad()
def single_pass(
    model: torch.nn.Module, detector, layers: tuple[str, ...], x: np.ndarray, batch: int
) -> dict[str, np.ndarray]:
    """One forward pass per image with hooks on layerguard's layers and the penultimate layer."""
    names = tuple(dict.fromkeys((*layers, PENULTIMATE)))
    preds, scores, pen, sims = [], [], [], []
    with LayerCapture(model, names) as cap:
        for xb, _ in _batches(x, np.zeros(len(x), dtype=np.int64), batch):
            logits, feats = cap.run(xb)
            det = detector.score({n: feats[n] for n in layers}, logits.argmax(dim=1))
            preds.append(det.predicted.numpy())
            scores.append(det.scores.numpy())
            sims.append(det.similarities.numpy())
            pen.append(feats[PENULTIMATE].float().clone())
    return {"pred": np.concatenate(preds), "score": np.concatenate(scores), "pen": torch.cat(pen),
            "sims": np.concatenate(sims)}


def attack_from_meta(name: str, meta: dict[str, Any] | None) -> Attack:
    """The attack with the settings the model was trained with (bench/train.py --set overrides are recorded
    in the weights' json as ``attack``); only the keys the attack's constructor takes are passed back."""
    params = (meta or {}).get("attack") or {}
    accepted = inspect.signature(ATTACK_CLASSES[name].__init__).parameters
    return build_attack(name, **{k: v for k, v in params.items() if k in accepted and k != "self"})


LAYERGUARD_NO_LOGITS = "layerguard --exclude-logits"


def layerguard_result(
    artifact, runs: dict[str, dict[str, np.ndarray] | None], y_ref: np.ndarray, success: np.ndarray, seconds: float
) -> dict[str, Any]:
    """layerguard's rows for one calibration: standardised scores for ROC and reference quantiles, the tau
    rows, the artifact's own target-FPR thresholds and, with attacks, each layer's AUROC (diagnostic)."""
    ref, ben, att = runs["ref"], runs["ben"], runs["att"]
    layers = artifact.layer_names

    def z(scores: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return (scores - artifact.score_mean[pred]) / np.maximum(artifact.score_std[pred], 1e-12)

    held = StratifiedSplit(NUM_CLASSES, 0.5).held_out(y_ref)  # the threshold half, as calibrate() split it
    z_ref, z_ben = z(ref["score"], ref["pred"])[held], z(ben["score"], ben["pred"])
    z_att = z(att["score"], att["pred"])[success] if att is not None else None
    lg = summarise(z_ref, z_ben, z_att, 1, seconds)
    lg["tau"] = {f"{t:g}": rates_at(-t, z_ben, z_att if z_att is not None else np.zeros(0)) for t in TAUS}
    lg["policy_target_fpr"] = {}
    for q in TARGET_FPRS:
        thr = artifact.thresholds(ThresholdPolicy(tau=None, target_fpr=q))
        flag_b = ben["score"] < thr[ben["pred"]]
        flag_a = (att["score"] < thr[att["pred"]])[success] if att is not None else np.zeros(0, dtype=bool)
        lg["policy_target_fpr"][f"{q:g}"] = {
            "fpr": float(flag_b.mean()),
            "tpr": float(flag_a.mean()) if len(flag_a) else float("nan"),
        }
    if att is not None:
        # Diagnostic: how well each monitored layer's similarity alone separates successful attacks from
        # benign images predicted as the target (both measured against the target's centroids).
        ben_t = ben["pred"] == TARGET
        lg["layer_auroc"] = {
            layer: auroc(ben["sims"][ben_t, k], att["sims"][success, k]) for k, layer in enumerate(layers)
        }
        # ... and why a window separates less than its best layer: each layer's benign spread and the attacks'
        # distance below the benign mean in units of that spread (a wide, signal-free layer drowns the others)
        b_sims, a_sims = ben["sims"][ben_t], att["sims"][success]
        lg["layer_spread"] = {
            layer: {"benign_mean": float(b_sims[:, k].mean()), "benign_std": float(b_sims[:, k].std()),
                    "attack_mean": float(a_sims[:, k].mean())}
            for k, layer in enumerate(layers) if len(b_sims) and len(a_sims)
        }
        lg["window_target"] = [layers[i] for i in range(max(0, artifact.loi[TARGET] - 2), artifact.loi[TARGET] + 1)]
    return lg


def evaluate_model(
    name: str,
    model: torch.nn.Module,
    data: dict[str, np.ndarray],
    args: argparse.Namespace,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All detectors on one model; ``name == 'clean'`` has no trigger, so only benign FPRs are reported."""
    t_model = time.time()
    model = model.eval().to(memory_format=torch.channels_last)
    x_all, y_all = data["x_test"], data["y_test"]
    ref_idx, scored_order = split_reference(y_all, args.ref_per_class, args.seed)
    sub = scored_order[: args.n_benign]
    x_ref, y_ref = x_all[ref_idx], y_all[ref_idx]
    x_ben, y_ben = x_all[sub], y_all[sub]
    attack = None if name == "clean" else attack_from_meta(name, meta)
    x_att = attack.apply(x_ben, np.random.default_rng(args.seed + 1)) if attack is not None else None

    # layerguard: calibrate on the reference images exactly as shipped
    t0 = time.time()
    candidates = discover_layers(model, to_tensor(x_ref[:2]).contiguous(memory_format=torch.channels_last))
    plan = default_plan(candidates)
    config = CalibrationConfig(policy=ThresholdPolicy(tau=2.5), holdout_fraction=0.5, min_per_class=10)
    artifact = calibrate(model, lambda: _batches(x_ref, y_ref, args.batch), plan, NUM_CLASSES, config)
    t_cal = time.time() - t0
    detector = artifact.detector(ThresholdPolicy(tau=2.5))
    t0 = time.time()
    ref = single_pass(model, detector, plan.layers, x_ref, args.batch)
    ben = single_pass(model, detector, plan.layers, x_ben, args.batch)
    att = single_pass(model, detector, plan.layers, x_att, args.batch) if x_att is not None else None
    t_single = time.time() - t0
    n_single = len(x_ref) + len(x_ben) + (len(x_att) if x_att is not None else 0)

    # successful attacks: triggered, predicted as the target, true label not the target
    success = (att["pred"] == TARGET) & (y_ben != TARGET) if att is not None else np.zeros(len(x_ben), dtype=bool)
    result: dict[str, Any] = {
        "clean_acc_scored": float(np.mean(ben["pred"] == y_ben)),
        "n_reference": int(len(x_ref)),
        "n_benign": int(len(x_ben)),
        "n_triggered": int(len(x_ben)) if att is not None else 0,
        "n_successful": int(success.sum()),
        "asr_scored": float(success.sum() / max(1, np.sum(y_ben != TARGET))) if att is not None else None,
        "layers": list(plan.layers),
        "loi": [plan.layers[i] for i in artifact.loi],
        "calibration_seconds": round(t_cal, 1),
        "detectors": {},
    }
    runs = {"ref": ref, "ben": ben, "att": att}
    single_seconds = t_single * len(x_ben) / n_single
    result["detectors"]["layerguard"] = layerguard_result(artifact, runs, y_ref, success, t_cal + single_seconds)
    log(f"[{name}] layerguard done ({t_cal:.0f}s calibration, {t_single:.0f}s scoring)")

    # layerguard --exclude-logits: its own calibration, scored on the similarities of the same forward pass
    # (its layers are the default window less the last, and the centroids of the shared layers are the same)
    t0 = time.time()
    plan_nl = default_plan(candidates, exclude_logits=True)
    artifact_nl = calibrate(model, lambda: _batches(x_ref, y_ref, args.batch), plan_nl, NUM_CLASSES, config)
    if plan_nl.layers != plan.layers[: len(plan_nl.layers)] or not all(
        np.allclose(artifact_nl.centroids[n], artifact.centroids[n]) for n in plan_nl.layers
    ):
        raise RuntimeError("--exclude-logits calibration does not share the default window's centroids")
    detector_nl = artifact_nl.detector(ThresholdPolicy(tau=2.5))

    def rescored(run: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        if run is None:
            return None
        sims = run["sims"][:, : len(plan_nl.layers)]
        det = detector_nl.score_similarities(torch.from_numpy(sims), torch.from_numpy(run["pred"]))
        return {**run, "sims": sims, "score": det.scores.numpy()}

    nl_runs = {k: rescored(r) for k, r in runs.items()}
    nl = layerguard_result(artifact_nl, nl_runs, y_ref, success, time.time() - t0 + single_seconds)
    nl["loi"] = [plan_nl.layers[i] for i in artifact_nl.loi]
    result["detectors"][LAYERGUARD_NO_LOGITS] = nl

    # Mahalanobis on the penultimate features of the same pass
    t0 = time.time()
    maha = Mahalanobis(PENULTIMATE).fit(ref["pen"], y_ref, NUM_CLASSES)
    m_ref = maha.score_features(ref["pen"], ref["pred"])
    m_ben = maha.score_features(ben["pen"], ben["pred"])
    m_att = maha.score_features(att["pen"], att["pred"])[success] if att is not None else None
    result["detectors"]["Mahalanobis"] = summarise(
        m_ref, m_ben, m_att, 1, time.time() - t0 + t_single * len(x_ben) / n_single
    )

    # SCALE-UP (data-limited variant) on a prefix of the scored subset
    t0 = time.time()
    n_su = min(args.n_scaleup, len(x_ben))
    su = ScaleUp(model, batch=args.batch)
    s_ref = su.fit(to_tensor(x_ref), NUM_CLASSES)
    s_ben = su.score(to_tensor(x_ben[:n_su]))
    s_att = su.score(to_tensor(x_att[:n_su]))[success[:n_su]] if x_att is not None else None
    result["detectors"]["SCALE-UP"] = summarise(s_ref, s_ben, s_att, su.forward_passes, time.time() - t0)
    log(f"[{name}] SCALE-UP done ({time.time() - t0:.0f}s, {n_su} benign + {n_su} triggered)")

    # STRIP: clean overlays from the reference pool; reference entropies on a reference subset
    t0 = time.time()
    n_st = min(args.n_strip, len(x_ben))
    pool = to_tensor(x_ref)
    strip = Strip(model, pool, n=args.strip_n, seed=args.seed, batch=args.batch)
    ref_sub = np.random.default_rng(args.seed + 2).choice(len(x_ref), size=min(args.n_strip, len(x_ref)), replace=False)
    t_ref = strip.score(pool[ref_sub])
    t_ben = strip.score(to_tensor(x_ben[:n_st]))
    t_att = strip.score(to_tensor(x_att[:n_st]))[success[:n_st]] if x_att is not None else None
    result["detectors"]["STRIP"] = summarise(t_ref, t_ben, t_att, strip.forward_passes, time.time() - t0)
    result["detectors"]["STRIP"]["n"] = args.strip_n
    log(f"[{name}] STRIP done ({time.time() - t0:.0f}s, N={args.strip_n}, {n_st} benign + {n_st} triggered)")
    result["seconds"] = round(time.time() - t_model, 1)
    return result


def weights_digest(name: str, weights: Path) -> str | None:
    """sha256 of bench/weights/<name>.pt, so merged results can tell a retrained model from the one scored."""
    path = weights / f"{name}.pt"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def load_model(name: str, weights: Path) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The zoo model and its json, or None when it is not trained yet."""
    from bench.train import load_zoo_model

    if not (weights / f"{name}.pt").exists() or not (weights / f"{name}.json").exists():
        return None
    return load_zoo_model(name, weights)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 npz (default: $LAYERGUARD_CIFAR or ../shared)")
    p.add_argument("--weights", type=Path, default=REPO_ROOT / "bench" / "weights")
    p.add_argument("--attacks", default="clean," + ",".join(ATTACKS), help="comma list; 'clean' = FPR only")
    p.add_argument("--ref-per-class", type=int, default=100)
    p.add_argument("--n-benign", type=int, default=2000, help="scored benign images (the same ones get the trigger)")
    p.add_argument("--n-scaleup", type=int, default=1000, help="prefix of the scored subset that SCALE-UP scores")
    p.add_argument("--n-strip", type=int, default=500, help="prefix that STRIP scores (and its reference count)")
    p.add_argument("--strip-n", type=int, default=20, help="STRIP's N (clean overlays per input)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="results dir (default bench/results)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models already in detection.json (evaluate only --attacks, replace those)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    data_path = args.data or default_data_path()
    data = load_cifar(data_path)
    models: dict[str, Any] = {}
    missing = []
    for name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        loaded = load_model(name, args.weights)
        if loaded is None:
            log(f"[{name}] no weights in {args.weights}; skipped (train with bench/train.py)")
            missing.append(name)
            continue
        model, meta = loaded
        log(f"[{name}] evaluating (clean acc {meta.get('clean_acc')}, ASR {meta.get('asr')})")
        res = evaluate_model(name, model, data, args, meta)
        zoo_asr, asr = meta.get("asr"), res["asr_scored"]
        if zoo_asr is not None and asr is not None and abs(zoo_asr - asr) > 0.1:
            log(f"[{name}] WARNING: ASR on the scored subset {asr:.3f} differs from the zoo's {zoo_asr:.3f}: "
                "is the trigger the one the model was trained with?")
        res["zoo"] = {k: meta.get(k) for k in ("clean_acc", "asr", "epochs", "model", "n_poison", "n_cover",
                                               "attack")}
        res["weights_sha256"] = weights_digest(name, args.weights)
        models[name] = res
        log(f"[{name}] done in {res['seconds']:.0f}s")
    payload = {
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(),
        "seconds": round(time.time() - t_start, 1),
        "data": str(Path(data_path).name),
        "protocol": {
            "reference_per_class": args.ref_per_class,
            "n_benign": args.n_benign,
            "n_scaleup": args.n_scaleup,
            "n_strip": args.n_strip,
            "strip_n": args.strip_n,
            "seed": args.seed,
            "target": TARGET,
            "calibration": "tau 2.5, holdout_fraction 0.5, min_per_class 10",
        },
        "missing": missing,
        "models": models,
    }
    previous = (args.out or RESULTS_DIR) / "detection.json"
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        # keep only earlier results whose weights are still the ones on disk (a retrained model is re-run)
        merged = {k: v for k, v in old.get("models", {}).items()
                  if k not in models and v.get("weights_sha256") is not None
                  and v.get("weights_sha256") == weights_digest(k, args.weights)}
        dropped = sorted(set(old.get("models", {})) - set(merged) - set(models))
        if dropped:
            log(f"dropped stale results (weights changed or gone): {', '.join(dropped)}")
            missing += [d for d in dropped if d not in missing]
        payload["models"] = {
            k: {**merged, **models}[k] for k in [*ATTACK_ORDER, *merged, *models] if k in {**merged, **models}
        }
        payload["missing"] = [m for m in missing if m not in payload["models"]]
        payload["merged_from"] = old.get("date")
        payload["seconds"] = round(sum(m.get("seconds", 0.0) for m in payload["models"].values()), 1)
        payload["command"] = f"{command_line()} (merged: each model's own run; seconds = their sum)"
    path = write_result("detection", payload, args.out)
    log(f"wrote {path} ({payload['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

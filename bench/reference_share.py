"""How the references' class mix and count move the false-positive rate a target-FPR threshold delivers.

Why: one threshold serves every class (the default rule), so it holds for traffic whose class mix is the
references'. GTSRB's classes run from 60 to 750 test images; references of 10% of each class with a floor
of 10 (the least calibration takes) over-represent the smallest classes. This script calibrates the
default rule, as shipped, on references drawn with several shares (and that floor) from the test set, over
several random splits, and measures the FPR delivered on held-out benign test images (at most ``--n-benign``
of those left), next to the spread that the reference count alone predicts (`fpr_spread`). It is the
measurement behind the detection benchmark's 20% reference protocol (bench/detection.py ``REF_SHARE``).
Each calibration is also thresholded with ``--confidences`` (``fpr_confidence``: the target as an upper bound
held with that probability, no refit), to measure how often each policy delivers more than the target.

Usage:  .venv/bin/python bench/reference_share.py [--datasets gtsrb,cifar10_full] [--models clean,badnets]
            [--shares 0.1,0.2] [--folds 5,10,20] [--seeds 4] [--confidences none,0.95]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import REPO_ROOT, command_line, log, machine_info, now_utc, write_result  # noqa: E402
from bench.data import to_tensor  # noqa: E402
from bench.detection import DATASETS, _batches, forward_all, load_model, reference_counts, split_reference  # noqa: E402
from layerguard.core.layers import default_plan, discover_layers  # noqa: E402
from layerguard.core.rules import DEFAULT_RULE  # noqa: E402
from layerguard.core.thresholds import ThresholdPolicy, fpr_spread  # noqa: E402
from layerguard.tooling.calibration import CalibrationConfig, calibrate  # noqa: E402

TARGET = 0.01
FLOOR = 10
# Per dataset, the grid `make bench` runs (each option overrides it for every dataset): GTSRB's class sizes
# run from 60 to 750, so share and folds matter there; CIFAR-10's are equal, so many splits of one setting.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "gtsrb": {"models": "clean,badnets", "shares": "0.1,0.2", "folds": "5,10,20", "seeds": 4,
              "confidences": "none,0.95"},
    "cifar10_full": {"models": "clean,badnets_scratch", "shares": "0.2", "folds": "10", "seeds": 10,
                     "confidences": "none,0.9,0.95"},
}


def delivered_fpr(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, share: float, seed: int, n_benign: int,
                  num_classes: int, folds: int, confidences: list[float | None]) -> list[dict[str, Any]]:
    """Calibrate the default rule on a `share` of each class (at least FLOOR) with `folds`-fold cross-fitting
    and score held-out benign images; one row per threshold confidence (None: the target is the expected
    rate)."""
    counts = reference_counts(y, share, FLOOR)
    ref_idx, rest = split_reference(y, counts, seed)
    ben_idx = rest[:n_benign]
    x_ref, y_ref = x[ref_idx], y[ref_idx]
    plan = default_plan(discover_layers(model, to_tensor(x_ref[:2]).contiguous(memory_format=torch.channels_last)))
    artifact = calibrate(model, lambda: _batches(x_ref, y_ref, 250), plan, num_classes,
                         CalibrationConfig(rule=DEFAULT_RULE, min_per_class=FLOOR, folds=folds))
    det = artifact.detector(ThresholdPolicy(target_fpr=TARGET))
    ben = forward_all(model, {"default": det}, x[ben_idx], 250)
    rows = []
    for confidence in confidences:  # the same scores, thresholded by each policy (no refit)
        policy = ThresholdPolicy(target_fpr=TARGET, confidence=confidence)
        flagged = ben["default"]["scores"] < det.benign.thresholds(policy)[ben["pred"]]
        rows.append({"share": share, "folds": folds, "seed": seed, "confidence": confidence,
                     "n_reference": int(len(ref_idx)), "n_benign": int(len(ben_idx)),
                     "floor_classes": int(np.sum(np.round(share * np.bincount(y)) < FLOOR)),
                     "reference_flagged": det.benign.flagged_share(policy),
                     "delivered_fpr": float(flagged.mean()), "expected_sd": fpr_spread(TARGET, len(ref_idx))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", "--dataset", default=",".join(PROTOCOLS),
                   help=f"comma list from {sorted(PROTOCOLS)}; each with its own grid (PROTOCOLS) unless overridden")
    p.add_argument("--models", help="rows of the dataset's zoo")
    p.add_argument("--shares", help="comma list of per-class reference shares")
    p.add_argument("--folds", help="comma list of cross-fitting fold counts")
    p.add_argument("--seeds", type=int, help="random splits per setting")
    p.add_argument("--confidences",
                   help="comma list of fpr_confidence values to threshold each calibration with; none = expected rate")
    p.add_argument("--n-benign", type=int, default=8000)
    p.add_argument("--weights", type=Path, default=REPO_ROOT / "bench" / "weights")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for dataset in args.datasets.split(","):
        grid = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in PROTOCOLS[dataset].items()}
        measure(dataset, grid, args)
    return 0


def measure(dataset: str, grid: dict[str, Any], args: argparse.Namespace) -> None:
    """Every calibration of one dataset's grid; writes reference_share_<dataset>.json."""
    t_start = time.time()
    ds = DATASETS[dataset]
    data = ds.loader(ds.default_path())
    x, y = data["x_test"], data["y_test"]
    rows = []
    confidences = [None if c.strip().lower() == "none" else float(c) for c in grid["confidences"].split(",")]
    for name in grid["models"].split(","):
        loaded = load_model(ds.stem(name), args.weights)
        if loaded is None:
            log(f"{name}: no weights; skipped")
            continue
        model, meta = loaded
        model = model.eval().to(memory_format=torch.channels_last)
        settings = [(float(s), int(k)) for s in grid["shares"].split(",") for k in grid["folds"].split(",")]
        for share, folds in settings:
            for seed in range(int(grid["seeds"])):
                for row in delivered_fpr(model, x, y, share, seed, args.n_benign, int(meta["num_classes"]), folds,
                                         confidences):
                    rows.append({"model": name, **row})
                    bound = "expected" if row["confidence"] is None else f"at most, {row['confidence']:g} confidence"
                    log(f"{dataset} {name} share {share:.2f} folds {folds} seed {seed} ({bound}): "
                        f"{row['n_reference']} references ({row['floor_classes']} classes at the floor), delivered "
                        f"FPR {100 * row['delivered_fpr']:.2f}% (expected 1.00 +/- {100 * row['expected_sd']:.2f})")
    payload = {"command": command_line(), "date": now_utc(), "machine": machine_info(),
               "seconds": round(time.time() - t_start, 1), "dataset": dataset, "target_fpr": TARGET,
               "floor": FLOOR, "rule": DEFAULT_RULE, "grid": grid, "rows": rows}
    log(f"wrote {write_result('reference_share_' + dataset, payload, args.out)}")


if __name__ == "__main__":
    raise SystemExit(main())

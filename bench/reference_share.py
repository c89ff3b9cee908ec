"""How the references' class mix and count move the false-positive rate a target-FPR threshold delivers.

Why: one threshold serves every class (the default rule), so it holds for traffic whose class mix is the
references'. GTSRB's classes run from 60 to 750 test images; references of 10% of each class with a floor
of 10 (the least calibration takes) over-represent the smallest classes. This script calibrates the
default rule, as shipped, on references drawn with several shares (and that floor) from the test set, over
several random splits, and measures the FPR delivered on held-out benign test images (at most ``--n-benign``
of those left), next to the spread that the reference count alone predicts (`fpr_spread`). It is the
measurement behind the detection benchmark's 20% reference protocol (bench/detection.py ``REF_SHARE``).

Usage:  .venv/bin/python bench/reference_share.py [--dataset gtsrb] [--models clean,badnets] [--shares 0.1,0.17,0.2]
            [--folds 5,10,20] [--seeds 3]
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


def delivered_fpr(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, share: float, seed: int, n_benign: int,
                  num_classes: int, folds: int) -> dict[str, Any]:
    """Calibrate the default rule on a `share` of each class (at least FLOOR) with `folds`-fold cross-fitting
    and score held-out benign images."""
    counts = reference_counts(y, share, FLOOR)
    ref_idx, rest = split_reference(y, counts, seed)
    ben_idx = rest[:n_benign]
    x_ref, y_ref = x[ref_idx], y[ref_idx]
    plan = default_plan(discover_layers(model, to_tensor(x_ref[:2]).contiguous(memory_format=torch.channels_last)))
    artifact = calibrate(model, lambda: _batches(x_ref, y_ref, 250), plan, num_classes,
                         CalibrationConfig(rule=DEFAULT_RULE, min_per_class=FLOOR, folds=folds))
    det = artifact.detector(ThresholdPolicy(target_fpr=TARGET))
    ben = forward_all(model, {"default": det}, x[ben_idx], 250)
    flagged = ben["default"]["scores"] < det.thresholds[ben["pred"]]
    return {"share": share, "folds": folds, "seed": seed, "n_reference": int(len(ref_idx)),
            "n_benign": int(len(ben_idx)), "floor_classes": int(np.sum(np.round(share * np.bincount(y)) < FLOOR)),
            "delivered_fpr": float(flagged.mean()), "expected_sd": fpr_spread(TARGET, len(ref_idx))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="gtsrb", choices=sorted(DATASETS))
    p.add_argument("--models", default="clean,badnets", help="rows of the dataset's zoo")
    p.add_argument("--shares", default="0.1,0.17,0.2")
    p.add_argument("--folds", default="5", help="comma list of cross-fitting fold counts")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-benign", type=int, default=8000)
    p.add_argument("--weights", type=Path, default=REPO_ROOT / "bench" / "weights")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    ds = DATASETS[args.dataset]
    data = ds.loader(ds.default_path())
    x, y = data["x_test"], data["y_test"]
    rows = []
    for name in args.models.split(","):
        loaded = load_model(ds.stem(name), args.weights)
        if loaded is None:
            log(f"{name}: no weights; skipped")
            continue
        model, meta = loaded
        model = model.eval().to(memory_format=torch.channels_last)
        settings = [(float(s), int(k)) for s in args.shares.split(",") for k in args.folds.split(",")]
        for share, folds in settings:
            for seed in range(args.seeds):
                row = {"model": name, **delivered_fpr(model, x, y, share, seed, args.n_benign,
                                                      int(meta["num_classes"]), folds)}
                rows.append(row)
                log(f"{name} share {share:.2f} folds {folds} seed {seed}: {row['n_reference']} references "
                    f"({row['floor_classes']} classes at the floor), delivered FPR {100 * row['delivered_fpr']:.2f}% "
                    f"(expected 1.00 +/- {100 * row['expected_sd']:.2f})")
    payload = {"command": command_line(), "date": now_utc(), "machine": machine_info(),
               "seconds": round(time.time() - t_start, 1), "dataset": args.dataset, "target_fpr": TARGET,
               "floor": FLOOR, "rule": DEFAULT_RULE, "rows": rows}
    log(f"wrote {write_result('reference_share_' + args.dataset, payload, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Calibration throughput and peak memory against the number of reference images (it must stay flat).

Why a fresh process per size: peak memory is a per-process high-water mark, so each size runs in its own
subprocess that streams the images from a raw file in batches (no mmap, whose touched pages would count
as resident and grow with N), resets the kernel's RSS high-water mark right before ``calibrate`` and reads
it right after. Calibration is two streaming passes (per-fold statistics, then out-of-fold scores), so its memory
should depend on the model and the batch size, not on the number of images.

Usage:  .venv/bin/python bench/calibration_cost.py [--sizes 500,1000,2000,4000] [--data PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import REPO_ROOT, command_line, log, machine_info, now_utc, rss_bytes, write_result  # noqa: E402
from bench.data import default_data_path, load_cifar, to_tensor  # noqa: E402
from bench.overhead import load_bench_model, peak_rss_bytes, reset_peak_rss  # noqa: E402
from layerguard.core.layers import default_plan, discover_layers  # noqa: E402
from layerguard.core.rules import DEFAULT_RULE  # noqa: E402
from layerguard.tooling.calibration import CalibrationConfig, calibrate  # noqa: E402

IMAGE_BYTES = 32 * 32 * 3


def interleaved_by_class(labels: np.ndarray, n: int) -> np.ndarray:
    """n indices, n/C per class, in round-robin class order (a stream of mixed classes, like real data)."""
    classes = np.unique(labels)
    per = -(-n // len(classes))
    cols = [np.flatnonzero(labels == c)[:per] for c in classes]
    if min(len(c) for c in cols) < per:
        raise ValueError(f"not enough images for {n} reference images ({per} per class)")
    return np.stack(cols, axis=1).reshape(-1)[:n]


def stream(images: Path, labels: np.ndarray, batch: int):
    """Zero-arg callable yielding (x, y) batches read from a raw uint8 NHWC file, one batch in memory at a time."""

    def batches():
        with open(images, "rb") as fh:
            for i in range(0, len(labels), batch):
                n = min(batch, len(labels) - i)
                x = np.fromfile(fh, dtype=np.uint8, count=n * IMAGE_BYTES).reshape(n, 32, 32, 3)
                yield to_tensor(x), torch.from_numpy(labels[i : i + n])

    return batches


def child(images: Path, labels_path: Path, batch: int, threads: int, rule: str = DEFAULT_RULE) -> dict[str, Any]:
    """One calibration in this (fresh) process; RSS high-water mark over ``calibrate`` alone."""
    torch.set_num_threads(threads)
    model, source = load_bench_model("resnet20")
    labels = np.load(labels_path)
    plan = default_plan(discover_layers(model, torch.rand(2, 3, 32, 32)))
    config = CalibrationConfig(rule=rule, min_per_class=10)  # as shipped: default policy and cross-fitting folds
    rss_before = rss_bytes()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    artifact = calibrate(model, stream(images, labels, batch), plan, 10, config)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {
        "images": int(len(labels)),
        "seconds": seconds,
        "images_per_s": len(labels) / seconds,
        "forward_images_per_s": 2 * len(labels) / seconds,
        "rss_before_mb": rss_before / 2**20,
        "peak_rss_mb": peak / 2**20,
        "peak_extra_mb": (peak - rss_before) / 2**20,
        "peak_is_calibration_only": reset,
        "weights": source,
        "rule": artifact.meta.rule,
        "folds": artifact.meta.folds,
        "layers": list(artifact.layer_names),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--sizes", default="500,1000,2000,4000")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rule", default=DEFAULT_RULE, help=f"scoring rule to calibrate (default {DEFAULT_RULE})")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--labels", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.labels, args.batch, args.threads, args.rule)))
        return 0

    t_start = time.time()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    data = load_cifar(args.data or default_data_path())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            idx = interleaved_by_class(data["y_train"], n)
            images, labels = Path(tmp) / f"x{n}.u8", Path(tmp) / f"y{n}.npy"
            np.ascontiguousarray(data["x_train"][idx]).tofile(images)
            np.save(labels, data["y_train"][idx])
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(images),
                "--labels",
                str(labels),
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
                "--rule",
                args.rule,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
            run = json.loads(res.stdout.strip().splitlines()[-1])
            runs.append(run)
            log(
                f"{n} images: {run['images_per_s']:.0f} images/s, peak +{run['peak_extra_mb']:.1f} MB "
                f"(peak RSS {run['peak_rss_mb']:.0f} MB)"
            )
    payload = {
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(),
        "threads": args.threads,
        "batch": args.batch,
        "model": "resnet20",
        "rule": args.rule,
        "seconds": round(time.time() - t_start, 1),
        "runs": runs,
    }
    path = write_result("calibration_cost", payload, args.out)
    log(f"wrote {path} ({payload['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

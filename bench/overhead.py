"""Cost of layerguard at serving time: latency with and without the hooks and scoring, peers' cost, memory.

Why measured this way: serving runs one forward pass with layerguard's hooks attached, then scores the
captured features and builds one JSON note per item (layerguard/serving.py). So "guarded" here is exactly
that: capture.clear(), forward under no_grad, ``Detector.score``, ``Detection.items`` for the batch; "plain"
is the same forward on a second copy of the model with no hooks. The two are timed alternately, repeat
after repeat, in one process, so drift from other jobs on a shared machine hits both alike; we report the
median of each and the median of the per-repeat ratios.

Models: the zoo's CIFAR ResNet-20 (trained weights when bench/weights has them) and ``resnet18_cifar``
(ResNet-18 sized, 11 M parameters; random weights are fine for timing), each calibrated on a few hundred
CIFAR test images. Memory: the artifact's file size, and resident memory of a fresh worker-like process
(load model; then load artifact + detector; then serve batches) with and without layerguard.

Usage:  .venv/bin/python bench/overhead.py [--repeats 50] [--threads 1] [--data PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import (  # noqa: E402
    ALLOCATOR_NOTE,
    REPO_ROOT,
    command_line,
    hold_freed_memory,
    log,
    machine_info,
    minor_faults,
    now_utc,
    rss_bytes,
    write_result,
)
from bench.data import default_data_path, load_cifar, to_tensor  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.peers import Mahalanobis, ScaleUp, Strip  # noqa: E402
from layerguard.core.artifact import CalibrationArtifact  # noqa: E402
from layerguard.core.capture import LayerCapture  # noqa: E402
from layerguard.core.detector import Detector  # noqa: E402
from layerguard.core.grouped import KEEP_WHOLE_UP_TO, KEEP_WHOLE_UP_TO_NO_COSINE, keep_whole_limit  # noqa: E402
from layerguard.core.host import match_blas_threads  # noqa: E402
from layerguard.core.layers import default_plan, discover_layers  # noqa: E402
from layerguard.core.rules import DEFAULT_RULE  # noqa: E402
from layerguard.tooling.calibration import CalibrationConfig, calibrate  # noqa: E402

WEIGHTS = REPO_ROOT / "bench" / "weights"
ZOO_PREFERENCE = ("badnets", "blended", "wanet", "sig", "adapblend", "clean")
MODELS = {"resnet20": "CIFAR ResNet-20 (0.27 M params)", "resnet18_cifar": "ResNet-18, CIFAR stem (11.2 M params)"}


def stratified(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` indices of every class (deterministic)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def load_bench_model(arch: str) -> tuple[torch.nn.Module, str]:
    """ResNet-20 with zoo weights when any exist (else random), ResNet-18 with random weights (seed 0)."""
    torch.manual_seed(0)
    model = build_model(arch)
    source = "random init (seed 0)"
    if arch == "resnet20":
        for name in ZOO_PREFERENCE:
            pt = WEIGHTS / f"{name}.pt"
            if pt.exists():
                model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
                source = f"bench/weights/{name}.pt"
                break
    return model.eval(), source


def make_artifact(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, path: Path, rule: str = DEFAULT_RULE,
    exclude_logits: bool = False,
) -> tuple[CalibrationArtifact, float]:
    """Calibrate on the given images as shipped (``rule``, default threshold policy and folds; the default window,
    or without the logits as `--exclude-logits` does) and save; returns (artifact, seconds)."""
    t0 = time.time()
    plan = default_plan(discover_layers(model, to_tensor(x[:2])), exclude_logits=exclude_logits)

    def batches():
        for i in range(0, len(x), 100):
            yield to_tensor(x[i : i + 100]), torch.from_numpy(y[i : i + 100])

    artifact = calibrate(model, batches, plan, 10, CalibrationConfig(rule=rule))
    artifact.save(path)
    return artifact, time.time() - t0


class Guarded:
    """What the serving handler does per batch (layerguard.serving.handler does the same): a forward pass whose
    hooks reduce each monitored output to what scoring needs, or, up to `keep_whole_limit` rows, keep the outputs
    to reduce after the pass; the verdicts; one JSON-ready note per item. `compact` is the `response: compact`
    setting (no per-layer similarities or terms)."""

    def __init__(self, model: torch.nn.Module, detector: Detector, compact: bool = False,
                 input_shape: tuple[int, ...] = (3, 32, 32),
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.model, self.detector, self.compact = model, detector, compact
        self.capture = LayerCapture(model, detector.layer_names, reducer=detector.reducer(similarities=not compact),
                                    keep_whole_up_to=KEEP_WHOLE_UP_TO)
        self.capture.attach()
        # the handler's load-time probe: one row's outputs set how many rows keep whole (core/grouped.py)
        _, kept = self.capture.run(torch.zeros(1, *input_shape).contiguous(memory_format=memory_format))
        self.capture.keep_whole_up_to = keep_whole_limit(kept, detector.computes_similarities(not compact))

    def __call__(self, x: torch.Tensor) -> list[dict]:
        self.capture.clear()
        with torch.no_grad():
            logits = self.model(x)
        det = self.detector.score_capture(self.capture, logits.argmax(dim=1), similarities=not self.compact)
        return det.items(self.detector.layer_names, self.detector.rule.term_names, compact=self.compact)


def plain_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Run every fn once per round, in a rotating order, ``warmup`` + ``repeats`` rounds.

    Returns ``{name: {"wall": [...], "cpu": [...]}}`` in seconds per call. "cpu" is this thread's CPU time
    (``time.thread_time``): with one torch thread all the work runs here, and CPU time does not count the
    moments the scheduler gives the core to another job, which wall time on a shared 2-core box does.
    """
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": [], "faults": []} for k in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            f0, c0, t0 = minor_faults(), time.thread_time(), time.perf_counter()
            fns[k]()
            dt, dc, df = time.perf_counter() - t0, time.thread_time() - c0, minor_faults() - f0
            if r >= warmup:
                times[k]["wall"].append(dt)
                times[k]["cpu"].append(dc)
                times[k]["faults"].append(df)
    return times


def summary(times: dict[str, list[float]]) -> dict[str, float]:
    return {
        "median_ms": 1000 * statistics.median(times["wall"]),
        "p10_ms": 1000 * float(np.percentile(times["wall"], 10)),
        "p90_ms": 1000 * float(np.percentile(times["wall"], 90)),
        "cpu_median_ms": 1000 * statistics.median(times["cpu"]),
        "minor_faults_median": statistics.median(times["faults"]) if times.get("faults") else None,
        "repeats": len(times["wall"]),
    }


def ratios(guarded: dict[str, list[float]], plain: dict[str, list[float]]) -> dict[str, float]:
    """Guarded/plain as a ratio of medians and as the median of per-round ratios, for wall and CPU time."""
    out = {}
    for kind in ("wall", "cpu"):
        g, p = guarded[kind], plain[kind]
        out[f"{kind}_ratio_of_medians"] = statistics.median(g) / statistics.median(p)
        out[f"{kind}_median_paired_ratio"] = statistics.median([a / b for a, b in zip(g, p)])
    return out


def latency_one(plain: torch.nn.Module, guarded: Guarded, x: torch.Tensor, repeats: int, warmup: int) -> dict[str, Any]:
    """Plain vs guarded (and the scoring step alone) on one batch, interleaved, median of ``repeats``."""
    detector = guarded.detector
    guarded(x)
    kept = dict(guarded.capture.features())  # what the hooks left: scoring from here is the rest of the cost
    whole = guarded.capture.kept_whole
    with torch.no_grad():
        pred = plain(x).argmax(dim=1)
    forward = plain_forward(plain)

    def score_only() -> None:
        det = (detector.score_outputs(kept, pred, similarities=not guarded.compact) if whole
               else detector.score_reduced(kept, pred))
        det.items(detector.layer_names, detector.rule.term_names, compact=guarded.compact)

    times = time_interleaved(
        {"plain": lambda: forward(x), "guarded": lambda: guarded(x), "score": score_only}, repeats, warmup
    )
    return {
        "plain": summary(times["plain"]),
        "guarded": summary(times["guarded"]),
        "score_only": summary(times["score"]),
        **ratios(times["guarded"], times["plain"]),
        "score_share_of_plain_cpu": statistics.median(times["score"]["cpu"]) / statistics.median(times["plain"]["cpu"]),
    }


def latency(
    model: torch.nn.Module, detector: Detector, x_pool: np.ndarray, batches: tuple[int, ...], repeats: int, warmup: int
) -> dict[str, Any]:
    """``latency_one`` per batch size; the guarded model is a deep copy so the plain one carries no hooks."""
    full, compact = Guarded(copy.deepcopy(model), detector), Guarded(copy.deepcopy(model), detector, compact=True)
    # fed channels_last inputs, the layers return channels_last outputs: its own probe sees them as serving would
    full_cl = Guarded(copy.deepcopy(model), detector, memory_format=torch.channels_last)
    out: dict[str, Any] = {}
    # Inputs as a TorchServe handler's torch.stack makes them (contiguous NCHW), plus the largest batch in the
    # channels_last layout; and every batch size again with `response: compact` (no per-layer detail, so the
    # hooks skip the cosine profile).
    cases = [(str(b), b, torch.contiguous_format, full) for b in batches]
    cases.append((f"{max(batches)}, channels_last", max(batches), torch.channels_last, full_cl))
    cases += [(f"{b}, compact", b, torch.contiguous_format, compact) for b in batches]
    for key, b, layout, guarded in cases:
        n = repeats * 4 if b == 1 else repeats  # batch 1 is cheap and its few-ms timings are the noisiest
        x = to_tensor(x_pool[:b]).contiguous(memory_format=layout)
        r = out[key] = latency_one(model, guarded, x, n, warmup)
        log(
            f"  batch {key}: plain {r['plain']['cpu_median_ms']:.2f} ms, guarded {r['guarded']['cpu_median_ms']:.2f} "
            f"ms (CPU time), added {100 * (r['cpu_ratio_of_medians'] - 1):+.1f}% (wall: "
            f"{100 * (r['wall_ratio_of_medians'] - 1):+.1f}%)"
        )
    for guarded in (full, compact, full_cl):
        guarded.capture.detach()
    return out


def peer_costs(
    model: torch.nn.Module,
    detector: Detector,
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    batch: int,
    repeats: int,
    strip_n: int,
) -> dict[str, Any]:
    """Per-input cost of every detector as a ratio of one plain forward pass, same batch, interleaved."""
    x = to_tensor(x_pool[:batch]).contiguous()
    ref = to_tensor(x_pool).contiguous()
    guard_model = copy.deepcopy(model)
    guarded = Guarded(guard_model, detector)
    strip = Strip(model, ref, n=strip_n, batch=max(batch * strip_n, 1))
    scaleup = ScaleUp(model, batch=batch * 6)
    scaleup.fit(ref[:200], 10)
    maha = Mahalanobis("pool")
    with LayerCapture(model, ["pool"]) as cap:
        _, feats = cap.run(ref)
    maha.fit(feats["pool"], y_pool, 10)
    fns = {
        "plain": lambda: plain_forward(model)(x),
        "layerguard": lambda: guarded(x),
        "Mahalanobis": lambda: maha.score(model, x, batch=batch),
        "SCALE-UP": lambda: scaleup.score(x),
        f"STRIP (N={strip_n})": lambda: strip.score(x),
    }
    times = time_interleaved(fns, repeats, warmup=2)
    guarded.capture.detach()
    base = {kind: statistics.median(times["plain"][kind]) for kind in ("wall", "cpu")}
    return {
        k: {
            "median_ms": 1000 * statistics.median(v["wall"]),
            "cpu_median_ms": 1000 * statistics.median(v["cpu"]),
            "cpu_per_input_ms": 1000 * statistics.median(v["cpu"]) / batch,
            "ratio_to_forward": statistics.median(v["cpu"]) / base["cpu"],
            "wall_ratio_to_forward": statistics.median(v["wall"]) / base["wall"],
            "repeats": len(v["wall"]),
        }
        for k, v in times.items()
    }


# ---- memory: a fresh process per configuration, like a TorchServe worker -------------------------------
def memory_child(arch: str, artifact_path: str | None, batch: int, steps: int, threads: int) -> dict[str, Any]:
    """Runs in a subprocess: RSS after loading the model, after loading the detector, and the peak while serving."""
    torch.set_num_threads(threads)
    match_blas_threads()
    model, _ = load_bench_model(arch)
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        model(x)  # allocator warm-up, as a worker's first request would
    rss_model = rss_bytes()
    run: Callable[[torch.Tensor], Any] = plain_forward(model)
    if artifact_path:
        artifact = CalibrationArtifact.load(artifact_path)
        run = Guarded(model, artifact.detector())
    rss_loaded = rss_bytes()
    reset = reset_peak_rss()
    for _ in range(steps):
        run(x)
    return {
        "rss_model_mb": rss_model / 2**20,
        "rss_after_load_mb": rss_loaded / 2**20,
        "rss_after_serving_mb": rss_bytes() / 2**20,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "peak_is_serving_only": reset,
    }


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak covers serving only."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM of this process (not ru_maxrss, which Linux carries over from the parent across fork+exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(arch: str, artifact_path: Path, batch: int, steps: int, threads: int) -> dict[str, Any]:
    out = {}
    for mode, art in (("plain", None), ("guarded", str(artifact_path))):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            arch,
            "--batch-child",
            str(batch),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ]
        if art:
            cmd += ["--artifact", art]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    out["extra_peak_rss_mb"] = out["guarded"]["peak_rss_mb"] - out["plain"]["peak_rss_mb"]
    out["extra_rss_after_serving_mb"] = out["guarded"]["rss_after_serving_mb"] - out["plain"]["rss_after_serving_mb"]
    out["detector_load_rss_mb"] = out["guarded"]["rss_after_load_mb"] - out["guarded"]["rss_model_mb"]
    out["batch"] = batch
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=50,
                   help="timed repeats per configuration at batch 32 (4x as many at batch 1); medians reported")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peer-repeats", type=int, default=15)
    p.add_argument("--strip-n", type=int, default=20)
    p.add_argument("--calib-per-class", type=int, default=30, help="calibration images per class for the artifacts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="resnet20,resnet18_cifar")
    p.add_argument("--rule", default=DEFAULT_RULE, help=f"scoring rule of the guarded model (default {DEFAULT_RULE})")
    p.add_argument("--exclude-logits", action="store_true",
                   help="monitor the default window without the logits, as `calibrate.py --exclude-logits` does")
    p.add_argument("--allocator", choices=("hold", "default"), default="hold",
                   help="hold: glibc keeps freed memory, so timings measure the work, not page faults (default); "
                   "default: glibc as it comes")
    p.add_argument("--out", type=Path, default=None)
    # internal: memory measurement in a fresh process
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-child", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    match_blas_threads()  # numpy's BLAS within the same threads, as in a guarded worker
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.artifact, args.batch_child, args.steps, args.threads)))
        return 0

    t_start = time.time()
    allocator = ALLOCATOR_NOTE if args.allocator == "hold" and hold_freed_memory() else "glibc defaults"
    data = load_cifar(args.data or default_data_path())
    idx = stratified(data["y_test"], args.calib_per_class)
    x_cal, y_cal = data["x_test"][idx], data["y_test"][idx]
    order = np.random.default_rng(0).permutation(len(x_cal))  # classes mixed within a batch, as in serving
    x_pool, y_pool = x_cal[order], y_cal[order]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [m.strip() for m in args.models.split(",") if m.strip()]:
            model, source = load_bench_model(arch)
            path = Path(tmp) / f"{arch}.npz"
            artifact, cal_s = make_artifact(model, x_cal, y_cal, path, args.rule, args.exclude_logits)
            detector = artifact.detector()
            log(f"[{arch}] calibrated on {len(x_cal)} images in {cal_s:.0f}s; layers {artifact.layer_names}")
            entry: dict[str, Any] = {
                "description": MODELS.get(arch, arch),
                "weights": source,
                "params": sum(p.numel() for p in model.parameters()),
                "layers": list(artifact.layer_names),
                "rule": artifact.meta.rule,
                "exclude_logits": args.exclude_logits,
                "policy": artifact.meta.threshold,
                "feature_dims": int(sum(c.shape[1] for c in detector.profile.centroids.values())),
                "artifact_bytes": path.stat().st_size,
                "calibration_images": len(x_cal),
                "latency": latency(model, detector, x_pool, (1, 32), args.repeats, args.warmup),
            }
            entry["memory"] = measure_memory(arch, path, 32, 10, args.threads)
            log(
                f"[{arch}] memory: extra peak RSS {entry['memory']['extra_peak_rss_mb']:.1f} MB, detector load "
                f"{entry['memory']['detector_load_rss_mb']:.1f} MB, artifact {entry['artifact_bytes'] / 2**20:.2f} MiB"
            )
            if arch == "resnet20":
                entry["peers_batch32"] = peer_costs(
                    model, detector, x_pool, y_pool, 32, args.peer_repeats, args.strip_n
                )
                log(
                    f"[{arch}] peers: "
                    + ", ".join(f"{k} x{v['ratio_to_forward']:.2f}" for k, v in entry["peers_batch32"].items())
                )
            results[arch] = entry
    payload = {
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(),
        "threads": args.threads,
        "allocator": allocator,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "keep_whole_up_to": {"full": KEEP_WHOLE_UP_TO, "compact": KEEP_WHOLE_UP_TO_NO_COSINE},
        "seconds": round(time.time() - t_start, 1),
        "models": results,
    }
    path = write_result("overhead", payload, args.out)
    log(f"wrote {path} ({payload['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

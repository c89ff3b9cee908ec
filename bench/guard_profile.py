#!/usr/bin/env python3
"""Where the guarded path spends its time beyond the plain forward pass, step by step, in process.

Each variant adds one piece of what a guarded worker does to a batch, measured interleaved with the plain
forward pass (same inputs, round-robin order, median of per-call times, glibc holding freed memory):

  hooks-keep     forward hooks that keep each monitored layer's output (the pre-0.2 design)
  keep + score   ... then scoring from the kept outputs, layers of equal shape reduced together after the
                 pass, in numpy (what serving does up to KEEP_WHOLE_UP_TO rows, 32: layerguard/core/grouped.py)
  keep + score (torch)  the same reductions in torch (what a GPU or half-precision model gets)
  hooks-reduce   hooks that reduce each output to what scoring needs, inside the hook (cosine profile + rule)
  hooks-compact  the same without the cosine profile (`response: compact`)
  + score        the detector's verdicts from the reduced outputs
  + notes        per-item JSON-ready annotations (`Detection.items`)
  + json         serialising each item's response body as TorchServe does (json.dumps per item)

Reported as milliseconds per batch and as a share of the plain forward pass.

Then the crossover that sets KEEP_WHOLE_UP_TO (layerguard/core/grouped.py): the whole guarded path of
bench/overhead.py (`Guarded`: forward, verdicts, notes) with the reductions inside the hooks against the outputs
kept and reduced after the pass, full and compact responses, at several batch sizes, as the median over rounds of
each path's CPU time / the plain pass's in the same round (paired: drift between rounds cancels).

Models are the CIFAR ResNet-20 and ResNet-18 of bench/models.py with random weights (timing does not depend on
what the weights learned), calibrated on random images (the statistics' values do not change the cost either).

    .venv/bin/python bench/guard_profile.py [--archs resnet20,resnet18_cifar] [--batches 1,16,32] [--repeats 40]
        [--crossover-batches 1,4,8,16,32,64] [--crossover-repeats 40]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import (  # noqa: E402
    ALLOCATOR_NOTE,
    command_line,
    hold_freed_memory,
    log,
    machine_info,
    now_utc,
    write_result,
)
from bench.models import build_model  # noqa: E402
from layerguard.core.capture import LayerCapture  # noqa: E402
from layerguard.core.grouped import KEEP_WHOLE_UP_TO, KEEP_WHOLE_UP_TO_NO_COSINE  # noqa: E402
from layerguard.core.host import match_blas_threads  # noqa: E402
from layerguard.core.layers import default_plan, discover_layers  # noqa: E402
from layerguard.core.rules import DEFAULT_RULE  # noqa: E402
from layerguard.tooling.calibration import CalibrationConfig, calibrate  # noqa: E402

VARIANTS = ("hooks-keep", "keep + score", "keep + score (torch)", "hooks-reduce", "hooks-compact", "+ score",
            "+ notes", "+ json")


def calibrated(arch: str, rule: str):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    x, y = torch.rand(300, 3, 32, 32), torch.arange(300) % 10
    plan = default_plan(discover_layers(model, x[:1]))
    artifact = calibrate(model, lambda: [(x[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)], plan, 10,
                         CalibrationConfig(rule=rule, min_per_class=10))
    return model, plan, artifact.detector()


def steps(model, plan, det, xb: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One callable per variant, each doing everything the previous one did plus its own piece."""
    keep = LayerCapture(model, plan.layers)
    full = LayerCapture(model, plan.layers, reducer=det.reducer(similarities=True))
    compact = LayerCapture(model, plan.layers, reducer=det.reducer(similarities=False))
    names, terms = det.layer_names, det.rule.term_names

    def forward(capture: LayerCapture | None):
        if capture is not None:
            capture.clear()
        with torch.no_grad():
            return model(xb)

    def kept_scored():
        out = forward(keep)
        return det.score_outputs(keep.features(), out.argmax(dim=1))

    def kept_scored_in_torch():
        out = forward(keep)
        return det.score_outputs(keep.features(), out.argmax(dim=1), on_host=False)

    def scored():
        out = forward(full)
        return det.score_reduced(full.features(), out.argmax(dim=1))

    def noted():
        return scored().items(names, terms)

    def dumped():
        return [json.dumps({"class": 0, "layerguard": note}) for note in noted()]

    return {
        "plain": lambda: forward(None),
        "hooks-keep": lambda: (forward(keep), keep.features()),
        "keep + score": kept_scored,
        "keep + score (torch)": kept_scored_in_torch,
        "hooks-reduce": lambda: (forward(full), full.features()),
        "hooks-compact": lambda: (forward(compact), compact.features()),
        "+ score": scored,
        "+ notes": noted,
        "+ json": dumped,
    }, {"keep": keep, "full": full, "compact": compact}


def multiply_adds(model: torch.nn.Module, plan, num_classes: int, xb: torch.Tensor) -> dict[str, int]:
    """Per input: the forward pass's multiply-adds (convolutions and linear layers) and the cosine profile's
    (each monitored layer's flattened output against every class centroid, plus its norm). A floor that no
    implementation of the per-layer similarities can go under, whatever the dispatch overheads."""
    forward = 0
    widths: dict[str, int] = {}

    def count(module, _inputs, output) -> None:
        nonlocal forward
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            forward += output[0].numel() * k
        elif isinstance(module, torch.nn.Linear):
            forward += module.in_features * module.out_features

    modules = dict(model.named_modules())
    handles = [m.register_forward_hook(count) for m in modules.values()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles += [modules[n].register_forward_hook(lambda _m, _i, out, n=n: widths.__setitem__(n, out[0].numel()))
                for n in plan.layers]
    try:
        with torch.no_grad():
            model(xb[:1])
    finally:
        for h in handles:
            h.remove()
    return {"forward": int(forward), "cosine_profile": int(sum((num_classes + 1) * w for w in widths.values()))}


def measure(arch: str, rule: str, batch: int, repeats: int) -> dict:
    model, plan, det = calibrated(arch, rule)
    xb = torch.rand(batch, 3, 32, 32)
    calls, captures = steps(model, plan, det, xb)
    attached = {"plain": None, "hooks-keep": "keep", "keep + score": "keep", "keep + score (torch)": "keep",
                "hooks-reduce": "full",
                "hooks-compact": "compact"}
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(repeats + 3):
        for name in order if r % 2 == 0 else reversed(order):
            which = attached.get(name, "full")
            for key, cap in captures.items():
                (cap.attach if key == which else cap.detach)()
            start = time.perf_counter()
            calls[name]()
            if r >= 3:  # warm-up rounds are not counted
                times[name].append(time.perf_counter() - start)
    captures["full"].attach()
    sample = calls["+ json"]()
    for cap in captures.values():
        cap.detach()
    plain = statistics.median(times["plain"])
    row = {"arch": arch, "rule": rule, "batch": batch, "layers": list(plan.layers), "plain_ms": 1e3 * plain}
    for name in VARIANTS:
        t = statistics.median(times[name])
        row[name] = {"ms": 1e3 * t, "added_ms": 1e3 * (t - plain), "added_pct": 100 * (t / plain - 1)}
    row["response_bytes_per_item"] = len(sample[0]) if sample else 0
    row["multiply_adds_per_input"] = multiply_adds(model, plan, det.num_classes, xb)
    return row


def crossover(arch: str, rule: str, batches: list[int], repeats: int) -> list[dict]:
    """Paired CPU time added by each path, hooks against kept, full and compact, per batch size."""
    from bench.overhead import Guarded, time_interleaved

    model, _, det = calibrated(arch, rule)
    paths = {}
    for compact in (False, True):
        for kept in (False, True):
            guarded = Guarded(copy.deepcopy(model), det, compact=compact)
            guarded.capture.keep_whole_up_to = max(batches) if kept else 0
            paths[f"{'compact' if compact else 'full'}, {'kept' if kept else 'hooks'}"] = guarded
    plain = copy.deepcopy(model)
    rows = []
    for batch in batches:
        xb = torch.rand(batch, 3, 32, 32)

        def forward(xb: torch.Tensor = xb) -> torch.Tensor:
            with torch.no_grad():
                return plain(xb)

        times = time_interleaved({"plain": forward, **{k: (lambda g=g, xb=xb: g(xb)) for k, g in paths.items()}},
                                 repeats, 5)
        base = times["plain"]["cpu"]
        rows.append({"arch": arch, "batch": batch, "plain_ms": 1e3 * statistics.median(base),
                     **{k: 100 * (statistics.median([g / p for g, p in zip(times[k]["cpu"], base)]) - 1)
                        for k in paths}})
        log(f"crossover {arch} b={batch}: " + "; ".join(f"{k} {rows[-1][k]:+.1f}%" for k in paths))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="resnet20,resnet18_cifar")
    p.add_argument("--batches", default="1,16,32")
    p.add_argument("--rule", default=DEFAULT_RULE, help=f"scoring rule (default {DEFAULT_RULE})")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--crossover-batches", default="1,4,8,16,32,64")
    p.add_argument("--crossover-repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=None, help="accepted for bench/run_all.py; the profile uses random inputs")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    match_blas_threads()  # numpy's BLAS within the same threads, as in a guarded worker
    held = hold_freed_memory()
    rows = []
    for arch in args.archs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure(arch, args.rule, batch, args.repeats)
            rows.append(row)
            log(f"{arch} b={batch}: plain {row['plain_ms']:.2f} ms; " + "; ".join(
                f"{k} +{row[k]['added_pct']:.1f}%" for k in VARIANTS))
    cross = [row for arch in args.archs.split(",")
             for row in crossover(arch, args.rule, [int(b) for b in args.crossover_batches.split(",")],
                                  args.crossover_repeats)]
    path = write_result("guard_profile", {"command": command_line(), "date": now_utc(), "machine": machine_info(),
                                          "allocator": ALLOCATOR_NOTE if held else "glibc defaults",
                                          "repeats": args.repeats, "rows": rows,
                                          "crossover": {"repeats": args.crossover_repeats,
                                                        "keep_whole_up_to": {"full": KEEP_WHOLE_UP_TO,
                                                                             "compact": KEEP_WHOLE_UP_TO_NO_COSINE},
                                                        "rows": cross}},
                        args.out)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

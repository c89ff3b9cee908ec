#!/usr/bin/env python3
"""Would `torch.compile` close the guard's cost gap? A probe for issue 14's open decision, not a shipped path.

In eager PyTorch the guard's reductions of each monitored output (channel means and norms, the cosine against
every class centroid) are a few small ops per layer, each a separate pass over the activation and a separate
dispatch: at batch 1 on the CIFAR ResNet-20 that is what the guard costs. Inductor (torch.compile, CPU, a C++
compiler at run time) can fuse those ops into generated loops. This probe times the guarded path of
bench/overhead.py (`Guarded`: forward with the hooks reducing inside them, verdicts, notes) eager and compiled,
against the plain forward pass eager and compiled, interleaved, and reports each guarded path's paired CPU time
over its own plain pass (and over the eager plain pass, which is what an ops team serves today). It also checks
that the compiled path gives the eager path's verdicts, and records how long the first call (the compilation)
takes for each batch shape.

Models: bench/models.py with random weights, calibrated on random images (as bench/guard_profile.py does: the
cost does not depend on the values). One torch thread.

    .venv/bin/python bench/compile_probe.py [--archs resnet20] [--batches 1,32] [--repeats 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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
from bench.guard_profile import calibrated  # noqa: E402
from bench.overhead import Guarded, time_interleaved  # noqa: E402
from layerguard.core.rules import DEFAULT_RULE  # noqa: E402


def first_call_seconds(fn, x: torch.Tensor) -> float:
    """Wall time of the first call: for a compiled callable, the compilation for this input shape."""
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def paired(times: dict, name: str, base: str) -> float:
    """Median over rounds of name's CPU time / base's, minus 1, in %."""
    return 100 * (statistics.median([g / p for g, p in zip(times[name]["cpu"], times[base]["cpu"])]) - 1)


def probe(arch: str, batch: int, repeats: int) -> dict:
    model, _, det = calibrated(arch, DEFAULT_RULE)
    eager_plain = copy.deepcopy(model)
    compiled_plain = torch.compile(copy.deepcopy(model), dynamic=False)
    eager = Guarded(copy.deepcopy(model), det)
    compiled = Guarded(copy.deepcopy(model), det)
    module = compiled.model

    def forward(xb: torch.Tensor) -> torch.Tensor:
        return module(xb)

    # a compiled function that calls the module traces its submodules' hooks and replays what they store
    # (torch.compile(module) ran the forward without them: the capture found no outputs)
    compiled.model = torch.compile(forward, dynamic=False)
    for guarded in (eager, compiled):
        guarded.capture.keep_whole_up_to = 0  # reduce inside the hooks, the path compilation can fuse
    x = torch.rand(batch, 3, 32, 32)

    def plain_call(m):
        def run(xb: torch.Tensor = x):
            with torch.no_grad():
                return m(xb)
        return run

    compile_s = {"plain": first_call_seconds(plain_call(compiled_plain), x),
                 "guarded": first_call_seconds(compiled, x)}
    notes_eager, notes_compiled = eager(x), compiled(x)
    score_diff = max(abs(a["score"] - b["score"]) for a, b in zip(notes_eager, notes_compiled))
    same_verdicts = all(a["poisoned"] == b["poisoned"] for a, b in zip(notes_eager, notes_compiled))
    times = time_interleaved({"eager plain": plain_call(eager_plain), "eager guarded": lambda: eager(x),
                              "compiled plain": plain_call(compiled_plain), "compiled guarded": lambda: compiled(x)},
                             repeats, 5)
    row = {"arch": arch, "batch": batch,
           **{f"{k} ms": 1e3 * statistics.median(v["cpu"]) for k, v in times.items()},
           "eager added %": paired(times, "eager guarded", "eager plain"),
           "compiled added %": paired(times, "compiled guarded", "compiled plain"),
           "compiled guarded vs eager plain %": paired(times, "compiled guarded", "eager plain"),
           "compile seconds": compile_s, "largest score difference": score_diff, "same verdicts": same_verdicts}
    log(f"{arch} b={batch}: eager {row['eager added %']:+.1f}%, compiled {row['compiled added %']:+.1f}% "
        f"(against eager plain {row['compiled guarded vs eager plain %']:+.1f}%); "
        f"compile {compile_s['guarded']:.0f} s; "
        f"score difference {score_diff:.2e}, same verdicts {same_verdicts}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="resnet20")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    # a cold compile cache, as a fresh TorchServe worker has: the compile seconds are then what a first request
    # of each batch shape would wait (a warm cache from an earlier run cut them from ~10 s to ~1 s)
    cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    allocator = ALLOCATOR_NOTE if hold_freed_memory() else "glibc defaults"
    t0 = time.time()
    rows = [probe(arch.strip(), int(b), args.repeats) for arch in args.archs.split(",")
            for b in args.batches.split(",")]
    path = write_result("compile_probe", {
        "command": command_line(), "date": now_utc(), "machine": machine_info(), "threads": 1,
        "allocator": allocator, "rule": DEFAULT_RULE, "repeats": args.repeats, "seconds": time.time() - t0,
        "torch": torch.__version__, "inductor_cache": cache, "rows": rows,
        "note": "probe for issue 14; the handler does not compile (a first call per batch shape takes the "
                "compile seconds shown)"}, args.out)
    log(f"wrote {path}")
    return 0 if all(r["same verdicts"] for r in rows) and np.isfinite([r["compiled added %"] for r in rows]).all() \
        else 1


if __name__ == "__main__":
    sys.exit(main())

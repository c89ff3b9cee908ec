"""Small helpers shared by the benchmark scripts: machine description, result files, logging.

Why: every number in docs/benchmarks.md must say which machine, torch build, thread count and command
produced it, and every script writes the same kind of small JSON under bench/results/.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def machine_info() -> dict[str, Any]:
    """CPU model and core count (from lscpu when available), OS, Python and torch versions."""
    cpu, cores = platform.processor() or "unknown", os.cpu_count()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cores": cores,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """The command as a user would type it from the repo root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (indented, stable key order) and return its path."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=_jsonable) + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# glibc gives freed memory back to the OS (trim, munmap) once it passes a threshold; the next call that needs
# it pays page faults again. Which of two alternating calls pays depends on the order, not on the work: on
# ResNet-20 at batch 32 one side paid ~1,500 minor faults a call and the other none, swinging the measured
# overhead by +-15% (`bench/overhead.py --allocator default` records the faults per call). Holding freed
# memory (as jemalloc and tcmalloc do, the allocators that CPU tuning guides for PyTorch suggest) measures
# the work itself. 32 MiB is glibc's largest mmap threshold.
HOLD_FREED_MEMORY = 32 * 1024 * 1024
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(HOLD_FREED_MEMORY), "MALLOC_MMAP_THRESHOLD_": str(HOLD_FREED_MEMORY)}
ALLOCATOR_NOTE = ("glibc told to keep freed memory (trim and mmap thresholds 32 MiB, via mallopt / "
                  "MALLOC_*_THRESHOLD_), so no call pays page faults for memory an earlier call gave back")


def hold_freed_memory(threshold: int = HOLD_FREED_MEMORY) -> bool:
    """mallopt(M_TRIM_THRESHOLD) and mallopt(M_MMAP_THRESHOLD) in this process; False where not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, threshold)) and bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False


def minor_faults() -> int:
    """Minor page faults of this process so far (a call that touches fresh memory pays one per page)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_ratios(a_phases: list[float], b_phases: list[float], phases_per_round: int = 2) -> list[float]:
    """Per round of an interleaved benchmark (ABBA: each round runs A and B twice), B's throughput over A's.
    Each phase serves the same number of requests, so a round's throughput is the harmonic mean of its
    phases'. Why: on a shared machine the load drifts between rounds by more than the effect measured, so
    the spread of these paired ratios says how far one run's overall ratio can be trusted."""
    if len(a_phases) != len(b_phases) or not a_phases or len(a_phases) % phases_per_round:
        raise ValueError(f"need whole rounds of {phases_per_round} phases each for both, got {len(a_phases)} "
                         f"and {len(b_phases)}")

    def harmonic(xs: list[float]) -> float:
        return len(xs) / sum(1.0 / x for x in xs)

    n = phases_per_round
    return [harmonic(b_phases[i:i + n]) / harmonic(a_phases[i:i + n]) for i in range(0, len(a_phases), n)]

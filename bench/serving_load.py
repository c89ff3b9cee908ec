"""Throughput and latency through a real TorchServe on 127.0.0.1: plain .mar vs the guarded .mar.

Why this setup: the question a user asks is "what does wrapping my archive cost me in production?". So
both archives hold the same CIFAR network with the same ordinary BaseHandler and the same batching config;
the guarded one is made from the plain one by ``layerguard.tooling.wrap.wrap_mar`` (calibrated on 1,000 benign
test PNGs through the handler's own preprocess). One TorchServe serves both (one worker each), and the same
closed-loop load (fixed concurrency, fixed request count, the same PNGs) is sent to each in alternation,
plain-guarded-guarded-plain per round (ABBA), so drift on the shared machine hits both alike. This runs for
each architecture in ``--archs``: the zoo's ResNet-20 (a forward pass so cheap that the guard's fixed
per-batch cost shows) and a ResNet-18-sized network (the paper's model size). Only loopback addresses are
used; each server is stopped by PID at the end (tests/torchserve_util.py).

Usage:  .venv/bin/python bench/serving_load.py [--archs resnet20,resnet18_cifar] [--requests 400] [--rounds 12]
        [--response compact]   (the guarded archive wrapped with `--response compact`: serving_load_compact.json)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import models as bench_models  # noqa: E402
from bench.benchutil import (  # noqa: E402
    ALLOCATOR_NOTE,
    MALLOC_ENV,
    REPO_ROOT,
    command_line,
    hold_freed_memory,
    log,
    machine_info,
    now_utc,
    write_result,
)
from bench.data import default_data_path, load_cifar  # noqa: E402
from bench.overhead import load_bench_model, stratified  # noqa: E402
from layerguard.core.detector import Detection  # noqa: E402
from layerguard.core.rules import DEFAULT_RULE  # noqa: E402
from layerguard.tooling.calibration import CalibrationConfig  # noqa: E402
from layerguard.tooling.data import ArraySource, encode_png  # noqa: E402
from layerguard.tooling.wrap import WrapConfig, wrap_mar  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "tests"))
import torchserve_util  # noqa: E402
from torchserve_util import PROJECT_CONFIG, TorchServe, free_port  # noqa: E402

HANDLER_SOURCE = '''"""CIFAR-10 handler as a model owner would write it: PNG -> RGB float [0, 1] NCHW; top class."""

import io

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class CifarHandler(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            payload = row.get("data") or row.get("body")
            if isinstance(payload, str):
                payload = payload.encode()
            image = Image.open(io.BytesIO(payload)).convert("RGB")
            if image.size != (32, 32):
                image = image.resize((32, 32))
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(images).to(self.device)

    def postprocess(self, data):
        probs = torch.softmax(data.float(), dim=1)
        top = probs.argmax(dim=1)
        return [{"class": int(k), "probability": round(float(p[k]), 6)} for k, p in zip(top, probs)]
'''

MODEL_SOURCE = '''"""The one model class BaseHandler looks for; the architecture lives in cifar_resnet.py."""

from cifar_resnet import CifarResNet


class CifarModel(CifarResNet):
    def __init__(self) -> None:
        super().__init__({blocks}, {widths}, {classes})
'''


def model_source(model: bench_models.CifarResNet) -> str:
    """The archive's model file for this CifarResNet: its stages' depths and widths, read off the model."""
    stages = [getattr(model, name) for name in model.stage_names]
    return MODEL_SOURCE.format(blocks=[len(s) for s in stages], widths=[s[0].conv1.out_channels for s in stages],
                               classes=model.fc.out_features)


def build_plain_mar(out: Path, model: torch.nn.Module, name: str, batch_size: int, max_batch_delay: int) -> Path:
    """An ordinary eager archive (model file + state_dict + extra file + handler + model-config.yaml)."""
    files = out / f"{name}-files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "cifar_resnet.py").write_text(inspect.getsource(bench_models))
    (files / "cifar_model.py").write_text(model_source(model))
    (files / "cifar_handler.py").write_text(HANDLER_SOURCE)
    torch.save(model.state_dict(), files / "cifar_model.pt")
    config = {"batchSize": batch_size, "maxBatchDelay": max_batch_delay, "minWorkers": 1, "maxWorkers": 1}
    (files / "model-config.yaml").write_text(yaml.safe_dump(config))
    tmp = out / "tmp"
    tmp.mkdir(exist_ok=True)
    cmd = [
        str(Path(sys.executable).parent / "torch-model-archiver"),
        "--model-name",
        name,
        "--version",
        "1.0",
        "--model-file",
        str(files / "cifar_model.py"),
        "--serialized-file",
        str(files / "cifar_model.pt"),
        "--extra-files",
        str(files / "cifar_resnet.py"),
        "--handler",
        str(files / "cifar_handler.py"),
        "--config-file",
        str(files / "model-config.yaml"),
        "--export-path",
        str(out),
        "--force",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "TMPDIR": str(tmp)})
    return out / f"{name}.mar"


def load_handlers(mars: dict[str, Path], batch_size: int, settings: dict[str, dict[str, Any]] | None = None
                  ) -> dict[str, tuple[Any, Any]]:
    """{name: (handle callable, context)} for each archive, built in this process as a worker builds it.

    Each archive is extracted and its entry point built with a real ``ts.context.Context`` as a worker does (a
    handler class is initialised, a ``handle`` function is called once with no data). `settings[name]` adds
    layerguard keys to that archive's model-config.yaml (e.g. ``response: compact``), as an operator would."""
    from layerguard.serving.inner import model_dir_imports
    from layerguard.tooling.archive import extract_mar
    from layerguard.tooling.worker import worker_context

    handlers = {}
    scratch = Path(tempfile.mkdtemp(prefix="layerguard-handlers-"))
    for name, mar in mars.items():
        model_dir = scratch / name
        model_dir.mkdir()
        manifest = extract_mar(mar, model_dir)
        config_name = manifest["model"].get("configFile")
        config = yaml.safe_load((model_dir / config_name).read_text()) if config_name else {}
        if settings and name in settings:
            config.setdefault("handler", {}).setdefault("layerguard", {}).update(settings[name])
        with model_dir_imports(model_dir):
            context = worker_context(model_dir, manifest, config, batch_size=batch_size)
            module = importlib.import_module(Path(manifest["model"]["handler"].split(":")[0]).stem)
            classes = [c for c in vars(module).values()
                       if inspect.isclass(c) and c.__module__ == module.__name__ and hasattr(c, "handle")]
            if len(classes) == 1:  # a class handler, as the plain archive's
                handler = classes[0]()
                handler.initialize(context)
                call = handler.handle
            elif callable(getattr(module, "handle", None)):  # a function entry point (the guarded archive's):
                call = module.handle  # TorchServe calls it once with no data to initialize
                call(None, context)
            else:
                raise RuntimeError(f"{mar.name}: expected one handler class or a handle function")
        handlers[name] = (call, context)
    return handlers


def handler_cpu(handlers: dict[str, tuple[Any, Any]], payloads: list[bytes], batches: tuple[int, ...], repeats: int
                ) -> dict[str, Any]:
    """CPU time per request of each archive's handler called in this process, without HTTP or the frontend:
    called on batches of PNG requests, the archives alternating. This isolates what the worker spends per
    request, the part layerguard adds to, from the noise of the whole server.
    """
    from layerguard.tooling.worker import set_requests

    out: dict[str, Any] = {}
    for b in batches:
        rows = [{"data": payloads[i % len(payloads)]} for i in range(b)]
        times: dict[str, list[float]] = {n: [] for n in handlers}
        for r in range(5 + repeats):
            for name, (call, context) in handlers.items():
                set_requests(context, b)
                t0 = time.thread_time()
                result = call(rows, context)
                if r >= 5:
                    times[name].append(time.thread_time() - t0)
                if len(result) != b:
                    raise RuntimeError(f"{name} returned {len(result)} results for {b} requests")
        med = {n: statistics.median(v) for n, v in times.items()}
        out[str(b)] = {**{f"{n}_cpu_ms_per_request": 1000 * v / b for n, v in med.items()},
                       **{("ratio" if n == "guarded" else f"{n}_ratio"): v / med["plain"]
                          for n, v in med.items() if n != "plain"}, "repeats": repeats}
        log(f"handler in process, batch {b}: "
            + ", ".join(f"{n} {1000 * v / b:.2f} ms/request (x{v / med['plain']:.3f})" for n, v in med.items()))
    return out


FORWARD = "forward pass (inner inference)"


def stage_targets(handler: tuple[Any, Any]) -> list[tuple[str, Any, str, str | None]]:
    """(label, object, attribute, parent label) of each stage of this archive's `handle` worth timing: the
    inner handler's lifecycle and, for a guarded archive, each piece layerguard adds. A child stage runs inside
    its parent (the hooks inside the forward pass), so its time is part of the parent's."""
    from layerguard.serving.entry import guard_for

    call, context = handler
    owner = getattr(call, "__self__", None)
    if owner is not None:  # the plain archive: a BaseHandler subclass
        return [("preprocess (PNG decode, stack)", owner, "preprocess", None), (FORWARD, owner, "inference", None),
                ("postprocess (softmax, top class)", owner, "postprocess", None)]
    guard = guard_for(str(context.system_properties["model_dir"]))
    return [("preprocess (PNG decode, stack)", guard.inner, "preprocess", None),
            (FORWARD, guard.inner, "inference", None),
            (f"monitored layers' reductions in their hooks (batches over {guard.capture.keep_whole_up_to})",
             guard.capture,
             "_reducer", FORWARD),
            (f"verdicts (Detector.score_capture; up to {guard.capture.keep_whole_up_to} rows it reduces the kept "
             "outputs)",
             guard.detector, "score_capture", None),
            ("JSON-ready notes (Detection.items)", Detection, "items", None),
            ("postprocess (softmax, top class)", guard.inner, "postprocess", None),
            ("answers and X-LayerGuard headers", guard, "_answer", None),
            ("metrics (log lines)", guard, "_emit_metrics", None)]


class StageClock:
    """Thread-CPU time spent inside wrapped callables, per stage, for the current call of `handle`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.thread_time() - t0

        return timed


def call_once(handler: tuple[Any, Any], rows: list[dict]) -> list:
    from layerguard.tooling.worker import set_requests

    call, context = handler
    set_requests(context, len(rows))
    return call(rows, context)


def worker_breakdown(handlers: dict[str, tuple[Any, Any]], payloads: list[bytes], batch: int, repeats: int
                     ) -> dict[str, Any]:
    """Where each archive's `handle` spends its CPU time, stage by stage, per batch: each stage's callable is
    wrapped (for the measurement only) in a thread-CPU clock, the archives alternate, and each stage reports its
    median over the calls; "other" is the median of what `handle` spent outside every top-level stage. Then the
    response bodies are encoded as TorchServe's worker encodes them after `handle` (json.dumps per item)."""
    rows = [{"data": payloads[i % len(payloads)]} for i in range(batch)]
    out: dict[str, Any] = {"batch": batch, "repeats": repeats, "archives": {}}
    clocks = {n: StageClock() for n in handlers}
    patches: list[tuple[Any, str, Any, bool]] = []  # (object, attribute, original, was set on the object itself)
    stages = {n: stage_targets(h) for n, h in handlers.items()}
    per_call: dict[str, list[dict[str, float]]] = {n: [] for n in handlers}
    encode: dict[str, list[float]] = {n: [] for n in handlers}
    try:
        for r in range(5 + repeats):
            for name, handler in handlers.items():
                clock = clocks[name]
                for label, obj, attr, _ in stages[name]:
                    patches.append((obj, attr, getattr(obj, attr), attr in vars(obj)))
                    setattr(obj, attr, clock.wrap(label, getattr(obj, attr)))
                clock.seconds = {}
                t0 = time.thread_time()
                results = call_once(handler, rows)
                total = time.thread_time() - t0
                while patches:  # unwrap before the next archive (Detection.items is shared by both guards)
                    obj, attr, original, own = patches.pop()
                    if own:
                        setattr(obj, attr, original)
                    else:
                        delattr(obj, attr)
                t0 = time.thread_time()
                for result in results:
                    json.dumps(result)
                if r >= 5:
                    encode[name].append(time.thread_time() - t0)
                    per_call[name].append({**clock.seconds, "handle": total})
    finally:
        for obj, attr, original, own in reversed(patches):
            if own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)
    for name, calls in per_call.items():
        rows_out = []
        for label, _, _, parent in stages[name]:
            if any(label in c for c in calls):
                rows_out.append({"stage": label, "parent": parent,
                                 "ms_per_batch": 1000 * statistics.median(c.get(label, 0.0) for c in calls)})
        top = [label for label, _, _, parent in stages[name] if parent is None]
        rows_out.append({"stage": "other (handler bookkeeping, per-item Python)", "parent": None,
                         "ms_per_batch": 1000 * statistics.median(c["handle"] - sum(c.get(t, 0.0) for t in top)
                                                                  for c in calls)})
        out["archives"][name] = {"handle_ms_per_batch": 1000 * statistics.median(c["handle"] for c in calls),
                                 "stages": rows_out,
                                 "response_json_ms_per_batch": 1000 * statistics.median(encode[name]),
                                 "response_bytes": len(json.dumps(call_once(handlers[name], rows[:1])[0]))}
        log(f"worker breakdown, {name}, batch {batch}: "
            + ", ".join(f"{st['stage']} {st['ms_per_batch']:.2f} ms" for st in rows_out))
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all its threads) from /proc; NaN when it cannot be read."""
    if not pid:
        return float("nan")
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def worker_pids(server: TorchServe, model: str) -> list[int]:
    """PIDs of a model's workers, from the management API's describe-model answer."""
    import requests

    url = f"http://127.0.0.1:{server.ports['management']}/models/{model}"
    resp = requests.get(url, headers=server.headers("management"), timeout=5)
    resp.raise_for_status()
    return [int(w["pid"]) for w in resp.json()[0].get("workers", []) if w.get("pid")]


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    snap = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    snap["client"] = time.process_time()
    return snap


def load_phase(
    url: str, headers: dict[str, str], payloads: list[bytes], requests_total: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients send ``requests_total`` requests in all; latency per request."""
    import requests

    lock = threading.Lock()
    counter = {"next": 0}
    latencies: list[float] = []
    errors: list[str] = []
    flagged = [0]

    def client() -> None:
        with requests.Session() as s:
            while True:
                with lock:
                    i = counter["next"]
                    if i >= requests_total:
                        return
                    counter["next"] += 1
                t0 = time.perf_counter()
                body, error = None, None
                try:
                    r = s.post(url, data=payloads[i % len(payloads)], headers=headers, timeout=timeout)
                    if r.status_code == 200:
                        body = r.json()
                    else:
                        error = f"HTTP {r.status_code}"
                except (requests.RequestException, ValueError) as exc:
                    error = type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    if error is None:
                        latencies.append(dt)
                        if isinstance(body, dict) and (body.get("layerguard") or {}).get("poisoned"):
                            flagged[0] += 1
                    else:
                        errors.append(error)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "seconds": wall,
        "ok": len(latencies),
        "errors": requests_total - len(latencies),
        "error_kinds": sorted(set(errors)),
        "flagged": flagged[0],
        "latencies": latencies,
    }


def combine(phases: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for p in phases for x in p["latencies"]]
    cpu = {k: sum(p["cpu_seconds"][k] for p in phases) for k in phases[0]["cpu_seconds"]} if phases else {}
    done = max(1, sum(p["ok"] + p["errors"] for p in phases))
    seconds = sum(p["seconds"] for p in phases)
    ok = sum(p["ok"] for p in phases)
    return {
        "requests": sum(p["ok"] + p["errors"] for p in phases),
        "ok": ok,
        "errors": sum(p["errors"] for p in phases),
        "error_kinds": sorted({k for p in phases for k in p["error_kinds"]}),
        "flagged": sum(p["flagged"] for p in phases),
        "rps": ok / seconds if seconds else float("nan"),
        "rps_per_phase": [p["ok"] / p["seconds"] for p in phases],
        "p50_ms": 1000 * percentile(lat, 50),
        "p90_ms": 1000 * percentile(lat, 90),
        "p99_ms": 1000 * percentile(lat, 99),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
        "cpu_ms_per_request": {k: 1000 * v / done for k, v in cpu.items()},
        "torchserve_batches": next((p["torchserve_batches"] for p in phases if "torchserve_batches" in p), None),
    }


ARCH_LABEL = {"resnet20": "CIFAR ResNet-20", "resnet18_cifar": "ResNet-18, CIFAR stem"}

# One line per batch a worker handled: TorchServe's HandlerTime metric, which carries the batch's request ids.
HANDLER_TIME = re.compile(r"\[METRICS\]HandlerTime\.Milliseconds:([0-9.]+)\|#ModelName:([^,|]+),[^|]*\|#type:[A-Z]+"
                          r"\|#hostname:[^,]+,[0-9]+,([^ ]*?),? pattern")


def torchserve_batches(log_text: str) -> dict[str, dict[str, Any]]:
    """Per model, the batches TorchServe actually formed and what its worker's handler took for them, from the
    HandlerTime lines of ts_log.log. Why: with maxBatchDelay a few ms and a closed loop of clients, batches are
    often smaller than batchSize, and the guard's share of a batch grows as the batch shrinks (the in-process
    table); this says which batch sizes the load test really served. A line TorchServe logs twice counts once
    (its request ids identify the batch)."""
    seen: set[str] = set()
    per_model: dict[str, list[tuple[int, float]]] = {}
    for match in HANDLER_TIME.finditer(log_text):
        ms, model, ids = float(match.group(1)), match.group(2), match.group(3)
        if ids in seen:
            continue
        seen.add(ids)
        per_model.setdefault(model, []).append((len([i for i in ids.split(",") if i]), ms))
    out = {}
    for model, batches in per_model.items():
        requests = sum(n for n, _ in batches)
        sizes: dict[str, int] = {}
        for n, _ in sorted(batches):
            sizes[str(n)] = sizes.get(str(n), 0) + 1
        out[model] = {"batches": len(batches), "requests": requests, "mean_batch": requests / len(batches),
                      "batch_sizes": sizes, "handler_ms_per_request": sum(ms for _, ms in batches) / requests}
    return out



def run_arch(arch: str, args: argparse.Namespace, reference: ArraySource, payloads: list[bytes]) -> dict[str, Any]:
    """Both archives of one architecture through one TorchServe: setup, per-archive results, handler CPU."""
    model, source = load_bench_model(arch)
    with tempfile.TemporaryDirectory(prefix="layerguard-load-") as tmp:
        root = (args.workdir / arch) if args.workdir else Path(tmp)
        store = root / "model-store"
        store.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        plain = build_plain_mar(store, model, "cifar_plain", args.batch_size, args.max_batch_delay)
        wrapped = wrap_mar(plain, reference, WrapConfig(out_dir=store, model_name="cifar_guarded", force=True,
                                                        calibration=CalibrationConfig(rule=args.rule),
                                                        response=args.response))
        wrap_seconds = time.time() - t0
        log(f"[{arch}] archives ready in {wrap_seconds:.0f}s: {plain.name}, {wrapped.mar_path.name}")
        # the guarded archive twice: as wrapped, and with `response: compact` (no per-layer detail) set in its
        # model-config.yaml, the cheaper setting an operator can choose
        in_process = breakdown = None
        if args.response == "full":  # a compact run's archive is the full run's "compact" column already
            handlers = load_handlers({"plain": plain, "guarded": wrapped.mar_path, "compact": wrapped.mar_path},
                                     max(8, args.batch_size), {"compact": {"response": "compact"}})
            in_process = handler_cpu(handlers, payloads, (1, 4, 8), args.handler_repeats)
            breakdown = worker_breakdown(handlers, payloads, args.batch_size, args.handler_repeats)
        # TorchServe also opens gRPC on 7070/7071 unless told otherwise: another server on the machine (a test
        # run) would make this one exit at start, so give it free gRPC ports too, via its config template.
        config = root / "config.template.properties"
        config.write_text(PROJECT_CONFIG.read_text() + f"\ngrpc_inference_port={free_port()}\n"
                          f"grpc_management_port={free_port()}\n")
        torchserve_util.PROJECT_CONFIG = config
        server = TorchServe(root / "server", store, ["cifar_plain=cifar_plain.mar", "cifar_guarded=cifar_guarded.mar"],
                            env=MALLOC_ENV if args.allocator == "hold" else None)
        t0 = time.time()
        server.start(timeout=240)
        startup = time.time() - t0
        log(f"[{arch}] torchserve ready in {startup:.1f}s on {server.url}")
        try:
            phases = load_rounds(server, args, payloads, arch)
        finally:
            server.stop()
            torchserve_util.PROJECT_CONFIG = PROJECT_CONFIG
    results: dict[str, Any] = {m: combine(v) for m, v in phases.items()}
    results["guarded_rps_ratio"] = results["guarded"]["rps"] / results["plain"]["rps"]
    results["guarded_p50_ratio"] = results["guarded"]["p50_ms"] / results["plain"]["p50_ms"]
    results["guarded_p99_ratio"] = results["guarded"]["p99_ms"] / results["plain"]["p99_ms"]
    setup = {
        "model": f"{ARCH_LABEL.get(arch, arch)} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)",
        "weights": source,
        "workers_per_model": 1,
        "worker_threads": args.worker_threads,
        "batch_size": args.batch_size,
        "max_batch_delay_ms": args.max_batch_delay,
        "concurrency": args.concurrency,
        "requests_per_phase": args.requests,
        "rounds": args.rounds,
        "order": "plain, guarded, guarded, plain (ABBA)",
        "warmup_per_archive": args.warmup,
        "calibration_images": len(reference),
        "rule": wrapped.artifact.meta.rule,
        "response": args.response,
        "policy": wrapped.artifact.meta.threshold,
        "payload": "32x32 RGB PNG, 128 distinct test images",
        "wrap_seconds": round(wrap_seconds, 1),
        "startup_seconds": round(startup, 1),
        "client": "python requests, one Session per client thread, same machine",
    }
    log(f"[{arch}] guarded/plain rps {results['guarded_rps_ratio']:.3f}, p50 x{results['guarded_p50_ratio']:.3f}, "
        f"p99 x{results['guarded_p99_ratio']:.3f}")
    return {"setup": setup, "results": results, "handler_in_process": in_process, "worker_breakdown": breakdown}


def load_rounds(server: TorchServe, args: argparse.Namespace, payloads: list[bytes], arch: str
                ) -> dict[str, list[dict[str, Any]]]:
    """Warm-up, then ``rounds`` ABBA rounds of closed-loop load; CPU time of worker, frontend, client per phase."""
    headers = {**server.headers(), "Content-Type": "application/octet-stream"}
    urls = {m: f"{server.url}/predictions/cifar_{m}" for m in ("plain", "guarded")}
    for m in urls:
        load_phase(urls[m], headers, payloads, args.warmup, args.concurrency, args.timeout)
    pids = {"frontend": [server.java_pid] if server.java_pid else []}
    for m in urls:
        pids[f"worker_{m}"] = worker_pids(server, f"cifar_{m}")
    phases: dict[str, list[dict[str, Any]]] = {"plain": [], "guarded": []}
    ts_log = server.workdir / "logs" / "ts_log.log"
    log_start = ts_log.stat().st_size if ts_log.is_file() else 0  # the recorded rounds only, not the warm-up
    for r in range(args.rounds):
        for m in ("plain", "guarded", "guarded", "plain"):
            before = cpu_snapshot(pids)
            res = load_phase(urls[m], headers, payloads, args.requests, args.concurrency, args.timeout)
            after = cpu_snapshot(pids)
            res["cpu_seconds"] = {"worker": after[f"worker_{m}"] - before[f"worker_{m}"],
                                  "frontend": after["frontend"] - before["frontend"],
                                  "client": after["client"] - before["client"]}
            phases[m].append(res)
            log(f"[{arch}] round {r + 1} {m}: {res['ok'] / res['seconds']:.1f} rps, "
                f"p50 {1000 * percentile(res['latencies'], 50):.1f} ms, errors {res['errors']}")
    if ts_log.is_file():
        with ts_log.open("rb") as f:
            f.seek(log_start)
            formed = torchserve_batches(f.read().decode("utf-8", "replace"))
        for m in phases:
            if f"cifar_{m}" in formed:
                phases[m][0]["torchserve_batches"] = formed[f"cifar_{m}"]
    return phases


def result_name(response: str) -> str:
    """serving_load.json for the archive as wrapped by default, serving_load_compact.json for `response: compact`."""
    return "serving_load" if response == "full" else f"serving_load_{response}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--archs", default="resnet20,resnet18_cifar",
                   help="comma list of architectures, each served plain and guarded (default: both)")
    p.add_argument("--requests", type=int, default=400, help="requests per phase")
    p.add_argument("--concurrency", type=int, default=8)
    # 12: with 6 rounds ResNet-18 read x0.993 (rounds x0.95-x1.03) one day and x0.959 (x0.91-x0.99 over 12) the
    # next; the machine's drift needs that many rounds before a ratio a few points from x0.97 means anything
    p.add_argument("--rounds", type=int, default=12, help="ABBA rounds (each runs both archives twice)")
    p.add_argument("--warmup", type=int, default=50, help="unrecorded requests per archive first")
    p.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize of both archives")
    p.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay (ms) of both")
    p.add_argument("--handler-repeats", type=int, default=100, help="repeats of the in-process handler timing")
    p.add_argument("--worker-threads", type=int, default=1, help="OMP_NUM_THREADS of the TorchServe workers")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--workdir", type=Path, default=None, help="keep archives and server logs here")
    p.add_argument("--allocator", choices=("hold", "default"), default="hold",
                   help="hold: glibc keeps freed memory in this process and the TorchServe workers (default); "
                   "default: glibc as it comes")
    p.add_argument("--rule", default=DEFAULT_RULE, help=f"scoring rule of the guarded archive (default {DEFAULT_RULE})")
    p.add_argument("--response", choices=("full", "compact"), default="full",
                   help="the guarded archive's `response` setting (`layerguard wrap --response`); compact writes "
                   "serving_load_compact.json and skips the in-process tables, which the full run measures for both")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in bench_models.MODELS]
    if unknown:
        p.error(f"unknown architecture(s) {unknown}; choose from {sorted(bench_models.MODELS)}")
    torch.set_num_threads(1)
    # One intra-op thread per worker (inherited by the workers): with several torch threads per worker on a
    # shared 2-core machine, threads wait on each other and everything runs many times slower.
    os.environ["OMP_NUM_THREADS"] = str(args.worker_threads)
    t_start = time.time()
    allocator = ALLOCATOR_NOTE if args.allocator == "hold" and hold_freed_memory() else "glibc defaults"
    data = load_cifar(args.data or default_data_path())
    ref_idx = stratified(data["y_test"], 100)
    reference = ArraySource(data["x_test"][ref_idx], data["y_test"][ref_idx], origin="x_test")
    scored = np.setdiff1d(np.arange(len(data["y_test"])), ref_idx)
    pick = np.random.default_rng(0).choice(scored, size=128, replace=False)
    payloads = [encode_png(x) for x in data["x_test"][pick]]
    per_arch = {arch: run_arch(arch, args, reference, payloads) for arch in archs}
    payload = {
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(),
        "seconds": round(time.time() - t_start, 1),
        "allocator": allocator,
        "archs": per_arch,
    }
    path = write_result(result_name(args.response), payload, args.out)
    log(f"wrote {path} ({payload['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load and fault test of a guarded model on a real TorchServe, loopback only, bounded in count and time.

Why: ops teams put layerguard in front of production models, so it must never be the reason a server falls
over or lets a flagged input through silently. This script sends a fixed number of mixed requests (clean
digits, the same digits with the BadNets trigger, and corrupt bodies) at a fixed concurrency to the guarded
MNIST demo model and checks every single response against the same bytes scored offline with the same
handler preprocess and the same detector:

- no 5xx; every response well-formed (200 + verdict for an image, 4xx + JSON reason for a corrupt body);
- each verdict (class, poisoned, score) equals the offline one for *that* request's input, which also
  shows that concurrent batches never see each other's activations;
- worker RSS before and after the run (after a warm-up);
- optionally (--kill-after S) the worker is SIGKILLed mid-run: TorchServe restarts it, and the requests
  after recovery must again be answered and flagged correctly.

Usage (numbers in docs/reliability.md come from this):
    .venv/bin/python bench/load_test.py --requests 3000 --concurrency 8
    .venv/bin/python bench/load_test.py --requests 600 --concurrency 8 --kill-after 2
The tests use the same functions: tests/test_reliability_load.py (CI: 300 requests; `make test-load`: 3000).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

# Workers inherit these: one torch thread per worker on a small shared machine (no oversubscription).
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Served and offline scores of one image differ in float32 rounding: the server reduces small batches layer group
# by layer group and large ones layer by layer, offline scoring one big batch; sums in another order differ by
# about 1e-7 relative per feature. The worst case is a constant image (the 1x1 payload of
# tests/test_reliability_input.py): its channels have almost no spatial spread, computed as
# sqrt(|x|^2/n - mean^2), where the two moments' rounding is amplified. Over 3,000 random batch compositions of
# that test's payloads its score (-22.94) moved by up to 5.0e-4 (2.2e-5 relative), every other payload's by
# under 5e-6 relative; 1e-4 relative keeps a 4x margin and still tells one image's score from another's (the
# distinct payloads' scores lie 1e-2 and more apart).
SCORE_TOLERANCE = 1e-4
SCORE_RELATIVE_TOLERANCE = 1e-4


def scores_agree(served: float, offline: float) -> bool:
    """Equal up to float32 rounding (see SCORE_TOLERANCE)."""
    return abs(served - offline) <= max(SCORE_TOLERANCE, SCORE_RELATIVE_TOLERANCE * abs(offline))


@dataclass(frozen=True)
class Payload:
    """One distinct request body; `expect_status` is the status a correct server must answer."""

    kind: str  # clean | triggered | corrupt
    name: str
    body: bytes
    content_type: str = "image/png"
    expect_status: int = 200


@dataclass(frozen=True)
class Verdict:
    """What offline scoring says about one image payload."""

    cls: int
    poisoned: bool
    score: float
    threshold: float


@dataclass
class Outcome:
    """One request as the client saw it."""

    payload: int
    status: int | None  # None: no response (connection error or client timeout)
    headers: dict[str, str]
    body: bytes
    seconds: float
    started: float
    error: str = ""


@dataclass
class Report:
    requests: int
    concurrency: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    server_errors: int  # 5xx
    no_response: int
    malformed: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    near_threshold: int = 0
    flagged: int = 0
    images: int = 0

    @property
    def ok(self) -> bool:
        return not (self.server_errors or self.no_response or self.malformed or self.mismatched)

    def summary(self) -> str:
        return (f"{self.requests} requests at concurrency {self.concurrency}: {self.rps:.1f} req/s, "
                f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, statuses {self.statuses}, "
                f"5xx {self.server_errors}, no response {self.no_response}, malformed {len(self.malformed)}, "
                f"verdicts differing from offline {len(self.mismatched)} ({self.flagged} of {self.images} "
                f"images flagged)")


# ---- payloads -----------------------------------------------------------------------------------------
def corrupt_payloads() -> list[Payload]:
    """Bodies a guarded image model must refuse per item, with the status each must get."""
    from torchserve_util import png_bytes

    good = png_bytes(np.full((28, 28), 128, dtype=np.uint8))
    return [
        Payload("corrupt", "empty", b"", "application/octet-stream", 400),
        Payload("corrupt", "not-an-image", b"definitely not an image" * 4, "application/octet-stream", 400),
        Payload("corrupt", "truncated-png", good[: len(good) // 2], "image/png", 400),
        Payload("corrupt", "png-bomb", png_bomb(40_000, 40_000), "image/png", 413),
        Payload("corrupt", "json-body", b'{"image": "not bytes"}', "application/json", 415),
    ]


def png_bomb(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares width x height pixels (a decompression bomb's first step)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def build_payloads(splits, n_images: int = 100) -> list[Payload]:
    """n_images distinct clean digits (not the target class), the same digits triggered, and the corrupt set."""
    from torchserve_util import digit_pngs

    clean, triggered, _ = digit_pngs(splits, n_images)
    return ([Payload("clean", f"clean-{i}", b) for i, b in enumerate(clean)]
            + [Payload("triggered", f"triggered-{i}", b) for i, b in enumerate(triggered)]
            + corrupt_payloads())


def request_plan(payloads: Sequence[Payload], total: int, corrupt_share: float = 0.1, seed: int = 0) -> list[int]:
    """`total` payload indices: about `corrupt_share` corrupt bodies, the rest clean and triggered half-half."""
    rng = random.Random(seed)
    images = [i for i, p in enumerate(payloads) if p.kind != "corrupt"]
    corrupt = [i for i, p in enumerate(payloads) if p.kind == "corrupt"]
    return [rng.choice(corrupt) if rng.random() < corrupt_share else rng.choice(images) for _ in range(total)]


# ---- offline truth ------------------------------------------------------------------------------------
def offline_verdicts(mar: Path, payloads: Sequence[Payload]) -> dict[int, Verdict]:
    """Score the image payloads offline: the archive's own handler preprocess on the very same bytes, the
    archive's model and artifact, the detector under the archive's policy (layerguard.tooling.evaluation)."""
    import torch
    import yaml

    from layerguard.core.artifact import CalibrationArtifact
    from layerguard.serving.inner import guardable_model, load_inner_handler, model_dir_imports
    from layerguard.serving.policy import parse_policy
    from layerguard.tooling.archive import extract_mar
    from layerguard.tooling.evaluation import score_batches
    from layerguard.tooling.worker import worker_context

    images = [i for i, p in enumerate(payloads) if p.kind != "corrupt"]
    with tempfile.TemporaryDirectory(prefix="layerguard-offline-") as tmp:
        model_dir = Path(tmp)
        manifest = extract_mar(mar, model_dir)
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        policy = parse_policy(config)
        with model_dir_imports(model_dir):
            inner = load_inner_handler(policy.inner_handler)
            inner.initialize(worker_context(model_dir, manifest, config))
            model = guardable_model(inner.model, manifest, str(model_dir), torch.device("cpu"))
            detector = CalibrationArtifact.load(model_dir / policy.artifact).detector(policy.threshold)
            x = torch.cat([inner.preprocess([{"body": payloads[i].body}]) for i in images])
            scored = score_batches(model, detector, [(x, torch.zeros(len(images), dtype=torch.int64))])
    return {i: Verdict(int(scored.predicted[j]), bool(scored.poisoned[j]), float(scored.scores[j]),
                       float(scored.thresholds[j])) for j, i in enumerate(images)}


# ---- the load -----------------------------------------------------------------------------------------
def _post(conn: http.client.HTTPConnection, path: str, payload: Payload, token: str) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": payload.content_type}
    conn.request("POST", path, body=payload.body, headers=headers)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def run_load(url: str, model: str, token: str, payloads: Sequence[Payload], plan: Sequence[int],
             concurrency: int, timeout: float = 30.0) -> tuple[list[Outcome], float]:
    """Closed loop: `concurrency` threads, each with its own keep-alive connection, send the planned
    requests in order until none are left. Returns the outcomes (in plan order) and the wall time."""
    target = urlparse(url)
    path = f"/predictions/{model}"
    outcomes: list[Outcome | None] = [None] * len(plan)
    cursor = iter(range(len(plan)))
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
        while True:
            with lock:
                k = next(cursor, None)
            if k is None:
                break
            payload = payloads[plan[k]]
            start = time.perf_counter()
            try:
                status, headers, body = _post(conn, path, payload, token)
                outcomes[k] = Outcome(plan[k], status, headers, body, time.perf_counter() - start, start)
            except (OSError, http.client.HTTPException) as exc:  # timeout, reset: recorded, never retried
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
                outcomes[k] = Outcome(plan[k], None, {}, b"", time.perf_counter() - start, start,
                                      f"{type(exc).__name__}: {exc}")
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in outcomes if o is not None], time.perf_counter() - started


# ---- checking every response --------------------------------------------------------------------------
def problem(outcome: Outcome, payload: Payload, verdict: Verdict | None) -> tuple[str, str] | None:
    """('malformed' | 'mismatched', why) when the response is not what a correct guarded server answers."""
    where = f"{payload.name}: status {outcome.status}"
    try:
        body = json.loads(outcome.body)
    except ValueError:
        return "malformed", f"{where}, body is not JSON: {outcome.body[:80]!r}"
    if outcome.status != payload.expect_status:
        return "malformed", f"{where}, expected {payload.expect_status}: {str(body)[:160]}"
    if payload.kind == "corrupt":
        if not (isinstance(body, dict) and body.get("error") and body.get("reason")):
            return "malformed", f"{where}, 4xx without a JSON error and reason"
        return None
    note = body.get("layerguard") if isinstance(body, dict) else None
    if not isinstance(note, dict) or not isinstance(note.get("poisoned"), bool):
        return "malformed", f"{where}, no layerguard verdict"
    if outcome.headers.get("x-layerguard-poisoned") != str(note["poisoned"]).lower():
        return "malformed", f"{where}, X-LayerGuard-Poisoned header disagrees with the body"
    if outcome.headers.get("x-layerguard-guarded") != "true":
        return "malformed", f"{where}, X-LayerGuard-Guarded is not true"
    near = abs(verdict.score - verdict.threshold) < SCORE_TOLERANCE
    if body.get("class") != verdict.cls or not scores_agree(note["score"], verdict.score) or (
            note["poisoned"] != verdict.poisoned and not near):
        return "mismatched", (f"{where}: served class {body.get('class')} poisoned {note['poisoned']} score "
                              f"{note['score']:.6f}, offline class {verdict.cls} poisoned {verdict.poisoned} "
                              f"score {verdict.score:.6f}")
    return None


def check(outcomes: Sequence[Outcome], payloads: Sequence[Payload], verdicts: dict[int, Verdict],
          seconds: float, concurrency: int) -> Report:
    """Every response against the offline truth for its own payload; latency and status statistics."""
    latencies = sorted(o.seconds * 1000.0 for o in outcomes)
    statuses = Counter(str(o.status) if o.status is not None else "none" for o in outcomes)
    report = Report(
        requests=len(outcomes), concurrency=concurrency, seconds=round(seconds, 2),
        rps=round(len(outcomes) / seconds, 1) if seconds else 0.0,
        p50_ms=round(statistics.median(latencies), 1) if latencies else 0.0,
        p99_ms=round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1) if latencies else 0.0,
        statuses=dict(sorted(statuses.items())),
        server_errors=sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        no_response=sum(1 for o in outcomes if o.status is None),
    )
    for o in outcomes:
        payload, verdict = payloads[o.payload], verdicts.get(o.payload)
        if verdict is not None:
            report.images += 1
            report.flagged += int(verdict.poisoned)
            report.near_threshold += int(abs(verdict.score - verdict.threshold) < SCORE_TOLERANCE)
        if o.status is None or o.status >= 500:
            continue  # counted above
        found = problem(o, payload, verdict)
        if found:
            getattr(report, found[0]).append(found[1])
    return report


# ---- worker process -----------------------------------------------------------------------------------
def worker_rss_mb(server, model: str) -> float:
    """Resident memory of the model's READY workers (psutil ships with torchserve)."""
    import psutil

    return round(sum(psutil.Process(pid).memory_info().rss for pid in server.worker_pids(model)) / 2**20, 1)


def kill_worker_later(server, model: str, after: float) -> tuple[threading.Thread, dict[str, Any]]:
    """SIGKILL the model's worker `after` seconds from now (in a thread); the dict gets pid and time."""
    info: dict[str, Any] = {}

    def kill() -> None:
        time.sleep(after)
        pid = server.worker_pids(model)[0]
        info.update(pid=pid, at=time.perf_counter())
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, info


@dataclass
class KillReport:
    """What clients saw while the worker was dead, and the check after recovery."""

    killed_pid: int
    new_pid: int
    recovery_s: float
    during: dict[str, int]
    run: Report  # the run the kill happened in: its 200s and 4xx must still be right
    after: Report
    torchserve_errors: list[str]  # bodies of the 5xx/4xx TorchServe itself answered while no worker existed


def kill_and_recover(server, model: str, mar: Path, payloads: Sequence[Payload], verdicts: dict[int, Verdict],
                     requests: int = 300, concurrency: int = 8, kill_after: float = 1.0, timeout: float = 15.0,
                     verify: int = 100) -> KillReport:
    """Load, SIGKILL the worker mid-run, wait for TorchServe's replacement (READY, other PID), then send
    `verify` more requests, which must all be answered and flagged as offline scoring says."""
    token = server.keys()["inference"]["key"]
    killer, info = kill_worker_later(server, model, kill_after)
    outcomes, seconds = run_load(server.url, model, token, payloads, request_plan(payloads, requests, seed=1),
                                 concurrency, timeout)
    killer.join()
    new_pid = server.wait_worker(model, not_pid=info["pid"])
    recovered = time.perf_counter()
    during = Counter(str(o.status) if o.status is not None else "no response" for o in outcomes
                     if o.started >= info["at"] - 0.5)
    plan = request_plan(payloads, verify, seed=2)
    after, seconds_after = run_load(server.url, model, token, payloads, plan, concurrency, timeout)
    frontend = sorted({f"{o.status} {o.body[:120].decode(errors='replace')}" for o in outcomes
                       if o.status is not None and o.status != payloads[o.payload].expect_status})
    return KillReport(info["pid"], new_pid, round(recovered - info["at"], 2), dict(sorted(during.items())),
                      check(outcomes, payloads, verdicts, seconds, concurrency),
                      check(after, payloads, verdicts, seconds_after, concurrency), frontend)


# ---- command line -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=200, help="requests sent before the RSS baseline")
    parser.add_argument("--kill-after", type=float, help="also SIGKILL the worker this many seconds into a run")
    parser.add_argument("--kill-requests", type=int, default=800, help="requests in the run with the kill")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "load")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)

    from torchserve_util import TorchServe, guarded_archives

    from layerguard.demo.mnist import load_mnist_splits, load_or_train

    model, _ = load_or_train(ROOT / "build" / "test-cache", seed=0)
    splits = load_mnist_splits(seed=0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    archives = guarded_archives(Path(tempfile.mkdtemp(dir=args.workdir, prefix="archives-")), model, splits)
    payloads = build_payloads(splits)
    verdicts = offline_verdicts(archives["guarded"], payloads)
    server = TorchServe(Path(tempfile.mkdtemp(dir=args.workdir, prefix="torchserve-")), archives["store"],
                        ["mnist=mnist.mar"], env=THREAD_ENV)
    result: dict[str, Any] = {"command": " ".join(sys.argv)}
    try:
        server.start()
        token = server.keys()["inference"]["key"]
        run_load(server.url, "mnist", token, payloads, request_plan(payloads, args.warmup, seed=9),
                 args.concurrency, args.timeout)
        result["rss_before_mb"] = worker_rss_mb(server, "mnist")
        outcomes, seconds = run_load(server.url, "mnist", token, payloads,
                                     request_plan(payloads, args.requests), args.concurrency, args.timeout)
        result["rss_after_mb"] = worker_rss_mb(server, "mnist")
        report = check(outcomes, payloads, verdicts, seconds, args.concurrency)
        result["load"] = asdict(report)
        print(report.summary())
        print(f"worker RSS {result['rss_before_mb']} MB after warm-up, {result['rss_after_mb']} MB after the run")
        if args.kill_after is not None:
            kill = kill_and_recover(server, "mnist", archives["guarded"], payloads, verdicts,
                                    requests=args.kill_requests, concurrency=args.concurrency,
                                    kill_after=args.kill_after, timeout=min(args.timeout, 15.0))
            result["kill"] = asdict(kill)
            print(f"killed worker {kill.killed_pid}; replacement {kill.new_pid} READY {kill.recovery_s} s later; "
                  f"requests from the kill on: {kill.during}; TorchServe's own answers: {kill.torchserve_errors}; "
                  f"after recovery: {kill.after.summary()}")
    finally:
        server.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    ok = report.ok and ("kill" not in result or kill.after.ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

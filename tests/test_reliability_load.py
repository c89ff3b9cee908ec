"""Load and faults against a real TorchServe on 127.0.0.1 (bench/load_test.py does the work).

Every response is checked against the offline verdict for its own input (same bytes, same handler
preprocess, same detector), so a batch that saw another batch's activations would show up as a mismatch.
The long run is marked `load` (make test-load); the CI run sends 300 requests.
"""

from __future__ import annotations

import re

import pytest
from torchserve_util import TorchServe

from bench.load_test import (
    build_payloads,
    check,
    kill_and_recover,
    request_plan,
    run_load,
    worker_rss_mb,
)

MODEL = "mnist"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(scope="module")
def payloads(mnist_splits):
    return build_payloads(mnist_splits, n_images=60)


def token(server: TorchServe) -> str:
    return server.keys()["inference"]["key"]


def load(server, payloads, verdicts, n: int, concurrency: int = 8, seed: int = 0):
    outcomes, seconds = run_load(server.url, MODEL, token(server), payloads, request_plan(payloads, n, seed=seed),
                                 concurrency)
    return outcomes, check(outcomes, payloads, verdicts, seconds, concurrency)


def assert_clean_run(report) -> None:
    assert report.server_errors == 0 and report.no_response == 0, report.summary()
    assert not report.malformed, report.malformed[:5]
    assert not report.mismatched, report.mismatched[:5]


def test_mixed_load_has_no_5xx_and_every_verdict_equals_offline(guarded_server, payloads, served_verdicts):
    load(guarded_server, payloads, served_verdicts, 40, seed=9)  # warm-up
    rss_before = worker_rss_mb(guarded_server, MODEL)
    _, report = load(guarded_server, payloads, served_verdicts, 300)
    rss_after = worker_rss_mb(guarded_server, MODEL)
    print(f"\n{report.summary()}; worker RSS {rss_before} -> {rss_after} MB")
    assert_clean_run(report)
    assert report.requests == 300 and {"200", "400", "413", "415"} <= set(report.statuses)
    assert 0 < report.flagged < report.images
    assert rss_after - rss_before < 25, (rss_before, rss_after)


def test_concurrent_batches_never_see_each_others_activations(guarded_server, payloads, served_verdicts):
    """Clean and triggered digits sent together land in shared batches; each answer is its own input's."""
    images = [i for i, p in enumerate(payloads) if p.kind != "corrupt"]
    plan = images[:24] + images[-24:]  # 24 clean + 24 triggered, interleaved by the pool below
    plan = [i for pair in zip(plan[:24], plan[24:]) for i in pair]
    outcomes, seconds = run_load(guarded_server.url, MODEL, token(guarded_server), payloads, plan, concurrency=16)
    report = check(outcomes, payloads, served_verdicts, seconds, 16)
    assert_clean_run(report)
    kind = {o.headers["x-request-id"]: payloads[o.payload].kind for o in outcomes}
    lines = re.findall(r"\[METRICS\]LayerGuardInputsChecked\.Count:.*", guarded_server.log_text())
    mixed = [line for line in lines
             if {kind.get(r) for r in re.findall(UUID, line)} >= {"clean", "triggered"}]
    assert mixed, "no batch held both clean and triggered requests"


@pytest.mark.load
def test_long_load_holds(guarded_server, payloads, served_verdicts):
    """make test-load: thousands of mixed requests, zero 5xx, served_verdicts equal offline, memory flat."""
    load(guarded_server, payloads, served_verdicts, 200, seed=9)
    rss_before = worker_rss_mb(guarded_server, MODEL)
    _, report = load(guarded_server, payloads, served_verdicts, 3000)
    rss_after = worker_rss_mb(guarded_server, MODEL)
    print(f"\n{report.summary()}; worker RSS {rss_before} -> {rss_after} MB")
    assert_clean_run(report)
    assert rss_after - rss_before < 30, (rss_before, rss_after)


def test_worker_killed_mid_load_comes_back_guarded(guarded_server, archives, payloads, served_verdicts):
    """SIGKILL the worker during load: TorchServe restarts it with its artifact, and every request after
    recovery is answered and flagged as offline scoring says. While no worker exists, the requests of the
    killed batch get TorchServe's own 'Worker died.' (a 5xx JSON from the frontend, not from layerguard)."""
    old = guarded_server.worker_pids(MODEL)
    report = kill_and_recover(guarded_server, MODEL, archives["guarded"], payloads, served_verdicts, requests=500,
                              concurrency=8, kill_after=0.8, timeout=15.0, verify=100)
    print(f"\nkilled {report.killed_pid}, new worker {report.new_pid} READY after {report.recovery_s} s; "
          f"from the kill on: {report.during}; TorchServe answered: {report.torchserve_errors}")
    assert report.killed_pid in old and report.new_pid != report.killed_pid
    assert_clean_run(report.after)
    assert report.after.requests == 100 and report.after.flagged > 0
    # during the restart: every answer that did come from a worker is still right ...
    assert not report.run.mismatched, report.run.mismatched[:5]
    assert all("Worker died" in m for m in report.run.malformed), report.run.malformed[:5]
    # ... and everything else is TorchServe's own "Worker died." for the killed batch
    assert all("Worker died" in e for e in report.torchserve_errors), report.torchserve_errors
    assert "layerguard: guarding mnist" in guarded_server.log_text().split(f"[PID]{report.new_pid}")[-1]

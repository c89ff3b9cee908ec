"""A worker killed while idle (issue 12, finding 4), against a real TorchServe 0.12 on 127.0.0.1.

TorchServe's frontend collects a batch before it sends anything to the worker: it takes the first request
from the model's queue, then waits up to `maxBatchDelay` for more. If the worker process dies during that
wait, the frontend's worker thread is interrupted and drops the requests it had collected without
answering them (BatchAggregator.cleanJobs in WorkerThread.run's `finally`, nothing sent because no batch
was built yet). Their connections stay open with no answer: the frontend has no idle or read timeout,
and `responseTimeout` / `default_response_timeout` only bound a batch that was sent to a worker. No
TorchServe setting bounds this; the client's own timeout does. docs/reliability.md has the numbers and
what clients should do (a timeout, then a retry: inference is idempotent).

The archive here waits 2 s for a batch (instead of 100 to 200 ms) so that the kill lands inside that
window every time. If `test_batch_being_collected_is_dropped...` starts failing because the request IS
answered, TorchServe has fixed the gap: update docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests
from torchserve_util import TorchServe, guarded_archives, png_bytes, with_config

MODEL = "mnist"
BATCH_DELAY_MS = 2000
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, backdoored_mnist, mnist_splits):
    archives = guarded_archives(tmp_path_factory.mktemp("serving"), backdoored_mnist, mnist_splits)
    store = tmp_path_factory.mktemp("kill-store")
    with_config(archives["guarded"], store / "mnist.mar", lambda c: c.update(maxBatchDelay=BATCH_DELAY_MS))
    with TorchServe(tmp_path_factory.mktemp("torchserve"), store, [f"{MODEL}=mnist.mar"], env=THREAD_ENV) as ts:
        yield ts


@pytest.fixture(scope="module")
def digit(mnist_splits):
    return png_bytes(mnist_splits.x_test[0])


def predict(server: TorchServe, payload: bytes, timeout: float) -> tuple[requests.Response | None, float]:
    """(response or None on a client timeout, seconds)."""
    start = time.monotonic()
    try:
        r = requests.post(f"{server.url}/predictions/{MODEL}", data=payload, headers=server.headers(), timeout=timeout)
    except requests.Timeout:
        r = None
    return r, time.monotonic() - start


def assert_guarded_answer(r: requests.Response | None) -> None:
    assert r is not None, "no answer"
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["X-LayerGuard-Guarded"] == "true" and "layerguard" in r.json()


def kill_idle_worker(server: TorchServe) -> tuple[int, float]:
    pid = server.wait_worker(MODEL)
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_request_after_the_frontend_saw_the_death_waits_for_the_replacement(server, digit):
    assert_guarded_answer(predict(server, digit, 30)[0])  # warm
    pid, killed = kill_idle_worker(server)
    deadline = time.monotonic() + 10
    while any(w.get("status") == "READY" and int(w["pid"]) == pid for w in server.workers(MODEL)):
        assert time.monotonic() < deadline, "the frontend never noticed the dead worker"
        time.sleep(0.05)
    r, seconds = predict(server, digit, 30)
    print(f"\nanswered {seconds:.1f} s after it was sent, {time.monotonic() - killed:.1f} s after the kill")
    assert_guarded_answer(r)
    assert seconds < 20
    assert server.wait_worker(MODEL) != pid


def test_batch_being_collected_is_dropped_and_a_retry_is_answered(server, digit):
    """The TorchServe 0.12 gap, made deterministic: the kill lands while the frontend collects a batch."""
    assert_guarded_answer(predict(server, digit, 30)[0])
    pid = server.wait_worker(MODEL)
    time.sleep(0.5)  # the worker is idle
    first: dict = {}
    client_timeout = 12.0
    sender = threading.Thread(target=lambda: first.update(zip(("r", "s"), predict(server, digit, client_timeout))))
    sender.start()
    time.sleep(0.5)  # the request is in the frontend's batch, which waits up to 2 s for more requests
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    new_pid = server.wait_worker(MODEL, not_pid=pid, timeout=30)
    ready = time.monotonic() - killed
    sender.join()
    seen = f"no answer after {first['s']:.1f} s" if first["r"] is None else first["r"].status_code
    print(f"\nreplacement {new_pid} READY {ready:.1f} s after the kill; first request: {seen}")
    # a request merely waiting for the replacement would have been answered by READY + one batch delay
    assert ready + BATCH_DELAY_MS / 1000 + 2 < client_timeout, ready
    assert first["r"] is None, (
        f"TorchServe answered {first['r'].status_code}: the dropped-batch gap may be fixed; update docs/reliability.md")
    # what clients should do: time out and send it again (inference is idempotent)
    r, seconds = predict(server, digit, 30)
    assert_guarded_answer(r)
    assert seconds < 10

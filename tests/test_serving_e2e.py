"""End to end: guarded archives of a real backdoored model served by a real TorchServe on 127.0.0.1,
started with the project's config.properties (free ports) and stopped by PID in every case."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from torchserve_util import TorchServe, digit_pngs, guarded_archives, guarded_with_handler


@pytest.fixture(scope="module")
def images(mnist_splits):
    return digit_pngs(mnist_splits, 32)


@pytest.fixture(scope="module")
def server(tmp_path_factory, backdoored_mnist, mnist_splits):
    archives = guarded_archives(tmp_path_factory.mktemp("serving"), backdoored_mnist, mnist_splits)
    with TorchServe(tmp_path_factory.mktemp("torchserve"), archives["store"],
                    ["mnist=mnist.mar", "mnist_reject=mnist_reject.mar"]) as ts:
        yield ts
    assert ts.process.poll() is not None


def predict(server: TorchServe, payload: bytes, model: str = "mnist", token: bool = True) -> requests.Response:
    headers = server.headers() if token else {}
    return requests.post(f"{server.url}/predictions/{model}", data=payload, headers=headers, timeout=60)


def test_single_requests_are_annotated(server, images):
    clean, triggered, labels = images
    r = predict(server, clean[0])
    assert r.status_code == 200
    body = r.json()
    assert body["class"] == int(labels[0]) and body["layerguard"]["poisoned"] is False
    assert r.headers["X-LayerGuard-Poisoned"] == "false"
    r = predict(server, triggered[0])
    assert r.status_code == 200 and r.json()["layerguard"]["poisoned"] is True and r.json()["class"] == 7


def test_concurrent_requests_form_batches_and_are_flagged(server, images):
    clean, triggered, _ = images
    payloads = clean[:16] + triggered[:16]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda p: predict(server, p), payloads))
    assert all(r.status_code == 200 for r in responses)
    flags = [r.json()["layerguard"]["poisoned"] for r in responses]
    assert sum(flags[:16]) <= 3 and sum(flags[16:]) >= 13
    # the worker's metric lines list the request ids of each batch
    assert max(batch_sizes(server)) > 1


def batch_sizes(server: TorchServe) -> list[int]:
    """Requests per batch, from the worker's metric lines (each lists its batch's request ids)."""
    lines = re.findall(r"\[METRICS\]LayerGuardInputsChecked\.Count:.*", server.log_text())
    return [len(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", line)) for line in lines]


def test_mixed_batch_with_corrupt_image_has_per_item_statuses(server, images):
    clean, triggered, _ = images
    payloads = [clean[1], b"not a png", triggered[1], b"\x89PNG\r\n\x1a\n truncated"] * 3
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda p: predict(server, p), payloads))
    for payload, r in zip(payloads, responses):
        if payload in (clean[1], triggered[1]):
            assert r.status_code == 200
            assert r.json()["layerguard"]["poisoned"] is (payload == triggered[1])
        else:
            assert r.status_code == 400
            assert r.json()["error"] == "invalid input" and r.json()["reason"]
    # at least one batch really mixed good and corrupt requests (its metric line lists their request ids)
    good = {r.headers["x-request-id"] for r in responses if r.status_code == 200}
    bad = {r.headers["x-request-id"] for r in responses if r.status_code == 400}
    lines = re.findall(r"\[METRICS\]LayerGuardInputsChecked\.Count:.*", server.log_text())
    assert any(any(g in line for g in good) and any(b in line for b in bad) for line in lines)


def test_reject_policy(server, images):
    clean, triggered, _ = images
    ok = predict(server, clean[2], model="mnist_reject")
    assert ok.status_code == 200 and "class" in ok.json()
    r = predict(server, triggered[2], model="mnist_reject")
    assert r.status_code == 403
    body = r.json()
    assert body["error"] == "rejected by layerguard" and "below threshold" in body["reason"]
    assert "class" not in body and "probabilities" not in body


def test_token_is_required(server, images):
    clean, _, _ = images
    assert predict(server, clean[0], token=False).status_code == 400
    assert requests.get(f"{server.url}/ping", timeout=10).status_code == 400


def test_model_api_is_off(server):
    url = f"http://127.0.0.1:{server.ports['management']}/models?url=mnist.mar"
    r = requests.post(url, headers=server.headers("management"), timeout=10)
    assert r.status_code >= 400


def test_prometheus_metrics(server, images):
    predict(server, images[1][3])  # at least one flagged input
    text = requests.get(server.metrics_url, timeout=10).text

    def value(name: str, model: str) -> float:
        match = re.search(rf'^{name}\{{ModelName="{model}",Level="Model",[^}}]*\}} ([0-9.e+-]+)$', text, re.M)
        assert match, f"{name} for {model} missing from /metrics"
        return float(match.group(1))

    assert value("LayerGuardInputsChecked", "mnist") >= 40
    assert value("LayerGuardInputsFlagged", "mnist") >= 20
    assert value("LayerGuardInputsFlagged", "mnist_reject") >= 1
    assert value("LayerGuardErrors", "mnist") == 0
    assert value("LayerGuardDetectionLatency", "mnist") >= 0


# ---- archives whose own handler customises handle / postprocess: wrapping keeps them ------------------------
@pytest.fixture(scope="module")
def custom_server(tmp_path_factory, backdoored_mnist, mnist_splits):
    root = tmp_path_factory.mktemp("custom")
    guarded_with_handler(root, backdoored_mnist, mnist_splits, "mnist_own_handle.py", "own")
    guarded_with_handler(root, backdoored_mnist, mnist_splits, "mnist_postprocess_only.py", "post",
                         extra_handler=True)
    with TorchServe(tmp_path_factory.mktemp("torchserve-custom"), root / "store",
                    ["own=own.mar", "post=post.mar"]) as ts:
        yield ts


def test_inner_handle_override_served_through_the_guard(custom_server, images):
    clean, triggered, _ = images
    body = predict(custom_server, triggered[0], model="own").json()
    assert body["handled_by"] == "own handle" and body["layerguard"]["poisoned"] is True
    assert predict(custom_server, clean[0], model="own").json()["layerguard"]["poisoned"] is False
    r = requests.post(f"{custom_server.url}/explanations/own", data=clean[0], headers=custom_server.headers(),
                      timeout=60)
    assert r.status_code == 200 and r.json() == {"explanation": "own explain", "n": 1}


def test_inner_postprocess_override_served_through_the_guard(custom_server, images):
    r = predict(custom_server, images[1][0], model="post")
    assert r.status_code == 200 and set(r.json()) == {"digit", "confidence", "layerguard"}
    assert r.json()["layerguard"]["poisoned"] is True
    url = f"http://127.0.0.1:{custom_server.ports['management']}/models/post?customized=true"
    described = requests.get(url, headers=custom_server.headers("management"), timeout=30)
    assert described.status_code == 200, described.text
    assert "digits, postprocess only" in described.text  # the inner describe_handle, through the guard


def test_handler_time_is_still_exported(custom_server, images):
    predict(custom_server, images[0][0], model="post")
    log = custom_server.log_text()
    assert "HandlerTime.ms" in log or "HandlerTime.Milliseconds" in log

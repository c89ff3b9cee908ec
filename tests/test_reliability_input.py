"""Bad input against a real TorchServe on 127.0.0.1: one server for the whole module.

Each bad request gets its own 4xx with a JSON reason, its batch neighbours are answered normally (checked
against offline scoring of the same bytes), the worker process keeps running (same PID), and the
Prometheus counters add up exactly: checked = verdicts answered, flagged = verdicts that flag, invalid =
the 4xx that layerguard answered, errors = 0.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from torchserve_util import TorchServe, png_bytes

from bench.load_test import Payload, build_payloads, png_bomb, scores_agree

MODEL = "mnist"
COUNTERS = ("LayerGuardInputsChecked", "LayerGuardInputsFlagged", "LayerGuardInvalidInputs", "LayerGuardErrors")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def odd_images(digit: np.ndarray) -> list[Payload]:
    """The same digit in modes and sizes the inner handler must convert (its contract: any image -> L 28x28)."""
    gray = Image.fromarray(digit)
    return [
        Payload("clean", "rgb", encode(gray.convert("RGB"))),
        Payload("clean", "rgba", encode(gray.convert("RGBA"))),
        Payload("clean", "cmyk-jpeg", encode(gray.convert("RGB").convert("CMYK"), "JPEG"), "image/jpeg"),
        Payload("clean", "gray-jpeg", encode(gray, "JPEG"), "image/jpeg"),
        Payload("clean", "16-bit", encode(Image.fromarray(digit.astype(np.uint16) * 257))),
        Payload("clean", "64x64", encode(gray.resize((64, 64)))),
        Payload("clean", "1x1", encode(Image.new("L", (1, 1)))),
    ]


def bad_inputs(digit: np.ndarray) -> list[Payload]:
    """Bodies that must each get their own 4xx, with the status a correct server answers."""
    png, jpeg = png_bytes(digit), encode(Image.fromarray(digit), "JPEG")
    return [
        Payload("corrupt", "empty", b"", "application/octet-stream", 400),
        Payload("corrupt", "not-an-image", b"plain text, not an image", "application/octet-stream", 400),
        Payload("corrupt", "truncated-png", png[: len(png) // 2], "image/png", 400),
        Payload("corrupt", "truncated-jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        Payload("corrupt", "bomb-40000x40000", png_bomb(40_000, 40_000), "image/png", 413),
        Payload("corrupt", "bomb-6000x6000", png_bomb(6_000, 6_000), "image/png", 413),  # between 1x and 2x cap
        Payload("corrupt", "json-object", b'{"image": "a digit"}', "application/json", 415),
        Payload("corrupt", "text", b"seven", "text/plain", 415),
    ]


@pytest.fixture(scope="module")
def payloads(mnist_splits):
    """8 clean + 8 triggered digits, the first clean digit in other modes and sizes, and the bad inputs."""
    digits = build_payloads(mnist_splits, n_images=8)[:16]
    digit = np.asarray(Image.open(io.BytesIO(digits[0].body)))
    return digits + odd_images(digit) + bad_inputs(digit)


@pytest.fixture(scope="module")
def tally():
    """What the counters must have gained over the module: filled in by the tests that send requests."""
    return dict.fromkeys(COUNTERS, 0)


def post(server: TorchServe, payload: Payload, timeout: float = 60) -> requests.Response:
    headers = {**server.headers(), "Content-Type": payload.content_type}
    return requests.post(f"{server.url}/predictions/{MODEL}", data=payload.body, headers=headers, timeout=timeout)


def count(tally: dict, response: requests.Response) -> None:
    if response.status_code == 200:
        tally["LayerGuardInputsChecked"] += 1
        tally["LayerGuardInputsFlagged"] += int(response.json()["layerguard"]["poisoned"])
    elif 400 <= response.status_code < 500:
        tally["LayerGuardInvalidInputs"] += 1


def test_each_bad_input_gets_its_own_4xx_and_neighbours_are_answered(guarded_server, payloads, served_verdicts, tally):
    pid = guarded_server.worker_pids(MODEL)
    with ThreadPoolExecutor(len(payloads)) as pool:  # all at once: bad and good share batches
        responses = list(pool.map(lambda p: post(guarded_server, p), payloads))
    for r in responses:
        count(tally, r)
    for i, (payload, r) in enumerate(zip(payloads, responses)):
        assert r.status_code == payload.expect_status, (payload.name, r.status_code, r.text[:200])
        assert r.headers["X-LayerGuard-Guarded"] == "true"
        body = r.json()
        if payload.kind == "corrupt":
            assert r.headers["content-type"] == "application/json", payload.name
            assert set(body) == {"error", "reason"} and body["reason"], (payload.name, body)
            continue
        note, offline = body["layerguard"], served_verdicts[i]
        assert (body["class"], note["poisoned"]) == (offline.cls, offline.poisoned), payload.name
        assert scores_agree(note["score"], offline.score), (payload.name, note["score"], offline.score)
    assert guarded_server.worker_pids(MODEL) == pid  # no bad input cost the worker its life


def test_refusals_say_why(guarded_server, payloads, tally):
    by_name = {p.name: p for p in payloads}
    answers = {}
    for name in ("bomb-40000x40000", "json-object", "truncated-png", "empty"):
        r = post(guarded_server, by_name[name])
        count(tally, r)
        answers[name] = r.json()
    bomb, media, truncated, empty = answers.values()
    assert bomb["error"] == "image too large" and "max_image_pixels" in bomb["reason"]
    assert media["error"] == "unsupported media type" and "application/json" in media["reason"]
    assert "image/png" in media["reason"]  # the fix
    assert truncated["error"] == "invalid input" and "truncated" in truncated["reason"]
    assert empty["reason"].startswith("empty request body")


def test_same_digit_in_other_lossless_modes_gets_the_same_verdict(guarded_server, payloads, served_verdicts):
    """RGB and RGBA of a gray digit convert back to exactly the same L image, so the same score."""
    names = {p.name: i for i, p in enumerate(payloads)}
    base = served_verdicts[0]  # payloads[0] is the digit that odd_images re-encodes
    for name in ("rgb", "rgba"):
        assert served_verdicts[names[name]].score == pytest.approx(base.score, abs=1e-6)


def test_body_over_max_request_size_is_refused_by_the_frontend(guarded_server, payloads, tally):
    """TorchServe's own 413 (empty body, not JSON: the frontend refuses it before any worker sees it).
    The server keeps serving and the worker is the same process."""
    pid = guarded_server.worker_pids(MODEL)
    big = Payload("corrupt", "too-big", b"\0" * 7_000_000, "application/octet-stream", 413)
    try:
        r = post(guarded_server, big)
        assert r.status_code == 413 and r.content == b""
    except requests.ConnectionError:  # the frontend may close the connection while the body is still sent
        pass
    after = post(guarded_server, payloads[0])
    count(tally, after)
    assert after.status_code == 200 and guarded_server.worker_pids(MODEL) == pid


def test_counters_add_up(guarded_server, tally):
    """Runs last: the module's requests, counted from the responses, equal the Prometheus deltas."""
    assert tally["LayerGuardInvalidInputs"] > 0 and tally["LayerGuardInputsFlagged"] > 0
    deadline = time.monotonic() + 20
    while True:
        values = guarded_server.metrics(MODEL)
        got = {name: values.get(name, 0.0) for name in COUNTERS}
        if got == {k: float(v) for k, v in tally.items()} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == {k: float(v) for k, v in tally.items()}, json.dumps({"metrics": got, "responses": tally})

"""The guard handler in-process, loaded by TorchServe's own model loader with the real ts.context.Context
(not MockContext: per-request statuses and the metrics cache are what serving uses)."""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchserve_util import build_original_mar, digit_pngs, guarded_with_handler

from layerguard.serving.entry import guard_for
from layerguard.serving.inner import GuardLoadError, guardable_model, model_dir_imports
from layerguard.tooling.data import ArraySource
from layerguard.tooling.worker import set_requests
from layerguard.tooling.wrap import WrapConfig, wrap_mar


@pytest.fixture(scope="module")
def images(mnist_splits):
    return digit_pngs(mnist_splits, 48)


def extract(mar: Path, dest: Path, mutate=None) -> Path:
    """The model dir a worker would see; `mutate(config)` edits its model-config.yaml."""
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(dest)
    if mutate:
        path = dest / "model-config.yaml"
        config = yaml.safe_load(path.read_text())
        mutate(config)
        path.write_text(yaml.safe_dump(config))
    return dest


class Served:
    """A model loaded the way a worker loads it: ts.model_loader + layerguard_handler.py."""

    def __init__(self, model_dir: Path, batch_size: int = 8, name: str = "mnist") -> None:
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
        from ts.model_loader import TsModelLoader

        self.metrics = MetricsCacheYamlImpl(str(Path(__file__).parents[1] / "layerguard" / "ts_metrics.yaml"))
        self.metrics.initialize_cache()
        with model_dir_imports(model_dir):
            self.service = TsModelLoader().load(name, str(model_dir.resolve()), "layerguard_handler.py", None,
                                                batch_size, None, True, self.metrics)
        self.context = self.service.context
        self.guard = guard_for(str(model_dir.resolve()))

    def __call__(self, payloads: list[bytes], headers: list[dict] | None = None) -> list[tuple[int, dict, dict]]:
        """(status, response headers, body) per request of one batch."""
        data = [{"data": p} for p in payloads]
        set_requests(self.context, len(data), headers)
        out = self.service._entry_point(data, self.context)
        assert len(out) == len(data)
        return [(self.context.get_response_status(i)[0], self.context.get_response_headers(i), out[i])
                for i in range(len(data))]


@pytest.fixture(scope="module")
def served(archives, tmp_path_factory):
    return Served(extract(archives["guarded"], tmp_path_factory.mktemp("guarded")))


def flagged(results) -> list[bool]:
    return [body["layerguard"]["poisoned"] for _, _, body in results]


def test_annotates_in_the_inner_handlers_shape(served, images):
    clean, triggered, labels = images
    results = served(clean[:8])
    for status, headers, body in results:
        assert status == 200
        assert {"class", "probability", "probabilities", "layerguard"} <= set(body)
        note = body["layerguard"]
        assert set(note) == {"poisoned", "score", "threshold", "layer_of_interest", "similarities", "terms"}
        assert set(note["similarities"]) == set(served.guard.artifact.layer_names)
        assert set(note["terms"]) == set(served.guard.detector.rule.term_names)
        assert headers["X-LayerGuard-Poisoned"] == ("true" if note["poisoned"] else "false")
    accuracy = sum(body["class"] == int(y) for (_, _, body), y in zip(results, labels[:8])) / 8
    assert accuracy >= 0.75


def test_flags_triggered_digits_and_passes_clean_ones(served, images):
    clean, triggered, _ = images
    clean_flags = [f for i in range(0, 48, 8) for f in flagged(served(clean[i:i + 8]))]
    trig_flags = [f for i in range(0, 48, 8) for f in flagged(served(triggered[i:i + 8]))]
    assert sum(clean_flags) / len(clean_flags) <= 0.15
    assert sum(trig_flags) / len(trig_flags) >= 0.8


def test_batch_equals_one_at_a_time(served, images):
    clean, triggered, _ = images
    batch = served(clean[:3] + triggered[:3])
    single = [served([p])[0] for p in clean[:3] + triggered[:3]]
    for (_, _, a), (_, _, b) in zip(batch, single):
        assert a["class"] == b["class"]
        assert a["layerguard"]["score"] == pytest.approx(b["layerguard"]["score"], abs=1e-4)


def test_small_batches_kept_whole_score_as_large_ones_reduced_in_the_hooks(served, images):
    """Up to the capture's limit (KEEP_WHOLE_UP_TO rows for this small model) the outputs are reduced after the
    pass, above it inside the hooks."""
    from layerguard.core.grouped import KEEP_WHOLE_UP_TO

    assert served.guard.capture.keep_whole_up_to == KEEP_WHOLE_UP_TO
    clean, triggered, _ = images
    half = KEEP_WHOLE_UP_TO // 2 + 1
    large = served(clean[:half] + triggered[:half])
    assert not served.guard.capture.kept_whole
    small = served(clean[:half]) + served(triggered[:half])
    assert served.guard.capture.kept_whole
    for (_, _, a), (_, _, b) in zip(large, small):
        assert a["class"] == b["class"] and a["layerguard"]["poisoned"] == b["layerguard"]["poisoned"]
        assert a["layerguard"]["score"] == pytest.approx(b["layerguard"]["score"], abs=1e-4)
        assert a["layerguard"]["similarities"] == pytest.approx(b["layerguard"]["similarities"], abs=1e-5)


def test_probe_keeps_whole_only_as_many_rows_as_fit_the_memory_budget(archives, tmp_path, images, monkeypatch):
    """A model with large monitored outputs keeps fewer rows past the forward pass (KEEP_WHOLE_BYTES); the
    verdicts do not change, only where the outputs are reduced."""
    import layerguard.core.grouped as grouped

    served = Served(extract(archives["guarded"], tmp_path / "d"))
    guard = served.guard
    clean, triggered, _ = images
    before = served(clean[:3] + triggered[:3])
    assert guard.capture.kept_whole
    guard._probe_pass(guard.artifact.meta.input_shape)  # one row's monitored outputs, to size the budget
    row_bytes = sum(t.numel() * t.element_size() for t in guard.capture.features().values())
    monkeypatch.setattr(grouped, "KEEP_WHOLE_BYTES", 2 * row_bytes + row_bytes // 2)
    guard._probe(served.context)
    assert guard.capture.keep_whole_up_to == 2
    after = served(clean[:3] + triggered[:3])
    assert not guard.capture.kept_whole  # 6 rows > 2: reduced in the hooks
    assert [r[2]["layerguard"]["score"] for r in after] == pytest.approx(
        [r[2]["layerguard"]["score"] for r in before], abs=1e-4)
    monkeypatch.setattr(grouped, "KEEP_WHOLE_BYTES", row_bytes // 2)
    guard._probe(served.context)
    assert guard.capture.keep_whole_up_to == 0


def test_probe_that_sees_a_monitored_output_changed_in_place_reduces_every_batch_in_the_hooks(archives, tmp_path,
                                                                                                images):
    served = Served(extract(archives["guarded"], tmp_path / "d"))
    guard = served.guard
    assert guard.capture.keep_whole_up_to > 0  # nothing changed in place: small batches keep whole outputs
    first = dict(guard.model.named_modules())[guard.artifact.layer_names[0]]
    seen = {}
    def change_in_place(*_args) -> None:  # as an in-place op later in the forward pass would
        seen["out"].add_(0.0)

    handles = [first.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out)),
               guard.model.register_forward_hook(change_in_place)]
    try:
        guard._probe(served.context)
        assert guard.capture.keep_whole_up_to == 0
        clean, triggered, _ = images
        results = served(clean[:2] + triggered[:2])
        assert [r[0] for r in results] == [200] * 4 and not served.guard.capture.kept_whole
    finally:
        for handle in handles:
            handle.remove()


def test_clean_batch_is_preprocessed_in_one_call_and_a_bad_one_request_by_request(served, images, monkeypatch):
    """The inner preprocess runs once per clean batch (as BaseHandler runs it); a batch with a corrupt input
    falls back to one call per request, so the corrupt one fails alone."""
    clean, triggered, _ = images
    calls: list[int] = []
    inner = served.guard.inner
    original = inner.preprocess
    monkeypatch.setattr(inner, "preprocess", lambda rows: calls.append(len(rows)) or original(rows))
    assert [r[0] for r in served(clean[:3] + triggered[:2])] == [200] * 5
    assert calls == [5]
    calls.clear()
    assert [r[0] for r in served([clean[0], b"\x89PNG broken", triggered[0]])] == [200, 400, 200]
    assert calls == [3, 1, 1, 1]


def test_corrupt_item_gets_its_own_400(served, images, caplog):
    clean, triggered, _ = images
    caplog.set_level(logging.INFO)
    results = served([clean[0], b"\x89PNG broken", triggered[0], b""])
    assert [r[0] for r in results] == [200, 400, 200, 400]
    assert results[1][2]["error"] == "invalid input" and "reason" in results[1][2]
    assert results[2][2]["layerguard"]["poisoned"] is True
    metrics = "\n".join(r.getMessage() for r in caplog.records if "[METRICS]LayerGuard" in r.getMessage())
    assert "LayerGuardInputsChecked.Count:2|" in metrics
    assert "LayerGuardInputsFlagged.Count:1|" in metrics


def test_first_batch_records_every_metric_later_batches_only_those_that_moved(archives, tmp_path, images, caplog):
    """Each metric is a log line the frontend parses: zeros are recorded once per worker (so every series
    exists for alerts), then only counters that moved."""
    clean, _, _ = images
    fresh = Served(extract(archives["guarded"], tmp_path / "d"))
    caplog.set_level(logging.INFO)

    def recorded() -> set[str]:
        lines = [r.getMessage() for r in caplog.records if "[METRICS]LayerGuard" in r.getMessage()]
        caplog.clear()
        return {line.split("[METRICS]")[1].split(".")[0] for line in lines}

    fresh(clean[:2])
    assert recorded() == {"LayerGuardInputsChecked", "LayerGuardInputsFlagged", "LayerGuardErrors",
                          "LayerGuardInvalidInputs", "LayerGuardDetectionLatency", "LayerGuardExpectedFlagRate"}
    assert fresh(clean[2:4] + [b"junk"])[2][0] == 400
    assert recorded() == {"LayerGuardInputsChecked", "LayerGuardInvalidInputs", "LayerGuardDetectionLatency"}


def test_detector_failure_is_a_per_item_500_and_counted(served, images, monkeypatch, caplog):
    clean, _, _ = images
    handler = served.guard

    def broken(*_args, **_kw):
        raise RuntimeError("centroids on fire")

    monkeypatch.setattr(handler.detector, "score_capture", broken)
    caplog.set_level(logging.INFO)
    results = served([clean[0], b"junk", clean[1]])
    assert [r[0] for r in results] == [500, 400, 500]
    assert results[0][2] == {"error": "detection failed", "reason": "RuntimeError: centroids on fire"}
    metrics = "\n".join(r.getMessage() for r in caplog.records if "[METRICS]LayerGuardErrors" in r.getMessage())
    assert "LayerGuardErrors.Count:2|" in metrics
    monkeypatch.undo()
    assert served([clean[0]])[0][0] == 200  # the same worker keeps serving


def test_reject_policy_answers_403_without_prediction(archives, tmp_path, images):
    clean, triggered, _ = images
    served = Served(extract(archives["reject"], tmp_path / "d"))
    results = served([clean[0], triggered[0], triggered[1]])
    assert results[0][0] == 200 and "class" in results[0][2]
    for status, headers, body in results[1:]:
        assert status == 403
        assert set(body) == {"error", "reason", "layerguard"} and "class" not in body
        assert "below threshold" in body["reason"]
        assert headers["X-LayerGuard-Poisoned"] == "true"


def test_tau_override_moves_the_threshold(archives, tmp_path, served, images):
    clean, _, _ = images
    lax = Served(extract(archives["guarded"], tmp_path / "d",
                         lambda c: c["handler"]["layerguard"].update(tau=10.0)))
    base = served([clean[0]])[0][2]["layerguard"]
    note = lax([clean[0]])[0][2]["layerguard"]
    assert note["score"] == pytest.approx(base["score"])
    assert note["threshold"] < base["threshold"]


def test_fpr_confidence_override_lowers_the_threshold(archives, tmp_path, served, images):
    """An upper-bound target flags fewer references than the same target as an expected rate."""
    clean, _, _ = images
    bounded = Served(extract(archives["guarded"], tmp_path / "d",
                             lambda c: c["handler"]["layerguard"].update(target_fpr=0.05, fpr_confidence=0.95)))
    expected = Served(extract(archives["guarded"], tmp_path / "e",
                              lambda c: c["handler"]["layerguard"].update(target_fpr=0.05)))
    assert bounded([clean[0]])[0][2]["layerguard"]["threshold"] < expected([clean[0]])[0][2]["layerguard"]["threshold"]
    # the flag-rate gauge (and its alert) follows what the bound is expected to flag, not the bound itself
    assert 0.0 < bounded.guard.expected_flag_rate < 0.05 == expected.guard.expected_flag_rate


def refused(model_dir: Path, images) -> str:
    """Load a broken model dir: the worker must load, and answer every request with a prompt 503 + reason."""
    served = Served(model_dir)
    results = served([images[0][0], images[0][1]])
    assert [r[0] for r in results] == [503, 503]
    assert all(r[2]["error"] == "model refused to load" and r[1]["X-LayerGuard-Guarded"] == "false"
               for r in results)
    return results[0][2]["reason"]


@pytest.mark.parametrize("block, message", [
    ({"polcy": "reject"}, "unknown key(s) polcy"),
    ({"policy": "block"}, "must be one of annotate, reject"),
    ({"tau": 1.0, "target_fpr": 0.01}, "--tau or --target-fpr, not both"),
    ({"response": "tiny"}, "must be one of full, compact"),
    ({"target_fpr": 0.001, "fpr_confidence": 0.999}, "that needs at least 6905"),
])
def test_bad_policy_refused_at_load(archives, tmp_path, images, block, message):
    model_dir = extract(archives["guarded"], tmp_path / "d", lambda c: c["handler"]["layerguard"].update(block))
    assert message in refused(model_dir, images)


def test_other_weights_refused_at_load(archives, tmp_path, images):
    model_dir = extract(archives["guarded"], tmp_path / "d")
    state = torch.load(model_dir / "mnist_model.pt", weights_only=True)
    state["fc2.bias"] = state["fc2.bias"] + 0.01
    torch.save(state, model_dir / "mnist_model.pt")
    assert "other model weights" in refused(model_dir, images)


def test_missing_artifact_refused_at_load(archives, tmp_path, images):
    model_dir = extract(archives["guarded"], tmp_path / "d")
    (model_dir / "layerguard_calibration.npz").unlink()
    assert "not found" in refused(model_dir, images)


def test_refusal_is_counted_in_a_metric(archives, tmp_path, images, caplog):
    model_dir = extract(archives["guarded"], tmp_path / "d")
    (model_dir / "layerguard_calibration.npz").unlink()
    caplog.set_level(logging.INFO)
    served = Served(model_dir)
    lines = [r.getMessage() for r in caplog.records if "[METRICS]LayerGuardGuardRefused" in r.getMessage()]
    assert any("LayerGuardGuardRefused.Count:1|" in line for line in lines), lines  # at load, before traffic
    caplog.clear()
    served([images[0][0]] * 3)
    lines = [r.getMessage() for r in caplog.records if "[METRICS]LayerGuardGuardRefused" in r.getMessage()]
    assert any("LayerGuardGuardRefused.Count:3|" in line for line in lines), lines
    described = served([images[0][0]], [{"describe": "True"}])[0]
    assert described[0] == 200 and described[2]["layerguard"]["state"] == "refused"
    assert "not found" in described[2]["layerguard"]["reason"]


def test_signing_key_configured_refuses_an_unsigned_artifact(archives, tmp_path, images, monkeypatch):
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123456789abcdef")
    monkeypatch.setenv("LAYERGUARD_SIGNING_KEY_FILE", str(key))
    assert "is not signed" in refused(extract(archives["guarded"], tmp_path / "d"), images)


def test_form_encoded_body_names_the_content_type_and_the_fix(served, images):
    # TorchServe form-decodes such a body: the image bytes never reach the handler (the probe saw b"")
    status, _, body = served([b""], [{"content-type": "application/x-www-form-urlencoded"}])[0]
    assert status == 415
    assert "application/x-www-form-urlencoded" in body["reason"] and "application/octet-stream" in body["reason"]


def test_default_pixel_cap_follows_the_calibrated_input_size(served, images):
    from PIL import Image

    from layerguard.serving.inputs import default_max_pixels

    assert served.guard.max_image_pixels == default_max_pixels((1, 28, 28)) == 1 << 20
    assert default_max_pixels((3, 224, 224)) == 64 * 224 * 224
    assert default_max_pixels(None) == 25_000_000
    import io

    buf = io.BytesIO()
    Image.new("L", (1500, 1500)).save(buf, format="PNG")  # 2.25 MP: fine for Pillow's default, not for 28x28
    big, small = served([buf.getvalue(), images[0][0]])
    assert big[0] == 413 and "1048576 pixels" in big[2]["reason"]
    assert small[0] == 200


def test_handler_time_is_recorded_like_base_handler(served, images, caplog):
    caplog.set_level(logging.INFO)
    served([images[0][0]])
    assert any("[METRICS]HandlerTime." in r.getMessage() for r in caplog.records), caplog.text[-2000:]


def test_compact_response_drops_per_layer_detail(archives, tmp_path, images):
    compact = Served(extract(archives["guarded"], tmp_path / "d",
                             lambda c: c["handler"]["layerguard"].update(response="compact")))
    note = compact([images[0][0]])[0][2]["layerguard"]
    assert set(note) == {"poisoned", "score", "threshold", "layer_of_interest"}
    from layerguard.core.grouped import KEEP_WHOLE_UP_TO, KEEP_WHOLE_UP_TO_NO_COSINE

    # without the cosine profile, a hook's moments of a still-cached activation win from 32 rows on
    rule = compact.guard.detector.rule
    assert compact.guard.capture.keep_whole_up_to == (
        KEEP_WHOLE_UP_TO if rule.needs_similarities else KEEP_WHOLE_UP_TO_NO_COSINE)


def test_torchscript_refused_with_what_to_ship(tmp_path, backdoored_mnist):
    model = backdoored_mnist
    with pytest.raises(GuardLoadError, match="TorchScript.*Ship the eager model"):
        guardable_model(torch.jit.script(model), {"model": {}}, str(tmp_path), torch.device("cpu"))
    mar = build_original_mar(tmp_path, model, fmt="torchscript")
    with pytest.raises(GuardLoadError, match="TorchScript"):
        wrap_mar(mar, ArraySource(np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.int64)),
                 WrapConfig(out_dir=tmp_path / "out"))


def test_torch_export_program_is_guarded_through_unflatten(tmp_path, images, backdoored_mnist, mnist_splits):
    from torchserve_util import ASSETS

    model, splits = backdoored_mnist, mnist_splits
    work = tmp_path / "export"
    work.mkdir()
    shutil.copy(ASSETS / "mnist_handler.py", work / "mnist_handler.py")
    mar = build_original_mar(tmp_path, model, fmt="export", handler=ASSETS / "mnist_export_handler.py")
    # the export handler imports mnist_handler: ship it in the original archive like a user would
    with zipfile.ZipFile(mar, "a") as zf:
        zf.write(work / "mnist_handler.py", "mnist_handler.py")
    reference = ArraySource(splits.x_ref[:300], splits.y_ref[:300])
    guarded = wrap_mar(mar, reference, WrapConfig(out_dir=tmp_path / "store")).mar_path
    served = Served(extract(guarded, tmp_path / "d"))
    assert type(served.guard.model).__name__ == "UnflattenedModule"
    clean, triggered, _ = images
    assert sum(flagged(served(triggered[:16]))) >= 12
    assert sum(flagged(served(clean[:16]))) <= 3


def test_inner_handle_override_keeps_working_and_is_annotated(tmp_path, images, backdoored_mnist, mnist_splits):
    guarded = guarded_with_handler(tmp_path, backdoored_mnist, mnist_splits, "mnist_own_handle.py", "custom")
    served = Served(extract(guarded, tmp_path / "d"), name="custom")
    assert served.guard.delegates_handle
    clean, triggered, _ = images
    results = served(clean[:4] + triggered[:4] + [b"junk"])
    assert [r[0] for r in results] == [200] * 8 + [400]  # the bad item alone fails (retried one by one)
    for _, _, body in results[:8]:
        assert body["handled_by"] == "own handle" and "layerguard" in body
    assert sum(b["layerguard"]["poisoned"] for _, _, b in results[4:8]) >= 3
    assert sum(b["layerguard"]["poisoned"] for _, _, b in results[:4]) <= 1
    # explain and describe go to the inner handle untouched
    assert served([clean[0]], [{"describe": "True"}])[0][2] == {"description": "digits, own handle"}
    assert served([clean[0]], [{"explain": "True"}])[0][2] == {"explanation": "own explain", "n": 1}


def test_inner_postprocess_override_keeps_its_shape(tmp_path, images, backdoored_mnist, mnist_splits):
    guarded = guarded_with_handler(tmp_path, backdoored_mnist, mnist_splits, "mnist_postprocess_only.py", "custom",
                                   extra_handler=True)
    served = Served(extract(guarded, tmp_path / "d"), name="custom")
    assert not served.guard.delegates_handle
    status, _, body = served([images[1][0]])[0]
    assert status == 200 and set(body) == {"digit", "confidence", "layerguard"}
    assert body["layerguard"]["poisoned"] is True
    assert served([images[0][0]], [{"describe": "True"}])[0][2] == {"description": "digits, postprocess only"}

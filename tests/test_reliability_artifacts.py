"""Bad artifacts and configuration: each is refused at load time with a message naming the problem and the
fix, and the refused model answers every request promptly with a 503 carrying that message (a worker that
raised would be restarted forever while clients hang). The model is served unguarded only when
model-config.yaml asks for it (`on_missing_calibration: serve_unguarded`), and then every response says so.
Artifacts are never unpickled.

In-process cases load the guarded model the way a worker does (ts.model_loader + the real Context); one
real TorchServe shows a broken archive refusing next to an explicitly unguarded one.
"""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from torchserve_util import TorchServe, digit_pngs

from bench.load_test import THREAD_ENV
from layerguard.core.artifact import DEFAULT_FILENAME, ArtifactMeta, CalibrationArtifact
from layerguard.serving.inner import model_dir_imports
from layerguard.serving.policy import ServingPolicy, parse_policy
from layerguard.tooling.worker import set_requests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(mnist_splits):
    return digit_pngs(mnist_splits, 4)


def extract(mar: Path, dest: Path) -> Path:
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(dest)
    return dest


def edit_config(model_dir: Path, **block) -> None:
    path = model_dir / "model-config.yaml"
    config = yaml.safe_load(path.read_text())
    config["handler"]["layerguard"].update(block)
    path.write_text(yaml.safe_dump(config))


def load_worker(model_dir: Path):
    """The model loaded as a TorchServe worker loads it; raises what the worker would log."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    metrics = MetricsCacheYamlImpl(str(ROOT / "layerguard" / "ts_metrics.yaml"))
    metrics.initialize_cache()
    with model_dir_imports(model_dir):
        return TsModelLoader().load("mnist", str(model_dir.resolve()), "layerguard_handler.py", None, 8, None,
                                    True, metrics)


# ---- ways to break an artifact --------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def tamper(path: Path) -> None:
    """Change one centroid value and re-save a valid .npz with the original metadata (stale checksum)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    key = next(k for k in arrays if k.startswith("profile/centroid/"))
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] += 0.5
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


class Payload:
    """Unpickling this would create `marker`: the proof that nothing is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def pickle_in(path: Path) -> None:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["meta"] = np.array([Payload(path.parent / "PWNED")], dtype=object)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def fewer_classes(path: Path) -> None:
    """A consistent, correctly sealed artifact for a 9-class model of the same weights."""
    art = CalibrationArtifact.load(path)
    keep = art.arrays["calibration/benign_labels"] < 9
    arrays = {}
    for key, value in art.arrays.items():
        if key.startswith("calibration/benign_"):
            arrays[key] = value[keep]
        elif value.ndim and value.shape[0] == 10:
            arrays[key] = value[:9]
        else:
            arrays[key] = value
    meta = ArtifactMeta(**{**art.meta.__dict__, "num_classes": 9, "class_names": art.meta.class_names[:9]})
    CalibrationArtifact(meta, arrays).save(path)


def missing_layer(path: Path) -> None:
    art = CalibrationArtifact.load(path)
    old, new = art.layer_names[-1], "head_that_is_not_there"
    arrays = {key.replace(f"/{old}", f"/{new}") if key.endswith(f"/{old}") else key: v for key, v in art.arrays.items()}
    meta = ArtifactMeta(**{**art.meta.__dict__, "layer_names": (*art.layer_names[:-1], new),
                           "penultimate": art.meta.penultimate if art.meta.penultimate != old else new})
    CalibrationArtifact(meta, arrays).save(path)


def answers(service, images) -> list[tuple[int, dict, object]]:
    data = [{"data": images[0][0]}, {"data": b"junk"}, {"data": images[1][0]}]
    set_requests(service.context, len(data))
    out = service._entry_point(data, service.context)
    return [(service.context.get_response_status(i)[0], service.context.get_response_headers(i), out[i])
            for i in range(len(data))]


def assert_refused(model_dir: Path, images, problem: str) -> str:
    """The worker loads; every request (good or bad input) gets a 503 whose reason names the problem."""
    start = time.monotonic()
    results = answers(load_worker(model_dir), images)
    assert time.monotonic() - start < 30
    assert [r[0] for r in results] == [503, 503, 503]
    reason = results[0][2]["reason"]
    assert results[0][2]["error"] == "model refused to load"
    import re

    assert re.search(problem, reason), reason
    return reason


@pytest.mark.parametrize("breaks, problem", [
    (truncate, "is damaged or not an artifact"),
    (tamper, "was modified after it was written"),
    (pickle_in, "is damaged or not an artifact"),
    (fewer_classes, "model outputs 10 classes but the artifact was calibrated for 9"),
    (missing_layer, "model has no layer.s. head_that_is_not_there"),
    (lambda path: path.unlink(), "not found"),
], ids=["truncated", "tampered", "pickled", "class-count", "missing-layer", "missing"])
def test_bad_artifact_is_refused_naming_problem_and_fix(archives, tmp_path, images, breaks, problem):
    model_dir = extract(archives["guarded"], tmp_path / "model")
    breaks(model_dir / DEFAULT_FILENAME)
    reason = assert_refused(model_dir, images, problem)
    assert "Re-run" in reason  # the fix
    assert not (model_dir / "PWNED").exists()  # never unpickled


@pytest.mark.parametrize("block, problem", [
    ({"polcy": "reject"}, "unknown key.s. polcy"),
    ({"tau": -1.0}, "tau must be in"),
    ({"tau": 100.0}, "tau must be in"),
    ({"target_fpr": 1.5}, "target_fpr must be in"),
    ({"target_fpr": 0.0}, "target_fpr must be in"),
    ({"on_missing_calibration": "ignore"}, "on_missing_calibration must be one of refuse, serve_unguarded"),
    ({"max_image_pixels": 0}, "max_image_pixels must be a positive integer"),
])
def test_bad_configuration_is_refused(archives, tmp_path, images, block, problem):
    model_dir = extract(archives["guarded"], tmp_path / "model")
    edit_config(model_dir, **block)
    assert_refused(model_dir, images, problem)


def test_new_policy_keys_round_trip_and_default_to_refuse():
    default = parse_policy({"handler": {"layerguard": {"inner_handler": "h.py"}}})
    assert default.on_missing_calibration == "refuse" and not default.may_serve_unguarded
    assert default.max_image_pixels is None  # follows the calibrated input size
    lax = ServingPolicy("h.py", on_missing_calibration="serve_unguarded", max_image_pixels=1000)
    assert parse_policy({"handler": {"layerguard": lax.to_config()}}) == lax


def test_serve_unguarded_applies_only_to_a_missing_artifact(archives, tmp_path, images):
    """A damaged or foreign artifact is a broken deployment, never a reason to drop the guard."""
    model_dir = extract(archives["guarded"], tmp_path / "model")
    edit_config(model_dir, on_missing_calibration="serve_unguarded")
    tamper(model_dir / DEFAULT_FILENAME)
    assert_refused(model_dir, images, "was modified")


def test_serve_unguarded_is_loud_and_marks_every_response(archives, tmp_path, images, caplog):
    model_dir = extract(archives["guarded"], tmp_path / "model")
    edit_config(model_dir, on_missing_calibration="serve_unguarded")
    (model_dir / DEFAULT_FILENAME).unlink()
    caplog.set_level(logging.INFO)
    service = load_worker(model_dir)
    assert any(r.levelno >= logging.ERROR and "UNGUARDED" in r.getMessage() for r in caplog.records)
    results = answers(service, images)
    assert [r[0] for r in results] == [200, 400, 200]
    assert all(r[1]["X-LayerGuard-Guarded"] == "false" for r in results)
    out = [r[2] for r in results]
    assert out[0]["layerguard"] == {"guarded": False, "reason": out[0]["layerguard"]["reason"]}
    assert out[2]["class"] == 7  # the trigger works and nothing stops it: that is what unguarded means
    metrics = "\n".join(r.getMessage() for r in caplog.records if "[METRICS]LayerGuard" in r.getMessage())
    assert "LayerGuardUnguardedInputs.Count:2|" in metrics and "LayerGuardInvalidInputs.Count:1|" in metrics
    assert "LayerGuardInputsChecked" not in metrics


# ---- one real TorchServe: a broken archive next to an explicitly unguarded one ---------------------------
def rewrite_mar(mar: Path, out: Path, artifact: bytes | None, **block) -> Path:
    """A copy of a guarded .mar with another artifact (None: none) and extra handler.layerguard keys."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == DEFAULT_FILENAME:
                if artifact is None:
                    continue
                data = artifact
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config["handler"]["layerguard"].update(block)
                data = yaml.safe_dump(config).encode()
            dst.writestr(item, data)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, archives):
    store = tmp_path_factory.mktemp("store")
    scratch = extract(archives["guarded"], tmp_path_factory.mktemp("scratch"))
    tamper(scratch / DEFAULT_FILENAME)
    # even with serve_unguarded: a tampered artifact is a broken deployment, not a missing calibration
    rewrite_mar(archives["guarded"], store / "broken.mar", (scratch / DEFAULT_FILENAME).read_bytes(),
                on_missing_calibration="serve_unguarded")
    rewrite_mar(archives["guarded"], store / "unguarded.mar", None, on_missing_calibration="serve_unguarded")
    with TorchServe(tmp_path_factory.mktemp("torchserve"), store, ["broken=broken.mar", "unguarded=unguarded.mar"],
                    env=THREAD_ENV, wait_for=["unguarded", "broken"]) as ts:
        yield ts


def test_broken_archive_answers_503_promptly_and_the_metric_shows_it(server, images):
    """The probe's hang: a refused model must answer at once, say why, and be visible to alerting."""
    start = time.monotonic()
    r = requests.post(f"{server.url}/predictions/broken", data=images[0][0], headers=server.headers(), timeout=30)
    assert time.monotonic() - start < 10
    assert r.status_code == 503 and r.json()["error"] == "model refused to load"
    assert "was modified after it was written" in r.json()["reason"] and "Re-run" in r.json()["reason"]
    assert r.headers["X-LayerGuard-Guarded"] == "false"
    log = server.log_text()
    assert "REFUSED to load model broken" in log and "Model broken is served UNGUARDED" not in log
    deadline = time.monotonic() + 20
    while server.metrics("broken").get("LayerGuardGuardRefused", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.metrics("broken")["LayerGuardGuardRefused"] >= 1
    assert server.worker_pids("unguarded")  # the other model is unaffected


def test_unguarded_archive_serves_with_the_mark(server, images):
    r = requests.post(f"{server.url}/predictions/unguarded", data=images[1][0], headers=server.headers(), timeout=60)
    assert r.status_code == 200 and r.headers["X-LayerGuard-Guarded"] == "false"
    assert r.json()["layerguard"]["guarded"] is False and "X-LayerGuard-Poisoned" not in r.headers
    assert "served UNGUARDED" in server.log_text()
    deadline = time.monotonic() + 20
    while server.metrics("unguarded").get("LayerGuardUnguardedInputs", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.metrics("unguarded")["LayerGuardUnguardedInputs"] >= 1

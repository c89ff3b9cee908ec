"""Artifact round trip, and refusal of damaged, edited or mismatched artifacts."""

import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from layerguard.artifact import ArtifactError, CalibrationArtifact
from layerguard.calibration import CalibrationConfig, calibrate
from layerguard.layers import default_plan, discover_layers


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                         nn.Linear(8, 3)).eval()


@pytest.fixture()
def artifact_and_model(tmp_path):
    model = _tiny_model()
    x = torch.rand(60, 1, 8, 8)
    y = torch.arange(60) % 3
    plan = default_plan(discover_layers(model, x[:1]))
    art = calibrate(model, lambda: [(x[:32], y[:32]), (x[32:], y[32:])], plan, 3,
                    CalibrationConfig(min_per_class=5))
    path = art.save(tmp_path / "art.npz")
    return path, model, art


def test_round_trip(artifact_and_model):
    path, model, art = artifact_and_model
    loaded = CalibrationArtifact.load(path)
    loaded.check_model(model)
    assert loaded.layer_names == art.layer_names
    for n in art.layer_names:
        assert np.array_equal(loaded.centroids[n], art.centroids[n])
    assert np.array_equal(loaded.loi, art.loi)
    assert np.allclose(loaded.thresholds(), art.thresholds())
    assert loaded.meta["threshold"] == {"tau": 2.5}


def test_loading_never_unpickles(artifact_and_model, monkeypatch):
    path, _, _ = artifact_and_model
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    CalibrationArtifact.load(path)
    assert calls and all(k.get("allow_pickle") is False for k in calls)


def test_truncated_file_is_refused(artifact_and_model):
    path, _, _ = artifact_and_model
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="damaged"):
        CalibrationArtifact.load(path)


def test_edited_array_is_refused(artifact_and_model, tmp_path):
    path, _, art = artifact_and_model
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["loi"] = np.zeros_like(arrays["loi"])  # an attacker silencing the detector
    if np.array_equal(arrays["loi"], art.loi):
        arrays["loi"] = np.ones_like(arrays["loi"])
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="modified"):
        CalibrationArtifact.load(path)


def test_edited_metadata_is_refused(artifact_and_model):
    path, _, _ = artifact_and_model
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["kind"] = "something-else"
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="not a layerguard"):
        CalibrationArtifact.load(path)


def test_pickled_content_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, meta=np.array([{"kind": "x"}], dtype=object))
    with pytest.raises(ArtifactError):
        CalibrationArtifact.load(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        CalibrationArtifact.load(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ArtifactError, match="no layerguard metadata"):
        CalibrationArtifact.load(other)
    junk = tmp_path / "junk.npz"
    with zipfile.ZipFile(junk, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(ArtifactError):
        CalibrationArtifact.load(junk)


def test_other_model_weights_are_refused(artifact_and_model):
    path, _, _ = artifact_and_model
    with pytest.raises(ArtifactError, match="other model weights"):
        CalibrationArtifact.load(path).check_model(_tiny_model(seed=1))


def test_missing_layer_and_class_count_are_refused(artifact_and_model):
    path, model, _ = artifact_and_model
    art = CalibrationArtifact.load(path)
    art.meta["model_fingerprint"] = "x"
    from layerguard.artifact import model_fingerprint

    renamed = nn.Sequential(*list(model.children())[:-1])  # the logits layer is gone
    art.meta["model_fingerprint"] = model_fingerprint(renamed)
    with pytest.raises(ArtifactError, match="no layer"):
        art.check_model(renamed)
    with pytest.raises(ArtifactError, match="10 classes"):
        art.check_output_classes(10)


def test_failed_save_leaves_no_partial_file(artifact_and_model, tmp_path, monkeypatch):
    _, _, art = artifact_and_model
    target = tmp_path / "out" / "new.npz"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        art.save(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

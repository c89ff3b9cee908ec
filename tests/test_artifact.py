"""Artifact round trip, and refusal of damaged, edited or mismatched artifacts."""

import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from layerguard.core.artifact import ArtifactError, CalibrationArtifact, model_fingerprint
from layerguard.core.layers import default_plan, discover_layers
from layerguard.core.rules import DEFAULT_RULE
from layerguard.tooling.calibration import CalibrationConfig, calibrate

KEY = b"0123456789abcdef-ops-team-key"


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
    assert loaded.meta == art.meta and loaded.layer_names == art.layer_names
    assert set(loaded.arrays) == set(art.arrays)
    for key, value in art.arrays.items():
        assert np.array_equal(loaded.arrays[key], value), key
    assert np.array_equal(loaded.detector().thresholds, art.detector().thresholds)
    assert loaded.meta.threshold == {"target_fpr": 0.01} and loaded.meta.rule == DEFAULT_RULE
    x = torch.rand(4, 1, 8, 8)
    from layerguard.core.capture import LayerCapture

    with LayerCapture(model, art.layer_names) as cap:
        out, feats = cap.run(x)
    a, b = art.detector().score(feats, out.argmax(1)), loaded.detector().score(feats, out.argmax(1))
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.poisoned, b.poisoned)


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
    key = "calibration/benign_scores"
    arrays[key] = arrays[key] - 100.0  # an attacker silencing the detector
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="modified"):
        CalibrationArtifact.load(path)


def _edit_meta(path, **changes):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_edited_metadata_is_refused(artifact_and_model):
    path, _, _ = artifact_and_model
    _edit_meta(path, kind="something-else")
    with pytest.raises(ArtifactError, match="not a layerguard"):
        CalibrationArtifact.load(path)


def test_edited_threshold_rule_in_metadata_is_refused(artifact_and_model):
    """The outside probe's attack: `{"tau": 10}` in the metadata silenced the detector and loaded READY."""
    path, _, _ = artifact_and_model
    _edit_meta(path, threshold={"tau": 10})
    with pytest.raises(ArtifactError, match="modified"):
        CalibrationArtifact.load(path)


def test_pasted_fingerprint_is_refused(artifact_and_model):
    """The other probe attack: an artifact for other weights with the served model's fingerprint pasted in."""
    path, _, _ = artifact_and_model
    _edit_meta(path, model_fingerprint=model_fingerprint(_tiny_model(seed=1)))
    with pytest.raises(ArtifactError, match="modified"):
        CalibrationArtifact.load(path)


def test_signed_artifact_verifies_only_with_its_key(artifact_and_model, tmp_path):
    _, _, art = artifact_and_model
    signed = art.save(tmp_path / "signed.npz", signing_key=KEY)
    assert CalibrationArtifact.load(signed, KEY).signed
    assert CalibrationArtifact.load(signed).signed  # no key configured: the digest still holds
    with pytest.raises(ArtifactError, match="does not match the configured key"):
        CalibrationArtifact.load(signed, b"another-key-of-16-bytes")
    unsigned = art.save(tmp_path / "unsigned.npz")
    with pytest.raises(ArtifactError, match="not signed"):
        CalibrationArtifact.load(unsigned, KEY)


def test_recomputed_digest_without_the_key_is_refused(artifact_and_model, tmp_path):
    """Someone who edits the metadata and recomputes the digest cannot make the signature."""
    from layerguard.core.artifact import ArtifactMeta

    _, _, art = artifact_and_model
    forged = CalibrationArtifact(ArtifactMeta(**{**art.meta.__dict__, "threshold": {"tau": 10.0}}), art.arrays)
    path = forged.save(tmp_path / "forged.npz", signing_key=b"attacker-key-1234567")
    with pytest.raises(ArtifactError, match="signature"):
        CalibrationArtifact.load(path, KEY)


def test_pickled_content_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, meta=np.array([{"kind": "x"}], dtype=object), seal=np.zeros(3))
    with pytest.raises(ArtifactError):
        CalibrationArtifact.load(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        CalibrationArtifact.load(tmp_path / "nope.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ArtifactError, match="no layerguard metadata or seal"):
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
    renamed = nn.Sequential(*list(model.children())[:-1])  # the logits layer is gone
    with pytest.raises(ArtifactError, match="no layer"):
        art.check_model(renamed, fingerprint=art.meta.model_fingerprint)
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

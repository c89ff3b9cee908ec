"""`layerguard wrap`: a guarded .mar from an existing one plus benign reference images."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest
import yaml
from torchserve_util import png_bytes

from layerguard.core.artifact import CalibrationArtifact
from layerguard.tooling import cli
from layerguard.tooling.archive import read_manifest
from layerguard.tooling.data import DataError, encode_png, open_reference
from layerguard.tooling.wrap import WrapConfig, WrapError, wrap_mar

RUNTIME_MODULES = {"core/__init__", "core/artifact", "core/capture", "core/detector", "core/grouped", "core/host",
                   "core/layers", "core/stats", "core/thresholds", "core/similarity", "core/rules/__init__",
                   "core/rules/base", "core/rules/cosine_loi", "core/rules/mahalanobis", "core/rules/mahalanobis_diag",
                   "core/rules/mahalanobis_spread", "core/rules/mahalanobis_spread_loi", "serving/__init__",
                   "serving/entry", "serving/handler", "serving/inner", "serving/inputs", "serving/metrics",
                   "serving/policy"}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_guarded_archive_carries_original_artifact_package_and_config(archives):
    original, guarded = archives["original"], archives["guarded"]
    manifest = read_manifest(guarded)["model"]
    assert manifest["handler"] == "layerguard_handler.py" and manifest["configFile"] == "model-config.yaml"
    before = read_manifest(original)["model"]
    assert manifest["modelFile"] == before["modelFile"] and manifest["serializedFile"] == before["serializedFile"]
    with zipfile.ZipFile(original) as zo, zipfile.ZipFile(guarded) as zg:
        names = set(zg.namelist())
        for name in zo.namelist():
            if name != "MAR-INF/MANIFEST.json":
                assert zg.read(name) == zo.read(name), f"{name} changed"
        config = yaml.safe_load(zg.read("model-config.yaml"))
    assert {"layerguard_calibration.npz", "layerguard_handler.py"} <= names
    shipped = {n[len("layerguard/"):-3] for n in names if n.startswith("layerguard/") and n.endswith(".py")}
    assert shipped == RUNTIME_MODULES | {"__init__"}  # the runtime only: no tooling, report, CLI or demo
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert config["handler"]["layerguard"] == {"inner_handler": "mnist_handler.py", "policy": "annotate"}
    assert config["batchSize"] == 8 and config["maxBatchDelay"] == 200


def test_wrap_cli_from_image_folder_leaves_original_untouched(archives, tmp_path, capsys, mnist_splits):
    splits = mnist_splits
    for i, (x, y) in enumerate(zip(splits.x_ref[:200], splits.y_ref[:200])):
        folder = tmp_path / "ref" / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png_bytes(x))
    original = archives["original"]
    before = digest(original)
    args = ["wrap", "--mar", str(original), "--data", str(tmp_path / "ref"), "--out", str(tmp_path / "store"),
            "--model-name", "mnist_strict", "--policy", "reject", "--target-fpr", "0.05", "--batch-size", "4",
            "--min-per-class", "5", "--exclude-logits", "--response", "compact"]
    assert cli.main(args) == 0
    out_text = capsys.readouterr().out
    assert "guarded archive:" in out_text
    # the calibration is shown, not hidden: rule, policy and the per-class table
    assert "rule mahalanobis" in out_text and "threshold target_fpr=0.05" in out_text
    assert "policy reject" in out_text and "response compact" in out_text
    rows = [ln for ln in out_text.splitlines() if ln[:2].strip().isdigit()]
    assert "layer of interest" in out_text and len(rows) >= 10
    assert digest(original) == before
    out = tmp_path / "store" / "mnist_strict.mar"
    with zipfile.ZipFile(out) as zf:
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert config["handler"]["layerguard"] == {"inner_handler": "mnist_handler.py", "policy": "reject",
                                               "response": "compact"}
    assert config["batchSize"] == 4
    with zipfile.ZipFile(out) as zf:
        (tmp_path / "art.npz").write_bytes(zf.read("layerguard_calibration.npz"))
    with zipfile.ZipFile(archives["guarded"]) as zf:
        (tmp_path / "default.npz").write_bytes(zf.read("layerguard_calibration.npz"))
    default_layers = CalibrationArtifact.load(tmp_path / "default.npz").layer_names
    strict = CalibrationArtifact.load(tmp_path / "art.npz")
    assert strict.layer_names == default_layers[:-1]  # --exclude-logits
    assert strict.meta.threshold == {"target_fpr": 0.05}  # the calibrated policy travels in the artifact
    assert cli.main(args) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    assert cli.main([*args, "--force", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().startswith("guarded archive:")


def test_refuses_to_overwrite_the_original_or_wrap_twice(archives, tmp_path):
    original = archives["original"]
    ref = tmp_path / "ref.npz"
    np.savez(ref, x=np.zeros((2, 28, 28), np.uint8), y=np.array([0, 1]))
    with pytest.raises(WrapError, match="overwrite the original"):
        wrap_mar(original, ref, WrapConfig(out_dir=original.parent))
    with pytest.raises(WrapError, match="already guarded"):
        wrap_mar(archives["guarded"], ref, WrapConfig(out_dir=tmp_path / "store", model_name="again"))


def test_reference_loading(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        open_reference(tmp_path / "empty")
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="no array.s. y"):
        open_reference(tmp_path / "bad.npz")
    for name in ("cat", "dog"):
        (tmp_path / "named" / name).mkdir(parents=True)
        (tmp_path / "named" / name / "a.png").write_bytes(encode_png(np.full((4, 4), 0.5)))
    ref = open_reference(tmp_path / "named")
    assert ref.class_names == ("cat", "dog") and ref.labels.tolist() == [0, 1]
    np.savez(tmp_path / "ok.npz", x=np.random.default_rng(0).random((3, 8, 8, 3)), y=np.array([0, 1, 2]))
    ref = open_reference(tmp_path / "ok.npz")
    assert len(ref) == 3 and ref.payload(0)[:4] == b"\x89PNG"

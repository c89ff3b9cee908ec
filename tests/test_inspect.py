"""`layerguard inspect`: verifies a guarded archive the way a worker loads it; non-zero on any mismatch."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import torch

from layerguard.tooling import cli


def rewrite(mar, out, name, change):
    """A copy of `mar` with member `name` replaced by change(bytes)."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, change(data) if item.filename == name else data)
    return out


def edit_meta(data: bytes, **changes) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_good_archive_is_verified_and_described(archives, capsys):
    assert cli.main(["inspect", str(archives["guarded"])]) == 0
    out = capsys.readouterr().out
    for check in ("entry handler", "handler.layerguard block", "runtime files", "calibration artifact",
                  "weights fingerprint", "monitored layers", "class count"):
        assert f"[OK] {check}" in out
    assert "inner handler mnist_handler.py" in out and "rule mahalanobis" in out and "layer of interest" in out
    assert out.strip().endswith("archive verified")


def test_edited_threshold_in_the_artifact_fails(archives, tmp_path, capsys):
    bad = rewrite(archives["guarded"], tmp_path / "bad.mar", "layerguard_calibration.npz",
                  lambda d: edit_meta(d, threshold={"tau": 10}))
    assert cli.main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] calibration artifact" in out and "modified" in out


def test_other_weights_fail_the_fingerprint(archives, tmp_path, capsys):
    def nudge(data: bytes) -> bytes:
        state = torch.load(io.BytesIO(data), weights_only=True)
        state["fc2.bias"] = state["fc2.bias"] + 0.01
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    bad = rewrite(archives["guarded"], tmp_path / "w.mar", "mnist_model.pt", nudge)
    assert cli.main(["inspect", str(bad)]) == 1
    assert "[FAIL] weights fingerprint" in capsys.readouterr().out


def test_signature_is_checked_with_the_ops_key(archives, tmp_path, capsys, mnist_splits):
    key = tmp_path / "key"
    key.write_text("an-ops-team-secret-of-32-bytes!!")
    ref = tmp_path / "ref.npz"
    np.savez(ref, x=mnist_splits.x_ref, y=mnist_splits.y_ref)
    assert cli.main(["wrap", "--mar", str(archives["original"]), "--data", str(ref), "--out", str(tmp_path / "s"),
                     "--signing-key", str(key), "--quiet"]) == 0
    signed = tmp_path / "s" / "mnist.mar"
    capsys.readouterr()
    assert cli.main(["inspect", str(signed), "--signing-key", str(key)]) == 0
    assert "signature verified" in capsys.readouterr().out
    other = tmp_path / "other"
    other.write_text("a-different-secret-of-32-bytes!!")
    assert cli.main(["inspect", str(signed), "--signing-key", str(other)]) == 1
    assert cli.main(["inspect", str(archives["guarded"]), "--signing-key", str(key)]) == 1  # unsigned
    assert "not signed" in capsys.readouterr().out


def test_plain_archive_is_not_guarded(archives, capsys):
    assert cli.main(["inspect", str(archives["original"])]) == 1
    assert "is this archive guarded?" in capsys.readouterr().out

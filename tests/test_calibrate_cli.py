"""calibrate.py as a user runs it: real files, real exit codes, no partial artifact on bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "layerguard" / "demo" / "mnist_model.py"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "calibrate.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, mnist_splits) -> Path:
    """The reference digits as PNG files in class subfolders, as a user would have them."""
    root = tmp_path_factory.mktemp("ref")
    for i, (img, label) in enumerate(zip(mnist_splits.x_ref, mnist_splits.y_ref)):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / str(label) / f"{i}.png")
    return root


def base_args(mnist_dir: Path) -> list[str]:
    return ["--model-file", str(MODEL_FILE), "--weights", str(mnist_dir / "mnist_badnets.pt"), "--channels", "1"]


def test_help_documents_every_option():
    out = run_cli("--help", cwd=ROOT).stdout
    for option in ["--model-file", "--weights", "--data", "--layers", "--exclude-logits", "--list-layers", "--tau",
                   "--target-fpr", "--fpr-confidence", "--rule", "--rule-option", "--folds", "--min-per-class",
                   "--output", "--poisoned",
                   "--benign-test", "--target-class", "--report", "--class-names", "--input-size", "--mean", "--std"]:
        assert option in out
    assert "NEVER trained on" in " ".join(out.split())  # references must be held-out images


def test_calibrates_a_folder_and_reports_detection(tmp_path, backdoored_mnist, mnist_dir, image_folder, mnist_npz):
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(image_folder), "-o", str(out), "--poisoned",
                  str(mnist_npz["poison"]), "--benign-test", str(mnist_npz["test"]), "--target-class", "7",
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.is_file()
    assert "layer of interest" in res.stdout and "threshold" in res.stdout
    # each monitored stage says what it computes: `flatten` is the third conv block's output
    assert "flatten = features.8 -> features.9 -> features.10 -> features.11 -> flatten" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("detection"))
    tpr = float(line.split("TPR ")[1].split("%")[0])
    assert tpr >= 95.0, line
    fpr_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("false-positive rate delivered"))
    assert "(target 1.00%)" in fpr_line and "WARNING" not in res.stderr


def test_warns_when_the_delivered_fpr_is_over_twice_the_target(tmp_path, backdoored_mnist, mnist_dir, mnist_splits,
                                                               mnist_npz):
    """Benign test traffic unlike the references (here: noisy scans) is flagged far above the target: the CLI
    must say so, since thresholds that do not hold would page the ops team all day."""
    rng = np.random.default_rng(0)
    noisy = np.clip(mnist_splits.x_test.astype(np.float64) + rng.normal(0, 60, mnist_splits.x_test.shape), 0, 255)
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, x=noisy.astype(np.uint8), y=mnist_splits.y_test)
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "-o", str(tmp_path / "a.npz"),
                  "--benign-test", str(shifted), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    delivered = float(res.stdout.split("held-out benign images: ")[1].split("%")[0])
    assert delivered > 2.0 and "WARNING" in res.stderr and "twice the target" in res.stderr, (res.stdout,
                                                                                             res.stderr)


def test_fpr_confidence_flags_fewer_references_and_says_so(tmp_path, backdoored_mnist, mnist_dir, mnist_npz):
    out = tmp_path / "bounded.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "-o", str(out), "--fpr-confidence", "0.9",
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "at most 1.00% with 90% confidence" in text, res.stdout
    flagged = float(text.split("flags ")[1].split("%")[0])
    assert 0.0 < flagged < 1.0  # fewer than the target's share of the references
    from layerguard.core.artifact import CalibrationArtifact
    assert CalibrationArtifact.load(out).policy.confidence == 0.9


def test_list_layers(tmp_path, backdoored_mnist, mnist_dir, mnist_npz):
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "--list-layers", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "features.7" in res.stdout and "fc2" in res.stdout
    assert not list(tmp_path.glob("*.npz"))


def test_exclude_logits_leaves_the_output_layer_unmonitored(tmp_path, backdoored_mnist, mnist_dir, mnist_npz):
    from layerguard.core.artifact import CalibrationArtifact

    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "--exclude-logits", "-o", str(out),
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = CalibrationArtifact.load(out).layer_names
    assert "fc2" not in names and names[-1] == "relu"  # the stage before the logits (fc1 + its ReLU)
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "--exclude-logits", "--layers",
                  "fc1,fc2", "-o", str(tmp_path / "b.npz"), cwd=tmp_path)
    _assert_refused(res, tmp_path / "b.npz", "--exclude-logits")


def _assert_refused(res: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in res.stderr, res.stderr
    assert not out.exists()
    assert not list(out.parent.glob("*.partial"))


def test_empty_folder(tmp_path, backdoored_mnist, mnist_dir):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(tmp_path / "empty"), "-o", str(out), cwd=tmp_path)
    _assert_refused(res, out, "no class subfolders")


def test_unknown_class_folder(tmp_path, backdoored_mnist, mnist_dir, image_folder):
    data = tmp_path / "ref"
    shutil.copytree(image_folder, data)
    (data / "cat").mkdir()
    shutil.copy(next((data / "3").iterdir()), data / "cat" / "x.png")
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(data), "-o", str(out),
                  "--class-names", ",".join(str(i) for i in range(10)), cwd=tmp_path)
    _assert_refused(res, out, "cat", "not among the model's classes")


def test_unreadable_image(tmp_path, backdoored_mnist, mnist_dir, image_folder):
    data = tmp_path / "ref"
    shutil.copytree(image_folder, data)
    (data / "4" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(data), "-o", str(out), cwd=tmp_path)
    _assert_refused(res, out, "broken.png", "not a readable image")


def test_class_with_too_few_samples(tmp_path, backdoored_mnist, mnist_dir, mnist_splits):
    keep = np.ones(len(mnist_splits.y_ref), dtype=bool)
    keep[np.nonzero(mnist_splits.y_ref == 5)[0][3:]] = False  # class 5 keeps 3 images
    data = tmp_path / "few.npz"
    np.savez(data, x=mnist_splits.x_ref[keep], y=mnist_splits.y_ref[keep])
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(data), "-o", str(out), cwd=tmp_path)
    _assert_refused(res, out, "too few reference samples", "5 (3)")


@pytest.mark.parametrize("extra, words", [
    (["--rule", "mahalanobis", "--rule-option", "colour=red"], ["no option(s) colour"]),
    (["--rule-option", "layers"], ["key=value"]),
    (["--folds", "0"], ["folds must be in 1..20"]),
    (["--tau", "2.5", "--fpr-confidence", "0.9"], ["not to tau"]),
    (["--target-fpr", "0.001", "--fpr-confidence", "0.999"], ["cannot keep the FPR at most 0.1%",
                                                               "needs at least 6905"]),
])
def test_bad_method_options_are_refused(tmp_path, backdoored_mnist, mnist_dir, mnist_npz, extra, words):
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "-o", str(out), *extra, cwd=tmp_path)
    _assert_refused(res, out, *words)


def test_missing_class_entirely(tmp_path, backdoored_mnist, mnist_dir, mnist_splits):
    keep = mnist_splits.y_ref != 9
    data = tmp_path / "nine.npz"
    np.savez(data, x=mnist_splits.x_ref[keep], y=mnist_splits.y_ref[keep])
    out = tmp_path / "art.npz"
    res = run_cli(*base_args(mnist_dir), "--data", str(data), "-o", str(out), cwd=tmp_path)
    _assert_refused(res, out, "10 classes")


def test_wrong_weights(tmp_path, mnist_dir, mnist_npz):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "art.npz"
    res = run_cli("--model-file", str(MODEL_FILE), "--weights", str(bad), "--channels", "1",
                  "--data", str(mnist_npz["ref"]), "-o", str(out), cwd=tmp_path)
    _assert_refused(res, out, "cannot read weights")


def test_mar_input_calibrates_through_the_archives_own_handler(tmp_path, backdoored_mnist, mnist_dir, mnist_npz):
    """The handler's preprocess and the CLI's image transform agree here, so both routes give one artifact;
    --mar also evaluates (--benign-test, --poisoned) and lists layers."""
    from layerguard.core.artifact import CalibrationArtifact

    sys.path.insert(0, str(ROOT / "tests"))
    from torchserve_util import build_original_mar

    mar = build_original_mar(tmp_path / "mar", backdoored_mnist)
    via_mar, via_files = tmp_path / "mar.npz", tmp_path / "files.npz"
    res = run_cli("--mar", str(mar), "--data", str(mnist_npz["ref"]), "-o", str(via_mar), "--quiet",
                  "--benign-test", str(mnist_npz["test"]), "--poisoned", str(mnist_npz["poison"]),
                  "--target-class", "7", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "TPR 100.00%" in res.stdout or "TPR 99." in res.stdout, res.stdout
    listed = run_cli("--mar", str(mar), "--data", str(mnist_npz["ref"]), "--list-layers", cwd=tmp_path)
    assert listed.returncode == 0 and "fc1 -> relu" in listed.stdout, listed.stderr
    res = run_cli(*base_args(mnist_dir), "--data", str(mnist_npz["ref"]), "-o", str(via_files), "--quiet",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    a, b = CalibrationArtifact.load(via_mar).detector(), CalibrationArtifact.load(via_files).detector()
    assert a.layer_names == b.layer_names and np.array_equal(a.loi, b.loi)
    assert np.allclose(a.thresholds, b.thresholds, atol=1e-3)

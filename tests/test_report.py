"""The calibration report: written from the real backdoored MNIST model, its PNGs are valid images, the HTML
is self-contained and links to them, and its numbers agree with the offline evaluation."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layerguard.core.artifact import ArtifactMeta, CalibrationArtifact
from layerguard.core.detector import DetectorFitter, DetectorSpec
from layerguard.core.layers import default_plan, discover_layers
from layerguard.core.thresholds import ThresholdPolicy
from layerguard.demo import mnist
from layerguard.tooling import cli
from layerguard.tooling.calibration import CalibrationConfig, calibrate
from layerguard.tooling.data import ArraySource, ImageTransform
from layerguard.tooling.evaluation import detection_quality, score_batches
from layerguard.tooling.report import FIGURES, INDEX, ReportData, ReportError, tau_sweep, write_report

FILES = {f.key: f.filename for f in FIGURES}

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "layerguard" / "demo" / "mnist_model.py"


class Links(HTMLParser):
    """Every src/href of the page, and the tags that would load something from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.external_tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        values = dict(attrs)
        if tag in ("script", "link", "iframe"):
            self.external_tags.append(tag)
        for key in ("src", "href"):
            if values.get(key):
                self.links.append(values[key])
        if tag == "img":
            self.images.append(values["src"])


def parse(index: Path) -> Links:
    links = Links()
    links.feed(index.read_text(encoding="utf-8"))
    return links


def assert_valid_report(index: Path, expected: set[str]) -> Links:
    assert index.name == INDEX and index.is_file()
    links = parse(index)
    assert not links.external_tags, "the page must open offline: no scripts or stylesheets"
    assert set(links.images) == expected
    for link in links.links:
        assert "://" not in link and not link.startswith("/"), link
        target = index.parent / link
        assert target.is_file(), f"{link} linked but missing"
    for name in expected:
        with Image.open(index.parent / name) as image:
            image.verify()
        with Image.open(index.parent / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    return links


# ---- the real demo model, calibrated once for this module ------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("model")
    model, report = mnist.load_or_train(cache)
    splits = mnist.load_mnist_splits(report.seed)
    transform = ImageTransform(channels=1)
    reference = ArraySource(splits.x_ref, splits.y_ref, transform)
    sample = mnist.to_tensor(splits.x_ref[:1])
    plan = default_plan(discover_layers(model, sample))
    config = CalibrationConfig(rule="cosine-loi", policy=ThresholdPolicy.from_options(tau=2.5))
    artifact = calibrate(model, lambda: reference.batches(100), plan, 10, config, input_shape=(1, 28, 28))
    detector = artifact.detector()
    keep = splits.y_test != mnist.TARGET_CLASS
    benign = score_batches(model, detector, ArraySource(splits.x_test, splits.y_test, transform).batches(250))
    poisoned_x = mnist.apply_trigger(splits.x_test[keep])
    poisoned = score_batches(model, detector, ArraySource(poisoned_x, splits.y_test[keep], transform).batches(250))
    files = {"weights": cache / "mnist_badnets.pt", "ref": cache / "ref.npz", "test": cache / "test.npz",
             "poisoned": cache / "poisoned.npz"}
    np.savez(files["ref"], x=splits.x_ref, y=splits.y_ref)
    np.savez(files["test"], x=splits.x_test, y=splits.y_test)
    np.savez(files["poisoned"], x=poisoned_x, y=splits.y_test[keep])
    return {"model": model, "artifact": artifact, "reference": reference, "benign": benign, "poisoned": poisoned,
            "files": files}


@pytest.mark.slow
def test_report_with_known_poisoned_has_every_plot_and_a_summary_table(demo, tmp_path):
    index = write_report(tmp_path / "report", ReportData(demo["artifact"], benign=demo["benign"],
                                                         poisoned=demo["poisoned"], target_class=mnist.TARGET_CLASS,
                                                         benign_label="held-out benign"))
    assert_valid_report(index, set(FILES.values()))
    page = index.read_text()
    for c in range(10):  # one summary row per class, with its layer of interest
        assert f"<td>{c}</td>" in page
    assert page.count("(calibrated)") == 1 and "layer of interest" in page
    assert "successful attacks" in page and "target class 7" in page


@pytest.mark.slow
def test_tau_sweep_agrees_with_the_offline_evaluation(demo):
    """At the calibrated tau the report's TPR/FPR are exactly what detection_quality reports."""
    quality = detection_quality(demo["benign"], demo["poisoned"], mnist.TARGET_CLASS)
    points = tau_sweep(ReportData(demo["artifact"], demo["benign"], "benign", demo["poisoned"], mnist.TARGET_CLASS))
    at = {p.tau: p for p in points}
    assert [p.tau for p in points] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert at[2.5].tpr == pytest.approx(quality.tpr) and at[2.5].fpr == pytest.approx(quality.fpr)
    fprs = [p.fpr for p in points]
    assert fprs == sorted(fprs, reverse=True), "a larger tau never flags more benign inputs"
    assert quality.tpr > 0.95 and quality.fpr < 0.1


@pytest.mark.slow
def test_calibrate_cli_writes_the_report(demo, tmp_path, capsys):
    """`calibrate.py --report DIR` with known-poisoned and held-out images: the call shape cli.py uses."""
    f = demo["files"]
    rc = cli.calibrate_main(["--model-file", str(MODEL_FILE), "--weights", str(f["weights"]), "--data", str(f["ref"]),
                   "--channels", "1", "--benign-test", str(f["test"]), "--poisoned", str(f["poisoned"]),
                   "--target-class", "7", "-o", str(tmp_path / "art.npz"), "--report", str(tmp_path / "rep"),
                   "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'rep' / INDEX}" in out
    assert_valid_report(tmp_path / "rep" / INDEX, set(FILES.values()))
    assert "held-out benign" in (tmp_path / "rep" / INDEX).read_text()


@pytest.mark.slow
def test_report_without_poisoned_samples_has_no_roc_and_says_how_to_get_one(demo, tmp_path):
    """A held-out benign set only: the benign distributions and FPR against tau, no TPR and no ROC."""
    index = write_report(tmp_path / "rep", ReportData(demo["artifact"], benign=demo["benign"],
                                                      benign_label="held-out benign"))
    assert_valid_report(index, {FILES["similarity"], FILES["scores"], FILES["tau"]})
    assert "--poisoned" in index.read_text()
    assert not (tmp_path / "rep" / FILES["roc"]).exists()


def test_artifact_alone_plots_the_out_of_fold_calibration_scores(tmp_path):
    """No model and no data: the plots come from the artifact's own statistics; many classes are capped."""
    artifact = synthetic_artifact(num_classes=30, layers=5)
    index = write_report(tmp_path / "rep", ReportData(artifact))
    assert_valid_report(index, {FILES["similarity"], FILES["scores"], FILES["tau"]})
    page = index.read_text()
    assert "25 of 30 classes" in page and page.count("<tr>") >= 31
    assert "cross-fitted" in page


def test_figures_read_on_their_own(demo, tmp_path):
    """Every figure names its axes and spells out the layer of interest; the score figure states the threshold
    rule and the delivered FPR (a PNG pasted into a ticket must read without the page)."""
    data = ReportData(demo["artifact"], benign=demo["benign"], poisoned=demo["poisoned"],
                      target_class=mnist.TARGET_CLASS, benign_label="held-out benign")
    from layerguard.tooling import report

    captured = []
    real = report.figure_factory()

    def spy(**kwargs):
        fig = real(**kwargs)
        captured.append(fig)
        return fig

    for fig_spec in FIGURES:
        fig_spec.plot(spy, data, tau_sweep(data), tmp_path / fig_spec.filename)
    texts = []
    for fig in captured:
        for ax in fig.axes:
            if ax.get_visible() and ax.has_data():
                assert ax.get_ylabel(), fig_spec
        texts.append(" ".join(t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))))
    similarity, scores = texts[0], texts[1]
    assert "layer of interest" in similarity and "LOI" not in similarity
    assert "threshold" in scores and "delivered FPR" in scores
    for fig in captured[:2]:
        assert fig.legends, "small multiples carry one shared legend"


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ReportError, match=r"pip install layerguard\[report\]"):
        write_report(tmp_path / "rep", ReportData(synthetic_artifact()))
    assert not (tmp_path / "rep").exists()


def test_serving_never_imports_matplotlib():
    code = ("import sys, layerguard.serving.entry, layerguard.tooling.wrap, layerguard.tooling.cli; "
            "bad = [m for m in ('matplotlib', 'layerguard.tooling.report') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


def synthetic_artifact(num_classes: int = 3, layers: int = 4) -> CalibrationArtifact:
    """A consistent artifact without a model: class-clustered random features through the real fitter."""
    rng = np.random.default_rng(0)
    names = tuple(f"block{i}" for i in range(layers))
    labels = np.repeat(np.arange(num_classes), 20)
    centers = rng.normal(size=(num_classes, 8))
    feats = {n: torch.from_numpy(centers[labels] * (i + 1) + rng.normal(size=(len(labels), 8))).float()
             for i, n in enumerate(names)}
    spec = DetectorSpec(rule="mahalanobis", layer_names=names, num_classes=num_classes, loi_search_start=1,
                        penultimate=names[-2], folds=2)
    fitter = DetectorFitter(spec)
    fitter.update(feats, torch.from_numpy(labels))
    fitter.fit()
    fitter.update_out_of_fold(feats, torch.from_numpy(labels))
    meta = ArtifactMeta(rule="mahalanobis", rule_options={}, layer_names=names, num_classes=num_classes,
                        class_names=tuple(str(c) for c in range(num_classes)), threshold=ThresholdPolicy().as_dict(),
                        folds=2, loi_search_start=1, total_layers=layers + 1, penultimate=names[-2],
                        model_fingerprint="0" * 64)
    return CalibrationArtifact.from_detector(fitter.detector(ThresholdPolicy()), meta)

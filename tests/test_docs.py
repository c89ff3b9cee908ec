"""The numbers in README.md and docs/ come from fresh runs (scripts/refresh_docs.py writes them between
`<!-- generated:NAME -->` markers); these tests fail when a fresh run disagrees with them.

Stated tolerances (the demo model is retrained from its seed; thread counts and BLAS kernels can move the
last digits between machines): rates within 1.5 percentage points, AUROC within 0.005, scores and
thresholds within 1.0 (score units of the default rule, whose benign scores spread over about 10).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATE_TOL, AUROC_TOL, SCORE_TOL = 1.5, 0.005, 1.0
DOCS = {"README.md": ("test-time", "demo-live", "demo-offline", "calibrate-output", "curl-response",
                      "bench-headline"),
        "docs/demo.md": ("demo-output",), "docs/serving.md": ("curl-clean",)}


def block(doc: str, name: str) -> str:
    text = (ROOT / doc).read_text()
    match = re.search(rf"<!-- generated:{name} -->\n(.*?)<!-- /generated:{name} -->", text, re.S)
    assert match, f"{doc} has no generated block {name}"
    return match.group(1)


def rates(text: str) -> dict[str, float]:
    """TPR/FPR percentages and AUROC from a detection-quality line."""
    out = {}
    for key in ("TPR", "FPR"):
        found = re.search(rf"{key} ([0-9.]+)%", text)
        if found:
            out[key] = float(found.group(1))
    found = re.search(r"AUROC ([0-9.]+)", text)
    if found:
        out["AUROC"] = float(found.group(1))
    return out


def test_every_generated_block_was_filled():
    for doc, names in DOCS.items():
        for name in names:
            body = block(doc, name).strip()
            assert body and body not in ("```json\n{}\n```", "```text\n```"), f"{doc}:{name} is empty: run " \
                                                                              "scripts/refresh_docs.py"


@pytest.fixture(scope="module")
def fresh_calibration(tmp_path_factory) -> str:
    """The README's calibrate.py command, run on freshly exported demo data."""
    work = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, "-m", "layerguard.demo.mnist", "--out", str(work / "demo-data")], check=True,
                   capture_output=True, timeout=600)
    args = [sys.executable, str(ROOT / "calibrate.py"), "--model-file", str(ROOT / "layerguard/demo/mnist_model.py"),
            "--weights", "demo-data/mnist_badnets.pt", "--data", "demo-data/reference.npz", "--channels", "1",
            "-o", "demo-data/mnist_calibration.npz", "--benign-test", "demo-data/test.npz", "--poisoned",
            "demo-data/triggered.npz", "--target-class", "7", "--quiet"]
    done = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def thresholds(text: str) -> list[float]:
    rows = re.findall(r"^(\d+)\s+\d+\s+\S+\s+(-?[0-9.]+)\s+([0-9.]+)\s+(-?[0-9.]+)$", text, re.M)
    return [float(r[3]) for r in rows]


def test_readme_calibration_output_matches_a_fresh_run(fresh_calibration):
    documented = block("README.md", "calibrate-output")
    fresh = fresh_calibration
    assert documented.splitlines()[1].split(";")[0] == fresh.splitlines()[0].split(";")[0]  # rule line
    doc_rates = rates(documented.split("detection on known-poisoned")[1])
    new_rates = rates(fresh.split("detection on known-poisoned")[1])
    for key in ("TPR", "FPR"):
        assert abs(doc_rates[key] - new_rates[key]) <= RATE_TOL, (key, doc_rates, new_rates)
    assert abs(doc_rates["AUROC"] - new_rates["AUROC"]) <= AUROC_TOL
    doc_thr, new_thr = thresholds(documented), thresholds(fresh)
    assert len(doc_thr) == len(new_thr) == 10
    assert max(abs(a - b) for a, b in zip(doc_thr, new_thr)) <= SCORE_TOL, (doc_thr, new_thr)


def test_demo_numbers_match_a_fresh_demo(tmp_path_factory):
    """The demo's offline line and the README's curl example against a fresh demo's summary.json."""
    work = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "layerguard.demo", "--out", "demo-out", "--model-store",
                           "model-store"], cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((work / "demo-out" / "summary.json").read_text())
    doc = rates(block("README.md", "demo-offline"))
    off = summary["offline"]
    assert abs(doc["TPR"] - 100 * off["tpr"]) <= RATE_TOL and abs(doc["FPR"] - 100 * off["fpr"]) <= RATE_TOL
    curl = json.loads(block("README.md", "curl-response").strip().strip("`").removeprefix("json").strip())
    live = next(r for r in summary["live"] if r["digit"] == 3 and r["kind"] == "triggered")
    assert curl["class"] == live["predicted"] == 7 and curl["layerguard"]["poisoned"] is live["poisoned"] is True
    assert abs(curl["layerguard"]["score"] - live["score"]) <= SCORE_TOL
    assert abs(curl["layerguard"]["threshold"] - live["threshold"]) <= SCORE_TOL
    table = block("README.md", "demo-live")
    assert "flagged: 10/10 triggered" in table and summary["live_counts"]["triggered_flagged"] == 10

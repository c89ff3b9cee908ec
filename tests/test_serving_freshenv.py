"""The guarded .mar serves in a fresh virtual environment holding only the serving dependencies
(torch, torchserve, numpy, pillow, pyyaml, threadpoolctl): no layerguard install, no torch-model-archiver."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
import torch
from torchserve_util import ROOT, TorchServe, digit_pngs, guarded_archives

SERVING_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "torchserve==0.12.0", "numpy", "pillow",
                        "pyyaml", "threadpoolctl"]
VENV = ROOT / "build" / "serving-venv"


def serving_venv():
    """One venv per checkout, rebuilt when the requirement list changes (pip's configured wheel sources)."""
    stamp = VENV / ".layerguard-serving"
    wanted = "\n".join(SERVING_REQUIREMENTS)
    if stamp.is_file() and stamp.read_text() == wanted:
        return VENV / "bin"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", *SERVING_REQUIREMENTS],
                   check=True)
    stamp.write_text(wanted)
    return VENV / "bin"


@pytest.mark.slow
def test_guarded_mar_serves_with_only_serving_dependencies(tmp_path_factory, backdoored_mnist, mnist_splits):
    bin_dir = serving_venv()
    probe = "import importlib.util as u; print(u.find_spec('layerguard'), u.find_spec('model_archiver'))"
    out = subprocess.run([str(bin_dir / "python"), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path_factory.mktemp("probe"))
    assert out.stdout.split() == ["None", "None"]
    archives = guarded_archives(tmp_path_factory.mktemp("serving"), backdoored_mnist, mnist_splits)
    clean, triggered, labels = digit_pngs(mnist_splits, 4)
    ts = TorchServe(tmp_path_factory.mktemp("torchserve"), archives["store"], ["mnist=mnist.mar"], bin_dir=bin_dir)
    try:
        ts.start()
        url = f"{ts.url}/predictions/mnist"
        r = requests.post(url, data=clean[0], headers=ts.headers(), timeout=60)
        assert r.status_code == 200 and r.json()["class"] == int(labels[0])
        assert r.json()["layerguard"]["poisoned"] is False
        r = requests.post(url, data=triggered[0], headers=ts.headers(), timeout=60)
        assert r.status_code == 200 and r.json()["layerguard"]["poisoned"] is True
    finally:
        ts.stop()

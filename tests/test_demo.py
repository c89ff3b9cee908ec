"""`make demo` end to end: trains the backdoored model, wraps it, serves it with a real TorchServe and checks
what the live server answered (from the demo's summary.json and its printed table), then that the server
is gone. A second run reuses the cached model, leaves the server up and stops it with `--stop`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from layerguard.demo import mnist
from layerguard.demo.run import LiveResult, format_live_table, live_counts, pick_digits, write_server_config

ROOT = Path(__file__).resolve().parents[1]


def run_demo(cwd: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run from `cwd` with relative paths, as `make demo` does (the project's config.properties is found
    next to the package when the folder has none)."""
    done = subprocess.run([sys.executable, "-m", "layerguard.demo", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr}"
    return done


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def table_rows(stdout: str) -> list[list[str]]:
    """The printed live table: `digit true | pred poisoned score threshold | pred poisoned score threshold`."""
    rows = re.findall(r"^\s*\d+\s+\d+ \|(.*)\|(.*)$", stdout, flags=re.M)
    return [[clean.split(), triggered.split()] for clean, triggered in rows]


# ---- fast checks of the pieces ---------------------------------------------------------------------------------
def test_server_config_keeps_the_project_settings_and_moves_off_busy_ports(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        source = tmp_path / "config.properties"
        text = (ROOT / "config.properties").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        source.write_text(text)
        path, ports, notes = write_server_config(source, tmp_path, tmp_path / "store")
    config = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")
    assert notes and str(port) in notes[0] and port not in ports.values()
    assert config["inference_address"] == f"http://127.0.0.1:{ports['inference']}"
    assert config["grpc_inference_port"] == str(ports["grpc_inference"])
    assert config["model_store"] == str((tmp_path / "store").resolve())
    assert Path(config["metrics_config"]).is_absolute()
    assert config["disable_token_authorization"] == "false"  # every other line as the project has it


def test_digits_sent_are_fixed_by_the_seed_and_never_the_target():
    splits = mnist.load_mnist_splits(0)
    picked = pick_digits(splits, 10, seed=0)
    assert picked.tolist() == pick_digits(splits, 10, seed=0).tolist()
    assert len(set(picked.tolist())) == 10 and mnist.TARGET_CLASS not in splits.y_test[picked]
    assert len(set(splits.y_test[picked].tolist())) == 9  # every other class, taken in turn


def test_live_table_and_counts_come_from_the_responses():
    results = [LiveResult(0, "clean", 3, 200, 3, False, 2.7, 2.5),
               LiveResult(0, "triggered", 3, 200, 7, True, 2.1, 2.4),
               LiveResult(1, "clean", 4, 200, 4, True, 2.3, 2.4),
               LiveResult(1, "triggered", 4, 500, None, None, None, None, "boom")]
    table = format_live_table(results)
    assert "YES" in table and "HTTP 500" in table
    assert live_counts(results) == {"clean_total": 2, "clean_flagged": 1, "triggered_total": 2,
                                    "triggered_flagged": 1, "triggered_predicted_target": 1, "errors": 1}


# ---- the real thing ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def first_run(demo_dirs):
    done = run_demo(demo_dirs, "--out", "demo-out", "--model-store", "model-store")
    return done, json.loads((demo_dirs / "demo-out" / "summary.json").read_text())


@pytest.mark.slow
def test_demo_catches_every_triggered_digit_live(first_run):
    done, summary = first_run
    counts = summary["live_counts"]
    assert counts["errors"] == 0
    assert counts["triggered_total"] == 10 and counts["triggered_flagged"] == 10
    assert counts["clean_total"] == 10 and counts["clean_flagged"] <= 1
    assert all(r["status"] == 200 for r in summary["live"])
    # the printed table says the same as the live responses it was made from
    rows = table_rows(done.stdout)
    assert len(rows) == 10
    assert all(triggered[1] == "YES" and triggered[0] == "7" for _, triggered in rows)
    assert sum(clean[1] == "YES" for clean, _ in rows) <= 1
    for (clean, triggered), digit in zip(rows, range(10)):
        live = {r["kind"]: r for r in summary["live"] if r["digit"] == digit}
        assert float(clean[2]) == pytest.approx(live["clean"]["score"], abs=1e-4)
        assert float(triggered[3]) == pytest.approx(live["triggered"]["threshold"], abs=1e-4)


@pytest.mark.slow
def test_demo_reports_model_offline_quality_and_stops_the_server(first_run, demo_dirs):
    done, summary = first_run
    store = demo_dirs / "model-store"
    model = summary["model"]
    assert model["trained_now"] and model["target_class"] == 7
    assert model["clean_accuracy"] > 0.9 and model["attack_success_rate"] > 0.9
    assert "clean accuracy" in done.stdout and "attack success rate" in done.stdout
    offline = summary["offline"]
    assert offline["benign_scored"] == 1000 and offline["tpr"] > 0.95 and offline["fpr"] < 0.1
    assert "TPR" in done.stdout and "AUROC" in done.stdout
    server = summary["server"]
    assert server["stopped"] is True and not alive(server["pid"])
    assert "TorchServe stopped" in done.stdout
    # the original archive is ordinary (no layerguard inside); the guarded one is in the model store
    with zipfile.ZipFile(model["original_mar"]) as zf:
        assert not any("layerguard" in n for n in zf.namelist())
    with zipfile.ZipFile(store / "mnist.mar") as zf:
        names = zf.namelist()
        assert "layerguard_calibration.npz" in names and "layerguard_handler.py" in names


@pytest.mark.slow
def test_demo_writes_a_report_with_valid_images(first_run):
    done, summary = first_run
    index = Path(summary["report"])
    assert f"Calibration report: {index.resolve()}" in done.stdout
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 4
    for name in images:
        with Image.open(index.parent / name) as image:
            image.verify()


@pytest.mark.slow
def test_same_seed_gives_the_same_model(first_run, demo_dirs):
    """Training again in another process state with seed 0 reproduces the demo's weights bit for bit."""
    import torch

    weights = torch.load(demo_dirs / "demo-out" / "model" / "mnist_badnets.pt", weights_only=True)
    again, report = mnist.train_backdoored_mnist(seed=0)
    assert report.clean_accuracy == first_run[1]["model"]["clean_accuracy"]
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


@pytest.mark.slow
def test_keep_running_then_stop(first_run, demo_dirs):
    """Second run: the cached model is reused (same seed, same weights) and the server outlives the demo."""
    done = run_demo(demo_dirs, "--out", "demo-out", "--model-store", "model-store", "--samples", "2",
                    "--keep-running")
    summary = json.loads((demo_dirs / "demo-out" / "summary.json").read_text())
    pid = summary["server"]["pid"]
    try:
        assert "loaded cached" in done.stdout and summary["model"]["trained_now"] is False
        assert summary["model"]["clean_accuracy"] == first_run[1]["model"]["clean_accuracy"]
        assert summary["live_counts"]["triggered_flagged"] == 2
        assert alive(pid) and f"kill {pid}" in done.stdout and "--stop" in done.stdout
        stopped = run_demo(demo_dirs, "--stop", "--out", "demo-out", timeout=120)
        assert "stopped" in stopped.stdout
        assert not alive(pid)
    finally:
        if alive(pid):  # never leave the test's own server behind
            os.kill(pid, 9)

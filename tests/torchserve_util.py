"""Helpers for the serving tests: build an ordinary (unguarded) .mar of the demo model, and start/stop a
real TorchServe on 127.0.0.1 with the project's config.properties on free ports.

Every server runs with its own TMPDIR (TorchServe keeps its pid file there, so servers of other test
runs on the machine never collide), in its own process group, and is stopped by PID.

Also a tiny CLI for the docs: `python tests/torchserve_util.py demo-mar --out build/demo` trains (or
loads) the backdoored MNIST demo model and writes build/demo/mnist.mar, reference images and test PNGs.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "serving_assets"
PROJECT_CONFIG = ROOT / "config.properties"
METRICS_CONFIG = ROOT / "layerguard" / "ts_metrics.yaml"
DEMO_CACHE = ROOT / "build" / "test-cache"
sys.path.insert(0, str(ROOT))


# ---- the original archive -----------------------------------------------------------------------------
def model_source() -> str:
    """MnistNet as a stand-alone model file: BaseHandler wants exactly one class in --model-file."""
    from layerguard.demo.mnist import MnistNet

    return "import torch\nfrom torch import nn\n\n\n" + inspect.getsource(MnistNet)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build_original_mar(out_dir: Path, model: torch.nn.Module, name: str = "mnist", fmt: str = "eager",
                       handler: Path = ASSETS / "mnist_handler.py", config: dict | None = None) -> Path:
    """An ordinary archive as a model owner would make it: eager (model file + state_dict), TorchScript
    (.pt) or torch.export (.pt2), with the user's own BaseHandler-based handler."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    files = out_dir / f"{name}-{fmt}-files"
    files.mkdir(exist_ok=True)
    model = model.eval()
    args = ["--model-name", name, "--version", "1.0", "--handler", str(handler), "--export-path", str(out_dir),
            "--force"]
    if fmt == "eager":
        (files / "mnist_model.py").write_text(model_source())
        torch.save(model.state_dict(), files / "mnist_model.pt")
        args += ["--model-file", str(files / "mnist_model.py"), "--serialized-file", str(files / "mnist_model.pt")]
    elif fmt == "torchscript":
        torch.jit.script(model).save(str(files / "mnist_script.pt"))
        args += ["--serialized-file", str(files / "mnist_script.pt")]
    elif fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(files / "mnist_program.pt2"))
        args += ["--serialized-file", str(files / "mnist_program.pt2")]
    else:
        raise ValueError(fmt)
    if config:
        (files / "model-config.yaml").write_text(yaml.safe_dump(config))
        args += ["--config-file", str(files / "model-config.yaml")]
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    subprocess.run([str(archiver), *args], check=True, capture_output=True, env=_tmp_env(out_dir))
    return out_dir / f"{name}.mar"


def _tmp_env(scratch: Path) -> dict:
    """The archiver stages in $TMPDIR/<model name>: give each build its own."""
    tmp = scratch / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def demo_model():
    """The backdoored MNIST demo model for the docs' demo (trained once, cached under build/test-cache);
    the tests use the session fixtures of tests/conftest.py instead."""
    from layerguard.demo import mnist

    model, report = mnist.load_or_train(DEMO_CACHE)
    return model, report, mnist.load_mnist_splits(report.seed)


# ---- guarded archives shared by the serving test modules (built once per test process) -------------
_BUILT: dict[str, dict[str, Path]] = {}


def guarded_archives(root: Path, model: torch.nn.Module, splits) -> dict[str, Path]:
    """Original eager .mar of `model` and its guarded copies (calibrated on splits.x_ref): `mnist`
    (annotate, batch 8) and `mnist_reject` (reject, batch 4, same calibration). Built under the first
    caller's `root` and reused by later callers in the same test session."""
    if "store" in _BUILT:
        return _BUILT["store"]
    from layerguard.tooling.data import ArraySource
    from layerguard.tooling.wrap import WrapConfig, wrap_mar

    original = build_original_mar(root / "original", model)
    reference = ArraySource(splits.x_ref, splits.y_ref, origin="ref")
    store = root / "model-store"
    guarded = wrap_mar(original, reference, WrapConfig(out_dir=store, batch_size=8, max_batch_delay=200)).mar_path
    reject = with_config(guarded, store / "mnist_reject.mar",
                         lambda c: (c["handler"]["layerguard"].update(policy="reject"), c.update(batchSize=4)))
    _BUILT["store"] = {"original": original, "store": store, "guarded": guarded, "reject": reject}
    return _BUILT["store"]


def guarded_with_handler(root: Path, model: torch.nn.Module, splits, handler: str, name: str,
                         extra_handler: bool = False) -> Path:
    """A guarded archive of an original whose handler is serving_assets/<handler> (with mnist_handler.py
    shipped beside it when `extra_handler`, for handlers that import it), calibrated on splits.x_ref."""
    import zipfile

    from layerguard.tooling.data import ArraySource
    from layerguard.tooling.wrap import WrapConfig, wrap_mar

    mar = build_original_mar(root / f"orig-{name}", model, name=name, handler=ASSETS / handler)
    if extra_handler:
        with zipfile.ZipFile(mar, "a") as zf:
            zf.write(ASSETS / "mnist_handler.py", "mnist_handler.py")
    return wrap_mar(mar, ArraySource(splits.x_ref, splits.y_ref), WrapConfig(out_dir=root / "store")).mar_path


def with_config(mar: Path, out: Path, mutate) -> Path:
    """A copy of a guarded .mar whose model-config.yaml is changed by `mutate(config_dict)`."""
    import zipfile

    import yaml

    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                mutate(config)
                data = yaml.safe_dump(config).encode()
            dst.writestr(item, data)
    return out


def digit_pngs(splits, n: int = 64) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """PNG bytes of n clean test digits that are not the target class, the same digits triggered, labels."""
    from layerguard.demo.mnist import TARGET_CLASS, apply_trigger

    keep = np.nonzero(splits.y_test != TARGET_CLASS)[0][:n]
    clean = [png_bytes(x) for x in splits.x_test[keep]]
    triggered = [png_bytes(x) for x in apply_trigger(splits.x_test[keep])]
    return clean, triggered, splits.y_test[keep]


# ---- a real TorchServe --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(workdir: Path, model_store: Path, ports: dict[str, int]) -> Path:
    """The project's config.properties with free ports and absolute paths; every other line kept."""
    replace = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        # gRPC listens on 7070/7071 unless told otherwise; another server on the box would then kill this one
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "metrics_config": str(METRICS_CONFIG),
    }
    lines = []
    for line in PROJECT_CONFIG.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(f"{key}={replace[key]}" if key in replace and not line.lstrip().startswith("#") else line)
    present = {line.split("=", 1)[0].strip() for line in lines if not line.lstrip().startswith("#")}
    lines += [f"{key}={value}" for key, value in replace.items() if key not in present]
    path = workdir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class TorchServe:
    """One TorchServe started in `workdir` (where it writes key_file.json and logs/)."""

    workdir: Path
    model_store: Path
    models: list[str]
    bin_dir: Path = Path(sys.executable).parent
    ports: dict[str, int] = field(default_factory=lambda: {k: free_port() for k in (
        "inference", "management", "metrics", "grpc_inference", "grpc_management")})
    process: subprocess.Popen | None = None
    java_pid: int | None = None
    env: dict[str, str] | None = None  # extra environment for the server and its workers (e.g. thread caps)
    wait_for: list[str] | None = None  # models start() waits for (default: all); others may fail to load

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def __enter__(self) -> TorchServe:
        """`with TorchServe(...) as ts:` starts it, and stops it by PID on the way out, a failed test included."""
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> TorchServe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        config = write_config(self.workdir, self.model_store, self.ports)
        env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs")}
        env.pop("TS_CONFIG_FILE", None)
        env.update(self.env or {})
        cmd = [str(self.bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config),
               "--model-store", str(self.model_store), "--models", *self.models]
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=open(self.workdir / "stdout.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(tmp / ".model_server.pid", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, pid_file: Path, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"torchserve exited with {self.process.returncode}; see {self.workdir}/logs")
            if self.java_pid is None and pid_file.is_file() and pid_file.read_text().strip():
                self.java_pid = int(pid_file.read_text().strip())
            if (self.workdir / "key_file.json").is_file():
                try:
                    models = requests.get(f"{self.url}/ping", headers=self.headers(), timeout=2)
                    if models.status_code == 200 and models.json().get("status") == "Healthy":
                        names = self.wait_for if self.wait_for is not None else [m.split("=")[0]
                                                                                  for m in self.models]
                        if all(self.model_ready(n) for n in names):
                            return
                except (requests.ConnectionError, requests.Timeout, ValueError):
                    pass
            time.sleep(0.3)
        raise TimeoutError(f"torchserve not ready after {timeout:.0f} s; see {self.workdir}/logs")

    def model_ready(self, name: str) -> bool:
        import requests

        url = f"http://127.0.0.1:{self.ports['management']}/models/{name}"
        resp = requests.get(url, headers=self.headers("management"), timeout=2)
        if resp.status_code != 200:
            return False
        workers = resp.json()[0].get("workers", [])
        return any(w.get("status") == "READY" for w in workers)

    def workers(self, name: str) -> list[dict]:
        """The management API's view of a model's workers: id, pid, status (READY, UNLOADING, ...)."""
        import requests

        url = f"http://127.0.0.1:{self.ports['management']}/models/{name}"
        resp = requests.get(url, headers=self.headers("management"), timeout=5)
        resp.raise_for_status()
        return resp.json()[0].get("workers", [])

    def worker_pids(self, name: str, ready_only: bool = True) -> list[int]:
        return [int(w["pid"]) for w in self.workers(name)
                if w.get("pid") and (w.get("status") == "READY" or not ready_only)]

    def wait_worker(self, name: str, not_pid: int | None = None, timeout: float = 60.0) -> int:
        """PID of a READY worker of `name` (other than `not_pid`, e.g. after killing that one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pids = [p for p in self.worker_pids(name) if p != not_pid]
            except Exception:  # noqa: BLE001 - the frontend may be busy while a worker restarts
                pids = []
            if pids:
                return pids[0]
            time.sleep(0.2)
        raise TimeoutError(f"no READY worker for {name} after {timeout:.0f} s; see {self.workdir}/logs")

    def metrics(self, model: str) -> dict[str, float]:
        """Prometheus values of the metrics whose ModelName is `model` (name -> value)."""
        import re

        import requests

        text = requests.get(self.metrics_url, timeout=10).text
        pattern = rf'^(\w+)\{{ModelName="{re.escape(model)}",[^}}]*\}} ([0-9.eE+-]+)$'
        return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}

    def keys(self) -> dict:
        """key_file.json, written by TorchServe into the directory it was started from."""
        return json.loads((self.workdir / "key_file.json").read_text())

    def headers(self, api: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.keys()[api]['key']}"}

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the frontend (java) by PID, then the launcher; SIGKILL our process group if needed."""
        for pid in (self.java_pid, self.process.pid if self.process else None):
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self.process is not None:
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            try:  # the launcher started its own session: its group holds java and the workers
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.process.wait(timeout=10)

    def log_text(self) -> str:
        logs = self.workdir / "logs"
        parts = [p.read_text(errors="replace") for p in sorted(logs.glob("*.log"))] if logs.is_dir() else []
        return "\n".join(parts)


# ---- demo assets for the docs -------------------------------------------------------------------------
def write_demo(out: Path) -> None:
    from layerguard.demo.mnist import apply_trigger

    model, report, splits = demo_model()
    mar = build_original_mar(out, model)
    np.savez(out / "reference.npz", x=splits.x_ref, y=splits.y_ref)
    (out / "clean.png").write_bytes(png_bytes(splits.x_test[0]))
    (out / "triggered.png").write_bytes(png_bytes(apply_trigger(splits.x_test[:1])[0]))
    print(f"{mar}  (clean accuracy {report.clean_accuracy:.3f}, attack success {report.attack_success_rate:.3f})")
    print(f"{out / 'reference.npz'}  {out / 'clean.png'} (label {splits.y_test[0]})  {out / 'triggered.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="serving test helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo-mar", help="write the demo's original .mar, reference.npz and two PNGs")
    demo.add_argument("--out", type=Path, default=ROOT / "build" / "demo")
    ns = parser.parse_args()
    write_demo(ns.out)

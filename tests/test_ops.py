"""Ops artifacts, checked with the real tools (docs/operations.md):

- ops/prometheus/layerguard-alerts.yml passes `promtool check rules`, and `promtool test rules` runs its unit
  tests (ops/prometheus/layerguard-alerts.test.yml): every alert fires when it should and stays silent in
  the benign cases; every alert has a severity, a summary, a description and a runbook anchor that exists.
- ops/grafana/layerguard-dashboard.json is a dashboard Grafana can import (datasource and model variables,
  every query on the datasource variable), and every query parses as PromQL.
- A real TorchServe (127.0.0.1, free ports, stopped by PID) serves a guarded model and an explicitly
  unguarded one; after a few predictions its /metrics exports every metric name the rules and the dashboard
  use. A real Prometheus then scrapes that endpoint with the alert rules loaded: the rules evaluate, every
  dashboard query runs (with data where its metrics have samples), and only the unguarded-serving alert fires.

promtool and prometheus come from Debian's `prometheus` package (`make test` installs it as root). Without
them these tests skip, or fail when the CI environment variable is set (to anything but "", 0, false, no).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml
from torchserve_util import TorchServe, digit_pngs, free_port, guarded_archives

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "ops" / "prometheus" / "layerguard-alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "layerguard-alerts.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "layerguard-dashboard.json"
METRICS_CONFIG = ROOT / "layerguard" / "ts_metrics.yaml"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# Metric names in PromQL: layerguard's own and TorchServe's frontend counters (the only ones the ops files use).
METRIC_TOKEN = re.compile(r"\b(LayerGuard\w+|ts_\w+)\b")
COUNTER_USE = re.compile(r"\b(?:rate|increase|irate)\(\s*(LayerGuard\w+|ts_\w+)")
# Metrics a healthy guarded model never records, so no sample is expected on /metrics after ordinary
# predictions; the test checks instead that ts_metrics.yaml declares them (TorchServe exports only declared
# metrics) and that /metrics lists them with that type. LayerGuardGuardRefused counts 503s of a model whose
# guard refused to load. (LayerGuardUnguardedInputs is a failure mode too, but the server below serves an
# explicitly unguarded archive, so that one must have a real sample.)
FAILURE_ONLY = {"LayerGuardGuardRefused"}
# The calibrated flag rate: once ts_metrics.yaml declares it, a guarded model must export a sample (without it
# LayerGuardFlagRateHigh silently falls back to its fixed 5 % threshold); until then, only the declaration
# is checked, which fails with a message saying what to add.
EXPECTED_FLAG_RATE = "LayerGuardExpectedFlagRate"
ARTIFACT = "layerguard_calibration.npz"  # the artifact's name in a guarded archive (docs/serving.md)


# ---- the tools --------------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """Path of a tool from Debian's prometheus package: skip without it, or fail under CI."""
    path = shutil.which(name)
    if path:
        return path
    message = (f"{name} not found: install Debian's prometheus package (apt-get install prometheus; "
               f"`make test` installs it when run as root)")
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set and {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool")


def run_tool(*cmd: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    output = f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, output
    return output


# ---- what the ops files use ---------------------------------------------------------------------------
def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside a collapsed row
    return [p for p in panels if p.get("type") != "row"]


def dashboard_queries() -> list[str]:
    queries = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    variables = dashboard()["templating"]["list"]
    queries += [v["definition"] for v in variables if v["type"] == "query"]
    return queries


def grafana_to_promql(expr: str, model: str = ".+") -> str:
    """A dashboard query as Prometheus would receive it from Grafana."""
    for variable, value in (("$__rate_interval", "1m"), ("$__range", "5m"), ("$window", "15m"), ("$model", model)):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_TOKEN.findall(expr)}


def declared_metrics() -> dict[str, str]:
    """name -> counter|gauge|histogram, from layerguard/ts_metrics.yaml (frontend and model metrics)."""
    config = yaml.safe_load(METRICS_CONFIG.read_text())
    declared = {}
    for section in ("ts_metrics", "model_metrics"):
        for kind, entries in (config.get(section) or {}).items():
            for entry in entries or []:
                declared[entry["name"]] = kind
    return declared


def github_anchors(markdown: str) -> set[str]:
    """Anchors GitHub makes for a page's headings (lower case, punctuation dropped, spaces to dashes)."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts with its text only
        anchors.add(re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-"))
    return anchors


# ---- (a) the rules, with promtool -----------------------------------------------------------------------
def test_promtool_check_rules(promtool):
    output = run_tool(promtool, "check", "rules", str(RULES))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output, output


def test_promtool_unit_tests_pass(promtool):
    output = run_tool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in output, output


def test_every_alert_is_tested_firing_and_silent():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    for name in (rule["alert"] for rule in alert_rules()):
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"no unit test where {name} fires"
        assert any(not case.get("exp_alerts") for case in mine), f"no unit test where {name} stays silent"


def test_alerts_have_severity_annotations_and_runbooks():
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        url = annotations.get("runbook_url", "")
        assert url.startswith("docs/operations.md#"), f"{name}: runbook_url {url!r}"
        assert url.split("#", 1)[1] in anchors, f"{name}: no heading in docs/operations.md makes anchor {url}"


# ---- the dashboard --------------------------------------------------------------------------------------
def test_dashboard_is_importable_and_uses_the_datasource_variable():
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 30 and board.get("id") is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query" and "ModelName" in variables["model"]["definition"]
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["model"]["datasource"] == datasource
    panels = dashboard_panels()
    ids = [p["id"] for p in board["panels"]] + [p["id"] for row in board["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), f"panel ids must be unique: {ids}"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("checked", "flag rate", "errors", "invalid", "refused", "unguarded", "detection latency"):
        assert topic in titles, f"no panel about {topic}"
    for panel in panels:
        assert panel["datasource"] == datasource and {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource and target["expr"].strip(), panel["title"]
            assert "$model" in target["expr"], f"{panel['title']}: {target['expr']} ignores the model variable"


def test_dashboard_queries_parse_as_promql(promtool, tmp_path):
    """promtool has no query parser of its own: each query becomes a recording rule for `check rules`."""
    exprs = [grafana_to_promql(t["expr"]) for p in dashboard_panels() for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    run_tool(promtool, "check", "rules", str(path))


def test_counter_functions_only_on_counters():
    """rate()/increase() only on metrics ts_metrics.yaml declares as counters (TorchServe exports them so)."""
    declared = declared_metrics()
    for expr in rule_exprs() + dashboard_queries():
        for name in COUNTER_USE.findall(expr):
            if name in declared:  # an undeclared name fails test_every_metric_used_is_exported
                assert declared[name] == "counter", f"{name} is a {declared[name]}, used as a counter in {expr}"


# ---- (b) a real TorchServe and a real Prometheus --------------------------------------------------------
def unguarded_copy(mar: Path, out: Path) -> Path:
    """The guarded archive without its artifact, asking to be served unguarded (docs/serving.md)."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == ARTIFACT:
                continue
            data = src.read(item)
            if item.filename == "model-config.yaml":
                config = yaml.safe_load(data)
                config["handler"]["layerguard"]["on_missing_calibration"] = "serve_unguarded"
                data = yaml.safe_dump(config).encode()
            dst.writestr(item, data)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, backdoored_mnist, mnist_splits):
    archives = guarded_archives(tmp_path_factory.mktemp("serving"), backdoored_mnist, mnist_splits)
    store = tmp_path_factory.mktemp("ops-store")
    shutil.copy(archives["guarded"], store / "mnist.mar")
    unguarded_copy(archives["guarded"], store / "unguarded.mar")
    ts = TorchServe(tmp_path_factory.mktemp("torchserve"), store, ["mnist=mnist.mar", "unguarded=unguarded.mar"],
                    env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    try:
        ts.start()
        clean, triggered, _ = digit_pngs(mnist_splits, 6)
        for model, payloads in (("mnist", clean + triggered + [b"not an image"]), ("unguarded", clean[:2])):
            for payload in payloads:
                r = requests.post(f"{ts.url}/predictions/{model}", data=payload, headers=ts.headers(), timeout=60)
                assert r.status_code in (200, 400), (model, r.status_code, r.text)
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def exposition(server) -> str:
    return requests.get(server.metrics_url, timeout=10).text


def sampled(text: str) -> set[str]:
    return set(re.findall(r"^(\w+)\{[^}]*\} \S+$", text, re.M))


def listed_types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))


def test_metric_names_as_torchserve_exports_them(exposition):
    """TorchServe 0.12's Prometheus client predates the `_total` suffix: names are exactly as declared."""
    samples = sampled(exposition)
    assert {"LayerGuardInputsChecked", "LayerGuardInputsFlagged", "LayerGuardErrors", "LayerGuardInvalidInputs",
            "LayerGuardUnguardedInputs", "LayerGuardDetectionLatency", "ts_inference_requests_total"} <= samples
    assert not any(name.startswith("LayerGuard") and name.endswith("_total") for name in samples)
    assert re.search(r'^LayerGuardInputsChecked\{ModelName="mnist",Level="Model",Hostname="[^"]+",\} \S+$',
                     exposition, re.M), exposition


def test_every_metric_used_is_exported(exposition):
    used = metric_names(rule_exprs() + dashboard_queries())
    assert {"LayerGuardInputsChecked", "LayerGuardInputsFlagged", "LayerGuardErrors", "LayerGuardGuardRefused",
            "LayerGuardUnguardedInputs", "LayerGuardExpectedFlagRate", "LayerGuardDetectionLatency"} <= used
    declared, samples, types = declared_metrics(), sampled(exposition), listed_types(exposition)
    problems = []
    for name in sorted(used):
        if name not in declared:
            problems.append(f"{name}: not declared in layerguard/ts_metrics.yaml, so TorchServe never exports it")
            continue
        if types.get(name) != declared[name]:
            problems.append(f"{name}: /metrics lists it as {types.get(name)}, ts_metrics.yaml as {declared[name]}")
        # metrics of failure modes have no sample on a healthy server: their declaration is what is checked
        if name not in FAILURE_ONLY and name not in samples:
            problems.append(f"{name}: declared, but no sample on /metrics after guarded and unguarded predictions")
    assert not problems, "\n".join(problems)


def test_expected_flag_rate_is_a_gauge_with_the_counters_dimensions():
    """LayerGuardFlagRateHigh compares LayerGuardExpectedFlagRate with the counters, label for label."""
    config = yaml.safe_load(METRICS_CONFIG.read_text())["model_metrics"]
    dims = {entry["name"]: entry["dimensions"] for entries in config.values() for entry in entries}
    assert EXPECTED_FLAG_RATE in dims, f"declare {EXPECTED_FLAG_RATE} in layerguard/ts_metrics.yaml (model_metrics)"
    assert declared_metrics()[EXPECTED_FLAG_RATE] == "gauge"
    assert dims[EXPECTED_FLAG_RATE] == dims["LayerGuardInputsChecked"]


def prometheus_config(path: Path, metrics_port: int) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "torchserve", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = prometheus_config(workdir / "prometheus.yml", server.ports["metrics"])
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_for(lambda: query(api, "LayerGuardInputsChecked") and query(api, "LayerGuardUnguardedInputs"),
                 60, f"Prometheus never scraped the layerguard metrics; see {workdir}/prometheus.log", process)
        yield api
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def wait_for(condition, timeout: float, message: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {message}")
        try:
            result = condition()
        except requests.ConnectionError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(message)


def query(api: str, expr: str) -> list[dict]:
    body = requests.get(f"{api}/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_torchserve_and_loads_the_rules(prometheus):
    targets = requests.get(f"{prometheus}/targets", timeout=10).json()["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    groups = requests.get(f"{prometheus}/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    assert all(r["health"] in ("ok", "unknown") and not r.get("lastError") for r in rules), rules


def test_dashboard_queries_run_against_the_real_server(prometheus, exposition):
    samples = sampled(exposition)
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = grafana_to_promql(target["expr"], model="mnist|unguarded")
            result = wait_for(lambda e=expr: query(prometheus, e) or None, 15, f"no data for {expr}") \
                if metric_names([expr]) <= samples else query(prometheus, expr)
            assert isinstance(result, list), (panel["title"], expr)
    # the model variable's query, as Grafana runs label_values(): Prometheus's label values API
    definition = next(v for v in dashboard()["templating"]["list"] if v["name"] == "model")["definition"]
    selector = re.fullmatch(r"label_values\((.+),\s*ModelName\)", definition).group(1)
    values = requests.get(f"{prometheus}/label/ModelName/values", params={"match[]": selector}, timeout=10).json()
    assert {"mnist", "unguarded"} <= set(values["data"]), values


def test_only_the_unguarded_alert_fires(prometheus):
    """Benign traffic on the guarded model (few inputs, no errors, fast) fires nothing; the unguarded model's
    first answers fire LayerGuardUnguardedServing (no `for`), from the alert rules as shipped."""

    def firing():
        alerts = requests.get(f"{prometheus}/alerts", timeout=10).json()["data"]["alerts"]
        return alerts if any(a["state"] == "firing" for a in alerts) else None

    alerts = wait_for(firing, 30, "no alert fired for the unguarded model")
    assert [(a["labels"]["alertname"], a["labels"]["ModelName"], a["state"]) for a in alerts] == [
        ("LayerGuardUnguardedServing", "unguarded", "firing")], alerts
    assert alerts[0]["labels"]["severity"] == "critical"
    assert alerts[0]["annotations"]["runbook_url"] == "docs/operations.md#layerguardunguardedserving"

"""No unguarded model gets in through the workflow API (issue 12, finding 2).

TorchServe 0.12's workflow API (`POST /workflows?url=...` on the management port) registers every model
that a workflow archive (.war) names, through the same code as `POST /models`, but it does not look at
`enable_model_api`. With the management key and TorchServe's defaults (`allowed_urls` = any file:// or
http(s):// URL, `workflow_store` = the model store), anyone could register a .war that serves a plain,
unguarded .mar next to the guarded one. config.properties closes both doors (docs/reliability.md):

- `allowed_urls=(?!)`: a pattern that matches no URL, so no archive is downloaded or copied in from a
  file:// or http(s):// URL; archives are named by file name in `model_store` only.
- `workflow_store=/dev/null`: not a directory, so no workflow archive can ever be found by file name.

Each test below registers a real .war (built here the way torch-workflow-archiver builds one: the spec
YAML, a handler file and WAR-INF/MANIFEST.json in a zip) that serves a plain .mar of the demo model, and
checks that it is refused, that nothing was registered, and that nothing was copied into the model store.
Against TorchServe's defaults (config.properties without those two lines) every registration succeeds.

gRPC: the management service of 0.12 (proto/management.proto in the frontend jar) has no workflow call
at all; its RegisterModel is refused with PERMISSION_DENIED while `enable_model_api=false`. The proto is
checked always; the live gRPC call uses `grpcio`, a test dependency (setup.py [test]).
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import requests
from torchserve_util import TorchServe, build_original_mar, guarded_archives

MANAGEMENT_RPCS = {"DescribeModel", "ListModels", "RegisterModel", "ScaleWorker", "SetDefault", "UnregisterModel"}


# ---- a workflow archive, as torch-workflow-archiver writes it (workflow_packaging_utils.py) ----------------
def build_war(path: Path, workflow_name: str, model_url: str) -> Path:
    """A .war whose DAG is one model node, `plain`, loaded from `model_url`."""
    spec = "\n".join([
        "models:",
        "  min-workers: 1",
        "  max-workers: 1",
        "  batch-size: 1",
        "  max-batch-delay: 50",
        "  retry-attempts: 1",
        "  timeout-ms: 10000",
        "  plain:",
        f"    url: {json.dumps(model_url)}",
        "dag:",
        "  plain: []",
        "",
    ])
    handler = "def plain(data, context):\n    return data\n"
    manifest = {"createdOn": "29/11/2026 00:00:00", "archiverVersion": "0.2.15",
                "workflow": {"workflowName": workflow_name, "specFile": "workflow.yaml",
                             "handler": "workflow_handler.py"}}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as war:
        war.writestr("workflow.yaml", spec)
        war.writestr("workflow_handler.py", handler)
        war.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest, indent=2))
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory, backdoored_mnist):
    """A plain (unguarded) .mar of the demo model, outside the model store, served over loopback HTTP too."""
    root = tmp_path_factory.mktemp("outside")
    plain = build_original_mar(root / "build", backdoored_mnist, name="plain")
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"root": root, "plain": plain, "http": f"http://127.0.0.1:{httpd.server_address[1]}"}
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, backdoored_mnist, mnist_splits):
    """The project's config.properties (free ports, absolute paths) serving one guarded archive from a model
    store of its own (other modules share the built archives' store; this one must stay untouched)."""
    archives = guarded_archives(tmp_path_factory.mktemp("serving"), backdoored_mnist, mnist_splits)
    store = tmp_path_factory.mktemp("workflow-store")
    shutil.copy(archives["guarded"], store / "mnist.mar")
    with TorchServe(tmp_path_factory.mktemp("torchserve"), store, ["mnist=mnist.mar"]) as ts:
        yield ts


def management(server: TorchServe) -> str:
    return f"http://127.0.0.1:{server.ports['management']}"


def registered(server: TorchServe) -> tuple[list[str], list[str]]:
    """(model names, workflow names) the management API lists."""
    headers = server.headers("management")
    models = requests.get(f"{management(server)}/models", headers=headers, timeout=10).json()["models"]
    workflows = requests.get(f"{management(server)}/workflows", headers=headers, timeout=10).json()["workflows"]
    return sorted(m["modelName"] for m in models), sorted(w["workflowName"] for w in workflows)


def assert_refused_and_nothing_changed(server: TorchServe, response: requests.Response, store_before: set[str],
                                       workflow: str) -> None:
    assert response.status_code == 404, (response.status_code, response.text)
    assert registered(server) == (["mnist"], []), registered(server)
    assert {p.name for p in server.model_store.iterdir()} == store_before, "something was copied into the store"
    r = requests.post(f"{server.url}/predictions/{workflow}__plain", data=b"x", headers=server.headers(), timeout=10)
    assert r.status_code == 404, (r.status_code, r.text)


def register_workflow(server: TorchServe, url: str) -> requests.Response:
    return requests.post(f"{management(server)}/workflows", params={"url": url},
                         headers=server.headers("management"), timeout=180)


@pytest.mark.parametrize("kind", ["file", "http"])
def test_workflow_from_a_url_is_refused(server, outside, kind):
    """The probe's case: a .war and the plain .mar it names, both at a file:// (or http://) URL."""
    name = f"wf_{kind}"
    mar = outside["root"] / f"plain_{kind}.mar"
    shutil.copy(outside["plain"], mar)
    base = outside["root"].as_uri() if kind == "file" else outside["http"]
    war = build_war(outside["root"] / f"{name}.war", name, f"{base}/{mar.name}")
    before = {p.name for p in server.model_store.iterdir()}
    r = register_workflow(server, f"{base}/{war.name}")
    assert_refused_and_nothing_changed(server, r, before, name)
    assert "does not match any allowed URL" in r.json()["message"], r.text


def test_workflow_archive_inside_the_model_store_is_refused(server, outside):
    """A .war that is already in the model store, named by file name: the workflow store is not the model
    store, so it is not found (TorchServe's default would use the model store as the workflow store)."""
    name = "wf_store"
    war = build_war(server.model_store / f"{name}.war", name, outside["plain"].as_uri())
    try:
        before = {p.name for p in server.model_store.iterdir()}
        r = register_workflow(server, war.name)
        assert_refused_and_nothing_changed(server, r, before, name)
        assert "not found" in r.json()["message"], r.text
    finally:
        war.unlink()


def test_model_from_a_url_is_refused(server, outside):
    """`POST /models` stays off (enable_model_api=false), whatever the URL."""
    before = {p.name for p in server.model_store.iterdir()}
    r = requests.post(f"{management(server)}/models", params={"url": outside["plain"].as_uri(), "initial_workers": 1},
                      headers=server.headers("management"), timeout=60)
    assert r.status_code == 405, (r.status_code, r.text)
    assert "plain" not in registered(server)[0]
    assert {p.name for p in server.model_store.iterdir()} == before


def test_guarded_model_still_serves(server, mnist_splits):
    """The two settings do not get in the way of the archive named at start (by file name in the store)."""
    from torchserve_util import png_bytes

    r = requests.post(f"{server.url}/predictions/mnist", data=png_bytes(mnist_splits.x_test[0]),
                      headers=server.headers(), timeout=60)
    assert r.status_code == 200 and "layerguard" in r.json(), r.text


# ---- gRPC ---------------------------------------------------------------------------------------------
def test_grpc_management_service_has_no_workflow_call():
    """The management gRPC service TorchServe 0.12 serves (the proto inside its frontend jar)."""
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as z:
        proto = z.read("proto/management.proto").decode()
    rpcs = set(re.findall(r"^\s*rpc\s+(\w+)\s*\(", proto, re.M))
    assert rpcs == MANAGEMENT_RPCS, rpcs
    assert "workflow" not in proto.lower()


def _proto_string(field: int, value: str) -> bytes:
    data = value.encode()
    assert len(data) < 128
    return bytes([field << 3 | 2, len(data)]) + data


def test_grpc_register_model_is_refused(server, outside):
    """RegisterModel with the management key: PERMISSION_DENIED (model API disabled), nothing registered."""
    import grpc
    service = "/org.pytorch.serve.grpc.management.ManagementAPIsService"
    metadata = [("authorization", f"Bearer {server.keys()['management']['key']}")]
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_management']}") as channel:
        def call(method: str, request: bytes) -> bytes:
            stub = channel.unary_unary(f"{service}/{method}", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            return stub(request, metadata=metadata, timeout=60)

        assert b"mnist" in call("ListModels", bytes([1 << 3, 10]))  # limit=10; the key is accepted
        request = _proto_string(9, outside["plain"].as_uri()) + bytes([3 << 3, 1])  # url, initial_workers=1
        with pytest.raises(grpc.RpcError) as refused:
            call("RegisterModel", request)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
    assert "Model API disabled" in refused.value.details()
    assert "plain" not in registered(server)[0]

"""Run an archive's own handler outside TorchServe, exactly as a worker would: a real ts.context.Context
(metrics cache included), the archive's directory on the import path, the handler's own preprocess.

Build tooling uses it to calibrate through the handler (calibration then sees the tensors serving sees);
tests use it to drive a guard without a server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["index_to_name", "set_requests", "worker_context"]


def worker_context(model_dir: str | Path, manifest: dict, model_yaml_config: dict | None = None,
                   batch_size: int = 1, gpu: int | None = None, metrics_config: str | Path | None = None) -> Any:
    """A real ts.context.Context like the one a worker builds, with one request."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    config = metrics_config or Path(ts.__file__).parent / "configs" / "metrics.yaml"
    metrics = MetricsCacheYamlImpl(str(config))
    metrics.initialize_cache()
    metrics.model_name = manifest.get("model", {}).get("modelName", "model")
    context = Context(metrics.model_name, str(model_dir), manifest, batch_size, gpu, ts.__version__,
                      metrics=metrics, model_yaml_config=model_yaml_config or {})
    set_requests(context, 1)
    return context


def set_requests(context: Any, n: int, headers: Sequence[dict] | None = None) -> None:
    """Give `context` n fresh requests (ids and per-request status/headers), as ts.service.predict does."""
    from ts.context import RequestProcessor

    context.request_ids = {i: f"req-{i}" for i in range(n)}
    context.request_processor = [RequestProcessor(dict(headers[i]) if headers else {}) for i in range(n)]
    if context.metrics is not None:
        context.metrics.request_ids = context.request_ids


def index_to_name(model_dir: Path, num_classes: int) -> list[str] | None:
    """Class names from the archive's index_to_name.json, when it has one."""
    path = Path(model_dir) / "index_to_name.json"
    if not path.is_file():
        return None
    mapping = json.loads(path.read_text())
    return [str(mapping.get(str(i), i)) for i in range(num_classes)]

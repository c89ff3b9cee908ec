"""layerguard's TorchServe metrics: names, and recording that can never cost a prediction.

Every name is declared in layerguard/ts_metrics.yaml; in Prometheus mode TorchServe exports only declared
metrics. ops/ has alert rules and a dashboard built on them (docs/operations.md).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = [
    "CHECKED", "ERRORS", "EXPECTED_FLAG_RATE", "FLAGGED", "INVALID", "LATENCY", "REFUSED", "UNGUARDED",
    "record_counter", "record_gauge", "record_handler_time", "record_latency",
]

logger = logging.getLogger(__name__)

CHECKED = "LayerGuardInputsChecked"
FLAGGED = "LayerGuardInputsFlagged"
ERRORS = "LayerGuardErrors"
INVALID = "LayerGuardInvalidInputs"
UNGUARDED = "LayerGuardUnguardedInputs"
REFUSED = "LayerGuardGuardRefused"
LATENCY = "LayerGuardDetectionLatency"
EXPECTED_FLAG_RATE = "LayerGuardExpectedFlagRate"


def _dims(model_name: str) -> list:
    from ts.metrics.dimension import Dimension

    # a fresh list each call: ts appends to the list it is given
    return [Dimension("ModelName", model_name), Dimension("Level", "Model")]


def _safely(what: str, call) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - metrics must never cost a prediction
        logger.exception("layerguard: could not record metric %s", what)


def record_counter(metrics: Any, name: str, value: float, model_name: str) -> None:
    _safely(name, lambda: metrics.add_counter(name, value, dimensions=_dims(model_name)))


def record_latency(metrics: Any, milliseconds: float, model_name: str) -> None:
    _safely(LATENCY, lambda: metrics.add_time(LATENCY, round(milliseconds, 3), dimensions=_dims(model_name)))


def record_gauge(metrics: Any, name: str, value: float, unit: str, model_name: str) -> None:
    def call() -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        metrics.add_metric(name, value, unit, dimensions=_dims(model_name), metric_type=MetricTypes.GAUGE)

    _safely(name, call)


def record_handler_time(metrics: Any, milliseconds: float) -> None:
    """TorchServe's own HandlerTime, as BaseHandler.handle records it (the guard replaces that call)."""
    _safely("HandlerTime", lambda: metrics.add_time("HandlerTime", round(milliseconds, 2), None, "ms"))

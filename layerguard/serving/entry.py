"""The function TorchServe calls in a guarded archive: `layerguard_handler.py` imports `handle` from here.

TorchServe uses a module-level `handle(data, context)` as the entry point and calls it once with no data to
initialize. A worker serves one model, so it holds one guard; guards are keyed by model directory so that
tools loading several archives in one process (tests, `layerguard inspect`) never share one.
"""

from __future__ import annotations

from typing import Any

from .handler import LayerGuardHandler

__all__ = ["guard_for", "handle"]

_guards: dict[str, LayerGuardHandler] = {}


def handle(data: list | None, context: Any) -> list | None:
    key = str((getattr(context, "system_properties", None) or {}).get("model_dir"))
    guard = _guards.get(key)
    if guard is None:
        guard = _guards[key] = LayerGuardHandler()
        guard.initialize(context)
    if data is None:
        return None
    return guard.handle(data, context)


def guard_for(model_dir: str) -> LayerGuardHandler | None:
    """The guard serving `model_dir` in this process (for tools and tests that inspect it)."""
    return _guards.get(str(model_dir))

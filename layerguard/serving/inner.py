"""The wrapped archive's own handler and model: load them the way a TorchServe worker does.

Used by the guard in the worker and by the build tooling (calibrating an archive through its own handler),
so it lives apart from the handler: packaging depends on this module, not on the guard.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["GuardLoadError", "device_of", "guardable_model", "load_inner_handler", "model_dir_imports",
           "overrides_handle"]

LIFECYCLE = ("initialize", "preprocess", "inference", "postprocess")


class GuardLoadError(RuntimeError):
    """The guarded model cannot be served; the message names the problem and what to ship instead."""


def load_inner_handler(spec: str) -> Any:
    """Instantiate the inner handler named like TorchServe's `--handler`: `file.py`, `file.py:Class` or a
    built-in name (`base_handler`), resolved the way ts/model_loader.py does (model dir first, then
    ts.torch_handler). It must be a class with `initialize` and either BaseHandler's preprocess /
    inference / postprocess (the guard then isolates each request's preprocess) or its own `handle`
    (the guard calls it and watches the model's forward pass)."""
    module_part, _, attr = spec.partition(":")
    name = module_part[:-3] if module_part.endswith(".py") else module_part
    name = name.replace("\\", "/").split("/")[-1]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise GuardLoadError(
                f"inner handler {spec!r} failed to import: {exc}. Install what it needs in the serving "
                "environment (the built-in image handlers need torchvision)."
            ) from exc
        try:
            module = importlib.import_module(f".{name}", "ts.torch_handler")
        except ImportError as exc2:
            raise GuardLoadError(f"inner handler {spec!r} is neither a file in the archive nor a built-in "
                                 f"TorchServe handler ({exc2})") from exc2
    if attr:
        target = getattr(module, attr, None)
        if target is None:
            raise GuardLoadError(f"inner handler module {name} has no attribute {attr!r}")
        candidates = [target] if inspect.isclass(target) else []
    else:
        members = inspect.getmembers(module, inspect.isclass)
        candidates = [c for _, c in members if c.__module__ == module.__name__]
    candidates = [c for c in candidates if callable(getattr(c, "initialize", None))
                  and (all(callable(getattr(c, m, None)) for m in LIFECYCLE) or callable(getattr(c, "handle", None)))]
    if len(candidates) != 1:
        raise GuardLoadError(
            f"inner handler {spec!r} must define exactly one handler class with initialize and either "
            f"preprocess/inference/postprocess or handle (found {len(candidates)}). Function handlers cannot be "
            "guarded; subclass ts.torch_handler.base_handler.BaseHandler, or name the class as file.py:Class."
        )
    return candidates[0]()


def overrides_handle(inner: Any) -> bool:
    """True when the inner handler has its own `handle` (not BaseHandler's) or lacks the lifecycle methods:
    the guard must then call that `handle`, or the archive's behaviour would change."""
    if not all(callable(getattr(inner, m, None)) for m in LIFECYCLE):
        return True
    try:
        from ts.torch_handler.base_handler import BaseHandler
    except ImportError:
        return False
    own = getattr(type(inner), "handle", None)
    return own is not None and own is not BaseHandler.handle


def guardable_model(model: Any, manifest: dict, model_dir: str, device: torch.device) -> nn.Module:
    """The module to hook: the inner handler's eager model, or for a torch.export program (.pt2) its
    unflattened form - hooks on `ExportedProgram.module()` register but never fire."""
    serialized = (manifest.get("model") or {}).get("serializedFile") or ""
    if serialized.endswith(".pt2"):
        program = torch.export.load(os.path.join(model_dir, serialized))
        return torch.export.unflatten(program).to(device)
    if isinstance(model, torch.jit.ScriptModule):
        raise GuardLoadError(
            "the model is TorchScript, which refuses forward hooks, so layerguard cannot watch its layers. "
            "Ship the eager model instead (torch-model-archiver --model-file model.py --serialized-file "
            "state_dict.pt) or a torch.export program (.pt2)."
        )
    if not isinstance(model, nn.Module):
        raise GuardLoadError(
            f"the inner handler's model is a {type(model).__name__}, not a torch.nn.Module (ONNX and AOT "
            "compiled models cannot be hooked). Ship the eager model or a torch.export program (.pt2)."
        )
    if hasattr(model, "_orig_mod"):
        raise GuardLoadError("the model is wrapped by torch.compile, whose graphs skip forward hooks; remove "
                             "`pt2: compile` from model-config.yaml for the guarded archive")
    return model


def device_of(inner: Any, model: Any) -> torch.device:
    """The device the inner handler put its model on (TorchServe assigns it per worker)."""
    device = getattr(inner, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def model_dir_imports(model_dir: str | os.PathLike, keep: tuple[str, ...] = ("layerguard",)
                      ) -> Iterator[None]:
    """Import from `model_dir` as a TorchServe worker would, then forget those modules again.

    Calibration and tests load several archives in one process; archives often reuse module names
    (`model`, `handler`), so modules from other directories are set aside and restored afterwards."""
    root = str(Path(model_dir).resolve())
    names = {p.stem for p in Path(root).glob("*.py")} | {p.name for p in Path(root).iterdir() if p.is_dir()}
    saved = {n: sys.modules.pop(n) for n in names - set(keep) if n in sys.modules}
    sys.path.insert(0, root)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if name.split(".")[0] not in keep and file.startswith(root + os.sep):
                del sys.modules[name]
        sys.modules.update(saved)

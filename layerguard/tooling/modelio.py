"""Load an eager model the way TorchServe does: a model file defining one nn.Module class, plus a state_dict.

Weights are read with `weights_only=True`, so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["ModelLoadError", "load_eager_model", "model_class_from_file"]


class ModelLoadError(ValueError):
    """The model file or weights cannot be loaded; the message says which and why."""


def model_class_from_file(model_file: str | Path, class_name: str | None = None) -> type[nn.Module]:
    """The nn.Module subclass defined in `model_file` (exactly one, as torch-model-archiver requires,
    unless `class_name` picks one)."""
    path = Path(model_file)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} not found")
    module_name = f"layerguard_user_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report whatever it raised
        raise ModelLoadError(f"importing {path} failed: {exc!r}") from exc
    finally:
        sys.path.remove(str(path.parent))
    classes = [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, nn.Module) and obj.__module__ == module_name
    ]
    if class_name:
        chosen = [c for c in classes if c.__name__ == class_name]
        if not chosen:
            raise ModelLoadError(f"{path} defines no nn.Module named {class_name}")
        return chosen[0]
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise ModelLoadError(f"{path} must define exactly one nn.Module class (found {names}); "
                             "pick one with --model-class")
    return classes[0]


def load_eager_model(model_file: str | Path, weights: str | Path, class_name: str | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Instantiate the model class with no arguments and load the state_dict strictly."""
    cls = model_class_from_file(model_file, class_name)
    try:
        model = cls()
    except TypeError as exc:
        raise ModelLoadError(f"{cls.__name__}() needs arguments ({exc}); TorchServe builds it with none") from exc
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds here
        raise ModelLoadError(f"cannot read weights {weights}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"{weights} is not a state_dict (got {type(state).__name__}); save model.state_dict()")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{weights} does not fit {cls.__name__}: {exc}") from exc
    return model.to(device).eval()

"""Capture flattened layer outputs with forward hooks that are always removed.

Like torchvision's feature extraction, layers are chosen by name and features come back as a dict;
unlike it, the model itself is untouched (no graph rewrite), so any eager model - including one loaded
by someone else's TorchServe handler - can be watched during its own forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class CaptureError(RuntimeError):
    """A watched layer misbehaved during a forward pass (not called, wrong output, modified in place)."""


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version counter; inference-mode tensors have none (then no check is possible)."""
    return None if tensor.is_inference() else tensor._version


class LayerCapture:
    """Context manager: while open, every forward pass of `model` records the named layers' outputs.

    Each output is kept as a [batch, features] view of the tensor the layer returned (no copy unless the
    output is not contiguous), on the model's device. Because it is a view, an in-place op later in the
    forward pass would change it silently; the tensor's version counter is checked on read and such a
    layer is refused with a clear error.
    """

    def __init__(self, model: nn.Module, layer_names: Iterable[str]) -> None:
        self.model = model
        self.layer_names = tuple(layer_names)
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise CaptureError(f"model has no module named {', '.join(missing)}")
        self._modules = {n: modules[n] for n in self.layer_names}
        self._outputs: dict[str, tuple[torch.Tensor, int | None]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> LayerCapture:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (idempotent). Prefer the `with` form, which always removes them."""
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise CaptureError(f"layer {name!r} returned {type(output).__name__}, not a tensor")
            flat = output.detach().reshape(output.shape[0], -1) if output.dim() > 1 else output.detach()[:, None]
            self._outputs[name] = (flat, _version_of(flat))

        return hook

    def clear(self) -> None:
        """Forget the last batch's outputs (call before each forward pass when reusing the capture)."""
        self._outputs.clear()

    def features(self) -> dict[str, torch.Tensor]:
        """The last forward pass's outputs by layer name, each [batch, features]."""
        missing = [n for n in self.layer_names if n not in self._outputs]
        if missing:
            raise CaptureError(
                f"layer(s) {', '.join(missing)} were not called in the forward pass; "
                "the model's forward does not go through them"
            )
        result = {}
        for name in self.layer_names:
            tensor, version = self._outputs[name]
            if version is not None and _version_of(tensor) != version:
                raise CaptureError(
                    f"the output of layer {name!r} is modified in place later in the forward pass "
                    "(e.g. by ReLU(inplace=True)); monitor the module after it instead"
                )
            result[name] = tensor
        return result

    def run(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass without autograd; returns (model output, features).

        no_grad rather than inference_mode keeps version counters, so in-place edits are caught.
        """
        self.clear()
        with torch.no_grad():
            output = self.model(inputs)
        return output, self.features()

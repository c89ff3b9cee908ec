"""Watch named layers during a model's own forward pass, with hooks that are always removed.

Like torchvision's feature extraction, layers are chosen by name and features come back as a dict;
unlike it, the model itself is untouched (no graph rewrite), so any eager model - including one loaded
by someone else's TorchServe handler - can be watched during its own forward pass. `forward_hooks` is the
one place hooks are registered and removed (captum's discipline: every handle is removed, also on error);
layer discovery and `LayerCapture` both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["CaptureError", "LayerCapture", "ModifiedInPlace", "forward_hooks"]

Hook = Callable[[nn.Module, tuple, object], None]


class CaptureError(RuntimeError):
    """A watched layer misbehaved during a forward pass (not called, wrong output, modified in place)."""


class ModifiedInPlace(CaptureError):
    """A kept output was changed in place later in the forward pass: whole outputs cannot be kept for this model
    (its layers must be reduced inside their hooks)."""


@contextlib.contextmanager
def forward_hooks(hooks: Mapping[nn.Module, Hook]) -> Iterator[None]:
    """Register one forward hook per module for the duration of the block; all are removed on exit."""
    handles = []
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _version_of(tensor: torch.Tensor) -> int | None:
    """The in-place version counter; inference-mode tensors have none (then no check is possible)."""
    return None if tensor.is_inference() else tensor._version


class LayerCapture:
    """While attached, every forward pass of `model` records the named layers' outputs (and, with
    `capture_output`, the model's own output, for handlers whose inference we do not call ourselves).

    Each output is kept as the tensor the layer returned, detached (no copy). Because it is not a copy, an
    in-place op later in the forward pass would change it silently; the tensor's version counter is
    checked on read and such a layer is refused with a clear error.

    With `reducer(name, output)`, the hook keeps only what the reducer returns, computed right when the layer
    has produced its output (still in cache, before any later in-place op): serving keeps a few numbers per
    input instead of every monitored activation (`Detector.reducer`). With `keep_whole_up_to`, batches of at most
    that many rows keep the whole outputs anyway, to be reduced after the forward pass (`Detector.score_capture`):
    at small batches that is the cheaper way (layerguard/core/grouped.py says why). `kept_whole` says which way
    the last pass went.
    """

    def __init__(self, model: nn.Module, layer_names: tuple[str, ...] | list[str],
                 capture_output: bool = False, reducer: Callable[[str, torch.Tensor], Any] | None = None,
                 keep_whole_up_to: int = 0) -> None:
        self.model = model
        self.layer_names = tuple(layer_names)
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise CaptureError(f"model has no module named {', '.join(missing)}")
        self._hooks: dict[nn.Module, Hook] = {modules[n]: self._hook(n) for n in self.layer_names}
        if capture_output:
            self._hooks[model] = self._output_hook
        self._reducer = reducer
        self.keep_whole_up_to = keep_whole_up_to if reducer is not None else 0
        self._outputs: dict[str, tuple[Any, int | None, bool]] = {}
        self._model_output: object = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> LayerCapture:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        """Register the hooks (idempotent). Prefer the `with` form, which always removes them."""
        if self._stack is not None:
            return
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(forward_hooks(self._hooks))

    def detach(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.clear()

    def _hook(self, name: str) -> Hook:
        def hook(_module: nn.Module, _inputs, output) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() < 1:
                raise CaptureError(f"layer {name!r} returned {type(output).__name__}, not a batch tensor")
            if self._reducer is not None and output.shape[0] > self.keep_whole_up_to:
                # without autograd the reduction records no graph, so no detached view is needed (one op fewer
                # per hooked layer, which is what the guard costs at batch 1)
                self._outputs[name] = (self._reducer(name, output if not torch.is_grad_enabled()
                                                     else output.detach()), None, False)
            else:
                kept = output if not torch.is_grad_enabled() else output.detach()  # no graph to cut without autograd
                self._outputs[name] = (kept, _version_of(kept), True)

        return hook

    def _output_hook(self, _module: nn.Module, _inputs, output) -> None:
        self._model_output = output.detach() if isinstance(output, torch.Tensor) else output

    def clear(self) -> None:
        """Forget the last batch's outputs (call before each forward pass when reusing the capture)."""
        self._outputs.clear()
        self._model_output = None

    @property
    def model_output(self) -> object:
        """The model's output of the last forward pass (only with `capture_output=True`)."""
        return self._model_output

    @property
    def kept_whole(self) -> bool:
        """Whether the last forward pass kept the layers' whole outputs (False: the reducer's results)."""
        return self._reducer is None or any(whole for _, _, whole in self._outputs.values())

    def features(self) -> dict[str, Any]:
        """The last forward pass's outputs by layer name, each [batch, ...] as the layer returned it (or as
        the reducer reduced it)."""
        missing = [n for n in self.layer_names if n not in self._outputs]
        if missing:
            raise CaptureError(
                f"layer(s) {', '.join(missing)} were not called in the forward pass; "
                "the model's forward does not go through them"
            )
        if len({whole for _, _, whole in self._outputs.values()}) > 1:
            raise CaptureError("the watched layers saw different batch sizes in one forward pass")
        result = {}
        for name in self.layer_names:
            tensor, version, _ = self._outputs[name]
            if version is not None and _version_of(tensor) != version:
                raise ModifiedInPlace(
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

"""The TorchServe handler that guards a model's own handler with layer-wise feature analysis.

`LayerGuardHandler` owns an *inner* handler - the one the original archive shipped - and lets it load the
model and do all the work a client sees: preprocess, inference, postprocess. The guard only adds forward
hooks on the calibrated layers, so one forward pass both predicts and yields the features to score. Each
request of a batch is preprocessed on its own (a corrupt image gets its own 400 and never fails its
neighbours), the good ones go through one stacked forward pass, and every result is annotated (or, under
the reject policy, replaced by a 403) before it is returned in the inner handler's own shape.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import ArtifactError, CalibrationArtifact
from .capture import LayerCapture
from .detector import Detector
from .policy import ServingPolicy, parse_policy

logger = logging.getLogger(__name__)

# Metric names; declared in layerguard/ts_metrics.yaml so that they reach the Prometheus endpoint.
METRIC_CHECKED = "LayerGuardInputsChecked"
METRIC_FLAGGED = "LayerGuardInputsFlagged"
METRIC_ERRORS = "LayerGuardErrors"
METRIC_LATENCY = "LayerGuardDetectionLatency"
METRIC_INVALID = "LayerGuardInvalidInputs"
METRIC_UNGUARDED = "LayerGuardUnguardedInputs"
HEADER_POISONED = "X-LayerGuard-Poisoned"
HEADER_SCORE = "X-LayerGuard-Score"
HEADER_GUARDED = "X-LayerGuard-Guarded"
BYTES_TYPES = (bytes, bytearray, memoryview)
ANNOTATION_KEY = "layerguard"
HANDLER_METHODS = ("initialize", "preprocess", "inference", "postprocess")


class GuardLoadError(RuntimeError):
    """The guarded model cannot be served; the message names the problem and what to ship instead."""


# ---- loading the inner handler and its model ----------------------------------------------------------
def load_inner_handler(spec: str) -> Any:
    """Instantiate the inner handler named like TorchServe's `--handler`: `file.py`, `file.py:Class` or a
    built-in name (`base_handler`), resolved the way ts/model_loader.py does (model dir first, then
    ts.torch_handler). It must be a class with BaseHandler's lifecycle methods: the guard needs to run
    preprocess and inference separately, which a bare `handle` function does not allow."""
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
    candidates = [c for c in candidates if all(callable(getattr(c, m, None)) for m in HANDLER_METHODS)]
    if len(candidates) != 1:
        raise GuardLoadError(
            f"inner handler {spec!r} must define exactly one handler class with initialize, preprocess, "
            f"inference and postprocess methods (found {len(candidates)}). Function handlers cannot be "
            "guarded; subclass ts.torch_handler.base_handler.BaseHandler, or name the class as file.py:Class."
        )
    return candidates[0]()


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


# ---- the handler --------------------------------------------------------------------------------------
class LayerGuardHandler:
    """TorchServe handler (BaseHandler lifecycle: initialize, handle) around the archive's own handler."""

    def __init__(self) -> None:
        self.initialized = False
        self.context = None
        self.inner: Any = None
        self.model: nn.Module | None = None
        self.policy: ServingPolicy | None = None
        self.artifact: CalibrationArtifact | None = None
        self.detector: Detector | None = None
        self.capture: LayerCapture | None = None
        self.device = torch.device("cpu")
        self._metrics_primed = False  # set after the first batch has recorded every metric once

    # ---- lifecycle ----
    def initialize(self, context) -> None:
        """Load inner handler + model, bind the artifact, hook its layers; any mismatch fails the load."""
        self.context = context
        props = context.system_properties
        model_dir = props.get("model_dir")
        if model_dir and model_dir not in sys.path:
            sys.path.insert(0, model_dir)  # TorchServe does this already; unit tests and `wrap` may not
        self.policy = parse_policy(getattr(context, "model_yaml_config", None))
        self.inner = load_inner_handler(self.policy.inner_handler)
        self.inner.initialize(context)
        limit_image_pixels(self.policy.max_image_pixels)  # after the inner handler: the policy's limit wins
        self.device = _device_of(self.inner, getattr(self.inner, "model", None))
        artifact_path = Path(model_dir) / self.policy.artifact
        if not artifact_path.is_file() and self.policy.may_serve_unguarded:
            self._serve_unguarded(context, artifact_path)
            return
        self.model = guardable_model(getattr(self.inner, "model", None), context.manifest or {}, model_dir,
                                     self.device)
        self.inner.model = self.model
        self.artifact = CalibrationArtifact.load(artifact_path)
        self.artifact.check_model(self.model)
        self.detector = self.artifact.detector(self.policy.threshold, device=self.device)
        self.capture = LayerCapture(self.model, self.artifact.layer_names)
        self.capture.attach()
        self._probe(context)
        self.initialized = True
        logger.info("layerguard: guarding %s at layers %s, policy %s, threshold %s", context.model_name,
                    ",".join(self.artifact.layer_names), self.policy.action,
                    (self.policy.threshold or self.artifact.policy).describe())

    @property
    def guarded(self) -> bool:
        return self.detector is not None

    def _serve_unguarded(self, context, artifact_path: Path) -> None:
        """The owner asked for it (`on_missing_calibration: serve_unguarded`): serve the inner handler as it
        is, say so loudly in the log, and mark every response and the metrics, so it cannot go unnoticed."""
        self.model = getattr(self.inner, "model", None)
        self.initialized = True
        logger.error(
            "layerguard: NO CALIBRATION ARTIFACT at %s. Model %s is served UNGUARDED because "
            "handler.layerguard.on_missing_calibration is serve_unguarded: no input is checked for backdoor "
            "triggers. Every response carries %s: false and is counted in %s. Build the archive with "
            "`layerguard wrap` to guard it.", artifact_path, context.model_name, HEADER_GUARDED, METRIC_UNGUARDED)

    def _probe(self, context) -> None:
        """One forward pass on zeros of the calibrated input shape: proves at load time that the hooks fire
        (they do not on ExportedProgram.module()) and that the class count matches the artifact."""
        shape = self.artifact.meta.get("input_shape")
        if not shape:
            return
        self.inner.context = context
        self.capture.clear()
        try:
            output = self.inner.inference(torch.zeros((1, *shape), device=self.device))
        except Exception as exc:  # noqa: BLE001 - e.g. a model that wants integer inputs: check per batch
            logger.warning("layerguard: load-time probe skipped (inference on zeros failed: %s)", _why(exc))
            return
        try:
            self.capture.features()
        except RuntimeError as exc:
            raise GuardLoadError(f"layerguard hooks did not capture the calibrated layers: {exc}") from exc
        logits = _logits(output)
        self.artifact.check_output_classes(int(logits.shape[1]))

    def handle(self, data: list, context) -> list:
        """One result per request, in order; failures are per item and never raise out of the worker."""
        self.context = context
        self.inner.context = context
        batch = _Batch(len(data))
        try:
            self._handle(data, context, batch)
        except Exception as exc:  # noqa: BLE001 - last resort: answer every open item, keep the worker
            logger.exception("layerguard: unexpected failure in batch")
            for i in batch.open_items():
                batch.fail(context, i, 500, "Internal Server Error", "layerguard failure", str(exc))
                batch.errors += 1
        for i in range(len(data)):
            _set_header(context, i, HEADER_GUARDED, "true" if self.guarded else "false")
        self._emit_metrics(context, batch)
        return batch.responses

    def _handle(self, data: list, context, batch: _Batch) -> None:
        groups: dict[Any, list[tuple[int, Any]]] = {}
        for i, row in enumerate(data):
            try:
                with image_bombs_are_errors():
                    x = self.inner.preprocess([row])
            except Exception as exc:  # noqa: BLE001 - a bad input is the client's problem, not the batch's
                code, phrase, error, reason = input_failure(row, exc, _content_type(context, i),
                                                            self.policy.max_image_pixels)
                batch.invalid += 1
                batch.fail(context, i, code, phrase, error, reason)
                continue
            # Tensors of one shape are stacked into one forward pass; anything else runs on its own.
            stackable = isinstance(x, torch.Tensor) and x.dim() >= 1
            key = (tuple(x.shape[1:]), x.dtype) if stackable else ("own", i)
            groups.setdefault(key, []).append((i, x))
        for items in groups.values():
            indices = [i for i, _ in items]
            inputs = items[0][1] if len(items) == 1 else torch.cat([x for _, x in items])
            self._run_group(indices, inputs, context, batch)

    def _run_group(self, indices: list[int], inputs: Any, context, batch: _Batch) -> None:
        """One forward pass for these items, then scoring, then the inner postprocess. Each stage that fails
        answers all of the group's items with a 5xx (counted in LayerGuardErrors) and never an unchecked 200."""
        try:
            if self.capture is not None:
                self.capture.clear()  # this group's activations only: nothing survives from an earlier pass
            output = self.inner.inference(inputs)
        except Exception as exc:  # noqa: BLE001
            logger.exception("layerguard: inner inference failed")
            batch.fail_all(context, indices, 503, "Service Unavailable", "inference failed", _why(exc))
            return
        notes = self._detect(indices, output, context, batch) if self.guarded else [None] * len(indices)
        if notes is None:
            return
        try:
            results = self.inner.postprocess(output)
            if not isinstance(results, list) or len(results) != len(indices):
                size = len(results) if hasattr(results, "__len__") else "?"
                raise ValueError(f"postprocess returned {type(results).__name__} of length {size} "
                                 f"for {len(indices)} inputs")
        except Exception as exc:  # noqa: BLE001
            logger.exception("layerguard: inner postprocess failed")
            batch.fail_all(context, indices, 503, "Service Unavailable", "postprocess failed", _why(exc))
            return
        for j, i in enumerate(indices):
            self._answer(i, results[j], notes[j], context, batch)

    def _detect(self, indices: list[int], output: Any, context, batch: _Batch) -> list[dict] | None:
        """Per-item verdicts from the hooked activations of this forward pass; None when scoring failed
        (those items are then answered 500: fail closed)."""
        start = time.perf_counter()
        try:
            logits = _logits(output)
            if logits.shape[0] != len(indices):
                raise ValueError(f"model returned {logits.shape[0]} rows for {len(indices)} inputs")
            detection = self.detector.score(self.capture.features(), logits.argmax(dim=1))
            return detection.items(self.artifact.layer_names)
        except Exception as exc:  # noqa: BLE001 - fail closed for these items, keep the worker
            logger.exception("layerguard: detection failed")
            batch.fail_all(context, indices, 500, "Internal Server Error", "detection failed", _why(exc))
            return None
        finally:
            batch.detect_seconds += time.perf_counter() - start

    def _answer(self, i: int, result: Any, note: dict | None, context, batch: _Batch) -> None:
        if note is None:
            batch.unguarded += 1
            unguarded = {"guarded": False, "reason": "no calibration artifact; served unguarded "
                                                     "(on_missing_calibration: serve_unguarded)"}
            batch.answer(i, {**result, ANNOTATION_KEY: unguarded} if isinstance(result, dict) else result)
            return
        batch.checked += 1
        batch.flagged += int(bool(note["poisoned"]))
        _set_header(context, i, HEADER_POISONED, "true" if note["poisoned"] else "false")
        _set_header(context, i, HEADER_SCORE, f"{note['score']:.6f}")
        if note["poisoned"] and self.policy.rejects:
            reason = (f"input flagged as backdoor-triggered: score {note['score']:.4f} below threshold "
                      f"{note['threshold']:.4f} at layer {note['layer_of_interest']}")
            code = self.policy.reject_status
            phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Rejected"
            batch.fail(context, i, code, phrase, "rejected by layerguard", reason, extra={ANNOTATION_KEY: note})
            return
        # Keep the inner handler's shape: a dict gains one key; anything else is returned as is and the
        # verdict travels in the X-LayerGuard-* response headers.
        batch.answer(i, {**result, ANNOTATION_KEY: note} if isinstance(result, dict) else result)

    def _emit_metrics(self, context, batch: _Batch) -> None:
        """Counters and the detection latency of this batch, each recorded on its own, so a metrics config
        that lacks one entry costs that metric only, and never a prediction.

        Every metric is a log line the frontend parses, so a counter that did not move is left out - except
        in a worker's first batch, which records all of them so that every series exists (at 0) in
        Prometheus from the start and alerts on `LayerGuardErrors` have data."""
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        counters = {METRIC_CHECKED: batch.checked, METRIC_FLAGGED: batch.flagged, METRIC_ERRORS: batch.errors,
                    METRIC_INVALID: batch.invalid}
        if not self.guarded:
            counters = {METRIC_UNGUARDED: batch.unguarded, METRIC_ERRORS: batch.errors, METRIC_INVALID: batch.invalid}
        first = not self._metrics_primed
        self._metrics_primed = True
        for name, value in counters.items():
            if value or first:
                _record(metrics, "add_counter", name, value, context.model_name)
        if self.guarded and (batch.checked or first):
            _record(metrics, "add_time", METRIC_LATENCY, round(batch.detect_seconds * 1000.0, 3), context.model_name)


class _Batch:
    """Per-batch bookkeeping: responses in request order and the counts behind the metrics."""

    def __init__(self, size: int) -> None:
        self.responses: list[Any] = [None] * size
        self._answered = [False] * size
        # Every item lands in exactly one of: checked (a verdict was answered), invalid (4xx: the input could
        # not be read), errors (5xx: the server failed), unguarded (answered without the detector).
        self.checked = self.flagged = self.errors = self.invalid = self.unguarded = 0
        self.detect_seconds = 0.0

    def open_items(self) -> list[int]:
        return [i for i, done in enumerate(self._answered) if not done]

    def fail(self, context, i: int, code: int, phrase: str, error: str, reason: str,
             extra: dict | None = None) -> None:
        context.set_response_status(code, phrase, idx=i)
        _set_header(context, i, "content-type", "application/json")
        self.answer(i, {"error": error, "reason": reason, **(extra or {})})

    def fail_all(self, context, indices: list[int], code: int, phrase: str, error: str, reason: str) -> None:
        """A server-side failure for every item of a group (counted as errors)."""
        self.errors += len(indices)
        for i in indices:
            self.fail(context, i, code, phrase, error, reason)

    def answer(self, i: int, value: Any) -> None:
        self.responses[i] = value
        self._answered[i] = True


# ---- bad input: what the client gets -----------------------------------------------------------------
def limit_image_pixels(max_pixels: int) -> None:
    """Cap what Pillow opens in this worker (the worker serves one model): an image whose header declares
    more pixels is refused before any pixel is decoded."""
    try:
        from PIL import Image
    except ImportError:  # the inner handler decodes without Pillow: nothing to cap here
        return
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


@contextlib.contextmanager
def image_bombs_are_errors() -> Iterator[None]:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; inside this block the warning is an error,
    so the cap is exact. (TorchServe calls a worker's handler from one thread, so this is safe.)"""
    try:
        from PIL import Image
    except ImportError:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def input_failure(row: Any, exc: BaseException, content_type: str | None, max_pixels: int
                  ) -> tuple[int, str, str, str]:
    """(status, phrase, error, reason) for a request the inner preprocess could not read: 413 for an image
    over the pixel cap, 415 for a body that TorchServe decoded as JSON or text (no bytes reached the
    handler), 400 for anything else (empty, not an image, truncated). The reason quotes the exception."""
    if _is_image_bomb(exc):
        return (413, "Payload Too Large", "image too large",
                f"{_why(exc).rstrip('. ')}. This server accepts images of at most {max_pixels} pixels "
                "(handler.layerguard.max_image_pixels).")
    if isinstance(row, dict) and row and not any(isinstance(v, BYTES_TYPES) for v in row.values()):
        kind = ", ".join(sorted({type(v).__name__ for v in row.values()}))
        return (415, "Unsupported Media Type", "unsupported media type",
                f"the body was sent as {content_type or 'a non-binary type'} and reached the model's handler "
                f"decoded ({kind}), which it could not read ({_why(exc)}). Send the image file itself, with "
                "Content-Type image/png, image/jpeg or application/octet-stream.")
    if isinstance(row, dict) and row and all(isinstance(v, BYTES_TYPES) and not len(v) for v in row.values()):
        return 400, "Bad Request", "invalid input", "empty request body: send the image file as the body"
    return 400, "Bad Request", "invalid input", _why(exc)


def _is_image_bomb(exc: BaseException | None) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    seen = 0
    while exc is not None and seen < 8:  # the inner handler may wrap Pillow's error in its own
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _content_type(context, i: int) -> str | None:
    """The Content-Type TorchServe recorded for request i (request header or body parameter)."""
    try:
        props = context.request_processor[i].get_request_properties()
    except (AttributeError, IndexError, TypeError):
        return None
    for key, value in props.items():
        if str(key).lower() == "content-type" and isinstance(value, str):
            return value
    for value in props.values():
        if isinstance(value, dict) and isinstance(value.get("content-type"), str):
            return value["content-type"]
    return None


def _record(metrics, method: str, name: str, value: float, model_name: str) -> None:
    try:
        from ts.metrics.dimension import Dimension

        # a fresh list each call: ts appends to the list it is given
        dims = [Dimension("ModelName", model_name), Dimension("Level", "Model")]
        getattr(metrics, method)(name, value, dimensions=dims)
    except Exception:  # noqa: BLE001 - metrics must never cost a prediction
        logger.exception("layerguard: could not record metric %s", name)


def _set_header(context, i: int, key: str, value: str) -> None:
    processors = getattr(context, "request_processor", None)
    if processors is not None and i < len(processors) and processors[i] is not None:
        context.set_response_header(i, key, value)


def _logits(output: Any) -> torch.Tensor:
    """The model output as [B, C] logits; the predicted class for scoring is their argmax."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ArtifactError(f"layerguard needs inference to return [batch, classes] logits, got {shape}")
    return output


def _device_of(inner: Any, model: Any) -> torch.device:
    device = getattr(inner, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

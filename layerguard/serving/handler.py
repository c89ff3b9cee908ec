"""The TorchServe handler that guards a model's own handler with layer-wise feature analysis.

`LayerGuardHandler` owns an *inner* handler - the one the original archive shipped - and lets it load the
model and do all the work a client sees. The guard only adds forward hooks on the calibrated layers, so one
forward pass both predicts and yields the features to score. Two ways, chosen per inner handler:
- BaseHandler lifecycle (no own `handle`): the batch is preprocessed in one call, as the inner handler would;
  if that fails, each request is preprocessed on its own (a corrupt image gets its own 400 and never fails
  its neighbours). The good ones go through one stacked forward pass, and every result is annotated (or,
  under the reject policy, replaced by a 403) in the inner handler's own shape.
- an inner handler with its own `handle`: that `handle` runs the batch (so its customisations hold), the
  guard watches the forward pass it makes and annotates its results; a failing batch is retried item by
  item so one bad input costs only its own request.
Explain and describe requests go to the inner handler's `handle` untouched. A guard that cannot load (a
tampered artifact, a model that does not match) does not fail the worker - TorchServe would retry forever
while clients hang - it answers every request with a prompt 503 naming the reason, counted in
LayerGuardGuardRefused.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.artifact import SIGNING_KEY_ENV, ArtifactError, CalibrationArtifact, read_signing_key
from ..core.capture import LayerCapture, ModifiedInPlace
from ..core.detector import Detector
from ..core.grouped import KEEP_WHOLE_UP_TO, keep_whole_limit
from ..core.host import match_blas_threads
from . import metrics as m
from .inner import GuardLoadError, device_of, guardable_model, load_inner_handler, overrides_handle
from .inputs import (
    default_max_pixels,
    image_bombs_are_errors,
    input_failure,
    limit_image_pixels,
    request_content_type,
    why,
)
from .policy import ServingPolicy, parse_policy

__all__ = ["ANNOTATION_KEY", "HEADER_GUARDED", "HEADER_POISONED", "HEADER_SCORE", "LayerGuardHandler"]

logger = logging.getLogger(__name__)

HEADER_POISONED = "X-LayerGuard-Poisoned"
HEADER_SCORE = "X-LayerGuard-Score"
HEADER_GUARDED = "X-LayerGuard-Guarded"
ANNOTATION_KEY = "layerguard"


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
        self.delegates_handle = False
        self.max_image_pixels = default_max_pixels(None)
        self.refused: str | None = None  # why the guard refused to load; every request is then answered 503
        self._metrics_primed = False  # set after the first batch has recorded every metric once

    # ---- lifecycle ----
    def initialize(self, context) -> None:
        """Load the inner handler and model, bind the artifact, hook its layers. Never raises: a failure
        puts the worker in the refused state (see the module docstring)."""
        self.context = context
        try:
            self._load(context)
        except Exception as exc:  # noqa: BLE001 - anything that stops the guard must stay answerable
            self._refuse(context, exc)
        self.initialized = True

    def _load(self, context) -> None:
        props = context.system_properties
        model_dir = props.get("model_dir")
        self.policy = parse_policy(getattr(context, "model_yaml_config", None))
        self.inner = load_inner_handler(self.policy.inner_handler)
        self.inner.initialize(context)
        self.device = device_of(self.inner, getattr(self.inner, "model", None))
        self.delegates_handle = overrides_handle(self.inner)
        artifact_path = Path(model_dir) / self.policy.artifact
        if not artifact_path.is_file() and self.policy.may_serve_unguarded:
            self._serve_unguarded(context, artifact_path)
            return
        self.model = guardable_model(getattr(self.inner, "model", None), context.manifest or {}, model_dir,
                                     self.device)
        self.inner.model = self.model
        key_file = os.environ.get(SIGNING_KEY_ENV)
        self.artifact = CalibrationArtifact.load(artifact_path, read_signing_key(key_file) if key_file else None)
        self.artifact.check_model(self.model)
        self.detector = self.artifact.detector(self.policy.threshold, device=self.device)
        match_blas_threads()  # scoring's numpy half stays within the worker's torch threads (core/host.py)
        self.max_image_pixels = self.policy.max_image_pixels or default_max_pixels(self.artifact.meta.input_shape)
        limit_image_pixels(self.max_image_pixels)  # after the inner handler: the guard's limit wins
        self.capture = LayerCapture(self.model, self.artifact.layer_names, capture_output=self.delegates_handle,
                                    reducer=self.detector.reducer(similarities=self.policy.response == "full"),
                                    keep_whole_up_to=KEEP_WHOLE_UP_TO)
        self.capture.attach()
        self._probe(context)
        logger.info("layerguard: guarding %s with rule %s at layers %s, policy %s, threshold %s, %s",
                    context.model_name, self.artifact.meta.rule, ",".join(self.artifact.layer_names),
                    self.policy.action, self.detector.policy.describe(),
                    "inner handle" if self.delegates_handle else "inner preprocess")

    def _refuse(self, context, exc: BaseException) -> None:
        self.refused = why(exc)
        self.detector = None
        if self.capture is not None:
            self.capture.detach()
        logger.error("layerguard: REFUSED to load model %s: %s. Every request is answered 503 with this reason "
                     "until the archive is fixed and re-registered.", getattr(context, "model_name", "?"),
                     self.refused)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:  # 1 for the refusal itself: alerts fire even before any request arrives
            m.record_counter(metrics, m.REFUSED, 1, context.model_name)

    @property
    def guarded(self) -> bool:
        return self.detector is not None

    def _serve_unguarded(self, context, artifact_path: Path) -> None:
        """The owner asked for it (`on_missing_calibration: serve_unguarded`): serve the inner handler as it
        is, say so loudly in the log, and mark every response and the metrics, so it cannot go unnoticed."""
        self.model = getattr(self.inner, "model", None)
        logger.error(
            "layerguard: NO CALIBRATION ARTIFACT at %s. Model %s is served UNGUARDED because "
            "handler.layerguard.on_missing_calibration is serve_unguarded: no input is checked for backdoor "
            "triggers. Every response carries %s: false and is counted in %s. Build the archive with "
            "`layerguard wrap` to guard it.", artifact_path, context.model_name, HEADER_GUARDED, m.UNGUARDED)

    def _probe(self, context) -> None:
        """One forward pass on zeros of the calibrated input shape: proves at load time that the hooks fire
        (they do not on ExportedProgram.module()), that the class count matches the artifact, and that no
        monitored output is changed in place later in the pass (else small batches cannot keep whole outputs
        to reduce after the pass, and every batch is reduced inside the hooks)."""
        shape = self.artifact.meta.input_shape
        self.inner.context = context
        try:
            output = self._probe_pass(shape) if shape else None
        except Exception as exc:  # noqa: BLE001 - e.g. a model that wants integer inputs: check per batch
            logger.warning("layerguard: load-time probe skipped (forward pass on zeros failed: %s)", why(exc))
            output = None
        if output is None:  # nothing proved that kept outputs stay as the layers returned them
            self.capture.keep_whole_up_to = 0
            return
        try:
            try:
                # small batches keep their outputs whole, as many rows as fit the memory budget (core/grouped.py)
                self.capture.keep_whole_up_to = keep_whole_limit(
                    self.capture.features(), self.detector.computes_similarities(self.policy.response == "full"))
            except ModifiedInPlace:
                logger.info("layerguard: a monitored output is modified in place later in the forward pass; "
                            "every batch is reduced inside the hooks")
                self.capture.keep_whole_up_to = 0
                output = self._probe_pass(shape)
                self.capture.features()
        except RuntimeError as exc:
            raise GuardLoadError(f"layerguard hooks did not capture the calibrated layers: {exc}") from exc
        self.artifact.check_output_classes(int(_logits(output).shape[1]))

    def _probe_pass(self, shape: tuple[int, ...]) -> Any:
        """The probe's forward pass, under no_grad: version counters stay on, so in-place changes show."""
        self.capture.clear()
        with torch.no_grad():
            return self.model(torch.zeros((1, *shape), device=self.device))

    # ---- requests ----
    def handle(self, data: list, context) -> list:
        """One result per request, in order; failures are per item and never raise out of the worker."""
        start = time.perf_counter()
        self.context = context
        if self.inner is not None:
            self.inner.context = context
        if _is_describe(context) and self.refused is not None:
            return [{"layerguard": {"state": "refused", "reason": self.refused}}]  # visible on the management API
        if self.refused is None and self.inner is not None and _is_explain_or_describe(context):
            return self.inner.handle(data, context)  # not a prediction: the inner handler's own answer
        batch = _Batch(len(data))
        try:
            if self.refused is not None:
                self._answer_refused(context, batch)
            elif self.delegates_handle:
                self._handle_delegated(data, context, batch)
            else:
                self._handle_items(data, context, batch)
        except Exception as exc:  # noqa: BLE001 - last resort: answer every open item, keep the worker
            logger.exception("layerguard: unexpected failure in batch")
            for i in batch.open_items():
                batch.fail(context, i, 500, "Internal Server Error", "layerguard failure", str(exc))
                batch.errors += 1
        for i in range(len(data)):
            _set_header(context, i, HEADER_GUARDED, "true" if self.guarded else "false")
        self._emit_metrics(context, batch)
        if not self.delegates_handle and getattr(context, "metrics", None) is not None:
            m.record_handler_time(context.metrics, (time.perf_counter() - start) * 1000.0)
        return batch.responses

    def _answer_refused(self, context, batch: _Batch) -> None:
        for i in range(len(batch.responses)):
            batch.fail(context, i, 503, "Service Unavailable", "model refused to load",
                       f"layerguard refused to load this model: {self.refused}. `layerguard inspect` on the "
                       "archive shows what is wrong; fix it (re-run `layerguard wrap`) and restart TorchServe "
                       "with the fixed archive.")
        batch.refused = len(batch.responses)

    # -- the BaseHandler lifecycle: the batch in one preprocess call, or request by request when that fails --
    def _handle_items(self, data: list, context, batch: _Batch) -> None:
        whole = self._preprocess_whole(data)
        if whole is not None:  # the common case: every input read, one tensor, one forward pass
            self._run_group(list(range(len(data))), whole, context, batch)
            return
        groups: dict[Any, list[tuple[int, Any]]] = {}
        for i, row in enumerate(data):
            try:
                with image_bombs_are_errors():
                    x = self.inner.preprocess([row])
            except Exception as exc:  # noqa: BLE001 - a bad input is the client's problem, not the batch's
                batch.invalid += 1
                batch.fail(context, i, *input_failure(row, exc, request_content_type(context, i),
                                                      self.max_image_pixels))
                continue
            # Tensors of one shape are stacked into one forward pass; anything else runs on its own.
            stackable = isinstance(x, torch.Tensor) and x.dim() >= 1
            key = (tuple(x.shape[1:]), x.dtype) if stackable else ("own", i)
            groups.setdefault(key, []).append((i, x))
        for items in groups.values():
            indices = [i for i, _ in items]
            inputs = items[0][1] if len(items) == 1 else torch.cat([x for _, x in items])
            self._run_group(indices, inputs, context, batch)

    def _preprocess_whole(self, data: list) -> torch.Tensor | None:
        """The inner preprocess on the whole batch, as the inner handler itself would call it: one call instead
        of one per request (what the per-item loop costs is the inner handler's per-call overhead, paid again
        for every request). None - then each request is preprocessed on its own, so a bad input fails only
        its own request - when it raises, or returns anything but one tensor row per request."""
        if len(data) < 2:
            return None
        try:
            with image_bombs_are_errors():
                x = self.inner.preprocess(data)
        except Exception:  # noqa: BLE001 - some input is bad: the per-request path finds which, and says why
            return None
        return x if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == len(data) else None

    def _run_group(self, indices: list[int], inputs: Any, context, batch: _Batch) -> None:
        """One forward pass for these items, then scoring, then the inner postprocess. Each stage that fails
        answers all of the group's items with a 5xx (counted in LayerGuardErrors) and never an unchecked 200."""
        try:
            if self.capture is not None:
                self.capture.clear()  # this group's activations only: nothing survives from an earlier pass
            output = self.inner.inference(inputs)
        except Exception as exc:  # noqa: BLE001
            logger.exception("layerguard: inner inference failed")
            batch.fail_all(context, indices, 503, "Service Unavailable", "inference failed", why(exc))
            return
        notes = self._detect(indices, output, context, batch) if self.guarded else [None] * len(indices)
        if notes is None:
            return
        try:
            results = self.inner.postprocess(output)
            _check_results(results, len(indices))
        except Exception as exc:  # noqa: BLE001
            logger.exception("layerguard: inner postprocess failed")
            batch.fail_all(context, indices, 503, "Service Unavailable", "postprocess failed", why(exc))
            return
        for j, i in enumerate(indices):
            self._answer(i, results[j], notes[j], context, batch)

    # -- an inner handler with its own handle --
    def _handle_delegated(self, data: list, context, batch: _Batch, indices: list[int] | None = None) -> None:
        """Run the inner `handle` on the batch and annotate its results; on failure, retry item by item."""
        indices = list(range(len(data))) if indices is None else indices
        rows = [data[i] for i in indices]
        try:
            if self.capture is not None:
                self.capture.clear()
            with image_bombs_are_errors():
                results = self.inner.handle(rows, context)
            _check_results(results, len(rows))
        except Exception as exc:  # noqa: BLE001
            if len(indices) > 1:
                for i in indices:
                    self._handle_delegated(data, context, batch, [i])
                return
            i = indices[0]
            batch.invalid += 1
            batch.fail(context, i, *input_failure(data[i], exc, request_content_type(context, i),
                                                  self.max_image_pixels))
            return
        notes = (self._detect(indices, self.capture.model_output, context, batch) if self.guarded
                 else [None] * len(indices))
        if notes is None:
            return
        for j, i in enumerate(indices):
            self._answer(i, results[j], notes[j], context, batch)

    # -- verdicts --
    def _detect(self, indices: list[int], output: Any, context, batch: _Batch) -> list[dict] | None:
        """Per-item verdicts from the hooked activations of this forward pass; None when scoring failed
        (those items are then answered 500: fail closed)."""
        start = time.perf_counter()
        try:
            logits = _logits(output)
            if logits.shape[0] != len(indices):
                raise ValueError(f"the watched forward pass had {logits.shape[0]} rows for {len(indices)} inputs "
                                 "(the handler ran the model more than once per batch?)")
            detection = self.detector.score_capture(self.capture, logits.argmax(dim=1),
                                                    similarities=self.policy.response == "full")
            return detection.items(self.artifact.layer_names, self.detector.rule.term_names,
                                   compact=self.policy.response == "compact")
        except Exception as exc:  # noqa: BLE001 - fail closed for these items, keep the worker
            if isinstance(exc, ModifiedInPlace):  # the probe could not see it: reduce in the hooks from now on
                self.capture.keep_whole_up_to = 0
            logger.exception("layerguard: detection failed")
            batch.fail_all(context, indices, 500, "Internal Server Error", "detection failed", why(exc))
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
                      f"{note['threshold']:.4f} ({self.artifact.meta.rule})")
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
        Prometheus from the start and alerts have data."""
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        name = context.model_name
        if self.refused is not None:
            counters = {m.REFUSED: batch.refused}
        elif self.guarded:
            counters = {m.CHECKED: batch.checked, m.FLAGGED: batch.flagged, m.ERRORS: batch.errors,
                        m.INVALID: batch.invalid}
        else:
            counters = {m.UNGUARDED: batch.unguarded, m.ERRORS: batch.errors, m.INVALID: batch.invalid}
        first = not self._metrics_primed
        self._metrics_primed = True
        for metric, value in counters.items():
            if value or first:
                m.record_counter(metrics, metric, value, name)
        if self.guarded and first:
            m.record_gauge(metrics, m.EXPECTED_FLAG_RATE, 100.0 * self.expected_flag_rate, "percent", name)
        if self.guarded and (batch.checked or first):
            m.record_latency(metrics, batch.detect_seconds * 1000.0, name)

    @property
    def expected_flag_rate(self) -> float:
        """The benign false-positive rate this detector was calibrated to: the target, or for tau (and for a
        target held with a confidence, whose expected rate is below it) the share of out-of-fold benign
        references it flags."""
        policy = self.detector.policy
        if policy.target_fpr is not None and policy.confidence is None:
            return policy.target_fpr
        return self.detector.benign.flagged_share(policy)


class _Batch:
    """Per-batch bookkeeping: responses in request order and the counts behind the metrics."""

    def __init__(self, size: int) -> None:
        self.responses: list[Any] = [None] * size
        self._answered = [False] * size
        # Every item lands in exactly one of: checked (a verdict was answered), invalid (4xx: the input could
        # not be read), errors (5xx: the server failed), unguarded (answered without the detector), refused
        # (503: the guard refused to load).
        self.checked = self.flagged = self.errors = self.invalid = self.unguarded = self.refused = 0
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


def _header_is_true(context, key: str) -> bool:
    """BaseHandler's own test: the frontend marks explanation and describe requests with a header."""
    try:
        return context.get_request_header(0, key) == "True"
    except (AttributeError, IndexError, KeyError, TypeError):
        return False


def _is_describe(context) -> bool:
    return _header_is_true(context, "describe")


def _is_explain_or_describe(context) -> bool:
    return _header_is_true(context, "explain") or _is_describe(context)


def _check_results(results: Any, n: int) -> None:
    if not isinstance(results, list) or len(results) != n:
        size = len(results) if hasattr(results, "__len__") else "?"
        raise ValueError(f"the handler returned {type(results).__name__} of length {size} for {n} inputs")


def _set_header(context, i: int, key: str, value: str) -> None:
    processors = getattr(context, "request_processor", None)
    if processors is not None and i < len(processors) and processors[i] is not None:
        context.set_response_header(i, key, value)


def _logits(output: Any) -> torch.Tensor:
    """The model output as [B, C] logits; the predicted class for scoring is their argmax."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ArtifactError(f"layerguard needs the model to return [batch, classes] logits, got {shape}")
    return output

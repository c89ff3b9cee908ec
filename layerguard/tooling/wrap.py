"""`layerguard wrap`: turn an existing TorchServe .mar into a guarded one, calibrated on benign images.

The original archive is only read. Its files are extracted to a scratch directory, its own handler loads
the model there (through a real ts.context.Context, exactly as a worker would), and the reference images
go through that handler's own preprocess one request at a time - so calibration sees exactly the tensors
serving will see. The guarded archive then carries the original files unchanged, the calibration
artifact, layerguard's runtime (core + serving) and a model-config.yaml whose `handler.layerguard` block
names the original handler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.artifact import CalibrationArtifact
from ..core.layers import plan_for
from ..serving.inner import guardable_model, load_inner_handler, model_dir_imports, overrides_handle
from ..serving.policy import ServingPolicy, parse_policy
from .archive import GUARD_HANDLER_FILE, ArchiveError, extract_mar, read_yaml, write_guarded_archive
from .calibration import CalibrationConfig, calibrate
from .data import ReferenceSource, open_reference
from .worker import index_to_name, set_requests, worker_context

__all__ = ["ArchiveModel", "WrapConfig", "WrapError", "WrapResult", "calibrate_archive", "guarded_model_config",
           "load_extracted", "open_archive", "wrap_mar"]


class WrapError(ArchiveError):
    """The archive or the reference data cannot be wrapped; the message says what to change."""


@dataclass(frozen=True)
class WrapConfig:
    """Everything `layerguard wrap` takes besides the archive and the references."""

    out_dir: Path = Path("model-store")
    model_name: str | None = None
    action: str = "annotate"
    calibration: CalibrationConfig = CalibrationConfig()
    threshold_override: bool = False  # write the policy into model-config.yaml (else the artifact's applies)
    layers: tuple[str, ...] | None = None
    exclude_logits: bool = False
    batch_size: int | None = None  # TorchServe batchSize for the guarded model
    max_batch_delay: int = 100
    response: str = "full"  # "compact": verdicts without per-layer detail (the cheaper responses, serving.md)
    calibration_batch_size: int = 64
    gpu: int | None = None
    force: bool = False
    signing_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WrapResult:
    mar_path: Path
    model_name: str
    artifact: CalibrationArtifact
    policy: ServingPolicy
    num_reference: int


@dataclass
class ArchiveModel:
    """An archive opened as a worker would: its model and its handler's preprocess, for one payload."""

    model_dir: Path
    manifest: dict
    handler: Any
    model: nn.Module
    device: torch.device

    def prepare(self, payload: bytes, source: str) -> torch.Tensor:
        """The tensor the handler feeds the model for this payload: its preprocess, or - for a handler with
        its own `handle` - whatever that handle passes to the model's forward."""
        try:
            x = self._through_handle(payload) if overrides_handle(self.handler) else \
                self.handler.preprocess([{"data": payload}])
        except Exception as exc:  # noqa: BLE001 - name the file, whatever the handler raised
            raise WrapError(f"the handler's preprocess rejected image {source}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(x, torch.Tensor):
            raise WrapError(f"the handler's preprocess returned {type(x).__name__}; layerguard needs a tensor")
        return x.to(self.device)

    def _through_handle(self, payload: bytes) -> torch.Tensor:
        captured: list = []
        hook = self.model.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        try:
            set_requests(self.handler.context, 1)
            self.handler.handle([{"data": payload}], self.handler.context)
        finally:
            hook.remove()
        if not captured:
            raise WrapError("the handler's handle never ran the model")
        return captured[-1]

    def batches(self, data: ReferenceSource, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The data's images through the handler's preprocess, in batches, with their labels."""
        for start in range(0, len(data), batch_size):
            idx = range(start, min(start + batch_size, len(data)))
            yield (torch.cat([self.prepare(data.payload(i), data.describe(i)) for i in idx]),
                   torch.from_numpy(data.labels[list(idx)]))

    def class_names(self, data: ReferenceSource, num_classes: int) -> list[str] | None:
        """The archive's index_to_name.json when the data only numbers its classes, else the data's names."""
        if data.numeric_names:
            return index_to_name(self.model_dir, num_classes) or list(data.class_names)
        return list(data.class_names)


@contextlib.contextmanager
def open_archive(mar: str | Path, gpu: int | None = None) -> Iterator[ArchiveModel]:
    """Extract `mar` to a scratch directory and load its model through its own handler."""
    with tempfile.TemporaryDirectory(prefix="layerguard-archive-") as scratch:
        model_dir = Path(scratch)
        manifest = extract_mar(mar, model_dir)
        with load_extracted(model_dir, manifest, gpu) as loaded:
            yield loaded


@contextlib.contextmanager
def load_extracted(model_dir: Path, manifest: dict, gpu: int | None) -> Iterator[ArchiveModel]:
    model_meta = manifest.get("model") or {}
    spec = model_meta.get("handler") or ""
    if not spec:
        raise WrapError("the archive names no handler in its manifest")
    if Path(spec.split(":")[0]).stem == Path(GUARD_HANDLER_FILE).stem:
        raise WrapError("the archive is already guarded by layerguard: wrap or calibrate the original archive")
    config_name = model_meta.get("configFile")
    yaml_config = read_yaml(model_dir / config_name) if config_name else {}
    with model_dir_imports(model_dir):
        context = worker_context(model_dir, manifest, yaml_config, gpu=gpu)
        handler = load_inner_handler(spec)
        handler.initialize(context)
        handler.context = context
        device = getattr(handler, "device", None) or torch.device("cpu")
        model = guardable_model(getattr(handler, "model", None), manifest, str(model_dir), device)
        model.eval()
        yield ArchiveModel(model_dir, manifest, handler, model, device)


def calibrate_archive(loaded: ArchiveModel, reference: ReferenceSource, config: CalibrationConfig,
                      layers: tuple[str, ...] | None = None, exclude_logits: bool = False, batch_size: int = 64,
                      progress: Callable[[int], None] | None = None) -> CalibrationArtifact:
    """Calibrate an opened archive on the handler's preprocess of the reference images."""
    sample = loaded.prepare(reference.payload(0), reference.describe(0))
    with torch.no_grad():
        num_classes = int(loaded.model(sample).shape[1])
    if reference.labels.max() >= num_classes or reference.labels.min() < 0:
        raise WrapError(f"reference labels run {reference.labels.min()}..{reference.labels.max()} but the model "
                        f"has {num_classes} outputs")
    plan = plan_for(loaded.model, sample, list(layers) if layers else None, exclude_logits=exclude_logits)
    names = loaded.class_names(reference, num_classes)
    if config.class_names is None and names:
        config = dataclasses.replace(config, class_names=tuple(names))
    return calibrate(loaded.model, lambda: loaded.batches(reference, batch_size), plan, num_classes, config=config,
                     input_shape=tuple(sample.shape[1:]), progress=progress)


def wrap_mar(mar: str | Path, reference: str | Path | ReferenceSource, config: WrapConfig = WrapConfig(),
             progress: Callable[[int], None] | None = None) -> WrapResult:
    """Build `out_dir/<model_name>.mar`, a guarded copy of `mar`; returns where it is and what it holds."""
    mar = Path(mar).resolve()
    if not mar.is_file():
        raise WrapError(f"{mar} not found")
    out_dir = Path(config.out_dir).resolve()
    data = reference if isinstance(reference, ReferenceSource) else open_reference(reference)
    with tempfile.TemporaryDirectory(prefix="layerguard-wrap-") as scratch:
        scratch = Path(scratch)
        original = scratch / "original"
        original.mkdir()
        manifest = extract_mar(mar, original)
        model_meta = manifest.get("model") or {}
        name = config.model_name or model_meta.get("modelName")
        target = out_dir / f"{name}.mar"
        if target.resolve() == mar:
            raise WrapError(f"the guarded archive would overwrite the original {mar}; pass another --out or "
                            "--model-name")
        if target.exists() and not config.force:
            raise WrapError(f"{target} exists; pass --force to replace it")
        config_name = model_meta.get("configFile")
        yaml_config = read_yaml(original / config_name) if config_name else {}
        with load_extracted(original, manifest, config.gpu) as loaded:
            artifact = calibrate_archive(loaded, data, config.calibration, config.layers, config.exclude_logits,
                                         config.calibration_batch_size, progress)
        policy = ServingPolicy(inner_handler=model_meta["handler"], action=config.action,
                               threshold=config.calibration.policy if config.threshold_override else None,
                               response=config.response)
        guarded_config = guarded_model_config(yaml_config, policy, config.batch_size, config.max_batch_delay)
        parse_policy(guarded_config)  # what the worker will read must parse
        mar_path = write_guarded_archive(scratch, original, manifest, name, artifact, guarded_config, out_dir,
                                         config.signing_key)
    return WrapResult(mar_path, name, artifact, policy, len(data))


def guarded_model_config(original: dict, policy: ServingPolicy, batch_size: int | None, max_batch_delay: int
                         ) -> dict:
    """The original model-config.yaml plus the layerguard block (and the batch size, if one is asked for)."""
    config = json.loads(json.dumps(original))  # deep copy of plain YAML data
    handler = config.get("handler") or {}
    if not isinstance(handler, dict):
        raise WrapError("the archive's model-config.yaml has a `handler` that is not a mapping")
    handler["layerguard"] = policy.to_config()
    config["handler"] = handler
    if batch_size is not None:
        if batch_size < 1:
            raise WrapError("--batch-size must be at least 1")
        config["batchSize"] = batch_size
        config["maxBatchDelay"] = int(config.get("maxBatchDelay", max_batch_delay))
    return config

"""`layerguard wrap`: turn an existing TorchServe .mar into a guarded one, calibrated on benign images.

The original archive is only read. Its files are extracted to a scratch directory, its own handler loads
the model there (through a real ts.context.Context, exactly as a worker would), and the reference images
go through that handler's own preprocess one request at a time - so calibration sees exactly the tensors
serving will see. The guarded archive then carries the original files unchanged, the calibration
artifact, a copy of the layerguard package (the serving side needs only torch, torchserve, numpy, pillow
and pyyaml) and a model-config.yaml whose `handler.layerguard` block names the original handler.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .artifact import DEFAULT_FILENAME, CalibrationArtifact
from .calibration import CalibrationConfig, calibrate
from .data import DataError, list_class_images
from .detector import ThresholdPolicy
from .layers import plan_for
from .policy import ServingPolicy, parse_policy
from .serving import guardable_model, load_inner_handler, model_dir_imports

GUARD_HANDLER_FILE = "layerguard_handler.py"
CONFIG_FILE = "model-config.yaml"
PACKAGE_DIR = Path(__file__).resolve().parent
ENTRY_HANDLER = PACKAGE_DIR.parent / "handler.py"
ENTRY_SOURCE = (
    "from layerguard.serving import LayerGuardHandler\n\n\n"
    "class GuardedHandler(LayerGuardHandler):\n"
    '    """The handler class TorchServe finds in this module."""\n'
)


class WrapError(ValueError):
    """The archive or the reference data cannot be wrapped; the message says what to change."""


@dataclass(frozen=True)
class ReferenceData:
    """Benign reference requests: the raw bytes a client would send, their true labels and class names."""

    payloads: list[bytes]
    labels: np.ndarray
    class_names: list[str] | None
    sources: list[str]


@dataclass(frozen=True)
class WrapResult:
    mar_path: Path
    model_name: str
    artifact: CalibrationArtifact
    policy: ServingPolicy
    num_reference: int


# ---- reference data -----------------------------------------------------------------------------------
def load_reference(path: str | Path) -> ReferenceData:
    """A folder of class sub-folders of images (digit names are class indices, otherwise sorted names are)
    or an .npz with `x` (uint8 or [0, 1] float images, [N,H,W] or [N,H,W,C]) and `y` labels."""
    path = Path(path)
    if path.is_dir():
        return _reference_folder(path)
    if path.suffix == ".npz" and path.is_file():
        return _reference_npz(path)
    raise WrapError(f"reference data {path} must be a folder of class sub-folders of images or an .npz with x, y")


def _reference_folder(root: Path) -> ReferenceData:
    """Raw bytes of every image: the handler's own preprocess decodes them, exactly as in serving."""
    try:
        items, class_names = list_class_images(root)
    except DataError as exc:
        raise WrapError(str(exc)) from exc
    numeric = all(name.isdigit() for name in class_names)
    return ReferenceData([path.read_bytes() for path, _ in items],
                         np.asarray([label for _, label in items], dtype=np.int64),
                         None if numeric else list(class_names), [str(path) for path, _ in items])


def _reference_npz(path: Path) -> ReferenceData:
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz.files or "y" not in npz.files:
            raise WrapError(f"{path} must hold arrays x (images) and y (labels); it has {', '.join(npz.files)}")
        x, y = npz["x"], npz["y"]
        names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else None
    if len(x) != len(y):
        raise WrapError(f"{path}: x has {len(x)} images but y has {len(y)} labels")
    return ReferenceData([encode_png(img) for img in x], y.astype(np.int64).reshape(-1), names,
                         [f"{path}[{i}]" for i in range(len(x))])


def encode_png(image: np.ndarray) -> bytes:
    """One image as PNG bytes (what a client would upload): uint8 as is, floats in [0, 1] scaled by 255."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64) * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255)
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1).squeeze()  # CHW -> HWC
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---- the original archive ----------------------------------------------------------------------------
def read_manifest(mar: str | Path) -> dict:
    """MAR-INF/MANIFEST.json of a .mar (zip) without extracting it."""
    try:
        with zipfile.ZipFile(mar) as zf:
            return json.loads(zf.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise WrapError(f"{mar} is not a readable .mar (zip with MAR-INF/MANIFEST.json): {exc}") from exc


def extract_mar(mar: str | Path, dest: Path) -> dict:
    """Extract safely (no absolute or parent paths) and return the manifest."""
    manifest = read_manifest(mar)
    with zipfile.ZipFile(mar) as zf:
        for member in zf.namelist():
            target = (dest / member).resolve()
            if not str(target).startswith(str(dest.resolve())):
                raise WrapError(f"{mar} holds an unsafe path {member!r}")
        zf.extractall(dest)
    return manifest


def ts_context(model_dir: str | Path, manifest: dict, model_yaml_config: dict | None = None,
               batch_size: int = 1, gpu: int | None = None):
    """A real ts.context.Context like the one a worker builds (metrics cache included), with one request."""
    import ts
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = manifest.get("model", {}).get("modelName", "model")
    context = Context(metrics.model_name, str(model_dir), manifest, batch_size, gpu, ts.__version__,
                      metrics=metrics, model_yaml_config=model_yaml_config or {})
    set_requests(context, 1)
    return context


def set_requests(context, n: int, headers: Sequence[dict] | None = None) -> None:
    """Give `context` n fresh requests (ids and per-request status/headers), as ts.service.predict does."""
    from ts.context import RequestProcessor

    context.request_ids = {i: f"req-{i}" for i in range(n)}
    context.request_processor = [RequestProcessor(dict(headers[i]) if headers else {}) for i in range(n)]
    if context.metrics is not None:
        context.metrics.request_ids = context.request_ids


# ---- calibration through the inner handler ------------------------------------------------------------
def calibrate_archive(
    model_dir: Path,
    manifest: dict,
    inner_spec: str,
    reference: ReferenceData,
    model_yaml_config: dict | None = None,
    threshold: ThresholdPolicy = ThresholdPolicy(),
    layers: Sequence[str] | None = None,
    exclude_logits: bool = False,
    batch_size: int = 64,
    holdout_fraction: float = 0.5,
    min_per_class: int = 10,
    gpu: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> CalibrationArtifact:
    """Load the model with its own handler in `model_dir` and calibrate on the handler's preprocess."""
    with model_dir_imports(model_dir):
        context = ts_context(model_dir, manifest, model_yaml_config, gpu=gpu)
        inner = load_inner_handler(inner_spec)
        inner.initialize(context)
        inner.context = context
        device = getattr(inner, "device", None) or torch.device("cpu")
        model = guardable_model(getattr(inner, "model", None), manifest, str(model_dir), device)
        model.eval()

        def prepare(i: int) -> torch.Tensor:
            try:
                x = inner.preprocess([{"data": reference.payloads[i]}])
            except Exception as exc:  # noqa: BLE001 - name the file, whatever the handler raised
                raise WrapError(f"the handler's preprocess rejected reference image {reference.sources[i]}: "
                                f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(x, torch.Tensor):
                raise WrapError(f"the handler's preprocess returned {type(x).__name__}; layerguard needs a tensor")
            return x.to(device)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start in range(0, len(reference.payloads), batch_size):
                idx = range(start, min(start + batch_size, len(reference.payloads)))
                yield torch.cat([prepare(i) for i in idx]), torch.from_numpy(reference.labels[list(idx)])

        sample = prepare(0)
        with torch.no_grad():
            num_classes = int(model(sample).shape[1])
        if reference.labels.max() >= num_classes or reference.labels.min() < 0:
            raise WrapError(f"reference labels run {reference.labels.min()}..{reference.labels.max()} but the model "
                            f"has {num_classes} outputs")
        plan = plan_for(model, sample, list(layers) if layers else None, exclude_logits=exclude_logits)
        names = reference.class_names or _index_to_name(model_dir, num_classes)
        config = CalibrationConfig(policy=threshold, holdout_fraction=holdout_fraction,
                                   min_per_class=min_per_class, class_names=tuple(names) if names else None)
        return calibrate(model, batches, plan, num_classes, config=config,
                         input_shape=tuple(sample.shape[1:]), progress=progress)


def _index_to_name(model_dir: Path, num_classes: int) -> list[str] | None:
    path = model_dir / "index_to_name.json"
    if not path.is_file():
        return None
    mapping = json.loads(path.read_text())
    return [str(mapping.get(str(i), i)) for i in range(num_classes)]


# ---- the guarded archive ------------------------------------------------------------------------------
def wrap_mar(
    mar: str | Path,
    reference: str | Path | ReferenceData,
    out_dir: str | Path = "model-store",
    *,
    model_name: str | None = None,
    action: str = "annotate",
    tau: float | None = None,
    target_fpr: float | None = None,
    batch_size: int | None = None,
    max_batch_delay: int = 100,
    layers: Sequence[str] | None = None,
    exclude_logits: bool = False,
    holdout_fraction: float = 0.5,
    min_per_class: int = 10,
    gpu: int | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> WrapResult:
    """Build `out_dir/<model_name>.mar`, a guarded copy of `mar`; returns where it is and what it holds."""
    mar = Path(mar).resolve()
    if not mar.is_file():
        raise WrapError(f"{mar} not found")
    override = (tau, target_fpr) != (None, None)
    threshold = ThresholdPolicy(tau=tau, target_fpr=target_fpr) if override else ThresholdPolicy()
    out_dir = Path(out_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="layerguard-wrap-") as scratch:
        scratch = Path(scratch)
        original = scratch / "original"
        original.mkdir()
        manifest = extract_mar(mar, original)
        model = manifest.get("model") or {}
        name = model_name or model.get("modelName")
        target = out_dir / f"{name}.mar"
        if target.resolve() == mar:
            raise WrapError(f"the guarded archive would overwrite the original {mar}; pass another --out or "
                            "--model-name")
        if target.exists() and not force:
            raise WrapError(f"{target} exists; pass --force to replace it")
        inner_spec = model.get("handler") or ""
        if not inner_spec:
            raise WrapError(f"{mar} names no handler in its manifest")
        if Path(inner_spec.split(":")[0]).stem == Path(GUARD_HANDLER_FILE).stem:
            raise WrapError(f"{mar} is already guarded by layerguard")
        reference = reference if isinstance(reference, ReferenceData) else load_reference(reference)
        config_name = model.get("configFile")
        yaml_config = _read_yaml(original / config_name) if config_name else {}
        artifact = calibrate_archive(original, manifest, inner_spec, reference, yaml_config, threshold, layers,
                                     exclude_logits=exclude_logits, holdout_fraction=holdout_fraction,
                                     min_per_class=min_per_class, gpu=gpu,
                                     progress=progress)
        policy = ServingPolicy(inner_handler=inner_spec, action=action,
                               threshold=threshold if override else None)
        guarded_config = _guarded_config(yaml_config, policy, batch_size, max_batch_delay)
        parse_policy(guarded_config)  # what the worker will read must parse
        mar_path = _archive(scratch, original, manifest, name, artifact, guarded_config, config_name, out_dir)
    return WrapResult(mar_path, name, artifact, policy, len(reference.payloads))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise WrapError(f"{path.name} in the archive is not a YAML mapping")
    return data


def _guarded_config(original: dict, policy: ServingPolicy, batch_size: int | None, max_batch_delay: int) -> dict:
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


def _copy_package(dest: Path) -> None:
    """The layerguard package as plain source (no caches), importable from the worker's model dir."""
    shutil.copytree(PACKAGE_DIR, dest / "layerguard",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "tests"))


def _archive(scratch: Path, original: Path, manifest: dict, name: str, artifact: CalibrationArtifact,
             config: dict, config_name: str | None, out_dir: Path) -> Path:
    """Stage the files and let torch-model-archiver write the .mar (its manifest format, its filters)."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    model = manifest["model"]
    staged = scratch / "staged"
    shutil.copytree(original, staged, ignore=shutil.ignore_patterns("MAR-INF", "__pycache__"))
    if config_name:
        (staged / config_name).unlink(missing_ok=True)
    for clash in ("layerguard", GUARD_HANDLER_FILE, DEFAULT_FILENAME, CONFIG_FILE):
        if (staged / clash).exists():
            raise WrapError(f"the original archive already holds {clash}; rename it there first")
    _copy_package(staged)
    artifact.save(staged / DEFAULT_FILENAME)
    extras = scratch / "files"
    (extras / "config").mkdir(parents=True)
    handler_file = extras / GUARD_HANDLER_FILE
    if ENTRY_HANDLER.is_file():
        shutil.copy(ENTRY_HANDLER, handler_file)
    else:  # installed without the top-level handler.py
        handler_file.write_text(ENTRY_SOURCE)
    config_file = extras / "config" / CONFIG_FILE
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    serialized = model.get("serializedFile")
    model_file = model.get("modelFile")
    requirements = model.get("requirementsFile")
    archiver = ModelArchiverConfig(
        model_name=name,
        handler=str(handler_file),
        version=str(model.get("modelVersion") or "1.0"),
        serialized_file=str(staged / serialized) if serialized else None,
        model_file=str(staged / model_file) if model_file else None,
        extra_files=str(staged),
        export_path=str(out_dir),
        force=True,
        requirements_file=str(staged / requirements) if requirements else None,
        config_file=str(config_file),
        runtime=manifest.get("runtime", "python"),
    )
    # The archiver stages in tempfile.gettempdir()/<name>: point it at our scratch so that concurrent
    # wraps of equally named models never share a directory.
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        generate_model_archive(archiver)
    finally:
        tempfile.tempdir = saved
    return out_dir / f"{name}.mar"


# ---- command line -------------------------------------------------------------------------------------
def add_wrap_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `layerguard wrap` (also usable as `calibrate.py --mar`)."""
    parser.add_argument("--mar", required=True, help="the original .mar (left untouched)")
    parser.add_argument("--data", required=True,
                        help="benign reference images: folder of class sub-folders, or .npz with x, y")
    parser.add_argument("--out", default="model-store", help="folder for the guarded .mar (default model-store)")
    parser.add_argument("--model-name", help="name of the guarded model (default: the original's)")
    parser.add_argument("--policy", choices=("annotate", "reject"), default="annotate",
                        help="annotate flagged inputs (default) or reject them with HTTP 403")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tau", type=float, help="threshold = mean - tau * std of benign scores (default 2.5)")
    group.add_argument("--target-fpr", type=float, help="threshold at this benign false-positive rate")
    parser.add_argument("--batch-size", type=int, help="TorchServe batchSize written to model-config.yaml")
    parser.add_argument("--max-batch-delay", type=int, default=100, help="maxBatchDelay in ms (default 100)")
    parser.add_argument("--layers", help="comma-separated module names to monitor (default: automatic)")
    parser.add_argument("--exclude-logits", action="store_true",
                        help="leave the output layer out of the automatic window (docs/method.md)")
    parser.add_argument("--holdout-fraction", type=float, default=0.5)
    parser.add_argument("--min-per-class", type=int, default=10)
    parser.add_argument("--gpu", type=int, help="calibrate on this CUDA device (default CPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing guarded .mar")
    return parser


def run_wrap(args: argparse.Namespace) -> int:
    """Run `layerguard wrap`; prints a summary, returns the exit status (errors are one clear line)."""
    logging.getLogger("ts").setLevel(logging.ERROR)  # TorchServe's import-time notes (no ONNX, no IPEX...)
    try:
        result = wrap_mar(
            args.mar, args.data, args.out, model_name=args.model_name, action=args.policy, tau=args.tau,
            target_fpr=args.target_fpr, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
            layers=[s.strip() for s in args.layers.split(",")] if args.layers else None,
            exclude_logits=args.exclude_logits, holdout_fraction=args.holdout_fraction,
            min_per_class=args.min_per_class, gpu=args.gpu,
            force=args.force,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"layerguard wrap: error: {exc}", file=sys.stderr)
        return 2
    art = result.artifact
    threshold = result.policy.threshold or art.policy
    print(f"guarded archive: {result.mar_path}")
    print(f"  model {result.model_name}, {art.num_classes} classes, {result.num_reference} reference images")
    print(f"  layers: {', '.join(art.layer_names)}")
    print(f"  policy: {result.policy.action}, threshold {threshold.describe()}")
    print(f"serve it: torchserve --start --ncs --ts-config config.properties --models {result.model_name}.mar")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_wrap_arguments(argparse.ArgumentParser(prog="layerguard wrap", description=__doc__.split("\n")[0]))
    return run_wrap(parser.parse_args(argv))

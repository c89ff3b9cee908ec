"""Command line: `calibrate.py` / `layerguard calibrate` (and `layerguard wrap` for .mar files).

Exit codes: 0 success, 2 bad arguments or data (a clear message, no artifact written), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .artifact import DEFAULT_FILENAME, CalibrationArtifact
from .calibration import CalibrationConfig, CalibrationError, calibrate
from .capture import CaptureError
from .data import DataError, ImageTransform, ReferenceSource, open_reference
from .detector import ThresholdPolicy
from .layers import (
    LayerSelectionError,
    all_module_outputs,
    default_plan,
    discover_layers,
    format_layer_table,
    plan_for,
)
from .modelio import ModelLoadError, load_eager_model
from .offline import detection_quality, score_batches
from .packaging import add_wrap_arguments, run_wrap
from .progress import Progress

USER_ERRORS = (DataError, CalibrationError, LayerSelectionError, ModelLoadError, CaptureError, ValueError)
# (packaging.WrapError and artifact.ArtifactError are ValueErrors too)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _size(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model (an eager model, as torch-model-archiver packages it)")
    model.add_argument("--model-file", type=Path, help="Python file defining the model's nn.Module class")
    model.add_argument("--weights", type=Path, help="state_dict saved with torch.save(model.state_dict())")
    model.add_argument("--model-class", help="class to use when the model file defines several")
    model.add_argument("--device", default="cpu", help="torch device for calibration (default: cpu)")
    model.add_argument("--mar", type=Path,
                       help="a TorchServe archive instead of --model-file/--weights: its own handler loads the "
                            "model and preprocesses the reference images, so calibration sees what serving sees "
                            "(`layerguard wrap` also builds the guarded archive)")

    data = p.add_argument_group("benign reference data")
    data.add_argument("--data", type=Path,
                      help="folder of class subfolders of images (ROOT/<class>/<image>), or an .npz with images "
                           "and labels; about 100 benign images per class is the method's amount")
    data.add_argument("--x-key", default="x", help="array of images in the .npz (default: x)")
    data.add_argument("--y-key", default="y", help="array of integer labels in the .npz (default: y)")
    data.add_argument("--class-names", help="comma-separated class names in output order "
                      "(default: folder names, numerically when they are all integers)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image channels the model takes")
    data.add_argument("--input-size", type=_size, help="resize images to HxW (e.g. 32 or 224x224)")
    data.add_argument("--mean", type=_floats, help="per-channel normalisation mean, e.g. 0.49,0.48,0.45")
    data.add_argument("--std", type=_floats, help="per-channel normalisation std")
    data.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")

    method = p.add_argument_group("method")
    method.add_argument("--layers", help="comma-separated module names to monitor, in forward order "
                        "(default: stage outputs L/2..L found by tracing one forward pass)")
    method.add_argument("--exclude-logits", action="store_true",
                        help="leave the model's output layer out of the default window and the LOI search "
                        "(see docs/method.md: helps when the LOI lands on the logits for every class)")
    method.add_argument("--list-layers", action="store_true",
                        help="print the model's candidate layers (and every usable module name) and exit")
    thr = method.add_mutually_exclusive_group()
    thr.add_argument("--tau", type=float, help="threshold = mean - tau * std of benign scores per class "
                     "(the paper's rule; default 2.5)")
    thr.add_argument("--target-fpr", type=float,
                     help="threshold = this quantile of benign scores per class, e.g. 0.01 (scores are not Gaussian)")
    method.add_argument("--holdout-fraction", type=float, default=0.5,
                        help="share of each class's references kept out of the centroids and used for the "
                             "threshold statistics (default 0.5; 0 = the notebook's in-sample way)")
    method.add_argument("--min-per-class", type=int, default=10,
                        help="refuse classes with fewer reference images than this (default 10)")

    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", type=Path, default=Path(DEFAULT_FILENAME),
                     help=f"artifact path (default: {DEFAULT_FILENAME})")
    out.add_argument("--poisoned", type=Path,
                     help="optional known-poisoned images (folder or .npz) to report TPR, FPR and AUROC")
    out.add_argument("--benign-test", type=Path,
                     help="benign images never used in calibration, for the FPR (default: the reference data, "
                          "reported as in-sample)")
    out.add_argument("--target-class", type=int,
                     help="attack target: TPR then counts only successful attacks (predicted as the target, "
                          "true label another class), as the paper does")
    out.add_argument("--report", type=Path, help="write an HTML report with plots to this folder "
                     "(needs matplotlib: pip install layerguard[report])")
    out.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="calibrate.py",
        description="Calibrate layerguard's backdoor-input detector on benign reference images and write "
                    "the calibration artifact that the TorchServe handler loads.",
    )
    add_calibrate_arguments(p)
    return p


def _transform(args: argparse.Namespace) -> ImageTransform:
    if (args.mean is None) != (args.std is None):
        raise DataError("give both --mean and --std, or neither")
    return ImageTransform(channels=args.channels, size=args.input_size, mean=args.mean, std=args.std)


def _class_names(args: argparse.Namespace) -> list[str] | None:
    return [c.strip() for c in args.class_names.split(",")] if args.class_names else None


def _policy(args: argparse.Namespace) -> ThresholdPolicy:
    if args.target_fpr is not None:
        return ThresholdPolicy(tau=None, target_fpr=args.target_fpr)
    return ThresholdPolicy(tau=2.5 if args.tau is None else args.tau)


def format_summary(artifact: CalibrationArtifact) -> str:
    """Per-class table: samples used, LOI, mean and std of the benign score, threshold."""
    names, thresholds = artifact.class_names, artifact.thresholds()
    width = max(5, *(len(n) for n in names))
    rows = [f"{'class':<{width}}  {'centroid n':>10} {'threshold n':>11}  {'layer of interest':<24} "
            f"{'score mean':>10} {'score std':>9} {'threshold':>9}"]
    for c, name in enumerate(names):
        rows.append(
            f"{name:<{width}}  {artifact.counts_centroid[c]:>10} {artifact.counts_threshold[c]:>11}  "
            f"{artifact.layer_names[artifact.loi[c]]:<24} {artifact.score_mean[c]:>10.4f} "
            f"{artifact.score_std[c]:>9.4f} {thresholds[c]:>9.4f}"
        )
    return "\n".join(rows)


def run_calibrate(args: argparse.Namespace) -> int:
    if args.mar is not None:
        return _calibrate_mar(args)
    if args.model_file is None or args.weights is None:
        raise DataError("--model-file and --weights (or --mar) are required")
    model = load_eager_model(args.model_file, args.weights, args.model_class, args.device)
    if args.data is None:
        raise DataError("--data is required: benign reference images")
    transform = _transform(args)
    source = open_reference(args.data, transform, _class_names(args), args.x_key, args.y_key)
    source.validate()
    sample = next(source.batches(1))[0].to(args.device)
    if args.list_layers:
        candidates = discover_layers(model, sample)
        plan = default_plan(candidates, exclude_logits=args.exclude_logits)
        print("Candidate layers (stage outputs, forward order; * = monitored by default):")
        print(format_layer_table(candidates, plan))
        print("\nEvery module --layers may name:")
        print(format_layer_table(all_module_outputs(model, sample)))
        return 0
    layers = [n.strip() for n in args.layers.split(",")] if args.layers else None
    plan = plan_for(model, sample, layers, exclude_logits=args.exclude_logits)
    with torch.no_grad():
        num_outputs = model(sample).shape[-1]
    if num_outputs != len(source.class_names):
        raise DataError(f"the model outputs {num_outputs} classes but the data has {len(source.class_names)} "
                        "class names; pass --class-names for every output class")
    config = CalibrationConfig(policy=_policy(args), holdout_fraction=args.holdout_fraction,
                               min_per_class=args.min_per_class, class_names=tuple(source.class_names))
    progress = Progress(2 * len(source), "calibrating (2 passes)", enabled=not args.quiet)
    artifact = calibrate(model, lambda: source.batches(args.batch_size), plan, num_outputs, config,
                         input_shape=tuple(sample.shape[1:]), progress=progress)
    path = artifact.save(args.output)
    print(f"monitored layers ({len(plan.layers)} of L={plan.total_layers}): {', '.join(plan.layers)}")
    print(f"threshold rule: {config.policy.describe()}, holdout fraction {config.holdout_fraction}")
    print(format_summary(artifact))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    scored = _evaluate(args, model, artifact, source, transform) if args.poisoned else {}
    if args.report:
        from .report import write_report

        index = write_report(args.report, artifact, model=model, reference=source, args=args, **scored)
        print(f"report: {index}")
    return 0


def _calibrate_mar(args: argparse.Namespace) -> int:
    """Calibrate a .mar through its own handler; writes the artifact (and the report), not an archive."""
    import tempfile

    from .packaging import calibrate_archive, extract_mar, load_reference

    if args.poisoned or args.list_layers:
        raise DataError("--poisoned and --list-layers need --model-file/--weights; with --mar, calibrate only")
    if args.data is None:
        raise DataError("--data is required: benign reference images")
    reference = load_reference(args.data)
    with tempfile.TemporaryDirectory(prefix="layerguard-calibrate-") as scratch:
        model_dir = Path(scratch)
        manifest = extract_mar(args.mar, model_dir)
        handler = (manifest.get("model") or {}).get("handler") or ""
        progress = Progress(2 * len(reference.payloads), "calibrating (2 passes)", enabled=not args.quiet)
        layers = [n.strip() for n in args.layers.split(",")] if args.layers else None
        artifact = calibrate_archive(model_dir, manifest, handler, reference, threshold=_policy(args),
                                     layers=layers, exclude_logits=args.exclude_logits,
                                     batch_size=args.batch_size,
                                     holdout_fraction=args.holdout_fraction, min_per_class=args.min_per_class,
                                     progress=progress)
    path = artifact.save(args.output)
    print(f"monitored layers: {', '.join(artifact.layer_names)}")
    print(format_summary(artifact))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.report:
        from .report import write_report

        print(f"report: {write_report(args.report, artifact)}")
    return 0


def _evaluate(args: argparse.Namespace, model: torch.nn.Module, artifact: CalibrationArtifact,
              reference: ReferenceSource, transform: ImageTransform) -> dict:
    """Print TPR/FPR/AUROC on known-poisoned images; return the scored sets for the report."""
    detector = artifact.detector(device=args.device)
    names = artifact.class_names
    poisoned_src = open_reference(args.poisoned, transform, names, args.x_key, args.y_key)
    benign_src = (open_reference(args.benign_test, transform, names, args.x_key, args.y_key)
                  if args.benign_test else reference)
    benign = score_batches(model, detector, benign_src.batches(args.batch_size))
    poisoned = score_batches(model, detector, poisoned_src.batches(args.batch_size))
    quality = detection_quality(benign, poisoned, args.target_class)
    where = "held-out benign images" if args.benign_test else "the reference images (in-sample)"
    print(f"detection on known-poisoned images, FPR on {where}: {quality}")
    label = "held-out benign" if args.benign_test else "reference (in-sample)"
    return {"benign": benign, "benign_label": label, "poisoned": poisoned, "target_class": args.target_class}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _guarded(run_calibrate, args)


def _guarded(fn, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def layerguard_main(argv: list[str] | None = None) -> int:
    """`layerguard calibrate ...` and `layerguard wrap ...`."""
    p = argparse.ArgumentParser(prog="layerguard", description="Backdoor-input detection for TorchServe.")
    sub = p.add_subparsers(dest="command", required=True)
    add_calibrate_arguments(sub.add_parser("calibrate", help="calibrate an eager model on benign images"))
    add_wrap_arguments(sub.add_parser("wrap", help="make a guarded .mar from an existing .mar"))
    args = p.parse_args(argv)
    return _guarded(run_wrap if args.command == "wrap" else run_calibrate, args)

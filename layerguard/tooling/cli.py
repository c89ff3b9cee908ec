"""Command line: `calibrate.py` / `layerguard calibrate`, `layerguard wrap` and `layerguard inspect`.

The only module that sees argparse: each command turns its arguments into the library's typed config
objects and calls the library. Exit codes: 0 success, 2 bad arguments or data (a clear message, no
artifact written), 1 anything else (and, for `inspect`, an archive that does not verify).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..core.artifact import DEFAULT_FILENAME, SIGNING_KEY_ENV, read_signing_key
from ..core.capture import CaptureError
from ..core.detector import DEFAULT_FOLDS
from ..core.layers import (
    LayerSelectionError,
    all_module_outputs,
    default_plan,
    discover_layers,
    format_layer_table,
    parse_layer_list,
    plan_for,
)
from ..core.rules import DEFAULT_RULE, RULES, parse_rule_options
from ..core.thresholds import DEFAULT_TARGET_FPR, DEFAULT_TAU, ThresholdPolicy
from ..serving.inner import GuardLoadError
from ..serving.policy import RESPONSES
from .archive import ArchiveError
from .calibration import CalibrationConfig, CalibrationError, calibrate
from .data import DataError, ImageTransform, ReferenceSource, open_reference
from .evaluation import ScoredSet, detection_quality, score_batches
from .inspect import inspect_archive
from .modelio import ModelLoadError, load_eager_model
from .progress import Progress
from .summary import describe_calibration, format_class_table
from .wrap import WrapConfig, open_archive, wrap_mar

__all__ = ["calibrate_main", "main"]

USER_ERRORS = (DataError, CalibrationError, LayerSelectionError, ModelLoadError, CaptureError, ArchiveError,
               GuardLoadError, ValueError)
REFERENCE_HELP = ("benign reference images: a folder of class sub-folders (ROOT/<class>/<image>) or an .npz with "
                  "images x and labels y. They must be images the model NEVER trained on (held-out or fresh data): "
                  "thresholds fitted on training images are too tight and flag more benign inputs than asked. "
                  "About 100 per class.")
FPR_WARN_FACTOR = 2.0


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _size(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


# ---- shared argument groups ---------------------------------------------------------------------------------
def _add_method_arguments(p: argparse.ArgumentParser) -> None:
    method = p.add_argument_group("method")
    method.add_argument("--rule", choices=tuple(RULES), default=DEFAULT_RULE,
                        help=f"scoring rule (default {DEFAULT_RULE}; cosine-loi is the paper's; docs/method.md and "
                             "docs/benchmarks.md say how the default was chosen)")
    method.add_argument("--rule-option", action="append", metavar="KEY=VALUE",
                        help="a rule option, repeatable: mahalanobis layers=all|penultimate, "
                             "reference=predicted|nearest")
    method.add_argument("--layers", help="comma-separated module names to monitor, in forward order "
                        "(default: stage outputs L/2..L found by tracing one forward pass)")
    method.add_argument("--exclude-logits", action="store_true",
                        help="leave the model's output layer out of the default window and the LOI search")
    thr = method.add_mutually_exclusive_group()
    thr.add_argument("--target-fpr", type=float,
                     help=f"flag at this benign false-positive rate (default {DEFAULT_TARGET_FPR}), set on "
                          "cross-fitted reference scores")
    thr.add_argument("--tau", type=float, help=f"the paper's threshold: class mean - tau * class std of benign "
                     f"scores (the paper uses {DEFAULT_TAU})")
    method.add_argument("--fpr-confidence", type=float, metavar="P",
                        help="make the target FPR an upper bound that holds with probability P (e.g. 0.95) over "
                             "the draw of the references, instead of the expected rate: flags fewer inputs, needs "
                             "at least log(1-P)/log(1-target) references (docs/method.md)")
    method.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help=f"k-fold cross-fitting of the thresholds over the references (default "
                             f"{DEFAULT_FOLDS}); 1 = the paper notebook's in-sample way (statistics and thresholds "
                             "from the same images)")
    method.add_argument("--min-per-class", type=int, default=10,
                        help="refuse classes with fewer reference images than this (default 10)")


def _add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    ev = p.add_argument_group("evaluation (optional)")
    ev.add_argument("--benign-test", type=Path,
                    help="benign images never used in calibration nor training: prints the false-positive rate "
                         "delivered on them and warns when it exceeds twice the target")
    ev.add_argument("--poisoned", type=Path, help="known-poisoned images (folder or .npz): prints TPR and AUROC")
    ev.add_argument("--target-class", type=int,
                    help="attack target: TPR then counts only successful attacks (predicted as the target, true "
                         "label another class), as the paper does")


def _config(args: argparse.Namespace, class_names: Iterable[str] | None = None) -> CalibrationConfig:
    return CalibrationConfig(rule=args.rule, rule_options=parse_rule_options(args.rule_option),
                             policy=ThresholdPolicy.from_options(args.tau, args.target_fpr, args.fpr_confidence),
                             folds=args.folds,
                             min_per_class=args.min_per_class,
                             class_names=tuple(class_names) if class_names else None)


# ---- calibrate ----------------------------------------------------------------------------------------------
def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model (an eager model as torch-model-archiver packages it, or an archive)")
    model.add_argument("--model-file", type=Path, help="Python file defining the model's nn.Module class")
    model.add_argument("--weights", type=Path, help="state_dict saved with torch.save(model.state_dict())")
    model.add_argument("--model-class", help="class to use when the model file defines several")
    model.add_argument("--device", default="cpu", help="torch device for calibration (default: cpu)")
    model.add_argument("--mar", type=Path,
                       help="a TorchServe archive instead of --model-file/--weights: its own handler loads the "
                            "model and preprocesses the images, so calibration sees what serving sees "
                            "(`layerguard wrap` also builds the guarded archive)")
    data = p.add_argument_group("benign reference data")
    data.add_argument("--data", type=Path, help=REFERENCE_HELP)
    data.add_argument("--x-key", default="x", help="array of images in the .npz (default: x)")
    data.add_argument("--y-key", default="y", help="array of integer labels in the .npz (default: y)")
    data.add_argument("--class-names", help="comma-separated class names in output order "
                      "(default: folder names, numerically when they are all integers)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image channels the model takes")
    data.add_argument("--input-size", type=_size, help="resize images to HxW (e.g. 32 or 224x224)")
    data.add_argument("--mean", type=_floats, help="per-channel normalisation mean, e.g. 0.49,0.48,0.45")
    data.add_argument("--std", type=_floats, help="per-channel normalisation std")
    data.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    _add_method_arguments(p)
    p.add_argument("--list-layers", action="store_true",
                   help="print the model's candidate layers, every module of each, and exit")
    _add_evaluation_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--output", "-o", type=Path, default=Path(DEFAULT_FILENAME),
                     help=f"artifact path (default: {DEFAULT_FILENAME})")
    out.add_argument("--report", type=Path, help="write an HTML report with plots to this folder "
                     "(needs matplotlib: pip install layerguard[report])")
    out.add_argument("--quiet", action="store_true", help="no progress output")


class _Model:
    """The model to calibrate and how to turn a data source into its input batches."""

    def __init__(self, model: torch.nn.Module, batches: Callable[[ReferenceSource], Iterable], sample: torch.Tensor,
                 class_names: Callable[[ReferenceSource, int], list[str] | None]) -> None:
        self.model, self.batches, self.sample, self.class_names = model, batches, sample, class_names


def run_calibrate(args: argparse.Namespace) -> int:
    if args.data is None and not args.list_layers:
        raise DataError("--data is required: benign reference images")
    if args.mar is not None:
        with open_archive(args.mar) as loaded:
            source = open_reference(args.data, None, _names(args), args.x_key, args.y_key)
            sample = loaded.prepare(source.payload(0), source.describe(0))
            model = _Model(loaded.model, lambda src: loaded.batches(src, args.batch_size), sample,
                           loaded.class_names)
            return _calibrate(args, model, source, lambda path, names: open_reference(path, None, names, args.x_key,
                                                                                    args.y_key))
    if args.model_file is None or args.weights is None:
        raise DataError("--model-file and --weights (or --mar) are required")
    net = load_eager_model(args.model_file, args.weights, args.model_class, args.device)
    transform = _transform(args)
    source = open_reference(args.data, transform, _names(args), args.x_key, args.y_key)
    source.validate()
    sample = next(source.batches(1))[0].to(args.device)
    model = _Model(net, lambda src: src.batches(args.batch_size), sample,
                   lambda src, n: list(src.class_names))
    return _calibrate(args, model, source, lambda path, names: open_reference(path, transform, names, args.x_key,
                                                                            args.y_key))


def _calibrate(args: argparse.Namespace, m: _Model, source: ReferenceSource,
               open_like: Callable[[Path, list[str]], ReferenceSource]) -> int:
    if args.list_layers:
        candidates = discover_layers(m.model, m.sample)
        print("Candidate layers (stage outputs, forward order; * = monitored by default; a stage is watched at "
              "its last module):")
        print(format_layer_table(candidates, default_plan(candidates, exclude_logits=args.exclude_logits)))
        print("\nEvery module --layers may name:")
        print(format_layer_table(all_module_outputs(m.model, m.sample)))
        return 0
    plan = plan_for(m.model, m.sample, parse_layer_list(args.layers), exclude_logits=args.exclude_logits)
    with torch.no_grad():
        num_outputs = int(m.model(m.sample).shape[-1])
    names = m.class_names(source, num_outputs) or list(source.class_names)
    if num_outputs != len(names):
        raise DataError(f"the model outputs {num_outputs} classes but the data has {len(names)} class names; "
                        "pass --class-names for every output class")
    config = _config(args, names)
    progress = Progress(2 * len(source), "calibrating (2 passes)", enabled=not args.quiet)
    artifact = calibrate(m.model, lambda: m.batches(source), plan, num_outputs, config,
                         input_shape=tuple(m.sample.shape[1:]), progress=progress)
    path = artifact.save(args.output)
    detector = artifact.detector(device=args.device if args.mar is None else "cpu")
    print(describe_calibration(artifact, detector))
    print(format_class_table(artifact, detector))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    scored = _evaluate(args, m, detector, names, open_like)
    if args.report:
        from .report import ReportData, write_report

        print(f"report: {write_report(args.report, ReportData(artifact, **scored))}")
    return 0


def _evaluate(args: argparse.Namespace, m: _Model, detector, names: list[str],
              open_like: Callable[[Path, list[str]], ReferenceSource]) -> dict:
    """Score the held-out benign and known-poisoned sets (when given); print FPR/TPR/AUROC; warn on FPR."""
    out: dict = {}
    if args.benign_test is not None:
        benign = score_batches(m.model, detector, m.batches(open_like(args.benign_test, names)))
        out.update(benign=benign, benign_label="held-out benign")
        _report_fpr(benign, detector.policy)
    if args.poisoned is not None:
        poisoned = score_batches(m.model, detector, m.batches(open_like(args.poisoned, names)))
        out.update(poisoned=poisoned, target_class=args.target_class)
        if "benign" in out:
            print(f"detection on known-poisoned images, FPR on held-out benign images: "
                  f"{detection_quality(out['benign'], poisoned, args.target_class)}")
        else:
            counted = poisoned.poisoned if args.target_class is None else poisoned.poisoned[
                (poisoned.predicted == args.target_class) & (poisoned.labels != args.target_class)]
            print(f"detection on known-poisoned images: TPR {100 * counted.mean():.2f}% over {counted.size} "
                  "(add --benign-test for the FPR and AUROC)")
    return out


def _report_fpr(benign: ScoredSet, policy: ThresholdPolicy) -> None:
    fpr = float(benign.poisoned.mean())
    print(f"false-positive rate delivered on {len(benign.scores)} held-out benign images: {100 * fpr:.2f}%"
          + (f" (target {100 * policy.target_fpr:.2f}%)" if policy.target_fpr is not None else ""))
    if policy.target_fpr is not None and fpr > FPR_WARN_FACTOR * policy.target_fpr:
        print(f"WARNING: the delivered false-positive rate {100 * fpr:.2f}% is more than twice the target "
              f"{100 * policy.target_fpr:.2f}%. Most often the references are images the model trained on (use "
              "held-out images), too few per class, or unlike the traffic served. Recalibrate before serving.",
              file=sys.stderr)


def _transform(args: argparse.Namespace) -> ImageTransform:
    if (args.mean is None) != (args.std is None):
        raise DataError("give both --mean and --std, or neither")
    return ImageTransform(channels=args.channels, size=args.input_size, mean=args.mean, std=args.std)


def _names(args: argparse.Namespace) -> list[str] | None:
    return [c.strip() for c in args.class_names.split(",")] if args.class_names else None


# ---- wrap ---------------------------------------------------------------------------------------------------
def add_wrap_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mar", required=True, type=Path, help="the original .mar (left untouched)")
    p.add_argument("--data", required=True, type=Path, help=REFERENCE_HELP)
    p.add_argument("--out", type=Path, default=Path("model-store"), help="folder for the guarded .mar "
                   "(default model-store)")
    p.add_argument("--model-name", help="name of the guarded model (default: the original's)")
    p.add_argument("--policy", choices=("annotate", "reject"), default="annotate",
                   help="annotate flagged inputs (default) or reject them with HTTP 403")
    p.add_argument("--response", choices=RESPONSES, default="full",
                   help="full (default): per-layer similarities and terms in every response; compact: verdict, "
                        "score, threshold and layer of interest only, which costs the worker less "
                        "(written to model-config.yaml as `response`, editable later)")
    _add_method_arguments(p)
    p.add_argument("--batch-size", type=int, help="TorchServe batchSize written to model-config.yaml")
    p.add_argument("--max-batch-delay", type=int, default=100, help="maxBatchDelay in ms (default 100)")
    p.add_argument("--gpu", type=int, help="calibrate on this CUDA device (default CPU)")
    p.add_argument("--signing-key", type=Path,
                   help=f"sign the artifact with this key file (HMAC-SHA256); workers with {SIGNING_KEY_ENV} set "
                        "to the same file refuse unsigned or foreign artifacts")
    p.add_argument("--force", action="store_true", help="replace an existing guarded .mar")
    p.add_argument("--benign-test", type=Path,
                   help="benign images never used in calibration nor training: prints the false-positive rate "
                        "delivered on them through the archive's handler and warns when it exceeds twice the target")
    p.add_argument("--quiet", action="store_true", help="print only where the archive is, no table or progress")


def _quiet_ts(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command with TorchServe's import-time notes (no ONNX, no OpenVINO...) silenced, then restore."""

    def run(args: argparse.Namespace) -> int:
        ts_logger = logging.getLogger("ts")
        level = ts_logger.level
        ts_logger.setLevel(logging.ERROR)
        try:
            return fn(args)
        finally:
            ts_logger.setLevel(level)

    return run


def run_wrap(args: argparse.Namespace) -> int:
    return _quiet_ts(_wrap)(args)


def _wrap(args: argparse.Namespace) -> int:
    reference = open_reference(args.data)
    config = WrapConfig(
        out_dir=args.out, model_name=args.model_name, action=args.policy, calibration=_config(args),
        threshold_override=False, layers=tuple(parse_layer_list(args.layers) or ()) or None,
        exclude_logits=args.exclude_logits, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
        response=args.response, gpu=args.gpu, force=args.force,
        signing_key=read_signing_key(args.signing_key) if args.signing_key else None,
    )
    progress = Progress(2 * len(reference), "calibrating (2 passes)", enabled=not args.quiet)
    result = wrap_mar(args.mar, reference, config, progress=progress)
    print(f"guarded archive: {result.mar_path}")
    if not args.quiet:
        art = result.artifact
        detector = art.detector()
        print(f"  model {result.model_name}, {art.num_classes} classes, {result.num_reference} reference images, "
              f"policy {result.policy.action}" + (", artifact signed" if config.signing_key else "")
              + (f", response {result.policy.response}" if result.policy.response != "full" else ""))
        print(describe_calibration(art, detector))
        print(format_class_table(art, detector))
        if args.benign_test is not None:
            with open_archive(result.mar_path) as loaded:
                benign = open_reference(args.benign_test, None, art.class_names)
                _report_fpr(score_batches(loaded.model, detector, loaded.batches(benign, 64)), detector.policy)
        print(f"serve it: torchserve --start --ncs --ts-config config.properties --model-store {args.out} "
              f"--models {result.model_name}.mar")
    return 0


# ---- inspect ------------------------------------------------------------------------------------------------
def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", type=Path, help="a guarded .mar (as written by `layerguard wrap`)")
    p.add_argument("--signing-key", type=Path, help=f"verify the artifact's signature with this key file "
                   f"(default: ${SIGNING_KEY_ENV} when set)")


def run_inspect(args: argparse.Namespace) -> int:
    return _quiet_ts(_inspect)(args)


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_archive(args.archive, args.signing_key)
    print(report.text())
    return 0 if report.ok else 1


# ---- entry points -------------------------------------------------------------------------------------------
def _guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    try:
        return fn(args)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def calibrate_main(argv: list[str] | None = None) -> int:
    """`calibrate.py ...` (same as `layerguard calibrate ...`)."""
    p = argparse.ArgumentParser(prog="calibrate.py", description="Calibrate layerguard's backdoor-input detector "
                                "on benign reference images and write the artifact the TorchServe handler loads.")
    add_calibrate_arguments(p)
    return _guarded(run_calibrate, p.parse_args(argv), "calibrate.py")


def main(argv: list[str] | None = None) -> int:
    """`layerguard calibrate|wrap|inspect ...`."""
    p = argparse.ArgumentParser(prog="layerguard", description="Backdoor-input detection for TorchServe.")
    sub = p.add_subparsers(dest="command", required=True)
    commands = {
        "calibrate": (add_calibrate_arguments, run_calibrate, "calibrate a model on benign images"),
        "wrap": (add_wrap_arguments, run_wrap, "make a guarded .mar from an existing .mar"),
        "inspect": (add_inspect_arguments, run_inspect, "verify and describe a guarded .mar"),
    }
    for name, (add, _, text) in commands.items():
        add(sub.add_parser(name, help=text, description=text))
    args = p.parse_args(argv)
    return _guarded(commands[args.command][1], args, f"layerguard {args.command}")

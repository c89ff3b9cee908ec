"""The per-class calibration table that calibrate.py, `layerguard wrap`, `layerguard inspect`, the demo and
the report all show: one definition, so they never disagree."""

from __future__ import annotations

from ..core.artifact import CalibrationArtifact
from ..core.detector import Detector
from ..core.thresholds import ThresholdPolicy, fpr_spread, references_for_spread

__all__ = ["CLASS_TABLE_HEAD", "bounded_fpr_note", "class_table_rows", "describe_calibration", "expected_fpr_note",
           "format_class_table"]

CLASS_TABLE_HEAD = ("class", "references", "layer of interest", "score mean", "score std", "threshold")


def class_table_rows(artifact: CalibrationArtifact, detector: Detector | None = None) -> list[list[str]]:
    det = detector or artifact.detector()
    names = artifact.class_names
    return [[names[c], str(int(det.counts[c])), artifact.layer_names[int(det.loi[c])],
             _number(det.benign.score_mean[c]), _number(det.benign.score_std[c]), _number(det.thresholds[c])]
            for c in range(artifact.num_classes)]


def _number(value: float) -> str:
    text = f"{value:.4f}"
    return text[1:] if text == "-0.0000" else text  # a standardised mean of -1e-17 is zero, not negative


def format_class_table(artifact: CalibrationArtifact, detector: Detector | None = None) -> str:
    """Aligned text: references per class, layer of interest, out-of-fold score mean/std, threshold."""
    rows = [list(CLASS_TABLE_HEAD)] + class_table_rows(artifact, detector)
    widths = [max(len(r[i]) for r in rows) for i in range(len(CLASS_TABLE_HEAD))]
    left = {0, 2}
    return "\n".join("  ".join(v.ljust(widths[i]) if i in left else v.rjust(widths[i]) for i, v in enumerate(r))
                     for r in rows)


def expected_fpr_note(target_fpr: float, n_references: int, spread: float = 0.0025) -> str:
    """What FPR to expect on new benign traffic, with the spread that the number of references allows."""
    sd = fpr_spread(target_fpr, n_references)
    note = (f"expected FPR on new benign traffic with the references' class mix: {100 * target_fpr:.2f}% "
            f"+/- {100 * sd:.2f} points (1 sd, from {n_references} references)")
    need = references_for_spread(target_fpr, spread)
    if need > n_references:
        note += f"; {need} references would narrow it to +/- {100 * spread:.2f}"
    return note


def bounded_fpr_note(policy: ThresholdPolicy, flagged_share: float, n_references: int) -> str:
    """What a target held with a confidence delivers: at most the target with that probability, and about the
    share of references flagged on average."""
    return (f"FPR on new benign traffic with the references' class mix: at most {100 * policy.target_fpr:.2f}% "
            f"with {100 * policy.confidence:g}% confidence, about {100 * flagged_share:.2f}% expected "
            f"(from {n_references} references; more references bring the expected rate closer to the bound)")


def describe_calibration(artifact: CalibrationArtifact, detector: Detector | None = None) -> str:
    """Rule, layers, threshold policy, what it delivered on the out-of-fold references and what to expect."""
    det = detector or artifact.detector()
    meta = artifact.meta
    options = ", ".join(f"{k}={v}" for k, v in sorted(meta.rule_options.items()))
    folds = "in-sample (the paper's notebook)" if meta.folds == 1 else f"{meta.folds}-fold cross-fitted"
    share = det.benign.flagged_share(det.policy)
    text = (f"rule {meta.rule}{f' ({options})' if options else ''}; monitored layers ({len(meta.layer_names)} of "
            f"L={meta.total_layers}): {', '.join(meta.layer_names)}\n"
            f"threshold {det.policy.describe()}, {folds}: flags {100 * share:.2f}% of the "
            f"{len(det.benign.scores)} benign references out-of-fold")
    if det.policy.target_fpr is not None and det.policy.confidence is not None:
        text += "\n" + bounded_fpr_note(det.policy, share, len(det.benign.scores))
    elif det.policy.target_fpr is not None:
        text += "\n" + expected_fpr_note(det.policy.target_fpr, len(det.benign.scores))
    stages = [f"  {name} = {how}" for name, how in zip(meta.layer_names, meta.layer_computations) if how != name]
    return text + ("\nwhere each monitored layer is the output of:\n" + "\n".join(stages) if stages else "")

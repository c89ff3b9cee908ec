"""The method, free of any serving or build concerns: capture, layers, statistics, rules, thresholds, artifact.

A TorchServe worker imports only this package and `layerguard.serving`.
"""

from .artifact import ArtifactError, ArtifactMeta, CalibrationArtifact, model_fingerprint
from .capture import CaptureError, LayerCapture
from .detector import Detection, Detector, DetectorFitter, DetectorSpec
from .layers import LayerPlan, LayerSelectionError, default_plan, discover_layers, plan_for
from .rules import DEFAULT_RULE, RULES, FitError
from .thresholds import DEFAULT_TARGET_FPR, DEFAULT_TAU, ThresholdPolicy

__all__ = [
    "DEFAULT_RULE", "DEFAULT_TARGET_FPR", "DEFAULT_TAU", "RULES", "ArtifactError", "ArtifactMeta",
    "CalibrationArtifact", "CaptureError", "Detection", "Detector", "DetectorFitter", "DetectorSpec", "FitError",
    "LayerCapture", "LayerPlan", "LayerSelectionError", "ThresholdPolicy", "default_plan", "discover_layers",
    "model_fingerprint", "plan_for",
]

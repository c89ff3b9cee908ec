"""The serving policy: what the guard does with a flagged input, read from the archive's model-config.yaml.

layerguard's keys live in their own block, `handler: {layerguard: {...}}`, so they never collide with the
keys the wrapped handler reads from the same `handler:` section (TorchServe's `profile`, a user's own
settings). Inside that block every key is known: a typo such as `polcy: reject` is refused when the model
loads, rather than silently serving with the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.artifact import DEFAULT_FILENAME
from ..core.thresholds import ThresholdPolicy

__all__ = ["ACTIONS", "ON_MISSING", "RESPONSES", "SECTION", "PolicyError", "ServingPolicy", "parse_policy"]

SECTION = "layerguard"
ACTIONS = ("annotate", "reject")
ON_MISSING = ("refuse", "serve_unguarded")
RESPONSES = ("full", "compact")
KNOWN_KEYS = {
    "inner_handler": "the wrapped model's own handler (written by `layerguard wrap`)",
    "policy": "annotate (default) or reject",
    "tau": "threshold = mean - tau * std of benign scores (overrides the calibrated policy)",
    "target_fpr": "threshold at this benign false-positive rate (overrides the calibrated policy)",
    "fpr_confidence": "with target_fpr: the rate is an upper bound that holds with this probability (e.g. 0.95) "
                      "instead of the expected rate",
    "artifact": f"calibration artifact file in the archive (default {DEFAULT_FILENAME})",
    "reject_status": "HTTP status for a rejected input (default 403)",
    "on_missing_calibration": "refuse (default: the model does not load) or serve_unguarded (serve without "
                              "the detector when the artifact file is absent, with a loud warning)",
    "max_image_pixels": "largest image (width x height) a request may declare (default: 64x the calibrated "
                        "input area, within 1 to 25 megapixels)",
    "response": "full (default: per-layer similarities and terms in every response) or compact (verdict, "
                "score, threshold, layer of interest only)",
}


class PolicyError(ValueError):
    """model-config.yaml has a layerguard setting that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ServingPolicy:
    inner_handler: str
    action: str = "annotate"
    threshold: ThresholdPolicy | None = None  # None: the policy chosen at calibration
    artifact: str = DEFAULT_FILENAME
    reject_status: int = 403
    on_missing_calibration: str = "refuse"
    max_image_pixels: int | None = None  # None: follows the calibrated input size (serving.inputs)
    response: str = "full"

    @property
    def rejects(self) -> bool:
        return self.action == "reject"

    @property
    def may_serve_unguarded(self) -> bool:
        return self.on_missing_calibration == "serve_unguarded"

    def to_config(self) -> dict[str, Any]:
        """The `handler.layerguard` block that `parse_policy` reads back to this policy."""
        block: dict[str, Any] = {"inner_handler": self.inner_handler, "policy": self.action}
        if self.threshold is not None:
            block.update(self.threshold.as_dict())
        if self.artifact != DEFAULT_FILENAME:
            block["artifact"] = self.artifact
        if self.reject_status != 403:
            block["reject_status"] = self.reject_status
        if self.on_missing_calibration != "refuse":
            block["on_missing_calibration"] = self.on_missing_calibration
        if self.max_image_pixels is not None:
            block["max_image_pixels"] = self.max_image_pixels
        if self.response != "full":
            block["response"] = self.response
        return block


def parse_policy(model_yaml_config: Mapping[str, Any] | None) -> ServingPolicy:
    """Read `handler.layerguard` from the parsed model-config.yaml (TorchServe's model_yaml_config)."""
    handler = (model_yaml_config or {}).get("handler") or {}
    if not isinstance(handler, Mapping):
        raise PolicyError("model-config.yaml: `handler` must be a mapping")
    block = handler.get(SECTION)
    if not isinstance(block, Mapping):
        raise PolicyError(
            "model-config.yaml has no `handler: layerguard:` block. Build the archive with "
            "`layerguard wrap`, which writes it, or add "
            "`handler: {layerguard: {inner_handler: your_handler.py}}`."
        )
    unknown = sorted(set(block) - set(KNOWN_KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in KNOWN_KEYS.items())
        raise PolicyError(f"model-config.yaml: unknown key(s) {', '.join(unknown)} under handler.layerguard. "
                          f"Known keys - {known}.")
    inner = block.get("inner_handler")
    if not isinstance(inner, str) or not inner.strip():
        raise PolicyError("model-config.yaml: handler.layerguard.inner_handler must name the model's own "
                          "handler (e.g. my_handler.py or my_handler.py:MyHandler)")
    action = _choice(block, "policy", ACTIONS)
    threshold = None
    if "fpr_confidence" in block and "target_fpr" not in block:
        raise PolicyError("model-config.yaml: handler.layerguard.fpr_confidence needs target_fpr beside it "
                          "(the rate it bounds), e.g. `target_fpr: 0.01` and `fpr_confidence: 0.95`")
    if "tau" in block or "target_fpr" in block:
        try:
            threshold = ThresholdPolicy.from_options(_number(block, "tau"), _number(block, "target_fpr"),
                                                     _number(block, "fpr_confidence"))
        except ValueError as exc:
            raise PolicyError(f"model-config.yaml: handler.layerguard: {exc}") from exc
    artifact = block.get("artifact", DEFAULT_FILENAME)
    if not isinstance(artifact, str) or "/" in artifact or "\\" in artifact or artifact.startswith("."):
        raise PolicyError("model-config.yaml: handler.layerguard.artifact must be a plain file name "
                          "in the archive")
    status = block.get("reject_status", 403)
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 499:
        raise PolicyError("model-config.yaml: handler.layerguard.reject_status must be a 4xx code, "
                          f"got {status!r}")
    on_missing = _choice(block, "on_missing_calibration", ON_MISSING)
    pixels = block.get("max_image_pixels")
    if pixels is not None and (not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 1):
        raise PolicyError("model-config.yaml: handler.layerguard.max_image_pixels must be a positive integer "
                          f"(width x height), got {pixels!r}")
    response = _choice(block, "response", RESPONSES)
    return ServingPolicy(inner_handler=inner.strip(), action=action, threshold=threshold, artifact=artifact,
                         reject_status=status, on_missing_calibration=on_missing, max_image_pixels=pixels,
                         response=response)


def _choice(block: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    """The key's value, one of `allowed` (the first is the default)."""
    value = block.get(key, allowed[0])
    if value not in allowed:
        raise PolicyError(f"model-config.yaml: handler.layerguard.{key} must be one of {', '.join(allowed)}, "
                          f"got {value!r}")
    return value


def _number(block: Mapping[str, Any], key: str) -> float | None:
    value = block.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"model-config.yaml: handler.layerguard.{key} must be a number, got {value!r}")
    return float(value)

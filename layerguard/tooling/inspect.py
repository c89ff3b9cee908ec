"""`layerguard inspect ARCHIVE.mar`: what a guarded archive holds, verified the way a worker would load it.

Checks, each reported as OK or FAIL: the entry handler and the `handler.layerguard` block, the artifact's
digest over arrays and metadata (and its signature when a key is given), the weights' fingerprint against
the model the archive's own handler loads, the monitored layers and the class count. Ops teams run it in
CI before deploying; any FAIL exits non-zero.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.artifact import SIGNING_KEY_ENV, CalibrationArtifact, model_fingerprint, read_signing_key
from ..serving.policy import parse_policy
from .archive import GUARD_HANDLER_FILE, RUNTIME_PACKAGES, extract_mar, read_yaml
from .summary import describe_calibration, format_class_table
from .wrap import load_extracted

__all__ = ["InspectReport", "inspect_archive"]


@dataclass
class InspectReport:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def check(self, passed: bool, what: str, detail: str = "") -> bool:
        self.lines.append(f"[{'OK' if passed else 'FAIL'}] {what}" + (f": {detail}" if detail else ""))
        if not passed:
            self.failures.append(what)
        return passed

    def text(self) -> str:
        verdict = "archive verified" if self.ok else f"archive FAILED {len(self.failures)} check(s)"
        return "\n".join([*self.lines, verdict])


def inspect_archive(mar: str | Path, signing_key: str | Path | None = None) -> InspectReport:
    report = InspectReport()
    key_path = signing_key or os.environ.get(SIGNING_KEY_ENV)
    with tempfile.TemporaryDirectory(prefix="layerguard-inspect-") as scratch:
        model_dir = Path(scratch)
        manifest = extract_mar(mar, model_dir)
        meta = manifest.get("model") or {}
        report.lines.append(f"archive {mar}: model {meta.get('modelName')} version {meta.get('modelVersion')}")
        guarded = meta.get("handler") == GUARD_HANDLER_FILE
        if not report.check(guarded, "entry handler", GUARD_HANDLER_FILE if guarded else
                            f"{meta.get('handler')} (expected {GUARD_HANDLER_FILE}: is this archive guarded?)"):
            return report
        config = read_yaml(model_dir / (meta.get("configFile") or "model-config.yaml"))
        try:
            policy = parse_policy(config)
        except ValueError as exc:
            report.check(False, "handler.layerguard block", str(exc))
            return report
        report.check(True, "handler.layerguard block",
                     f"inner handler {policy.inner_handler}, action {policy.action}, threshold override "
                     f"{policy.threshold.describe() if policy.threshold else 'none'}, response {policy.response}")
        with zipfile.ZipFile(mar) as zf:
            extra = sorted({n.split("/")[1] for n in zf.namelist() if n.startswith("layerguard/") and n.count("/") > 1}
                           - set(RUNTIME_PACKAGES))
        report.check(not extra, "runtime files", "layerguard core and serving only" if not extra else
                     f"unexpected packages {', '.join(extra)}")
        try:
            key = read_signing_key(key_path) if key_path else None
            artifact = CalibrationArtifact.load(model_dir / policy.artifact, key)
        except ValueError as exc:
            report.check(False, "calibration artifact", str(exc))
            return report
        signed = ("signature verified" if key else "signed (no key given to verify)") if artifact.signed else "unsigned"
        report.check(True, "calibration artifact", f"digest {artifact.digest()[:16]}... verified over arrays and "
                     f"metadata; {signed}")
        _check_model(report, model_dir, manifest, artifact)
        detector = artifact.detector(policy.threshold)
        report.lines += ["", describe_calibration(artifact, detector), format_class_table(artifact, detector)]
    return report


def _check_model(report: InspectReport, model_dir: Path, manifest: dict, artifact: CalibrationArtifact) -> None:
    """Load the model with the archive's own handler and compare it with what the artifact was made for."""
    inner_manifest = {**manifest, "model": {**manifest["model"], "handler": _inner_spec(model_dir, manifest)}}
    try:
        with load_extracted(model_dir, inner_manifest, None) as loaded:
            fingerprint = model_fingerprint(loaded.model)
            report.check(fingerprint == artifact.meta.model_fingerprint, "weights fingerprint",
                         f"{fingerprint[:16]}... (artifact {artifact.meta.model_fingerprint[:16]}...)")
            modules = dict(loaded.model.named_modules())
            missing = [n for n in artifact.layer_names if n not in modules]
            report.check(not missing, "monitored layers", ", ".join(artifact.layer_names) if not missing else
                         f"missing in the model: {', '.join(missing)}")
            shape = artifact.meta.input_shape
            if shape:
                with torch.no_grad():
                    outputs = int(loaded.model(torch.zeros((1, *shape), device=loaded.device)).shape[-1])
                report.check(outputs == artifact.num_classes, "class count",
                             f"model {outputs}, artifact {artifact.num_classes}")
    except Exception as exc:  # noqa: BLE001 - the archive's own code: report whatever it raised
        report.check(False, "model loads with its own handler", f"{type(exc).__name__}: {exc}")


def _inner_spec(model_dir: Path, manifest: dict) -> str:
    config = read_yaml(model_dir / (manifest["model"].get("configFile") or "model-config.yaml"))
    return parse_policy(config).inner_handler

"""The calibration artifact: one .npz file (never pickled) bound to one model by a weight fingerprint.

Layout: the detector's arrays (`profile/...`, `rule/...`, `calibration/...`, see detector.py), `meta` (the
typed `ArtifactMeta` as JSON bytes) and `seal` (JSON bytes: `content_sha256` over every array AND the meta,
plus an optional HMAC-SHA256 `signature` of that digest). Editing any byte the guard reads - a threshold
setting or the fingerprint in the metadata included - breaks the digest. The digest alone does not stop
someone who recomputes it; a signature made with a key the ops team keeps outside the archive does
(`layerguard wrap --signing-key`, checked at load when LAYERGUARD_SIGNING_KEY_FILE is set).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .detector import Detector, DetectorSpec
from .thresholds import ThresholdPolicy

__all__ = [
    "ARTIFACT_KIND", "DEFAULT_FILENAME", "FORMAT_VERSION", "SIGNING_KEY_ENV", "ArtifactError", "ArtifactMeta",
    "CalibrationArtifact", "model_fingerprint", "read_signing_key",
]

FORMAT_VERSION = 2
ARTIFACT_KIND = "layerguard-calibration"
DEFAULT_FILENAME = "layerguard_calibration.npz"
SIGNING_KEY_ENV = "LAYERGUARD_SIGNING_KEY_FILE"
FIX = "Re-run `layerguard wrap` (or calibrate.py) on this model to make a new artifact."


class ArtifactError(ValueError):
    """The artifact cannot be used; the message names the problem and the fix."""


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes, bytes): which exact weights were calibrated."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_signing_key(path: str | os.PathLike) -> bytes:
    """The HMAC key: the file's bytes, stripped of surrounding whitespace; at least 16 bytes."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ArtifactError(f"cannot read the signing key {path}: {exc}") from exc
    if len(key) < 16:
        raise ArtifactError(f"the signing key {path} is shorter than 16 bytes; use e.g. `openssl rand -hex 32`")
    return key


@dataclass(frozen=True)
class ArtifactMeta:
    """What the artifact is for and how it was made. Read by attribute everywhere."""

    rule: str
    rule_options: dict
    layer_names: tuple[str, ...]
    num_classes: int
    class_names: tuple[str, ...]
    threshold: dict  # ThresholdPolicy.as_dict()
    folds: int
    loi_search_start: int
    total_layers: int
    penultimate: str
    model_fingerprint: str
    input_shape: tuple[int, ...] | None = None
    layer_computations: tuple[str, ...] = ()  # per monitored layer, the modules of its stage, for people
    layerguard_version: str = ""
    kind: str = ARTIFACT_KIND
    format_version: int = FORMAT_VERSION

    @property
    def policy(self) -> ThresholdPolicy:
        return ThresholdPolicy.from_dict(self.threshold)

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec(rule=self.rule, layer_names=self.layer_names, num_classes=self.num_classes,
                            loi_search_start=self.loi_search_start, penultimate=self.penultimate,
                            rule_options=dict(self.rule_options), folds=self.folds)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactMeta:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("metadata is not a JSON object")
        if data.get("kind") != ARTIFACT_KIND:
            raise ArtifactError(f"not a layerguard calibration artifact. {FIX}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"format version {data.get('format_version')}; this layerguard reads version "
                                f"{FORMAT_VERSION}. {FIX}")
        for key in ("layer_names", "class_names", "layer_computations"):
            data[key] = tuple(data.get(key) or ())
        if data.get("input_shape") is not None:
            data["input_shape"] = tuple(data["input_shape"])
        return cls(**data)


@dataclass
class CalibrationArtifact:
    """Everything serving needs to score inputs of one model: metadata plus the fitted detector's arrays."""

    meta: ArtifactMeta
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    signed: bool = False

    @classmethod
    def from_detector(cls, detector: Detector, meta: ArtifactMeta) -> CalibrationArtifact:
        return cls(meta, {k: np.ascontiguousarray(v) for k, v in detector.arrays().items()})

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.meta.layer_names

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def policy(self) -> ThresholdPolicy:
        return self.meta.policy

    def detector(self, policy: ThresholdPolicy | None = None, device: torch.device | str = "cpu") -> Detector:
        """The fitted detector, thresholded by `policy` (default: the one chosen at calibration)."""
        return Detector.from_arrays(self.meta.spec, self.arrays, policy or self.policy, device)

    # ---- binding to a model -------------------------------------------------------------------------
    def check_model(self, model: nn.Module, fingerprint: str | None = None) -> None:
        """Refuse a model other than the one calibrated: fingerprint and layers must match."""
        fingerprint = fingerprint or model_fingerprint(model)
        if fingerprint != self.meta.model_fingerprint:
            raise ArtifactError(
                "calibration artifact was made for other model weights (fingerprint "
                f"{self.meta.model_fingerprint[:12]}..., this model {fingerprint[:12]}...). {FIX}"
            )
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise ArtifactError(f"model has no layer(s) {', '.join(missing)} named in the calibration artifact. {FIX}")

    def check_output_classes(self, num_outputs: int) -> None:
        if num_outputs != self.num_classes:
            raise ArtifactError(
                f"model outputs {num_outputs} classes but the artifact was calibrated for {self.num_classes}. {FIX}"
            )

    # ---- file format --------------------------------------------------------------------------------
    def digest(self) -> str:
        return _content_digest(self.arrays, self.meta.to_json())

    def save(self, path: str | os.PathLike, signing_key: bytes | None = None) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a partial artifact behind."""
        path = Path(path)
        meta_json = self.meta.to_json()
        digest = _content_digest(self.arrays, meta_json)
        seal = {"content_sha256": digest}
        if signing_key is not None:
            seal["signature"] = _sign(signing_key, digest)
        arrays = dict(self.arrays)
        arrays["meta"] = np.frombuffer(meta_json.encode(), dtype=np.uint8)
        arrays["seal"] = np.frombuffer(json.dumps(seal, sort_keys=True).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.signed = signing_key is not None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, signing_key: bytes | None = None) -> CalibrationArtifact:
        """Read and verify. With `signing_key` an unsigned or wrongly signed artifact is refused."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"calibration artifact {path} not found. {FIX}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise ArtifactError(f"calibration artifact {path} is damaged or not an artifact ({exc}). {FIX}") from exc
        if "meta" not in arrays or "seal" not in arrays:
            raise ArtifactError(f"{path} has no layerguard metadata or seal: not a calibration artifact of this "
                                f"version. {FIX}")
        try:
            meta_json = arrays.pop("meta").tobytes().decode()
            seal = json.loads(arrays.pop("seal").tobytes().decode())
            meta = ArtifactMeta.from_json(meta_json)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise ArtifactError(f"calibration artifact {path} has damaged metadata ({exc}). {FIX}") from exc
        digest = _content_digest(arrays, meta_json)
        if not isinstance(seal, dict) or not hmac.compare_digest(str(seal.get("content_sha256")), digest):
            raise ArtifactError(f"calibration artifact {path} was modified after it was written (checksum mismatch "
                                f"over its arrays and metadata). {FIX}")
        signature = seal.get("signature")
        if signing_key is not None:
            if not signature:
                raise ArtifactError(f"calibration artifact {path} is not signed, but a signing key is configured "
                                    f"({SIGNING_KEY_ENV}). Wrap the model with `layerguard wrap --signing-key KEY`.")
            if not hmac.compare_digest(str(signature), _sign(signing_key, digest)):
                raise ArtifactError(f"calibration artifact {path} has a signature that does not match the configured "
                                    "key: it was made elsewhere or altered. Re-wrap with the right --signing-key.")
        artifact = cls(meta, arrays, signed=bool(signature))
        artifact._validate(path)
        return artifact

    def _validate(self, path: Path) -> None:
        """Build the detector once: any missing or mis-shaped array is found at load time, not per request."""
        try:
            det = self.detector()
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise ArtifactError(f"calibration artifact {path} is inconsistent ({type(exc).__name__}: {exc}). {FIX}"
                                ) from exc
        c, k = self.num_classes, len(self.layer_names)
        problems = []
        if det.loi.shape != (c,) or (c and (det.loi.min() < 0 or det.loi.max() >= k)):
            problems.append("layer-of-interest indices out of range")
        for n in self.layer_names:
            cen = det.profile.centroids[n]
            if cen.dim() != 2 or cen.shape[0] != c:
                problems.append(f"centroid {n} has shape {tuple(cen.shape)}, expected ({c}, D)")
        if det.sim_mean.shape != (c, k) or not np.all(np.isfinite(det.thresholds)):
            problems.append("statistics do not match the class and layer counts")
        if problems:
            raise ArtifactError(f"calibration artifact {path} is inconsistent: {'; '.join(problems)}. {FIX}")


def _content_digest(arrays: dict[str, np.ndarray], meta_json: str) -> str:
    digest = hashlib.sha256()
    digest.update(b"meta|")
    digest.update(meta_json.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"|{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _sign(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()

"""The calibration artifact: one .npz file (never pickled) bound to one model by a weight fingerprint.

Layout: arrays `centroid/<layer>` [C, D] float32, `sim_mean`/`sim_std` [C, K], `loi` [C], `score_mean`,
`score_std` [C], `score_hist` [C, bins], `counts_centroid`/`counts_threshold` [C], and `meta`, a JSON
document stored as uint8 bytes. `meta.content_sha256` covers every array, so a damaged or edited file
is refused rather than silently scoring with wrong numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .detector import Detector, ThresholdPolicy, thresholds_for

FORMAT_VERSION = 1
ARTIFACT_KIND = "layerguard-calibration"
DEFAULT_FILENAME = "layerguard_calibration.npz"


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


@dataclass
class CalibrationArtifact:
    """Everything serving needs to score inputs of one model, plus the statistics behind it."""

    layer_names: tuple[str, ...]
    centroids: dict[str, np.ndarray]
    sim_mean: np.ndarray
    sim_std: np.ndarray
    loi: np.ndarray
    score_mean: np.ndarray
    score_std: np.ndarray
    score_hist: np.ndarray
    counts_centroid: np.ndarray
    counts_threshold: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [str(i) for i in range(self.num_classes)])

    @property
    def policy(self) -> ThresholdPolicy:
        return ThresholdPolicy(**self.meta["threshold"])

    def hist_edges(self) -> np.ndarray:
        lo, hi, bins = self.meta["hist_range"]
        return np.linspace(lo, hi, int(bins) + 1)

    def thresholds(self, policy: ThresholdPolicy | None = None) -> np.ndarray:
        """Per-class thresholds under `policy` (default: the one chosen at calibration)."""
        return thresholds_for(
            policy or self.policy, self.score_mean, self.score_std, self.score_hist, self.hist_edges()
        )

    def detector(self, policy: ThresholdPolicy | None = None, device: torch.device | str = "cpu") -> Detector:
        centroids = {n: torch.from_numpy(self.centroids[n]) for n in self.layer_names}
        return Detector(self.layer_names, centroids, self.loi, self.thresholds(policy), device=device)

    # ---- binding to a model -------------------------------------------------------------------------
    def check_model(self, model: nn.Module, fingerprint: str | None = None) -> None:
        """Refuse a model other than the one calibrated: fingerprint, layers and class count must match."""
        fingerprint = fingerprint or model_fingerprint(model)
        if fingerprint != self.meta["model_fingerprint"]:
            raise ArtifactError(
                "calibration artifact was made for other model weights (fingerprint "
                f"{self.meta['model_fingerprint'][:12]}..., this model {fingerprint[:12]}...). "
                "Re-run `layerguard wrap` (or calibrate.py) on this model to make a matching artifact."
            )
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise ArtifactError(
                f"model has no layer(s) {', '.join(missing)} named in the calibration artifact. "
                "Re-run `layerguard wrap` (or calibrate.py) on this model."
            )

    def check_output_classes(self, num_outputs: int) -> None:
        if num_outputs != self.num_classes:
            raise ArtifactError(
                f"model outputs {num_outputs} classes but the artifact was calibrated for {self.num_classes}. "
                "Re-run `layerguard wrap` (or calibrate.py) on this model."
            )

    # ---- file format --------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"centroid/{n}": np.ascontiguousarray(self.centroids[n], dtype=np.float32) for n in self.layer_names}
        arrays.update(
            sim_mean=self.sim_mean, sim_std=self.sim_std, loi=self.loi.astype(np.int64),
            score_mean=self.score_mean, score_std=self.score_std, score_hist=self.score_hist,
            counts_centroid=self.counts_centroid, counts_threshold=self.counts_threshold,
        )
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a partial artifact behind."""
        path = Path(path)
        arrays = self._arrays()
        meta = dict(self.meta, kind=ARTIFACT_KIND, format_version=FORMAT_VERSION,
                    layer_names=list(self.layer_names), content_sha256=_content_digest(arrays))
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.meta = meta
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationArtifact:
        path = Path(path)
        fix = "Re-run `layerguard wrap` (or calibrate.py) to make a new artifact."
        if not path.is_file():
            raise ArtifactError(f"calibration artifact {path} not found. {fix}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise ArtifactError(f"calibration artifact {path} is damaged or not an artifact ({exc}). {fix}") from exc
        if "meta" not in arrays:
            raise ArtifactError(f"{path} has no layerguard metadata: not a calibration artifact. {fix}")
        try:
            meta = json.loads(arrays.pop("meta").tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"calibration artifact {path} has damaged metadata. {fix}") from exc
        if meta.get("kind") != ARTIFACT_KIND:
            raise ArtifactError(f"{path} is not a layerguard calibration artifact. {fix}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {meta.get('format_version')}; this layerguard reads "
                f"version {FORMAT_VERSION}. {fix}"
            )
        if _content_digest(arrays) != meta.get("content_sha256"):
            raise ArtifactError(f"calibration artifact {path} was modified after it was written (checksum "
                                f"mismatch). {fix}")
        layers = tuple(meta["layer_names"])
        try:
            artifact = cls(
                layer_names=layers,
                centroids={n: arrays[f"centroid/{n}"] for n in layers},
                sim_mean=arrays["sim_mean"], sim_std=arrays["sim_std"], loi=arrays["loi"],
                score_mean=arrays["score_mean"], score_std=arrays["score_std"], score_hist=arrays["score_hist"],
                counts_centroid=arrays["counts_centroid"], counts_threshold=arrays["counts_threshold"],
                meta=meta,
            )
        except KeyError as exc:
            raise ArtifactError(f"calibration artifact {path} lacks array {exc}. {fix}") from exc
        artifact._validate(path)
        return artifact

    def _validate(self, path: Path) -> None:
        c, k = self.num_classes, len(self.layer_names)
        problems = []
        if self.loi.shape != (c,) or (c and (self.loi.min() < 0 or self.loi.max() >= k)):
            problems.append("layer-of-interest indices out of range")
        for n in self.layer_names:
            if self.centroids[n].ndim != 2 or self.centroids[n].shape[0] != c:
                problems.append(f"centroid {n} has shape {self.centroids[n].shape}, expected ({c}, D)")
        if self.sim_mean.shape != (c, k) or self.score_hist.shape[0] != c:
            problems.append("statistics do not match the class and layer counts")
        if problems:
            raise ArtifactError(f"calibration artifact {path} is inconsistent: {'; '.join(problems)}. "
                                "Re-run `layerguard wrap` (or calibrate.py).")


def _content_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(io.BytesIO(a.tobytes()).getbuffer())
    return digest.hexdigest()

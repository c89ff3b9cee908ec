"""CIFAR-10 / GTSRB npz loading and uint8 -> model-input conversion shared by the bench scripts.

Why a helper: every bench script must accept any data path (users point at their own copy) and must
feed the model the same thing: float [0, 1] NCHW (normalisation lives inside the model). The CIFAR-10
file stores JPEG bytes; decoding 60,000 images takes about 10 s, so the decoded arrays are cached once in
``bench/cache/`` (keyed by the source file's name, size and mtime).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_DATA = SHARED_DATA / "cifar10_32_jpeg.npz"
DATA_ENV = "LAYERGUARD_CIFAR"
DEFAULT_GTSRB = SHARED_DATA / "gtsrb_32_sub13k.npz"
GTSRB_ENV = "LAYERGUARD_GTSRB"
CACHE_DIR = REPO_ROOT / "bench" / "cache"


def default_data_path() -> Path:
    """$LAYERGUARD_CIFAR if set, else ../shared/data/cifar10_32_jpeg.npz relative to the repo root."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_DATA


def default_gtsrb_path() -> Path:
    """$LAYERGUARD_GTSRB if set, else ../shared/data/gtsrb_32_sub13k.npz relative to the repo root."""
    env = os.environ.get(GTSRB_ENV)
    return Path(env) if env else DEFAULT_GTSRB


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Concatenated JPEG files (``offsets``: N+1 boundaries) -> uint8 NHWC RGB."""
    from PIL import Image

    imgs = [
        np.asarray(Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
        for i in range(len(offsets) - 1)
    ]
    return np.stack(imgs) if imgs else np.zeros((0, 32, 32, 3), dtype=np.uint8)


def _decoded(p: Path, cache_dir: Path | None) -> dict[str, np.ndarray]:
    """Arrays of a JPEG-bytes npz with x_train/x_test decoded; cached as a plain npz next to the bench."""
    st = p.stat()
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"{p.stem}.decoded.{st.st_size}.{st.st_mtime_ns}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    with np.load(p, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files if not k.endswith(("_jpeg", "_offsets"))}
        for split in ("train", "test"):
            out[f"x_{split}"] = _decode_jpegs(z[f"{split}_jpeg"], z[f"{split}_offsets"])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: two runs may decode at once
        np.savez(tmp, **out)
        tmp.replace(cache)
    return out


def _checked(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for k in ("y_train", "y_test"):
        out[k] = out[k].astype(np.int64)
    for k in ("x_train", "x_test"):
        if out[k].dtype != np.uint8 or out[k].ndim != 4 or out[k].shape[-1] != 3:
            raise ValueError(f"{k}: expected uint8 NHWC with 3 channels, got {out[k].dtype} {out[k].shape}")
    return out


def load_cifar(path: str | os.PathLike[str] | None = None, cache_dir: Path | None = CACHE_DIR) -> dict[str, np.ndarray]:
    """Load CIFAR-10: x_train/x_test uint8 NHWC, y_train/y_test int64, class_names str.

    Reads the JPEG-bytes npz (train_jpeg/train_offsets/...; decoded once, then from ``cache_dir``; None
    disables the cache) or an npz that already holds x_train/x_test arrays.
    """
    p = Path(path) if path is not None else default_data_path()
    if not p.is_file():
        raise FileNotFoundError(f"CIFAR-10 npz not found at {p} (pass --data or set ${DATA_ENV})")
    with np.load(p, allow_pickle=False) as z:
        jpeg = "train_jpeg" in z.files
        out = None if jpeg else {k: z[k] for k in z.files}
    if out is None:
        out = _decoded(p, cache_dir)
    return _checked(out)


def load_gtsrb(path: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """Load GTSRB: x_train, y_train, train_track, x_test, y_test, class_names (uint8 NHWC, int64 labels).

    ``train_track`` numbers the tracks inside each class: a physical sign is the pair (y_train, train_track).
    """
    p = Path(path) if path is not None else default_gtsrb_path()
    if not p.is_file():
        raise FileNotFoundError(f"GTSRB npz not found at {p} (pass --data or set ${GTSRB_ENV})")
    keys = ("x_train", "y_train", "train_track", "x_test", "y_test", "class_names")
    with np.load(p, allow_pickle=False) as z:
        out = {k: z[k] for k in keys}
    out["train_track"] = out["train_track"].astype(np.int64)
    return _checked(out)


def to_tensor(x_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy -> float32 [0, 1] NCHW torch tensor, the model's input format."""
    t = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc))
    return t.permute(0, 3, 1, 2).float().div_(255.0)

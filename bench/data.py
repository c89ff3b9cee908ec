"""CIFAR-10 npz loading and uint8 -> model-input conversion shared by the bench scripts.

Why a helper: every bench script must accept any data path (users point at their own copy) and must
feed the model the same thing: float [0, 1] NCHW (normalisation lives inside the model).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cifar10_32_sub20k10k.npz"
DATA_ENV = "LAYERGUARD_CIFAR"


def default_data_path() -> Path:
    """$LAYERGUARD_CIFAR if set, else ../shared/data/cifar10_32_sub20k10k.npz relative to the repo root."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_DATA


def load_cifar(path: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """Load the npz into memory: x_train/x_test uint8 NHWC, y_train/y_test int64, class_names str."""
    p = Path(path) if path is not None else default_data_path()
    if not p.is_file():
        raise FileNotFoundError(f"CIFAR-10 npz not found at {p} (pass --data or set ${DATA_ENV})")
    with np.load(p, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for k in ("y_train", "y_test"):
        out[k] = out[k].astype(np.int64)
    for k in ("x_train", "x_test"):
        if out[k].dtype != np.uint8 or out[k].ndim != 4 or out[k].shape[-1] != 3:
            raise ValueError(f"{k}: expected uint8 NHWC with 3 channels, got {out[k].dtype} {out[k].shape}")
    return out


def to_tensor(x_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC numpy -> float32 [0, 1] NCHW torch tensor, the model's input format."""
    t = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc))
    return t.permute(0, 3, 1, 2).float().div_(255.0)

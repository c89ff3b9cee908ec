"""All-to-one backdoor attacks (target label 0) with the standard CIFAR-10 settings of REFERENCE.md.

Why procedural: the benchmark must run offline and be reproducible, so every trigger is generated from a
fixed seed (random-noise blend images stand in for the usual cartoon images). Every attack works on
uint8 NHWC numpy arrays, the dataset's native format, so a poisoned set is stored exactly like a clean one.

Interface of every attack:
  - ``apply(x, rng=None)``: test-time triggering of any images (uint8 NHWC -> uint8 NHWC).
  - ``poison_training_set(x, y, rate=None, rng=None)``: returns a poisoned copy ``(x, y, info)``; ``info``
    holds the modified indices (``poison_idx`` relabelled/triggered, ``cover_idx`` triggered-but-true-label)
    and JSON-friendly counts.
  - ``params()``: the settings, recorded next to cached weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TARGET = 0


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(0)


def _pick(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    n = min(int(n), len(candidates))
    return np.sort(rng.choice(candidates, size=n, replace=False)) if n > 0 else np.zeros(0, dtype=np.int64)


def _poison_with_cover(x: np.ndarray, y: np.ndarray, target: int, rate: float, n_cover: int,
                       poison: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                       cover: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Poison-label set with cover samples (WaNet's noise mode, Adap-Blend's conservatism): `rate` of the set,
    drawn from other classes, gets the trigger and the target label; `n_cover` of the rest get `cover` and keep
    their labels, so the model learns that the trigger, not any distortion, means the target."""
    pidx = _pick(np.flatnonzero(y != target), round(rate * len(x)), rng)
    cidx = _pick(np.setdiff1d(np.arange(len(x)), pidx), n_cover, rng)
    x, y = x.copy(), y.copy()
    x[pidx] = poison(x[pidx], rng)
    y[pidx] = target
    x[cidx] = cover(x[cidx], rng)
    return x, y, {"poison_idx": pidx, "cover_idx": cidx, "n_poison": len(pidx), "n_cover": len(cidx), "rate": rate}


def _noise_image(seed: int, size: int = 32) -> np.ndarray:
    """Fixed uniform-noise RGB image: the procedural stand-in for a blend trigger picture."""
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _blend(x: np.ndarray, pattern: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    out = (1.0 - alpha) * x.astype(np.float32) + alpha * pattern.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class Attack:
    """Base: dirty-label poisoning of a random ``rate`` fraction of non-target images, relabelled to 0."""

    name = "attack"
    default_rate = 0.1

    def __init__(self, target: int = TARGET, rate: float | None = None) -> None:
        self.target = target
        self.rate = self.default_rate if rate is None else rate

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "rate": self.rate}

    def poison_transform(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Training-time trigger of ``info["poison_idx"]`` images (used when triggering after augmentation)."""
        return self.apply(x, rng)

    def cover_transform(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Training-time transform of ``info["cover_idx"]`` images (true label kept); identity by default."""
        return x.copy()

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float | None = None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rng = _rng(rng)
        rate = self.rate if rate is None else rate
        idx = _pick(np.flatnonzero(y != self.target), round(rate * len(x)), rng)
        x, y = x.copy(), y.copy()
        x[idx] = self.apply(x[idx], rng)
        y[idx] = self.target
        return (
            x,
            y,
            {
                "poison_idx": idx,
                "cover_idx": np.zeros(0, dtype=np.int64),
                "n_poison": len(idx),
                "n_cover": 0,
                "rate": rate,
            },
        )


class BadNets(Attack):
    """3x3 white patch at the bottom-right corner (Gu et al. 2017)."""

    name = "badnets"

    def __init__(self, target: int = TARGET, rate: float | None = None, size: int = 3, value: int = 255) -> None:
        super().__init__(target, rate)
        self.size, self.value = size, value

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        out = x.copy()
        out[:, -self.size :, -self.size :, :] = self.value
        return out

    def params(self) -> dict[str, Any]:
        return {**super().params(), "size": self.size, "value": self.value, "position": "bottom-right"}


class Blended(Attack):
    """Blend a fixed noise image with alpha 0.2 (Chen et al. 2017); noise stands in for the cartoon."""

    name = "blended"

    def __init__(self, target: int = TARGET, rate: float | None = None, alpha: float = 0.2, seed: int = 1234) -> None:
        super().__init__(target, rate)
        self.alpha, self.seed = alpha, seed
        self.pattern = _noise_image(seed)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return _blend(x, self.pattern, self.alpha)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "seed": self.seed, "pattern": "uniform noise"}


class WaNet(Attack):
    """Warping-based trigger (Nguyen & Tran 2021): a fixed smooth warp field applied with grid_sample.

    Noise mode: ``cross_ratio * rate`` extra images get the field plus random per-pixel jitter and keep
    their true label, forcing the network to learn the exact field rather than "any warp".
    """

    name = "wanet"

    def __init__(
        self,
        target: int = TARGET,
        rate: float | None = None,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        seed: int = 4321,
        size: int = 32,
    ) -> None:
        super().__init__(target, rate)
        self.k, self.s, self.grid_rescale, self.cross_ratio, self.seed, self.size = (
            k,
            s,
            grid_rescale,
            cross_ratio,
            seed,
            size,
        )
        g = torch.Generator().manual_seed(seed)
        ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise_grid = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        line = torch.linspace(-1, 1, steps=size)
        xx, yy = torch.meshgrid(line, line, indexing="ij")
        identity_grid = torch.stack((yy, xx), 2)[None]
        self.grid = torch.clamp((identity_grid + s * noise_grid / size) * grid_rescale, -1, 1)

    def _warp(self, x: np.ndarray, grid: torch.Tensor) -> np.ndarray:
        if len(x) == 0:
            return x.copy()
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
        out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self._warp(x, self.grid.expand(len(x), -1, -1, -1))

    def apply_noise(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The noise-mode ("cross") transform: the field plus uniform jitter of one pixel at most."""
        jitter = _rng(rng).uniform(-1, 1, size=(len(x), self.size, self.size, 2)).astype(np.float32)
        grid = torch.clamp(self.grid + torch.from_numpy(jitter) / self.size, -1, 1)
        return self._warp(x, grid)

    def cover_transform(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.apply_noise(x, rng)

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float | None = None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rng = _rng(rng)
        rate = self.rate if rate is None else rate
        return _poison_with_cover(x, y, self.target, rate, round(self.cross_ratio * rate * len(x)),
                                  self.apply, self.apply_noise, rng)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "k": self.k,
            "s": self.s,
            "grid_rescale": self.grid_rescale,
            "cross_ratio": self.cross_ratio,
            "seed": self.seed,
        }


class SIG(Attack):
    """Clean-label sinusoidal signal (Barni et al. 2019): x + delta*sin(2*pi*j*f/m) along each row.

    Only target-class training images are poisoned (labels untouched), so ``rate`` is a fraction of the
    whole set capped by the number of target images.
    """

    name = "sig"

    def __init__(
        self,
        target: int = TARGET,
        rate: float | None = None,
        delta: float = 20.0,
        f: float = 6.0,
        size: int = 32,
    ) -> None:
        super().__init__(target, rate)
        self.delta, self.f = delta, f
        j = np.arange(size, dtype=np.float32)
        row = delta * np.sin(2 * math.pi * j * f / size)
        self.pattern = np.broadcast_to(row[None, :, None], (size, size, 3)).astype(np.float32)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return np.clip(np.rint(x.astype(np.float32) + self.pattern), 0, 255).astype(np.uint8)

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float | None = None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rng = _rng(rng)
        rate = self.rate if rate is None else rate
        idx = _pick(np.flatnonzero(y == self.target), round(rate * len(x)), rng)
        x = x.copy()
        x[idx] = self.apply(x[idx], rng)
        return (
            x,
            y.copy(),
            {
                "poison_idx": idx,
                "cover_idx": np.zeros(0, dtype=np.int64),
                "n_poison": len(idx),
                "n_cover": 0,
                "rate": rate,
                "clean_label": True,
            },
        )

    def params(self) -> dict[str, Any]:
        return {**super().params(), "delta": self.delta, "f": self.f, "clean_label": True}


class AdapBlend(Attack):
    """Adaptive-Blend (Qi et al. ICLR 2023): a 4x4-piece blend trigger, half the pieces masked per image.

    Poison images (relabelled) and cover images (true label) both carry a randomly half-masked trigger at
    ``alpha_train``; at test time the full trigger is blended at ``alpha_test``. Cover samples and the
    partial triggers are what keep poisoned and clean features close (the point of the attack).
    """

    name = "adapblend"
    default_rate = 0.003

    def __init__(
        self,
        target: int = TARGET,
        rate: float | None = None,
        pieces: int = 16,
        mask_rate: float = 0.5,
        alpha_train: float = 0.15,
        alpha_test: float = 0.2,
        cover_rate: float = 0.003,
        seed: int = 5678,
        size: int = 32,
    ) -> None:
        super().__init__(target, rate)
        self.pieces, self.mask_rate, self.alpha_train, self.alpha_test = (
            pieces,
            mask_rate,
            alpha_train,
            alpha_test,
        )
        self.cover_rate, self.seed, self.size = cover_rate, seed, size
        self.pattern = _noise_image(seed, size)

    def _masked(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        div = int(round(math.sqrt(self.pieces)))
        step = self.size // div
        n_masked = int(round(self.pieces * self.mask_rate))
        alpha = np.zeros((len(x), self.size, self.size, 1), dtype=np.float32)
        for i in range(len(x)):
            keep = np.ones((self.size, self.size), dtype=np.float32)
            for p in rng.choice(self.pieces, size=n_masked, replace=False):
                r, c = divmod(int(p), div)
                keep[r * step : (r + 1) * step, c * step : (c + 1) * step] = 0.0
            alpha[i, :, :, 0] = self.alpha_train * keep
        return _blend(x, self.pattern, alpha)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return _blend(x, self.pattern, self.alpha_test)

    def poison_transform(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self._masked(x, _rng(rng))

    def cover_transform(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return self._masked(x, _rng(rng))

    def poison_training_set(
        self, x: np.ndarray, y: np.ndarray, rate: float | None = None, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rng = _rng(rng)
        rate = self.rate if rate is None else rate
        return _poison_with_cover(x, y, self.target, rate, round(self.cover_rate * len(x)),
                                  self._masked, self._masked, rng)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "cover_rate": self.cover_rate,
            "pieces": self.pieces,
            "mask_rate": self.mask_rate,
            "alpha_train": self.alpha_train,
            "alpha_test": self.alpha_test,
            "seed": self.seed,
            "pattern": "uniform noise",
        }


ATTACKS: dict[str, type[Attack]] = {c.name: c for c in (BadNets, Blended, WaNet, SIG, AdapBlend)}


def build_attack(name: str, **kwargs: Any) -> Attack:
    """Attack by name (badnets, blended, wanet, sig, adapblend) with optional constructor overrides."""
    try:
        return ATTACKS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}") from None


def attack_from_params(params: dict[str, Any]) -> Attack:
    """Rebuild the exact attack recorded by ``Attack.params()`` (e.g. ``meta["attack"]`` of a zoo model).

    Why: the zoo deviates from the defaults for some attacks (see bench/train.py ZOO_SETTINGS), so test-time
    triggering must use the recorded settings, never the class defaults.
    """
    kwargs = {k: v for k, v in params.items() if k not in ("name", "pattern", "position", "clean_label")}
    return build_attack(params["name"], **kwargs)

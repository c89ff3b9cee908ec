"""The zoo's training script: a run killed between epochs resumes to exactly the weights of an unbroken run.

Why this matters: the well-trained CIFAR zoo is trained over several sessions on two CPU cores (bench/README.md),
so every model in it went through at least one resume. Tested with the zoo's own recipe (`cifar_vgg`: the fast
VGG, bfloat16 autocast, triggers after crop/flip) on a few random images; the images' content does not matter to
what is tested, only that the run is a real one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.models import build_model
from bench.train import RECIPES, train_one
from bench.train_speed import table as speed_table
from bench.zoo_table import recipe_trial_table


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> tuple[dict[str, np.ndarray], Path]:
    rng = np.random.default_rng(0)
    data = {
        "x_train": rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 96).astype(np.int64),
        "x_test": rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
        "y_test": np.arange(40, dtype=np.int64) % 10,
    }
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, **data)
    return data, path


def _train(data, path: Path, out: Path, ckpt: Path, stop_at_epoch: int | None = None) -> dict:
    # with a quarter of each class's training images held out and scored every epoch (--holdout)
    recipe = dataclasses.replace(RECIPES["cifar_vgg"], epochs=3, batch_size=32, epochs_by_attack={}, val_fraction=0.25)

    def log(msg: str) -> None:
        if stop_at_epoch is not None and f"epoch {stop_at_epoch}/" in msg:
            raise Interrupted(msg)  # after the epoch's training, before its checkpoint: like a kill

    return train_one(
        "badnets", data, path, out, recipe, seed=0, log=log, trigger_after_augment=True, ckpt_dir=ckpt, command="test"
    )


def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_one(tiny_cifar, tmp_path):
    data, path = tiny_cifar
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums in the same order on every run
    try:
        _compare_unbroken_and_resumed(data, path, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_unbroken_and_resumed(data, path: Path, tmp_path: Path) -> None:
    unbroken = _train(data, path, tmp_path / "a", tmp_path / "ckpt_a")

    with pytest.raises(Interrupted):
        _train(data, path, tmp_path / "b", tmp_path / "ckpt_b", stop_at_epoch=3)
    saved = torch.load(tmp_path / "ckpt_b" / "cifar_vgg_badnets.pt", weights_only=True)
    assert len(json.loads(saved["history"])) == 2  # epochs 1 and 2 were checkpointed, epoch 3 was lost
    assert not (tmp_path / "b" / "cifar_vgg_badnets.pt").exists()
    resumed = _train(data, path, tmp_path / "b", tmp_path / "ckpt_b")

    a = torch.load(tmp_path / "a" / "cifar_vgg_badnets.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "cifar_vgg_badnets.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["clean_acc"] == unbroken["clean_acc"] and resumed["asr"] == unbroken["asr"]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in unbroken["history"]]
    assert not (tmp_path / "ckpt_b" / "cifar_vgg_badnets.pt").exists()  # a finished run leaves no checkpoint

    # the record says how it was trained, and the weights load into the architecture it names
    assert resumed["model"] == "cifar_vgg" and resumed["recipe"] == "cifar_vgg"
    assert resumed["optimizer"]["precision"].startswith("bfloat16")
    held_out = resumed["data"]["n_val"]
    assert 0 < held_out < 96 and resumed["data"]["n_train"] == 96 - held_out
    assert resumed["data"]["val_split"].startswith("0.25 of each class's images")
    assert all(0.0 <= r["val_clean_acc"] <= 1.0 and 0.0 <= r["val_asr"] <= 1.0 for r in resumed["history"])
    model = build_model(resumed["model"], resumed["num_classes"])
    model.load_state_dict(b)
    assert resumed["n_params"] == sum(p.numel() for p in model.parameters())

    # bench/README.md's recipe-trial table shows a held-out run's accuracy after every epoch, from its record
    (tmp_path / "b" / "no_holdout.json").write_text(json.dumps({**resumed, "data": {**resumed["data"], "n_val": 0}}))
    table = recipe_trial_table(tmp_path / "b").splitlines()
    assert len(table) == 3  # header, rule, the one run with held-out images
    curve = ", ".join(f"{100 * r['val_clean_acc']:.1f}" for r in resumed["history"])
    assert table[2].startswith("| cifar_vgg | cifar_vgg (1.97 M) | max lr 0.4, batch 32,")
    assert f"| {curve} |" in table[2]


def test_the_fast_vgg_shows_each_block_to_the_detector():
    model = build_model("cifar_vgg").eval()
    modules = dict(model.named_modules())
    assert model.layer_names() == ["stem", *(f"block{i}" for i in range(1, 7)), "fc"]
    assert all(name in modules for name in model.layer_names())
    seen: list[tuple[int, ...]] = []
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape))) for n in model.layer_names()
    ]
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 10)
    # stem 31x31, each group's first block pools: 15, 7, 3
    assert seen == [
        (2, 24, 31, 31),
        (2, 64, 15, 15),
        (2, 64, 15, 15),
        (2, 256, 7, 7),
        (2, 256, 7, 7),
        (2, 256, 3, 3),
        (2, 256, 3, 3),
        (2, 10),
    ]


def test_the_training_speed_table_pairs_each_model_and_batch_by_precision():
    rows = [
        {"arch": a, "params": 272474, "multiply_adds": 40813184, "batch": 128, "precision": p, "seconds_per_epoch": s}
        for a, p, s in (("resnet20", "fp32", 90.0), ("resnet20", "bf16", 45.0))
    ]
    result = {
        "command": "c",
        "date": "d",
        "machine": {"cpu": "cpu", "cores": 2},
        "torch": "t",
        "threads": 2,
        "steps": 4,
        "rows": rows,
    }
    assert speed_table(result).splitlines()[-1] == "| resnet20 | 0.27 M | 40.8 M | 128 | 90 | 45 | x2.00 |"

"""Train the backdoored-model zoos: one model per attack (plus a clean one) on CIFAR-10 or GTSRB.

Why: the detection benchmark needs models with a known, working backdoor. Each model is cached as
``<out>/<prefix><attack>.pt`` (a plain state_dict, loadable with ``torch.load(..., weights_only=True)``)
and ``<out>/<prefix><attack>.json`` (clean accuracy, attack success rate, timing, seed, attack parameters,
recipe), and is skipped on later runs unless ``--force``. ``--dataset`` picks a recipe (``RECIPES``):
CIFAR-10 -> ResNet-20, no prefix; GTSRB -> compact VGG, prefix ``gtsrb_``. Training writes a checkpoint
every epoch under ``--ckpt-dir`` (default ``bench/cache/ckpt/``) and resumes from it when rerun with the same
settings. The well-trained CIFAR zoo (recipes ``cifar_full``: 50k images, 45 epochs, from scratch; ``cifar_ft``:
poisoned fine-tuning of ``cifar_full_clean``; ``cifar_vgg``: the fast VGG, 20 epochs in bfloat16 autocast, every
attack from scratch) is longer than a session: it checkpoints to the committed
``bench/checkpoints/`` so that the next session resumes it (README "CIFAR-10 well-trained zoo").
``--holdout FRACTION`` measures a recipe on training images held out of training, never on the test images.

Usage (from the repo root):
    python bench/train.py --attacks clean,badnets,blended,wanet,sig,adapblend [--epochs N] [--data PATH]
    python bench/train.py --dataset gtsrb            # the GTSRB zoo: clean, badnets, blended, wanet, sig
    python bench/train.py --dataset cifar_full --attacks clean --threads 1 --ckpt-dir bench/checkpoints
    python bench/train.py --dataset cifar_vgg --threads 2 --ckpt-dir bench/checkpoints
    python bench/train.py --dataset cifar_vgg --attacks clean --holdout 0.1 --out bench/cache/trial/holdout
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attacks import ATTACKS, Attack, attack_from_params, build_attack  # noqa: E402
from bench.data import (  # noqa: E402
    CACHE_DIR,
    REPO_ROOT,
    default_data_path,
    default_gtsrb_path,
    load_cifar,
    load_gtsrb,
    to_tensor,
)
from bench.models import build_model  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "bench" / "weights"
CKPT_DIR = CACHE_DIR / "ckpt"
# committed checkpoint folder of long runs (the CIFAR well-trained zoo): a run killed at a session's end
# resumes there when the same command is run again (README "CIFAR-10 well-trained zoo")
COMMITTED_CKPT_DIR = REPO_ROOT / "bench" / "checkpoints"
ALL_NAMES = ["clean", *ATTACKS]


@dataclass(frozen=True)
class Recipe:
    """How one zoo is trained: architecture, SGD + OneCycle settings, augmentation, validation split."""

    dataset: str
    model: str
    num_classes: int
    epochs: int
    lr: float
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.0
    pad: int = 4  # random crop with zero padding
    flip: bool = True  # random horizontal flip (never for traffic signs: it changes their meaning)
    val_fraction: float = 0.0  # fraction of each class's tracks held out for validation (GTSRB only)
    prefix: str = ""  # output file name prefix
    zoo: tuple[str, ...] = tuple(ALL_NAMES)  # what ``--attacks all`` trains
    epochs_by_attack: dict[str, int] = field(default_factory=dict)  # attacks that need longer ("--epochs" wins)
    name: str = ""  # the RECIPES key, recorded in each json
    # fine-tuning: start from ``<out>/<init_from>.pt`` instead of a random init ("poisoned fine-tuning")
    init_from: str | None = None
    # forward pass and loss under bfloat16 autocast (weights, gradients and SGD stay float32): about twice the
    # training speed on a CPU with AVX512-BF16 (bench/README.md); the saved weights are float32 as always
    bf16: bool = False

    def epochs_for(self, name: str) -> int:
        return self.epochs_by_attack.get(name, self.epochs)

    def route(self) -> str:
        return f"poisoned fine-tuning of {self.init_from}" if self.init_from else "from scratch"


RECIPES: dict[str, Recipe] = {
    # the weakly trained CIFAR zoo (6 epochs on the old 20k subset; README "Results")
    "cifar": Recipe("cifar", "resnet20", 10, epochs=6, lr=0.2),
    # the well-trained CIFAR zoo: all 50k training images, 45 one-cycle epochs, label smoothing 0.1;
    # clean first (it is also the base of "cifar_ft"), then BadNets and Blended from scratch; WaNet and SIG from
    # scratch too, because fine-tuning implants them only weakly (ASR 59% and 57%, bench/README.md)
    "cifar_full": Recipe(
        "cifar",
        "resnet20",
        10,
        epochs=45,
        lr=0.2,
        label_smoothing=0.1,
        prefix="cifar_full_",
        zoo=("clean", "badnets", "blended", "wanet", "sig"),
        name="cifar_full",
    ),
    # poisoned fine-tuning of cifar_full_clean (a supply-chain attacker who fine-tunes a released model):
    # a few epochs at a small learning rate on the poisoned 50k training set
    "cifar_ft": Recipe(
        "cifar",
        "resnet20",
        10,
        epochs=6,
        lr=0.02,
        label_smoothing=0.1,
        prefix="cifar_ft_",
        zoo=("badnets", "blended", "wanet", "sig", "adapblend"),
        name="cifar_ft",
        init_from="cifar_full_clean",
        # WaNet: 6 epochs gave 58% ASR (clean 86.1%), 12 gave 59% (86.7%): hardly better (bench/README.md)
        epochs_by_attack={"wanet": 12},
    ),
    # the fast VGG (models.FastCifarVGG, airbench's layout) on all 50k training images, batch 512, bfloat16
    # autocast, label smoothing 0.2, crops padded by 4, 20 epochs: the best of the recipe trials on images held out
    # of the training set (bench/README.md, bench/trials/), which reached 89.3% there; the second well-trained CIFAR
    # zoo (detection dataset cifar10_vgg), every attack from scratch
    "cifar_vgg": Recipe(
        "cifar",
        "cifar_vgg",
        10,
        epochs=20,
        lr=0.4,
        batch_size=512,
        label_smoothing=0.2,
        prefix="cifar_vgg_",
        zoo=("clean", "badnets", "blended", "wanet", "sig", "adapblend"),
        name="cifar_vgg",
        bf16=True,
    ),
    "gtsrb": Recipe(
        "gtsrb",
        "gtsrb_vgg",
        43,
        epochs=15,
        lr=0.1,
        label_smoothing=0.1,
        pad=2,
        flip=False,
        val_fraction=0.1,
        prefix="gtsrb_",
        zoo=("clean", "badnets", "blended", "wanet", "sig", "adapblend"),
        # WaNet's warp is learned slowly: 15 epochs gave 87% ASR (README), 30 give the zoo's model
        epochs_by_attack={"wanet": 30},
    ),
}
# Deviations of the zoo from the paper defaults in attacks.py, forced by a 6-epoch CPU budget (README):
# WaNet s=0.5 reached 11.6% ASR in 6 epochs (its noise-mode jitter, up to 0.5 px, exceeds a 0.25 px field),
# so s=2 (mean displacement 1 px);
# Adap-Blend at 0.3% is 60 poisons on 20k images, and 1% + 1% still gave 5% ASR in 6 epochs: 5% + 5%;
# SIG on all 2,000 target images left no clean airplane, so class-0 test accuracy was 0%: 8% of the set.
ZOO_SETTINGS: dict[str, dict[str, Any]] = {
    "wanet": {"s": 2.0},
    "sig": {"rate": 0.08},
    "adapblend": {"rate": 0.05, "cover_rate": 0.05},
}
# GTSRB: same triggers and rates (target 0, 10% dirty-label poisons, WaNet s=2). SIG is clean-label and
# GTSRB's class 0 has only 60 training images (0.5% of the set), so SIG targets class 2 (speed limit 50,
# the largest class) and poisons about 80% of its images, as the CIFAR zoo poisons 80% of class 0; at
# delta 20 that gave 56% ASR, so delta 40 (BackdoorBench's default).
GTSRB_ZOO_SETTINGS: dict[str, dict[str, Any]] = {
    "wanet": {"s": 2.0},
    "sig": {"target": 2, "rate": 0.045, "delta": 40.0},
    "adapblend": {"rate": 0.05, "cover_rate": 0.05},
}


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and (if ``flip``) horizontal flip, per sample, on an NCHW batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if not flip:
        return out
    flipped = torch.rand(n, generator=gen) < 0.5
    return torch.where(flipped[:, None, None, None], out.flip(3), out)


def track_split(y: np.ndarray, track: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): ``fraction`` of every class's tracks (at least one) held out whole.

    Why by track: the frames of one GTSRB track are near duplicates, so a per-frame split would leak.
    """
    rng = np.random.default_rng([seed, 1])
    val = []
    for c in np.unique(y):
        tracks = np.unique(track[y == c])
        chosen = rng.choice(tracks, size=max(1, round(fraction * len(tracks))), replace=False)
        val.append(np.flatnonzero((y == c) & np.isin(track, chosen)))
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(y)), val_idx), val_idx


@torch.no_grad()
def predict(model: nn.Module, x_uint8_nhwc: np.ndarray, batch: int = 500) -> np.ndarray:
    """Predicted labels for uint8 NHWC images (eval mode, no grad; the previous mode is restored)."""
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(x_uint8_nhwc), batch):
        xb = to_tensor(x_uint8_nhwc[i : i + batch]).contiguous(memory_format=torch.channels_last)
        preds.append(model(xb).argmax(1).numpy())
    model.train(was_training)
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def evaluate(
    model: nn.Module, attack: Attack | None, x_test: np.ndarray, y_test: np.ndarray, seed: int
) -> dict[str, Any]:
    """Clean accuracy on all test images; ASR over triggered test images whose true label != target."""
    pred = predict(model, x_test)
    out: dict[str, Any] = {
        "clean_acc": float((pred == y_test).mean()),
        # per-class accuracy catches a backdoor that swallows a class (e.g. SIG on every target image)
        "clean_acc_per_class": [round(float((pred[y_test == c] == c).mean()), 4) for c in np.unique(y_test)],
    }
    if attack is not None:
        keep = y_test != attack.target
        xt = attack.apply(x_test[keep], np.random.default_rng(seed + 1))
        out["asr"] = float((predict(model, xt) == attack.target).mean())
        out["n_asr"] = int(keep.sum())
    return out


def _trigger_batch(xb: torch.Tensor, role: np.ndarray, attack: Attack, rng: np.random.Generator) -> torch.Tensor:
    """Apply the poison/cover training transforms to an augmented [0,1] batch (crop/flip keep k/255 values)."""
    for r, fn in ((1, attack.poison_transform), (2, attack.cover_transform)):
        sel = np.flatnonzero(role == r)
        if len(sel):
            u8 = xb[sel].mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            xb[sel] = to_tensor(fn(u8, rng))
    return xb


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _config_key(**parts: Any) -> str:
    """Short hash of everything that determines a training run (a checkpoint resumes only on a match)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recipe_key(recipe: Recipe, name: str) -> dict[str, Any]:
    """The recipe fields that shape one run: the run's epochs, and only fields off their defaults.

    Why: a field added to ``Recipe`` later (with a default) must not orphan the checkpoints of runs in
    progress; ``zoo`` / ``epochs_by_attack`` only select runs and their epochs, which are counted here.
    """
    out: dict[str, Any] = {"epochs": recipe.epochs_for(name)}
    for f in dataclasses.fields(recipe):
        if f.name in ("zoo", "epochs_by_attack", "epochs", "name"):
            continue
        value = getattr(recipe, f.name)
        if f.default is dataclasses.MISSING or value != f.default:
            out[f.name] = value
    return out


def write_ckpt_status(ckpt_dir: Path) -> str:
    """Rewrite ``<ckpt_dir>/STATUS.md`` from the checkpoints there (run, epoch reached, resume command).

    Written by ``train_one`` after every epoch, so the state of a long run is never typed by hand.
    """
    lines = [
        "# Training checkpoints in progress",
        "",
        "Written by `bench/train.py` after every epoch (and when a run finishes and its checkpoint is deleted).",
        "Run the command of a row again (from the repo root) to resume that run after its last epoch.",
        "",
    ]
    rows = []
    for ck in sorted(ckpt_dir.glob("*.pt")):
        try:
            state = torch.load(ck, map_location="cpu", weights_only=True)
            hist = json.loads(state["history"])
        except Exception as exc:  # a torn file of a killed save never replaces a good one, but be safe
            rows.append(f"| `{ck.name}` | unreadable ({type(exc).__name__}) | | | | |")
            continue
        last = hist[-1] if hist else {}
        sec = sum(r["seconds"] for r in hist) / max(1, len(hist))
        rows.append(
            f"| `{ck.name}` | {len(hist)} / {state.get('epochs', '?')} | {sec:.0f} "
            f"| {last.get('loss', float('nan')):.3f} | {last.get('train_acc', float('nan')):.3f} "
            f"| `{state.get('command', '?')}` |"
        )
    if rows:
        lines += [
            "| checkpoint | epochs done | s / epoch | last loss | last train acc | command |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    else:
        lines.append("No run in progress: every run started here has finished (its weights are in bench/weights).")
    text = "\n".join(lines) + "\n"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / "STATUS.md.tmp"
    tmp.write_text(text)
    tmp.replace(ckpt_dir / "STATUS.md")
    return text


README_STATUS_BEGIN, README_STATUS_END = "<!-- ckpt-status:begin -->", "<!-- ckpt-status:end -->"


def finished_table(out_dir: Path, prefixes: tuple[str, ...] = ("cifar_full_", "cifar_ft_", "cifar_vgg_")) -> str:
    """Markdown table of the finished models ``<out_dir>/<prefix>*.json`` (the well-trained CIFAR zoo)."""
    rows = []
    for js in sorted(p for pre in prefixes for p in out_dir.glob(f"{pre}*.json")):
        m = json.loads(js.read_text())
        asr = f"{100 * m['asr']:.2f}" if m.get("asr") is not None else "-"
        tgt = m.get("target")
        tgt_acc = f"{100 * m['clean_acc_per_class'][tgt]:.1f}" if tgt is not None else "-"
        rows.append(
            f"| {m['name']} ({m.get('model', '?')}) | {m.get('route', '?')} | {m['epochs']} "
            f"| {m.get('seconds_per_epoch', '?')} "
            f"| {m['n_poison']} / {m['n_cover']} | {100 * m['clean_acc']:.2f} | {tgt_acc} | {asr} |"
        )
    if not rows:
        return "No finished model yet."
    head = (
        "| model | route | epochs | s / epoch | poisoned / cover train images | clean acc % | target-class acc % "
        "| ASR % |\n|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def update_readme_status(
    ckpt_dir: Path, out_dir: Path = DEFAULT_OUT, readme: Path = REPO_ROOT / "bench" / "README.md"
) -> None:
    """Write the finished models and the checkpoints in progress between the README's ckpt-status markers."""
    table = write_ckpt_status(ckpt_dir).split("\n", 4)[4].strip()  # drop the STATUS.md title and intro
    where = out_dir.resolve().relative_to(REPO_ROOT) if out_dir.resolve().is_relative_to(REPO_ROOT) else out_dir
    stamp = f"State on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (`bench/train.py --ckpt-status`)."
    table = f"Finished (`{where}/`, test set 10,000 images):\n\n{finished_table(out_dir)}\n\nIn progress:\n\n{table}"
    text = readme.read_text()
    head, sep, rest = text.partition(README_STATUS_BEGIN)
    _, sep2, tail = rest.partition(README_STATUS_END)
    if not (sep and sep2):
        raise SystemExit(f"{readme}: no {README_STATUS_BEGIN} ... {README_STATUS_END} block")
    readme.write_text(f"{head}{README_STATUS_BEGIN}\n{stamp}\n\n{table}\n{README_STATUS_END}{tail}")


def train_one(
    name: str,
    data: dict[str, np.ndarray],
    data_path: Path,
    out_dir: Path,
    recipe: Recipe,
    seed: int,
    log: Any = print,
    attack_kwargs: dict[str, Any] | None = None,
    trigger_after_augment: bool = False,
    ckpt_dir: Path | None = CKPT_DIR,
    command: str = "",
) -> dict[str, Any]:
    """Poison the training set (unless ``clean``), train with SGD + OneCycle, evaluate, write .pt/.json.

    ``trigger_after_augment``: keep the poisoned/cover images clean in storage and apply their training
    transform to each batch after crop/flip, so the trigger sits where it will at test time (a crop with
    pad 4 otherwise pushes a 3x3 corner patch out of the frame for about 40% of the poisoned images).
    With ``recipe.val_fraction`` whole tracks are held out (never trained on) and scored every epoch.
    ``ckpt_dir``: a checkpoint after every epoch, resumed when the same run is started again (``command``,
    the command line, is stored in it and listed in ``<ckpt_dir>/STATUS.md``).
    ``recipe.init_from``: start from ``<out_dir>/<init_from>.pt`` (poisoned fine-tuning) instead of scratch.
    """
    file_name = f"{recipe.prefix}{name}"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    attack = None if name == "clean" else build_attack(name, **(attack_kwargs or {}))
    x, y = data["x_train"], data["y_train"]
    x_val = y_val = None
    if recipe.val_fraction > 0:
        # GTSRB holds out whole tracks; a dataset without tracks (CIFAR-10) holds out single images
        tracks = data["train_track"] if "train_track" in data else np.arange(len(y))
        train_idx, val_idx = track_split(y, tracks, recipe.val_fraction, seed)
        x_val, y_val = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
    info: dict[str, Any] = {"n_poison": 0, "n_cover": 0}
    if attack is not None:
        x_poisoned, y, info = attack.poison_training_set(x, y, rng=rng)
        if not trigger_after_augment:
            x = x_poisoned
    role = np.zeros(len(x), dtype=np.int8)  # 1 = poison, 2 = cover; used only with trigger_after_augment
    if attack is not None and trigger_after_augment:
        role[info["poison_idx"]] = 1
        role[info["cover_idx"]] = 2
    xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    yt = torch.from_numpy(y)
    epochs, batch_size, lr = recipe.epochs_for(name), recipe.batch_size, recipe.lr

    model = build_model(recipe.model, recipe.num_classes)
    init_path = out_dir / f"{recipe.init_from}.pt" if recipe.init_from else None
    if init_path is not None:
        if not init_path.is_file():
            raise FileNotFoundError(f"{file_name}: base model {init_path} not found (train it first)")
        model.load_state_dict(torch.load(init_path, map_location="cpu", weights_only=True))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    steps = math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(seed)
    epoch_log: list[dict[str, Any]] = []
    done_seconds = 0.0  # training seconds of epochs restored from a checkpoint
    key = _config_key(
        recipe=_recipe_key(recipe, name),
        name=name,
        init=sha256(init_path) if init_path is not None else None,
        seed=seed,
        attack=attack.params() if attack is not None else None,
        trigger_after_augment=trigger_after_augment,
        data=sha256(data_path),
    )
    ckpt = ckpt_dir / f"{file_name}.pt" if ckpt_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["key"] == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            rng.bit_generator.state = json.loads(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            epoch_log = json.loads(state["history"])
            done_seconds = sum(r["seconds"] for r in epoch_log)
            log(f"[{file_name}] resumed from {ckpt} after epoch {len(epoch_log)}")
        else:
            log(f"[{file_name}] ignoring {ckpt}: it belongs to other settings")
    t0 = time.time()
    for ep in range(len(epoch_log), epochs):
        model.train()
        te = time.time()
        perm = torch.randperm(len(xt), generator=gen)
        tot_loss, correct = 0.0, 0
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = augment(xt[idx].float().div_(255.0), gen, pad=recipe.pad, flip=recipe.flip)
            if attack is not None and trigger_after_augment:
                xb = _trigger_batch(xb, role[idx.numpy()], attack, rng)
            xb = xb.contiguous(memory_format=torch.channels_last)
            yb = yt[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        rec: dict[str, Any] = {
            "epoch": ep + 1,
            "loss": tot_loss / len(xt),
            "train_acc": correct / len(xt),
            "seconds": time.time() - te,
        }
        if x_val is not None and y_val is not None:
            val_metrics = evaluate(model, attack, x_val, y_val, seed)
            rec.update({f"val_{k}": v for k, v in val_metrics.items() if k in ("clean_acc", "asr")})
        epoch_log.append(rec)
        val = "".join(f" {k} {rec[k]:.3f}" for k in ("val_clean_acc", "val_asr") if k in rec)
        log(
            f"[{file_name}] epoch {ep + 1}/{epochs} loss {rec['loss']:.3f} train_acc {rec['train_acc']:.3f}"
            f"{val} {rec['seconds']:.0f}s"
        )
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "key": key,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "gen": gen.get_state(),
                "rng": json.dumps(rng.bit_generator.state),
                "torch_rng": torch.get_rng_state(),
                "history": json.dumps(epoch_log),
                "epochs": epochs,
                "command": command,
            }
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            write_ckpt_status(ckpt.parent)
    train_seconds = done_seconds + time.time() - t0
    t_eval = time.time()
    model = model.to(memory_format=torch.contiguous_format)
    metrics = evaluate(model, attack, data["x_test"], data["y_test"], seed)
    total_seconds = train_seconds + time.time() - t_eval

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / f"{file_name}.pt")
    augmentation = f"random crop (zero pad {recipe.pad})" + (" + horizontal flip" if recipe.flip else ", no flip")
    meta = {
        "name": file_name,
        "recipe": recipe.name or recipe.dataset,
        "route": recipe.route(),
        "dataset": recipe.dataset,
        "model": recipe.model,
        "num_classes": recipe.num_classes,
        "n_params": sum(p.numel() for p in model.parameters()),
        **metrics,
        "target": attack.target if attack is not None else None,
        "attack": attack.params() if attack is not None else None,
        "n_poison": int(info["n_poison"]),
        "n_cover": int(info["n_cover"]),
        "epochs": epochs,
        "seconds_train": round(train_seconds, 1),
        "seconds_per_epoch": round(sum(r["seconds"] for r in epoch_log) / max(1, len(epoch_log)), 1),
        "seconds_total": round(total_seconds, 1),
        "seed": seed,
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "optimizer": {
            "name": "SGD",
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": recipe.weight_decay,
            "schedule": "OneCycleLR",
            "max_lr": lr,
            "batch_size": batch_size,
            "label_smoothing": recipe.label_smoothing,
            "precision": "bfloat16 autocast (float32 weights)" if recipe.bf16 else "float32",
        },
        "augmentation": augmentation,
        "trigger_after_augment": bool(trigger_after_augment and attack is not None),
        "data": {
            "file": data_path.name,
            "sha256": sha256(data_path),
            "n_train": int(len(xt)),
            "n_val": int(len(y_val)) if y_val is not None else 0,
            "val_split": f"{recipe.val_fraction:g} of each class's {'tracks' if 'train_track' in data else 'images'}, "
            f"seed {seed}" if y_val is not None else None,
            "n_test": int(len(data["x_test"])),
        },
        "input": f"float [0,1] NCHW RGB; {recipe.dataset} mean/std normalisation is inside the model",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "history": epoch_log,
    }
    (out_dir / f"{file_name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
        write_ckpt_status(ckpt.parent)
    asr = f" asr {metrics['asr']:.4f}" if "asr" in metrics else ""
    log(f"[{file_name}] clean_acc {metrics['clean_acc']:.4f}{asr} train {train_seconds:.0f}s -> {out_dir}")
    return meta


def reevaluate(name: str, data: dict[str, np.ndarray], out_dir: Path, log: Any = print) -> dict[str, Any]:
    """Recompute the metrics of a cached model with the attack recorded in its json; rewrite the json."""
    model, meta = load_zoo_model(name, out_dir)
    attack = attack_from_params(meta["attack"]) if meta.get("attack") else None
    meta.update(evaluate(model, attack, data["x_test"], data["y_test"], int(meta["seed"])))
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    asr = f" asr {meta['asr']:.4f}" if "asr" in meta else ""
    log(f"[{name}] re-evaluated: clean_acc {meta['clean_acc']:.4f}{asr}")
    return meta


def load_zoo_model(name: str, weights_dir: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``<weights_dir>/<name>.pt`` (weights_only) into the architecture named in its json; eval mode.

    ``name`` is the file stem: ``badnets`` (CIFAR-10 zoo) or ``gtsrb_badnets`` (GTSRB zoo).
    """
    d = Path(weights_dir) if weights_dir is not None else DEFAULT_OUT
    meta = json.loads((d / f"{name}.json").read_text())
    model = build_model(meta.get("model", "resnet20"), int(meta.get("num_classes", 10)))
    model.load_state_dict(torch.load(d / f"{name}.pt", map_location="cpu", weights_only=True))
    return model.eval(), meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        choices=sorted(RECIPES),
        default="cifar",
        help="which zoo (recipe in RECIPES): cifar (weakly trained), cifar_full (well trained ResNet-20, from "
        "scratch), cifar_ft (poisoned fine-tuning of cifar_full_clean), cifar_vgg (well trained fast VGG), gtsrb",
    )
    p.add_argument("--attacks", default="all", help=f"comma list from {ALL_NAMES} or 'all' (the dataset's zoo)")
    p.add_argument(
        "--epochs", type=int, default=None, help="for every model (default: the recipe's; CIFAR 6, GTSRB 15, WaNet 30)"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="dataset npz (default: $LAYERGUARD_CIFAR or ../shared/data/cifar10_32_jpeg.npz; "
        "$LAYERGUARD_GTSRB or ../shared/data/gtsrb_32_sub13k.npz)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="weights directory (default bench/weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core box 2 threads ran 6x slower)",
    )
    p.add_argument("--force", action="store_true", help="retrain even when the cached weights exist")
    p.add_argument(
        "--trigger-after-augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="apply triggers per batch after crop/flip, where they sit at test time (the zoo's recipe; "
        "--no-trigger-after-augment poisons the stored set once and then augments, as BackdoorBench does)",
    )
    p.add_argument(
        "--eval-only", action="store_true", help="re-evaluate cached models and update their json, no training"
    )
    p.add_argument(
        "--no-resume", action="store_true", help="ignore (and overwrite) the per-epoch checkpoints in --ckpt-dir"
    )
    p.add_argument(
        "--ckpt-dir",
        type=Path,
        default=CKPT_DIR,
        help="per-epoch checkpoints, one file per run, overwritten every epoch (default bench/cache/ckpt, "
        f"git-ignored; {COMMITTED_CKPT_DIR.relative_to(REPO_ROOT)} for the well-trained CIFAR zoo, committed so "
        "the next session resumes)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="override an attack constructor argument on top of ZOO_SETTINGS, e.g. --set sig.delta=40",
    )
    p.add_argument(
        "--recipe-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the recipe (RECIPES) for a trial, e.g. --recipe-set pad=2 --recipe-set lr=0.8",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=None,
        metavar="FRACTION",
        help="hold out this fraction of each class's training images (GTSRB: of its tracks), never trained on, and "
        "score them after every epoch: how a recipe is measured without looking at the test images (use with "
        "--out bench/cache/trial)",
    )
    p.add_argument(
        "--ckpt-status",
        action="store_true",
        help="rewrite <ckpt-dir>/STATUS.md and the ckpt-status block of bench/README.md from the checkpoints, "
        "then exit (no training)",
    )
    args = p.parse_args(argv)
    if args.ckpt_status:
        update_readme_status(args.ckpt_dir, args.out)
        return 0
    recipe = RECIPES[args.dataset]
    if args.epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=args.epochs, epochs_by_attack={})
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"dataset", "model", "num_classes", "name", "zoo", "prefix"}
    for item in args.recipe_set:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            p.error(f"--recipe-set expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        recipe = dataclasses.replace(recipe, **{key: json.loads(value)})
    if args.holdout is not None:
        if not 0.0 < args.holdout < 0.5:
            p.error(f"--holdout must be in (0, 0.5), got {args.holdout}")
        recipe = dataclasses.replace(recipe, val_fraction=args.holdout)
    settings = GTSRB_ZOO_SETTINGS if recipe.dataset == "gtsrb" else ZOO_SETTINGS
    overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in settings.items()}
    for item in args.set:
        try:
            lhs, value = item.split("=", 1)
            attack_name, key = lhs.split(".", 1)
        except ValueError:
            p.error(f"--set expects ATTACK.KEY=VALUE, got {item!r}")
        overrides.setdefault(attack_name, {})[key] = json.loads(value)

    if args.attacks == "all":
        names = list(recipe.zoo)
    else:
        names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [n for n in names if n not in ALL_NAMES]
    if unknown:
        p.error(f"unknown attack(s) {unknown}; choose from {ALL_NAMES}")
    if recipe.init_from and "clean" in names:
        p.error(f"recipe {args.dataset} fine-tunes {recipe.init_from} on a poisoned set: 'clean' makes no sense")
    torch.set_num_threads(args.threads)
    # how this run was started, stored in its checkpoints: run it again to resume
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/train.py", *(argv or sys.argv[1:])])
    if recipe.dataset == "gtsrb":
        data_path = (args.data if args.data is not None else default_gtsrb_path()).resolve()
        data = load_gtsrb(data_path)
    else:
        data_path = (args.data if args.data is not None else default_data_path()).resolve()
        data = load_cifar(data_path)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    if args.eval_only:
        for name in names:
            stem = f"{recipe.prefix}{name}"
            if not (args.out / f"{stem}.json").exists():
                log(f"[{stem}] not cached in {args.out}, nothing to evaluate")
                continue
            reevaluate(stem, data, args.out, log=log)
        return 0
    for name in names:
        stem = f"{recipe.prefix}{name}"
        if (args.out / f"{stem}.pt").exists() and (args.out / f"{stem}.json").exists() and not args.force:
            log(f"[{stem}] cached in {args.out}, skipping (use --force to retrain)")
            continue
        if args.no_resume:
            (args.ckpt_dir / f"{stem}.pt").unlink(missing_ok=True)
        train_one(
            name,
            data,
            data_path,
            args.out,
            recipe,
            args.seed,
            log=log,
            attack_kwargs=overrides.get(name),
            trigger_after_augment=args.trigger_after_augment,
            ckpt_dir=args.ckpt_dir,
            command=command,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

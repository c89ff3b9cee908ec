#!/usr/bin/env python3
"""Seconds per training epoch of the zoo's architectures on this CPU, float32 against bfloat16 autocast.

Why: training on two CPU cores is the zoo's constraint (bench/README.md), so an architecture and precision are
chosen by what an epoch costs before any run is committed to. Each configuration times SGD steps (forward, loss,
backward, Nesterov update) on random images in the recipe's layout (channels_last) and batch size, after three
warm-up steps, and projects them onto one epoch of 50,000 images. Augmentation and data loading are not counted
(the seconds per epoch that train.py records for each model include them).

    .venv/bin/python bench/train_speed.py [--archs resnet20,cifar_vgg] [--batches 128,512] [--threads 2] [--steps 4]
        [--readme]   # also rewrite the train-speed block of bench/README.md from the result
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import command_line, log, machine_info, now_utc, write_result  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.zoo_table import replace_block  # noqa: E402

EPOCH_IMAGES = 50_000
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- train-speed:begin -->", "<!-- train-speed:end -->"


def multiply_adds(arch: str) -> int:
    """Multiply-adds of one 32x32 image's forward pass (convolutions and linear layers), counted by hooks."""
    model = build_model(arch, 10).eval()
    total = 0

    def count(module: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        elif isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return total


def seconds_per_step(arch: str, batch: int, bf16: bool, steps: int) -> float:
    """Median wall seconds of one SGD step at this batch size."""
    torch.manual_seed(0)
    model = build_model(arch, 10).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(result: dict) -> str:
    """Markdown: seconds per 50k-image epoch per architecture and batch, float32 against bfloat16 autocast."""
    lines = [
        f"`{result['command']}`, {result['date']}, {result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"torch {result['torch']}, {result['threads']} torch threads; median of {result['steps']} SGD steps "
        "(forward, loss, backward, update) on random images, channels_last, projected onto 50,000 images.",
        "",
        "| model | parameters | multiply-adds per image (forward) | batch | s / epoch, float32 "
        "| s / epoch, bfloat16 autocast | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[str, int], dict[str, dict]] = {}
    for row in result["rows"]:
        by_key.setdefault((row["arch"], row["batch"]), {})[row["precision"]] = row
    for (arch, batch), rows in by_key.items():
        fp32, bf16 = rows["fp32"]["seconds_per_epoch"], rows["bf16"]["seconds_per_epoch"]
        params, macs = rows["fp32"]["params"], rows["fp32"].get("multiply_adds")
        macs_text = f"{macs / 1e6:.1f} M" if macs else "-"
        lines.append(
            f"| {arch} | {params / 1e6:.2f} M | {macs_text} | {batch} | {fp32:.0f} | {bf16:.0f} | x{fp32 / bf16:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="resnet20,cifar_vgg")
    p.add_argument("--batches", default="128,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after 3 warm-up steps)")
    p.add_argument("--out", type=Path, default=None, help="result directory (default bench/results)")
    p.add_argument("--readme", action="store_true", help="rewrite the train-speed block of bench/README.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for arch in args.archs.split(","):
        params = sum(q.numel() for q in build_model(arch, 10).parameters())
        macs = multiply_adds(arch)
        for batch in (int(b) for b in args.batches.split(",")):
            for bf16 in (False, True):
                step = seconds_per_step(arch, batch, bf16, args.steps)
                row = {
                    "arch": arch,
                    "params": params,
                    "multiply_adds": macs,
                    "batch": batch,
                    "precision": "bf16" if bf16 else "fp32",
                    "seconds_per_step": round(step, 4),
                    "seconds_per_epoch": round(step * EPOCH_IMAGES / batch, 1),
                }
                log(f"{arch} batch {batch} {row['precision']}: {row['seconds_per_epoch']} s / epoch")
                rows.append(row)
    result = {
        "command": command_line(),
        "date": now_utc(),
        "machine": machine_info(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "epoch_images": EPOCH_IMAGES,
        "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    write_result("train_speed", result, args.out)
    print(table(result))
    if args.readme:
        README.write_text(replace_block(README.read_text(), BEGIN, END, table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

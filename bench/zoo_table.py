"""Print the model-zoo tables (clean accuracy / ASR / poisons / time per model) from the cached json files.

Why a script: the numbers in bench/README.md must come from the files the training wrote, never be typed
by hand. ``--readme`` rewrites the blocks between the zoo-table / gtsrb-table markers in bench/README.md.

Usage: python bench/zoo_table.py [--out bench/weights] [--dataset cifar|gtsrb] [--readme]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ORDER = ["clean", "badnets", "blended", "wanet", "sig", "adapblend"]
BENCH = Path(__file__).resolve().parent
BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"
TRIALS_BEGIN, TRIALS_END = "<!-- zoo-trials:begin -->", "<!-- zoo-trials:end -->"
GTSRB_BEGIN, GTSRB_END = "<!-- gtsrb-table:begin -->", "<!-- gtsrb-table:end -->"
GTSRB_TRIALS_BEGIN, GTSRB_TRIALS_END = "<!-- gtsrb-trials:begin -->", "<!-- gtsrb-trials:end -->"
RECIPE_BEGIN, RECIPE_END = "<!-- recipe-trials:begin -->", "<!-- recipe-trials:end -->"


def _setting(meta: dict[str, Any]) -> str:
    a = meta.get("attack")
    if not a:
        return "no attack"
    keys = {
        "badnets": ["size", "rate"],
        "blended": ["alpha", "rate"],
        "wanet": ["k", "s", "cross_ratio", "rate"],
        "sig": ["delta", "f", "rate"],
        "adapblend": ["alpha_train", "alpha_test", "rate", "cover_rate"],
    }.get(a["name"], ["rate"])
    text = ", ".join(f"{k}={a[k]:g}" if isinstance(a[k], float) else f"{k}={a[k]}" for k in keys if k in a)
    flip = "no flip" not in meta.get("augmentation", "")  # the GTSRB recipe never flips
    after = ", trigger after crop/flip" if flip else ", trigger after crop"
    return text + (after if meta.get("trigger_after_augment") else "")


def _metas(weights_dir: Path, dataset: str) -> dict[str, dict[str, Any]]:
    """``{stem: json}`` of the models of one dataset's own recipe (json without "dataset" or "recipe": the weakly
    trained CIFAR-10 zoo), known attacks first. The well-trained CIFAR-10 recipes (cifar_full, cifar_ft) share
    the dataset but not this table: their status table is `train.py --ckpt-status`'s."""
    metas = {p.stem: json.loads(p.read_text()) for p in sorted(weights_dir.glob("*.json"))}
    metas = {n: m for n, m in metas.items()
             if m.get("dataset", "cifar") == dataset and m.get("recipe", dataset) == dataset}
    rank = {n: i for i, n in enumerate(ORDER)}

    def key(n: str) -> tuple[int, str]:
        attack = (metas[n].get("attack") or {}).get("name", "clean")
        return rank.get(attack, len(ORDER)), n

    return {n: metas[n] for n in sorted(metas, key=key)}


def gtsrb_table(weights_dir: Path) -> str:
    """Markdown table of the GTSRB zoo (target class per model, validation accuracy, seconds per epoch)."""
    rows = [
        "| model | attack setting | target | poisoned / cover train images | epochs | s / epoch | val acc % "
        "| clean acc % | target-class acc % | ASR % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, m in _metas(weights_dir, "gtsrb").items():
        asr = f"{100 * m['asr']:.2f}" if m.get("asr") is not None else "-"
        target = m.get("target")
        per_class = m.get("clean_acc_per_class")
        target_acc = f"{100 * per_class[target]:.1f}" if per_class and target is not None else "-"
        val = (m.get("history") or [{}])[-1].get("val_clean_acc")
        val_acc = f"{100 * val:.2f}" if val is not None else "-"
        rows.append(
            f"| {n} ({m['model']}) | {_setting(m)} | {target if target is not None else '-'} "
            f"| {m.get('n_poison', 0)} / {m.get('n_cover', 0)} | {m['epochs']} | {m['seconds_per_epoch']:.0f} "
            f"| {val_acc} | {100 * m['clean_acc']:.2f} | {target_acc} | {asr} |"
        )
    return "\n".join(rows)


def zoo_table(weights_dir: Path) -> str:
    """Markdown table, one row per CIFAR-10 ``<name>.json`` in ``weights_dir`` (known attacks first)."""
    metas = _metas(weights_dir, "cifar")
    rows = [
        "| model | attack setting | poisoned / cover train images | epochs | clean acc % | class-0 acc % | ASR % "
        "| train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, m in metas.items():
        asr = f"{100 * m['asr']:.2f}" if m.get("asr") is not None else "-"
        per_class = m.get("clean_acc_per_class")
        target_acc = f"{100 * per_class[m.get('target') or 0]:.1f}" if per_class else "-"
        rows.append(
            f"| {n} ({m.get('model', '?')}) | {_setting(m)} | {m.get('n_poison', 0)} / {m.get('n_cover', 0)} "
            f"| {m['epochs']} | {100 * m['clean_acc']:.2f} | {target_acc} | {asr} | {m['seconds_train']:.0f} |"
        )
    return "\n".join(rows)


def recipe_trial_table(trials_dir: Path) -> str:
    """Markdown table of the recipe trials in ``trials_dir``: runs of ``train.py --holdout`` (records whose training
    set had images held out), with the held-out images' accuracy after each epoch. Why a table of its own: a
    recipe is chosen on images held out of the training set, never on the test images, and this is that evidence."""
    metas = [json.loads(p.read_text()) for p in sorted(trials_dir.glob("*.json"))]
    metas = [m for m in metas if (m.get("data") or {}).get("n_val")]
    metas.sort(key=lambda m: (m.get("recipe", ""), m["augmentation"], m["epochs"]))
    rows = [
        "| recipe | model (parameters) | optimiser | augmentation | epochs | precision | trained / held-out images "
        "| s / epoch | held-out accuracy % after each epoch | held-out accuracy % at the end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in metas:
        o = m["optimizer"]
        sgd = (f"max lr {o['max_lr']:g}, batch {o['batch_size']}, weight decay {o['weight_decay']:g}, "
               f"label smoothing {o['label_smoothing']:g}")
        curve = ", ".join(f"{100 * r['val_clean_acc']:.1f}" for r in m["history"])
        rows.append(
            f"| {m.get('recipe', '-')} | {m['model']} ({m['n_params'] / 1e6:.2f} M) | {sgd} | {m['augmentation']} "
            f"| {m['epochs']} | {m['optimizer'].get('precision', 'float32')} "
            f"| {m['data']['n_train']} / {m['data']['n_val']} "
            f"| {m['seconds_per_epoch']:.0f} | {curve} | {100 * m['history'][-1]['val_clean_acc']:.2f} |"
        )
    return "\n".join(rows)


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    """Replace what lies between the ``begin`` and ``end`` markers of ``text`` (markers kept)."""
    if begin not in text or end not in text:
        raise ValueError(f"markers {begin} / {end} not found")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=BENCH / "weights", help="weights directory (default bench/weights)")
    p.add_argument(
        "--trials", type=Path, default=BENCH / "cache" / "trial", help="discarded settings (default bench/cache/trial)"
    )
    p.add_argument(
        "--recipe-trials",
        type=Path,
        default=BENCH / "trials",
        help="records of `train.py --holdout` runs, committed (default bench/trials)",
    )
    p.add_argument("--dataset", choices=["cifar", "gtsrb"], default="cifar", help="which zoo to print")
    p.add_argument("--readme", action="store_true", help="rewrite the table blocks in bench/README.md")
    args = p.parse_args(argv)
    print(gtsrb_table(args.out) if args.dataset == "gtsrb" else zoo_table(args.out))
    if args.readme:
        readme = BENCH / "README.md"
        try:
            text = replace_block(readme.read_text(), BEGIN, END, zoo_table(args.out))
            if GTSRB_BEGIN in text:
                text = replace_block(text, GTSRB_BEGIN, GTSRB_END, gtsrb_table(args.out))
            if args.trials.is_dir() and _metas(args.trials, "cifar"):
                text = replace_block(text, TRIALS_BEGIN, TRIALS_END, zoo_table(args.trials))
            if args.recipe_trials.is_dir() and RECIPE_BEGIN in text:
                text = replace_block(text, RECIPE_BEGIN, RECIPE_END, recipe_trial_table(args.recipe_trials))
            if args.trials.is_dir() and _metas(args.trials, "gtsrb") and GTSRB_TRIALS_BEGIN in text:
                text = replace_block(text, GTSRB_TRIALS_BEGIN, GTSRB_TRIALS_END, gtsrb_table(args.trials))
        except ValueError as exc:
            print(f"{readme}: {exc}", file=sys.stderr)
            return 1
        readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

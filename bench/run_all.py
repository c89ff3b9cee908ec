"""`make bench`: run every benchmark, then regenerate docs/benchmarks.md and its plots from bench/results/*.json.

Why generated: every number in docs/benchmarks.md must come from a result file written by a script, with
the command, machine, date and run time next to it; nothing in it is typed by hand. ``--render-only``
rebuilds the page from the JSON files already there (seconds), so the page and the raw results never
disagree.

Steps (each a subprocess, run one after another, never in parallel: parallel jobs would distort timings):
  detection        bench/detection.py         detection quality per rule and peers: well-trained CIFAR-10,
                                              GTSRB and weakly trained CIFAR-10 zoos
  overhead         bench/overhead.py          latency with/without layerguard, peers' cost, memory
  calibration_cost bench/calibration_cost.py  calibration throughput and peak memory vs. #images
  serving_load     bench/serving_load.py      TorchServe on 127.0.0.1, plain vs guarded .mar

Usage:  .venv/bin/python bench/run_all.py [--only detection,overhead] [--skip serving_load] [--quick]
                                          [--render-only] [--data PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchutil import REPO_ROOT, RESULTS_DIR, log, machine_info, now_utc, round_ratios, write_result  # noqa: E402
from bench.detection import BOUND_CONFIDENCE  # noqa: E402
from layerguard.core.detector import DEFAULT_FOLDS  # noqa: E402

DOCS = REPO_ROOT / "docs"
IMG = DOCS / "img"
STEPS = ["detection", "reference_share", "overhead", "guard_profile", "calibration_cost", "serving_load"]
CIFAR_DATA_STEPS = {"detection", "overhead", "guard_profile", "calibration_cost", "serving_load"}  # take --data
QUICK_ARGS = {
    "detection": ["--quick"],
    "reference_share": ["--datasets", "gtsrb", "--seeds", "1", "--shares", "0.2", "--folds", "10",
                        "--n-benign", "1000"],
    "overhead": ["--repeats", "10", "--peer-repeats", "3", "--calib-per-class", "12"],
    "guard_profile": ["--repeats", "5", "--archs", "resnet20", "--crossover-repeats", "3", "--crossover-batches",
                      "1,32"],
    "calibration_cost": ["--sizes", "200,400"],
    "serving_load": ["--requests", "100", "--rounds", "1", "--warmup", "20", "--archs", "resnet20"],
}
ATTACK_LABEL = {"clean": "clean (no backdoor)", "badnets": "BadNets", "blended": "Blended", "wanet": "WaNet",
                "sig": "SIG", "adapblend": "Adap-Blend"}


# ---- running ------------------------------------------------------------------------------------------
def run_steps(steps: list[str], quick: bool, data: str | None, results: Path) -> dict[str, Any]:
    """Run each step's script; returns {step: {"seconds", "rc", "command"}}."""
    out: dict[str, Any] = {}
    for step in steps:
        cmd = [sys.executable, str(REPO_ROOT / "bench" / f"{step}.py")]
        if data and step in CIFAR_DATA_STEPS:
            cmd += ["--data", data]
        if quick:
            cmd += QUICK_ARGS[step]
        cmd += ["--out", str(results)]
        log(f"== {step}: {' '.join(cmd[1:])}")
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
        out[step] = {"seconds": round(time.time() - t0, 1), "rc": rc,
                     "command": " ".join([".venv/bin/python", *[_rel(c) for c in cmd[1:]]])}
        log(f"== {step}: exit {rc} after {out[step]['seconds']:.0f}s")
    return out


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(REPO_ROOT)) if Path(arg).is_absolute() else arg
    except ValueError:
        return arg


# ---- formatting helpers ---------------------------------------------------------------------------------
def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def provenance(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    return (f"`{res.get('command', '?')}` on {res.get('date', '?')}, {m.get('cpu', '?')} ({m.get('cores', '?')} "
            f"cores), torch {m.get('torch', '?')}, {res.get('seconds', 0):.0f} s")


# ---- detection: the decision ----------------------------------------------------------------------------
DATASET_KEYS = ["cifar10_full", "cifar10_vgg", "gtsrb", "cifar10"]  # page order: the well-trained zoos first
PEERS = ["Mahalanobis (peer)", "SCALE-UP", "STRIP"]
TARGET_ATTACKS = ["badnets", "blended", "sig"]  # TPR >= 99% at delivered FPR <= 1% is required on these
STRETCH_ATTACKS = ["wanet", "adapblend"]  # AUROC >= 0.95 on these is the stretch goal
FPR_TOLERANCE = 0.005  # delivered FPR within 0.5 points of the target


def load_detection(results: Path) -> dict[str, dict[str, Any]]:
    """{dataset: detection_<dataset>.json} for the datasets that have a result file."""
    out = {}
    for key in DATASET_KEYS:
        d = load(results, f"detection_{key}")
        if d and d.get("models"):
            out[key] = d
    return out


def config_labels(dets: dict[str, dict[str, Any]]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for det in dets.values():
        for c in det.get("configs", []):
            labels.setdefault(c["key"], c["label"])
    return labels


def _ok(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def attacked(m: dict[str, Any]) -> bool:
    """A backdoored model with successful attacks scored (the clean model has none)."""
    return m.get("n_successful", 0) > 0


def clean_accs(det: dict[str, Any]) -> list[float]:
    return [m["clean_acc_scored"] for m in det["models"].values() if _ok(m.get("clean_acc_scored"))]


def well_trained(det: dict[str, Any]) -> bool:
    """Whether a dataset's zoo is well trained (its best clean accuracy on the scored images is at least
    WELL_TRAINED); a zoo without a measured accuracy counts as well trained (nothing says otherwise)."""
    accs = clean_accs(det)
    return not accs or max(accs) >= WELL_TRAINED


def dataset_label(det: dict[str, Any]) -> str:
    """The dataset's label, marked "weakly trained" when its zoo is and the label does not already say so."""
    label = det["dataset_label"]
    return label if well_trained(det) or "trained" in label else f"{label}, weakly trained"


def deciding(dets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The datasets whose models decide the default rule: the well-trained zoos (every one when none is)."""
    return {k: d for k, d in dets.items() if well_trained(d)} or dets


def model_attack(det: dict[str, Any], key: str) -> str:
    """The attack a model row carries ("clean" for none): recorded per model and per row since the
    well-trained CIFAR-10 zoo (rows "badnets", "badnets_ft"); before that the row name was the attack."""
    m = det["models"].get(key) or {}
    return m.get("attack") or (det.get("rows") or {}).get(key, {}).get("attack") or key


def model_label(det: dict[str, Any], key: str) -> str:
    """A model row as the tables show it: the attack, with the training route where the zoo has several
    ("BadNets (fine-tuned)")."""
    base = ATTACK_LABEL.get(model_attack(det, key), key)
    route = (det.get("rows") or {}).get(key, {}).get("route")
    return f"{base} ({route})" if route else base


def rows_with(det: dict[str, Any], attack: str) -> list[tuple[str, dict[str, Any]]]:
    """The evaluated rows of a dataset that carry ``attack`` (several when a zoo has several routes)."""
    return [(k, m) for k, m in det["models"].items() if model_attack(det, k) == attack]


def decide(dets: dict[str, dict[str, Any]], counted: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per rule configuration, over every backdoored model of every counted dataset (default: all): mean TPR at
    delivered 1% FPR, mean AUROC, and how far the delivered FPR strays from its target on every model (clean
    included). The mean TPR per dataset (``mean_tpr_1_per_dataset``) covers every dataset, counted or not."""
    counted = set(dets) if counted is None else counted
    out: dict[str, dict[str, Any]] = {}
    for key in config_labels(dets):
        tpr1, tpr5, aucs, roc1, dev1, over1, dev5, n_models = [], [], [], [], [], [], [], 0
        per_dataset: dict[str, list[float]] = {}
        for dkey, det in dets.items():
            for m in det["models"].values():
                r = m["rules"].get(key)
                if r is None:
                    continue
                if dkey not in counted:
                    if attacked(m):
                        per_dataset.setdefault(dkey, []).append(r["target_fpr"]["0.01"]["tpr"])
                    continue
                n_models += 1
                dev1.append(abs(r["target_fpr"]["0.01"]["fpr"] - 0.01))
                over1.append(r["target_fpr"]["0.01"]["fpr"] - 0.01)
                dev5.append(abs(r["target_fpr"]["0.05"]["fpr"] - 0.05))
                if attacked(m):
                    tpr1.append(r["target_fpr"]["0.01"]["tpr"])
                    per_dataset.setdefault(dkey, []).append(r["target_fpr"]["0.01"]["tpr"])
                    tpr5.append(r["target_fpr"]["0.05"]["tpr"])
                    aucs.append(r["auroc"])
                    roc1.append(r["roc_tpr_at_0.01"])
        out[key] = {
            "mean_tpr_1": float(np.mean(tpr1)) if tpr1 else float("nan"),
            "mean_tpr_1_per_dataset": {k: float(np.mean(v)) for k, v in per_dataset.items()},
            "min_tpr_1": float(np.min(tpr1)) if tpr1 else float("nan"),
            "mean_tpr_5": float(np.mean(tpr5)) if tpr5 else float("nan"),
            "mean_auroc": float(np.mean(aucs)) if aucs else float("nan"),
            "mean_roc_tpr_1": float(np.mean(roc1)) if roc1 else float("nan"),
            "max_dev_1": float(np.max(dev1)) if dev1 else float("nan"),
            "max_over_1": float(np.max(over1)) if over1 else float("nan"),
            "max_dev_5": float(np.max(dev5)) if dev5 else float("nan"),
            "within_1": int(sum(d <= FPR_TOLERANCE + 1e-12 for d in dev1)),
            "within_5": int(sum(d <= FPR_TOLERANCE + 1e-12 for d in dev5)),
            "n_models": n_models,
            "n_attacked": len(tpr1),
        }
    return out


WELL_TRAINED = 0.85  # clean accuracy below which a zoo is reported as weakly trained
TPR_TIE = 0.01  # mean TPRs within 1 point are a tie: the simpler configuration wins
DEFAULT_OPTIONS = {"layers": "all", "reference": "predicted"}


def config_index(dets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["key"]: c for det in dets.values() for c in det.get("configs", [])}


def complexity(cfg: dict[str, Any]) -> int:
    """How far a configuration is from the library's plain defaults (options, window, folds, tau)."""
    changed = sum(1 for k, v in (cfg.get("options") or {}).items() if DEFAULT_OPTIONS.get(k) != v)
    window, tau = bool(cfg.get("exclude_logits")), cfg.get("tau") is not None
    folds = cfg.get("folds", DEFAULT_FOLDS) != DEFAULT_FOLDS
    return changed + int(window) + int(folds) + int(tau)


def best_config(summary: dict[str, dict[str, Any]], configs: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The product's promise first: a rule qualifies when the FPR it delivers never exceeds the 1% asked for by
    more than 0.5 points on any model (flagging less than asked costs detection, which the TPR counts). Among
    those, the highest mean TPR at the delivered rate; means within 1 point are a tie, won by the configuration
    closest to the plain defaults, then by mean AUROC. When none qualifies, only those whose worst excess is
    within 0.25 points of the smallest compete (a rule must not win by flagging more than asked)."""
    keys = [k for k, v in summary.items() if _ok(v["mean_tpr_1"])]
    if not keys:
        return None
    qualified = [k for k in keys if summary[k]["max_over_1"] <= FPR_TOLERANCE + 1e-12]
    if not qualified:  # none keeps the promise everywhere: those that break it least, never the loosest
        least = min(summary[k]["max_over_1"] for k in keys)
        qualified = [k for k in keys if summary[k]["max_over_1"] <= least + FPR_TOLERANCE / 2]
    top = max(summary[k]["mean_tpr_1"] for k in qualified)
    near = [k for k in qualified if top - summary[k]["mean_tpr_1"] <= TPR_TIE]
    configs = configs or {}
    return min(near, key=lambda k: (complexity(configs.get(k, {})), -summary[k]["mean_auroc"]))


def conclusion(dets: dict[str, dict[str, Any]], summary: dict[str, dict[str, Any]]) -> list[str]:
    """The paragraph that states the decision and checks the targets, every number from the JSON. ``dets``
    are the counted datasets (`deciding`), ``summary`` is `decide` over them."""
    best = best_config(summary, config_index(dets))
    if best is None:
        return ["No backdoored model was evaluated, so no rule can be chosen yet.", ""]
    labels = config_labels(dets)
    s = summary[best]
    ranked = sorted((k for k in summary if _ok(summary[k]["mean_tpr_1"])), key=lambda k: -summary[k]["mean_tpr_1"])
    runner = next((k for k in ranked if k != best), None)
    paper = summary.get("cosine-loi/paper")
    text = ("The criterion, in order: the false-positive rate delivered on held-out benign images never exceeds the "
            "1% asked for by more than 0.5 points on any model (the product's promise to the ops team); then the "
            "highest mean TPR at the delivered rate, means within 1 point counting as a tie won by the configuration "
            "closest to the plain defaults. ")
    text += (f"**By measurement the best rule is `{labels[best]}`**: over the {s['n_attacked']} backdoored models "
            f"of {' and '.join(dataset_label(dets[d]) for d in dets)} it detects on average {pct(s['mean_tpr_1'])}% "
            f"of successful attacks at a delivered 1% FPR (lowest {pct(s['min_tpr_1'])}%; {pct(s['mean_tpr_5'])}% "
            f"at 5%), mean AUROC {num(s['mean_auroc'])}")
    if runner:
        r = summary[runner]
        text += (f"; next best `{labels[runner]}` {pct(r['mean_tpr_1'])}% (AUROC {num(r['mean_auroc'])})")
    if paper and best != "cosine-loi/paper":
        text += (f"; the paper's rule as its notebook runs it (cosine-loi, 1 fold, tau 2.5) gets "
                 f"{pct(paper['mean_tpr_1'])}% at 1% (AUROC {num(paper['mean_auroc'])})")
    text += ". Targets, for that rule:"
    parts = []
    counts = {"expected": 0, "bounded": 0, "n": 0}
    for det in dets.values():
        checks = []
        for a in TARGET_ATTACKS:
            rows = [(k, m) for k, m in rows_with(det, a) if attacked(m)]
            if not rows:
                checks.append(f"{ATTACK_LABEL[a]} not evaluated")
            for k, m in rows:
                r = m["rules"][best]["target_fpr"]["0.01"]
                met = r["tpr"] >= 0.99 and r["fpr"] <= 0.01
                counts["expected"] += met
                counts["n"] += 1
                check = f"{model_label(det, k)} {pct(r['tpr'])}% at {pct(r['fpr'], 2)}% ({'met' if met else 'not met'}"
                b = m["rules"][best].get("bounded_fpr", {}).get("0.01")
                if b:
                    b_met = b["tpr"] >= 0.99 and b["fpr"] <= 0.01
                    counts["bounded"] += b_met
                    check += (f"; bounded: {pct(b['tpr'])}% at {pct(b['fpr'], 2)}%, "
                              f"{'met' if b_met else 'not met'}")
                checks.append(check + ")")
        parts.append(f"{dataset_label(det)}: " + ", ".join(checks))
    text += (" (1) TPR >= 99% at delivered FPR <= 1% on BadNets/Blended/SIG: met on "
             f"{counts['expected']} of {counts['n']} models with the default threshold (the 1% is the expected "
             f"rate, so about half of all calibrations deliver a little more), on {counts['bounded']} of "
             f"{counts['n']} with the 1% held as an upper bound with {100 * BOUND_CONFIDENCE:g}% confidence "
             "(`--fpr-confidence 0.95`, \"bounded\") - " + "; ".join(parts) + ".")
    devs = []
    for det in dets.values():
        for a, m in det["models"].items():
            f = m["rules"][best]["target_fpr"]["0.01"]["fpr"]
            if abs(f - 0.01) > FPR_TOLERANCE + 1e-12:
                devs.append(f"{dataset_label(det)} {model_label(det, a)} {pct(f, 2)}%")
    text += (f" (2) Delivered FPR within 0.5 points of the 1% target on every model: "
             f"{'met' if not devs else 'not met'}, {s['within_1']} of {s['n_models']} models within "
             f"(largest deviation {pct(s['max_dev_1'], 2)} points{'; off: ' + ', '.join(devs) if devs else ''}); "
             f"at the 5% target {s['within_5']} of {s['n_models']} (largest deviation {pct(s['max_dev_5'], 2)} "
             "points). " + sampling_sentence(dets))
    stretch = []
    for det in dets.values():
        for a in STRETCH_ATTACKS:
            for k, m in rows_with(det, a):
                if attacked(m):
                    auc = m["rules"][best]["auroc"]
                    verdict = "met" if auc >= 0.95 else "not met"
                    stretch.append(f"{dataset_label(det)} {model_label(det, k)} {num(auc)} ({verdict})")
    text += (" (3) AUROC >= 0.95 on WaNet/Adap-Blend (stretch): " + (", ".join(stretch) if stretch else
             "no such model evaluated") + ".")
    text += " " + peer_sentence(dets, best)
    text += " " + threshold_sentence(dets, summary, labels, best)
    return [text, ""]


def peer_sentence(dets: dict[str, dict[str, Any]], best: str, tie: float = 0.01) -> str:
    """Target (4): the default beats or equals every single-pass peer at equal FPR (both read off their ROC at
    exactly 1%), on every backdoored model; ties within 1 point."""
    single = [p for p in PEERS if p == "Mahalanobis (peer)"]
    losses, n = [], 0
    for det in dets.values():
        for key, m in det["models"].items():
            if not attacked(m):
                continue
            mine = m["rules"][best].get("roc_tpr_at_0.01")
            for peer in single:
                theirs = m.get("peers", {}).get(peer, {}).get("roc_tpr_at_0.01")
                if not (_ok(mine) and _ok(theirs)):
                    continue
                n += 1
                if theirs > mine + tie:
                    losses.append(f"{dataset_label(det)} {model_label(det, key)} ({peer} {pct(theirs)}% vs "
                                  f"{pct(mine)}%)")
    if not n:
        return ""
    return (f"(4) The default beats or equals the single-pass peer at equal FPR (ROC TPR at exactly 1%, ties within "
            f"1 point) on every backdoored model: {'met' if not losses else 'not met'}, {n - len(losses)} of {n}"
            + (f"; beaten on {', '.join(losses)}." if losses else "."))


def sampling_sentence(dets: dict[str, dict[str, Any]], target: float = 0.01) -> str:
    """How far a model's measured FPR may sit from the target by sampling alone: the threshold's own spread
    from the references it was set on (layerguard.core.thresholds.fpr_spread) and the test set's."""
    pairs = [(m["n_reference"], m["n_benign"]) for det in dets.values() for m in det["models"].values()
             if m.get("n_reference") and m.get("n_benign")]
    if not pairs:
        return ""
    sds = [np.sqrt(target * (1 - target) * (1 / r + 1 / b)) for r, b in pairs]
    refs = sorted({r for r, _ in pairs})
    bens = sorted({b for _, b in pairs})
    def span(lo: Any, hi: Any) -> str:
        return f"{lo}" if lo == hi else f"{lo}-{hi}"

    spread = span(pct(min(sds), 2), pct(max(sds), 2))
    return (f"Sampling alone spreads a model's measured FPR around the target by {spread} points (1 sd: the "
            f"threshold comes from {span(refs[0], refs[-1])} references, the rate is measured on "
            f"{span(bens[0], bens[-1])} benign test images), so a deviation under about twice that is noise, not "
            "bias.")


def threshold_sentence(dets: dict[str, dict[str, Any]], summary: dict[str, dict[str, Any]], labels: dict[str, str],
                       best: str) -> str:
    """Why the paper's cosine rule loses at a target FPR: its separation (oracle ROC) against the FPR its shipped
    threshold delivers, and, per dataset, what a threshold from references scored by predicted class gives."""
    key = "cosine-loi"
    if key not in summary or key == best:
        return ""
    c, b = summary[key], summary[best]
    text = (f"Separation alone (ROC TPR at exactly 1% FPR) is {pct(c['mean_roc_tpr_1'])}% on average for "
            f"`{labels[key]}` against {pct(b['mean_roc_tpr_1'])}% for `{labels[best]}`.")
    parts = []
    for det in dets.values():
        rows = [(m, m["rules"][key]) for m in det["models"].values()
                if "target_fpr_by_predicted" in m["rules"].get(key, {})]
        if not rows:
            continue
        acc = float(np.mean([m.get("reference_acc", float("nan")) for m, _ in rows]))
        shipped = float(np.mean([r["target_fpr"]["0.01"]["fpr"] for _, r in rows]))
        by_pred = float(np.mean([r["target_fpr_by_predicted"]["0.01"]["fpr"] for _, r in rows]))
        tpr = [r["target_fpr"]["0.01"]["tpr"] for m, r in rows if attacked(m)]
        tpr_pred = [r["target_fpr_by_predicted"]["0.01"]["tpr"] for m, r in rows if attacked(m)]
        parts.append(f"{dataset_label(det)} (reference accuracy {pct(acc)}%): {pct(shipped, 2)}% FPR and "
                     f"{pct(float(np.mean(tpr)) if tpr else None)}% TPR shipped, {pct(by_pred, 2)}% and "
                     f"{pct(float(np.mean(tpr_pred)) if tpr_pred else None)}% by predicted class")
    if parts:
        text += (f" `{labels[key]}`'s 1% threshold is inferred from references scored against their true class, "
                 "while serving scores inputs against their predicted class; the diagnostic tables below compare it "
                 "with a threshold from the references scored by predicted class (in-sample): "
                 + "; ".join(parts) + ".")
    return text


def rule_rows(det: dict[str, Any], labels: dict[str, str], best: str | None) -> list[list[str]]:
    rows = []
    for a, m in det["models"].items():
        for key, r in m["rules"].items():
            t1, t5, tau = r["target_fpr"]["0.01"], r["target_fpr"]["0.05"], r["tau"]["2.5"]
            name = f"**{labels.get(key, key)}**" if key == best else labels.get(key, key)
            b = r.get("bounded_fpr", {}).get("0.01")
            rows.append([model_label(det, a), name, num(r.get("auroc")), pct(t1["tpr"]), pct(t1["fpr"], 2),
                         f"{pct(b['tpr'])} / {pct(b['fpr'], 2)}" if b else "n/a",
                         pct(t5["tpr"]), pct(t5["fpr"], 2), f"{pct(tau['tpr'])} / {pct(tau['fpr'], 2)}"])
    return rows


def peer_rows(det: dict[str, Any], labels: dict[str, str], shown: list[str]) -> list[list[str]]:
    rows = []
    for a, m in det["models"].items():
        for key in shown:
            r = m["rules"].get(key)
            if r is None:
                continue
            t1, t5 = r["target_fpr"]["0.01"], r["target_fpr"]["0.05"]
            rows.append([model_label(det, a), f"layerguard: {labels.get(key, key)}", "1", num(r.get("auroc")),
                         pct(t1["fpr"]), pct(t1["tpr"]), pct(t5["fpr"]), pct(t5["tpr"]),
                         pct(r.get("roc_tpr_at_0.01")), pct(r.get("roc_tpr_at_0.05")),
                         f"{m['n_benign']} / {m['n_successful']}"])
        for name in PEERS:
            d = m["peers"].get(name)
            if d is None:
                continue
            r1, r5 = d["ref_fpr_0.01"], d["ref_fpr_0.05"]
            label = name + (f" (N={d['n']})" if "n" in d else "")
            rows.append([model_label(det, a), label, str(d["forward_passes"]), num(d.get("auroc")),
                         pct(r1["fpr"]), pct(r1["tpr"]), pct(r5["fpr"]), pct(r5["tpr"]),
                         pct(d.get("roc_tpr_at_0.01")), pct(d.get("roc_tpr_at_0.05")),
                         f"{d['n_benign']} / {d['n_attacks']}"])
    return rows


def dataset_section(key: str, det: dict[str, Any], best: str | None, labels: dict[str, str],
                    images: dict[str, str], counted: bool = True, full_cifar: bool = False) -> list[str]:
    """One dataset's tables. ``counted``: its models count in the decision; ``full_cifar``: the page has a
    well-trained CIFAR-10 section (what the weakly trained CIFAR-10 zoo's note points to)."""
    p = det["protocol"]
    models = det["models"]
    code = det.get("code") or {}
    lib = (f" Library: layerguard at commit {code.get('commit') or '?'}"
           f"{' with uncommitted edits' if code.get('layerguard_uncommitted_edits') else ''} (sources sha256 "
           f"{str(code.get('layerguard_sources_sha256', '?'))[:12]}).") if code else ""
    name = dataset_label(det)
    lines = [f"### {name}", "", f"Made by {provenance(det)}.{lib}", ""]
    accs = clean_accs(det)
    routes = list(dict.fromkeys(m["route"] for m in models.values() if m.get("route")))
    if accs:
        trained = "well trained" if well_trained(det) else "weakly trained"
        if trained == "weakly trained":
            where = ("has its own section above" if full_cifar else
                     "is being trained, bench/checkpoints/STATUS.md, and is not in these tables yet")
            note = f" (a few epochs on 2 CPU cores; the well-trained CIFAR-10 zoo {where})."
        else:
            note = "."
        if len(routes) > 1:
            note += (" Training routes (column \"route\", from each model's json; bench/README.md): "
                     + "; ".join(routes) + ".")
        if not counted:
            note += " These models do not count in the decision above, which is made on the well-trained zoos."
        lines += [f"These models are {trained}: {pct(min(accs))} to {pct(max(accs))}% clean "
                  f"accuracy on the scored test images{note}", ""]
    if det.get("quick"):
        lines += ["**Quick mode (`--quick`): one model, few images; a smoke test, not the reported numbers.**", ""]
    lines += [f"Reference images: {p['reference']} of the test split ({det.get('data')}, seed {p['seed']}), never "
              f"scored. Scored per model: {p['n_benign']} held-out benign test images and {p['n_poison']} triggered "
              "test images whose true label is not the target; TPR counts the successful attacks among them. "
              f"Peers: SCALE-UP scores the first {p['n_scaleup']} benign and triggered images, STRIP (N = "
              f"{p['strip_n']}) the first {p['n_strip']} (and {p['n_strip']} reference images), because they cost 6 "
              f"and {p['strip_n'] + 1} forward passes an input.", ""]
    missing = [a for a in det.get("missing", []) if a not in models]
    if missing:
        stems = det.get("rows") or {}
        shown = [model_label(det, a) + (f": `{stems[a]['stem']}`" if a in stems else "") for a in missing]
        lines += [f"Not evaluated (no trained weights when this ran): {'; '.join(shown)}.", ""]
    rows = []
    for a, m in models.items():
        z = m.get("zoo", {})
        how = ([m.get("route") or "-"] if len(routes) > 1 else []) + [str(z.get("epochs", "?"))]
        rows.append([model_label(det, a), *how, str(m["target"]) if attacked(m) or a != "clean" else "-",
                     pct(z.get("clean_acc")), pct(z.get("asr")), pct(m["clean_acc_scored"]), pct(m.get("asr_scored")),
                     str(m["n_successful"]), f"{m['seconds']:.0f}"])
    # the route column only where a zoo mixes routes; epochs always (a zoo trains some attacks longer)
    lines += table(["model", *(["route"] if len(routes) > 1 else []), "epochs", "target", "clean acc % (test)",
                    "ASR % (test)", "clean acc % (scored)", "ASR % (scored)", "successful attacks scored", "seconds"],
                   rows)
    lines += ["", "Clean accuracy and ASR \"(test)\" come from the model's json (bench/train.py); "
              "\"scored\" ones from the images this benchmark scored.", ""]
    lines += [f"#### Rules ({name})", ""]
    lines += table(["model", "rule", "AUROC", "TPR @1%", "delivered FPR @1%",
                    f"at most 1% ({100 * BOUND_CONFIDENCE:g}%): TPR / FPR", "TPR @5%", "delivered FPR @5%",
                    "tau 2.5: TPR / FPR"], rule_rows(det, labels, best))
    lines += ["", "All rates in %. \"@1%\" / \"@5%\": the threshold policy `target_fpr` 0.01 / 0.05, inferred from "
              "the rule's cross-fitted reference scores (`detector.benign.thresholds(policy)`); TPR over successful "
              "attacks and the FPR it delivers over the held-out benign images. \"At most 1%\": the same 1% target "
              f"held as an upper bound with {100 * BOUND_CONFIDENCE:g}% confidence over the draw of the references "
              f"(`fpr_confidence {BOUND_CONFIDENCE:g}`: fewer references flagged, docs/method.md), no refit. "
              "The paper-notebook row's reference scores are in-sample (1 fold), so its target-FPR thresholds are "
              "optimistic. AUROC is over the per-class standardised score that every threshold cuts. The clean "
              "model's rows show only the FPR. Bold: the rule chosen below.", ""]
    shown = [k for k in dict.fromkeys([best, "cosine-loi/paper"]) if k]
    lines += [f"#### Peers at equal FPR ({name})", ""]
    lines += ["Each peer's threshold is the 1% (5%) quantile of its scores on the reference images (the penultimate "
              "Mahalanobis peer's are out-of-fold, 10 folds), the same target the layerguard rows use; the FPR "
              "it then delivers on the held-out benign images is shown next to the TPR. \"ROC TPR\" reads the TPR "
              "off the scored ROC at exactly 1% (5%) FPR (an oracle threshold: like-for-like at equal FPR).", ""]
    lines += table(["model", "detector", "passes / input", "AUROC", "@1%: FPR", "@1%: TPR", "@5%: FPR", "@5%: TPR",
                    "ROC TPR @1%", "ROC TPR @5%", "benign / attacks scored"], peer_rows(det, labels, shown))
    lines += ["", "All rates in %. Mahalanobis (peer) is bench/peers.py's single-layer detector on the pooled "
              "penultimate features (covariance shrunk 10% towards its diagonal, squared distance to the predicted "
              "class's mean), not layerguard's `mahalanobis` rule. SCALE-UP's score takes few distinct values, so "
              "its delivered FPR can sit well below the target.", ""]
    lines += threshold_diagnostic(det, labels)
    diag = {a: m["layer_diagnostic"] for a, m in models.items() if m.get("layer_diagnostic")}
    if diag:
        layers = next(iter(diag.values()))["layers"]
        lines += [f"#### Which monitored layer separates the attacks ({name}, diagnostic)", "",
                  "Per layer, AUROC of successful attacks against benign images of one term alone: the cosine "
                  "similarity to the target class's centroid (benign: scored images predicted as the target; **bold** "
                  "= the paper's window LOI-2..LOI for the target class), the Mahalanobis distance to the "
                  "predicted class's mean and the spread term of `mahalanobis-spread` (RMS z-score of the channels' "
                  "spatial standard deviations against the predicted class; layers without a spatial extent have "
                  "none) (benign: all scored images).", ""]
        rows = []
        for a, d in diag.items():
            window = set(d.get("window_target", []))
            rows.append([model_label(det, a), f"cosine (n benign {d['cosine_benign_n']})",
                         *[f"**{num(v)}**" if n in window else num(v) for n, v in zip(d["layers"], d["cosine"])]])
            by_layer = dict(zip(d["mahalanobis_layers"], d["mahalanobis"]))
            rows.append([model_label(det, a), "mahalanobis", *[num(by_layer.get(n)) for n in layers]])
            if d.get("spread"):
                spread = dict(zip(d["spread_layers"], d["spread"]))
                rows.append([model_label(det, a), "spread", *[num(spread[n]) if n in spread else "-" for n in layers]])
        lines += table(["model", "term", *layers], rows)
        lines += [""]
    if images.get("roc"):
        lines += [f"![ROC per model, {name}]({images['roc']})", "",
                  f"ROC per backdoored model ({name}): TPR over successful attacks against FPR over "
                  "held-out benign images, log FPR axis; solid lines layerguard's rule configurations, dashed the "
                  "peers; AUROC in the legend order is in the tables above.", ""]
    if images.get("fpr"):
        lines += [f"![Delivered FPR, {name}]({images['fpr']})", "",
                  "Delivered FPR on held-out benign images for the 1% and 5% targets, per model and rule; the "
                  "shaded band is the target +- 0.5 points.", ""]
    return lines


def threshold_diagnostic(det: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Shipped thresholds (cross-fitted, references scored against their true class) against thresholds
    inferred from the references scored against their predicted class, as serving scores every input."""
    keys = [k for k in ("cosine-loi",) if any(k in m["rules"] for m in det["models"].values())]
    models = {a: m for a, m in det["models"].items()
              if all("target_fpr_by_predicted" in m["rules"].get(k, {}) for k in keys)}
    if not models:
        return []
    rows = []
    for a, m in models.items():
        cells = []
        for k in keys:
            r = m["rules"][k]
            shipped, pred = r["target_fpr"]["0.01"], r["target_fpr_by_predicted"]["0.01"]
            cells.append(f"{pct(shipped['fpr'], 2)} / {pct(pred['fpr'], 2)}")
            cells.append(f"{pct(shipped['tpr'])} / {pct(pred['tpr'])}")
        rows.append([model_label(det, a), pct(m.get("reference_acc")), *cells])
    header = ["model", "reference accuracy %"]
    for k in keys:
        header += [f"{labels.get(k, k)}: FPR @1%", f"{labels.get(k, k)}: TPR @1%"]
    lines = [f"#### Where the threshold comes from ({dataset_label(det)}, diagnostic)", "",
             "Calibration scores each reference image against its *true* class; serving scores every input "
             "against its *predicted* class. On a model that misclassifies many benign images the two differ. "
             "Each cell: the shipped threshold (cross-fitted, true class) / a threshold from the same references "
             "scored against their predicted class by the final detector, both at target FPR 1%, measured on the "
             "held-out images; in %. The second is in-sample and groups references by predicted class, so a class "
             "with few references (GTSRB's class 0 has 20) gets noisy statistics; for the Mahalanobis rules, which "
             "fit their statistics on the references, in-sample scores are optimistic, so they are not shown.", ""]
    lines += table(header, rows)
    return lines + [""]


def counted_note(dets: dict[str, dict[str, Any]], counted: dict[str, dict[str, Any]]) -> str:
    """Which datasets decide, when some do not (a weakly trained zoo is shown, not counted)."""
    left = [dataset_label(d) for k, d in dets.items() if k not in counted]
    if not left:
        return ""
    zoos = " and ".join(dataset_label(d) for d in counted.values())
    return (f"The decision is made on the well-trained zoos ({zoos}), every backdoored model of each; "
            f"{' and '.join(left)} is shown for comparison and does not count. ")


def detection_section(dets: dict[str, dict[str, Any]], docs: Path) -> list[str]:
    labels = config_labels(dets)
    counted = deciding(dets)
    summary = decide(dets, set(counted))
    best = best_config(summary, config_index(dets))
    configs = next(iter(dets.values())).get("configs", [])
    lines = ["## Detection quality: which rule is the default", ""]
    lines += ["Every rule configuration is calibrated exactly as shipped (`layerguard.tooling.calibration`; the "
              "configurations share one pair of passes, `calibrate_many`, which gives each the artifact `calibrate` "
              "gives it alone, byte for byte, as tests/test_calibrate_e2e.py checks), on benign reference images the "
              "model never trained on, and scored on other held-out test images (bench/detection.py). "
              "Configurations compared:", ""]
    for c in configs:
        opts = ", ".join(f"{k}={v}" for k, v in c["options"].items()) or "-"
        window = "monitored window without the logits (`--exclude-logits`)" if c["exclude_logits"] else \
            "the method's default window (layers L/2-1 .. L, logits included)"
        pol = f"tau {c['policy']['tau']}" if "tau" in c["policy"] else f"target FPR {c['policy']['target_fpr']:g}"
        lines.append(f"- `{c['label']}`: rule `{c['rule']}` (options {opts}), {c['folds']} fold(s), {window}; "
                     f"calibrated with {pol}.")
    lines += ["", "Whatever the calibration policy, every row is evaluated at the same three thresholds, all derived "
              "from the rule's reference scores without refitting: target FPR 1%, target FPR 5%, tau 2.5.", ""]
    lines += ["### Decision", ""]
    decision = conclusion(counted, summary)
    lines += [counted_note(dets, counted) + decision[0], *decision[1:]]
    rows = []
    for key, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean_tpr_1"] if _ok(kv[1]["mean_tpr_1"]) else 1):
        name = f"**{labels[key]}**" if key == best else labels[key]
        rows.append([name, pct(s["mean_tpr_1"]), *[pct(s["mean_tpr_1_per_dataset"].get(d)) for d in dets],
                     pct(s["min_tpr_1"]), pct(s["mean_tpr_5"]), pct(s["mean_roc_tpr_1"]),
                     num(s["mean_auroc"]),
                     f"{s['within_1']} / {s['n_models']}", pct(s["max_dev_1"], 2), f"{s['within_5']} / {s['n_models']}",
                     pct(s["max_dev_5"], 2)])
    lines += table(["rule", "mean TPR @1%", *[f"mean TPR @1%, {dataset_label(d)}"
                                              + ("" if k in counted else " (not counted)") for k, d in dets.items()],
                    "lowest TPR @1%", "mean TPR @5%", "mean ROC TPR @1% (oracle)", "mean AUROC",
                    "FPR within 0.5 pt of 1%", "largest deviation (pt)", "FPR within 0.5 pt of 5%",
                    "largest deviation (pt)"], rows)
    scope = "every dataset below" if len(counted) == len(dets) else "the well-trained datasets below"
    lines += ["", f"Over every backdoored model of {scope} (means of per-model rates); FPR deviations over "
              "every model, the clean ones included. Sorted by mean TPR at a delivered 1% FPR, the criterion. "
              "\"ROC TPR @1% (oracle)\" is the TPR at exactly 1% FPR on the held-out images, what a perfectly "
              "calibrated threshold would give: the rule's separation alone, without its threshold's error.", ""]
    for key, det in dets.items():
        images = {}
        if plot_roc(det, labels, docs / "img" / f"detection_roc_{key}.png"):
            images["roc"] = f"img/detection_roc_{key}.png"
        if plot_fpr(det, labels, docs / "img" / f"detection_fpr_{key}.png"):
            images["fpr"] = f"img/detection_fpr_{key}.png"
        lines += dataset_section(key, det, best, labels, images, counted=key in counted,
                                 full_cifar="cifar10_full" in dets)
    return lines


# ---- plots --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def distinct_colours(n: int) -> list[tuple[float, float, float]]:
    """n colours no two alike, up to 20 (tab10's ten, then tab20's lighter ten): the figures carry a dozen rule
    configurations plus the peers, and a repeated colour would make two legend entries indistinguishable."""
    tab20 = _pyplot().get_cmap("tab20").colors
    palette = list(tab20[0::2]) + list(tab20[1::2])
    if n > len(palette):
        raise ValueError(f"{n} series need distinct colours; the palette has {len(palette)}")
    return palette[:n]


def plot_roc(det: dict[str, Any], labels: dict[str, str], path: Path) -> bool:
    """One panel per backdoored model: TPR vs FPR (%, log x) of every rule configuration and every peer."""
    plt = _pyplot()
    models = [a for a, m in det["models"].items() if attacked(m)]
    if not models:
        return False
    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    height = 3.3 * nrows + 1.2  # inches: the panels, plus the legend strip below them and the title above
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, height), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    keys = list(dict.fromkeys(k for a in models for k in det["models"][a]["rules"]))
    colours = dict(zip(keys + PEERS, distinct_colours(len(keys) + len(PEERS))))
    handles = {}
    for ax, a in zip(axes.flat, models):
        m = det["models"][a]
        curves = [(labels.get(k, k), r, "-", colours[k]) for k, r in m["rules"].items()]
        curves += [(n, m["peers"][n], "--", colours[n]) for n in PEERS if n in m["peers"]]
        for name, r, style, colour in curves:
            if "roc" not in r:
                continue
            fpr = [100 * max(f, 1e-3) for f in r["roc"]["fpr"]]
            (h,) = ax.step(fpr, [100 * t for t in r["roc"]["tpr"]], where="post", ls=style, color=colour, lw=1.2)
            handles.setdefault(name, h)
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(0.1, 100)
        ax.set_ylim(-2, 102)
        ax.set_title(f"{model_label(det, a)} ({m['n_successful']} attacks, {m['n_benign']} benign)", fontsize=9)
        ax.set_xlabel("FPR on held-out benign images (%, log scale)", fontsize=8)
        ax.set_ylabel("TPR on successful attacks (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{dataset_label(det)}: ROC per model (dotted line: 1% FPR)", fontsize=10)
    fig.tight_layout(rect=(0, 0.85 / height, 1, 1 - 0.3 / height))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fpr(det: dict[str, Any], labels: dict[str, str], path: Path) -> bool:
    """Delivered FPR (%) per model and rule for the 1% and 5% targets, with the +-0.5 point band."""
    plt = _pyplot()
    models = list(det["models"])
    keys = list(dict.fromkeys(k for m in det["models"].values() for k in m["rules"]))
    if not models or not keys:
        return False
    colours = distinct_colours(len(keys))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(keys)
    for ax, q in zip(axes, ("0.01", "0.05")):
        target = 100 * float(q)
        ax.axhspan(target - 0.5, target + 0.5, color="green", alpha=0.12, label="target +- 0.5 pt")
        ax.axhline(target, color="green", lw=0.8)
        for i, k in enumerate(keys):
            vals = [100 * det["models"][a]["rules"][k]["target_fpr"][q]["fpr"] if k in det["models"][a]["rules"]
                    else float("nan") for a in models]
            ax.bar(np.arange(len(models)) + (i - (len(keys) - 1) / 2) * width, vals, width, color=colours[i],
                   label=labels.get(k, k))
        ticks = ["clean" if model_attack(det, a) == "clean" else model_label(det, a) for a in models]
        tilt = len(models) > 6 or max(len(t) for t in ticks) > 12  # long labels ("BadNets (fine-tuned)") overlap
        ax.set_xticks(np.arange(len(models)), ticks, fontsize=7, rotation=30 if tilt else 0,
                      ha="right" if tilt else "center")
        ax.set_ylabel("delivered FPR on held-out benign images (%)", fontsize=8)
        ax.set_xlabel("model", fontsize=8)
        ax.set_title(f"target FPR {target:g}%", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{dataset_label(det)}: FPR each threshold delivers", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits outside the axes: keep it whole
    plt.close(fig)
    return True


def plot_calibration(cal: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = cal.get("runs") or []
    if not runs:
        return False
    n = [r["images"] for r in runs]
    fig, ax = plt.subplots(1, 2, figsize=(7, 2.8))
    ax[0].plot(n, [r["images_per_s"] for r in runs], "o-")
    ax[0].set_ylim(bottom=0)
    ax[0].set_xlabel("reference images")
    ax[0].set_ylabel("images / s (both passes)")
    ax[1].plot(n, [r["peak_extra_mb"] for r in runs], "o-")
    ax[1].set_ylim(bottom=0)
    ax[1].set_xlabel("reference images")
    ax[1].set_ylabel("peak extra RSS (MB)")
    for a in ax:
        a.set_xscale("log")
        a.set_xticks(n, [str(v) for v in n])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- the page -----------------------------------------------------------------------------------------
def overhead_section(ov: dict[str, Any]) -> list[str]:
    lines = ["## Cost", "", "### Latency of one forward pass, with and without layerguard", "",
             f"Made by {provenance(ov)}; torch threads: {ov['threads']}; median of {ov['repeats']} repeats at batch 32 "
             f"({4 * ov['repeats']} at batch 1) after {ov['warmup']} warm-up rounds, plain and guarded alternating "
             f"in one process. Memory allocator: {ov.get('allocator', 'glibc defaults')}."
             + rule_note(ov["models"].values()), ""]
    hdr = ["model", "batch", "plain ms (CPU)", "guarded ms (CPU)", "added (CPU time)", "added (CPU, paired)",
           "added (wall)", "scoring alone ms", "scoring / plain"]
    rows = []
    for m in ov["models"].values():
        for b, r in m["latency"].items():
            rows.append([m["description"], b, num(r["plain"]["cpu_median_ms"], 2),
                         num(r["guarded"]["cpu_median_ms"], 2), f"{100 * (r['cpu_ratio_of_medians'] - 1):+.1f}%",
                         f"{100 * (r['cpu_median_paired_ratio'] - 1):+.1f}%",
                         f"{100 * (r['wall_ratio_of_medians'] - 1):+.1f}%", num(r["score_only"]["cpu_median_ms"], 2),
                         f"{100 * r['score_share_of_plain_cpu']:.1f}%"])
    lines += table(hdr, rows)
    lines += ["", "\"Guarded\" is what the serving handler does per batch: the forward pass with hooks that "
              "reduce each monitored output to what scoring needs inside the hook (cosine profile and the rule's "
              f"pooled features) or, for batches of up to {kept_rows_text(ov.get('keep_whole_up_to', 16))}, keep "
              "the outputs to reduce after the pass, layers of equal shape together, in numpy for CPU outputs "
              "(layerguard/core/grouped.py); `Detector.score_capture` and one JSON note per "
              "item; \"compact\" rows are the `response: compact` setting, which skips the cosine profile and whose "
              "notes carry no per-layer detail. CPU time is the thread's own CPU time (one torch thread, so all the"
              " work is on it); wall time on this shared 2-core machine also counts time the scheduler gave to "
              "other jobs, and is the noisier of the two. \"Paired\" is the median over rounds of guarded / plain "
              "within the round, which cancels drift between rounds; the ratio of the two medians does not. "
              "\"Scoring alone\" times the verdicts and notes from what the hooks kept, without the forward pass. "
              "Inputs are contiguous NCHW, as a handler's `torch.stack` makes them; the channels_last rows feed the"
              " same images in that layout, where each monitored output is copied into NCHW order to be flattened. "
              "Targets: at most 3% added at batch 32 and 10% at batch 1.", ""]
    r20 = ov["models"].get("resnet20", {})
    peers = r20.get("peers_batch32")
    if peers:
        lines += ["### Peers' cost per input (ResNet-20, batch 32)", ""]
        rows = [[k, num(v["cpu_per_input_ms"], 2), f"x{v['ratio_to_forward']:.2f}",
                 f"x{v['wall_ratio_to_forward']:.2f}"] for k, v in peers.items()]
        lines += table(["detector", "CPU ms / input", "ratio to one forward (CPU)", "ratio (wall)"], rows)
        lines += ["", f"Median of {next(iter(peers.values()))['repeats']} interleaved repeats. STRIP and SCALE-UP "
                  "include the forward pass that serves the prediction (1 + N and 1 + 5 passes).", ""]
    lines += ["### Memory", ""]
    rows = []
    for m in ov["models"].values():
        mem = m["memory"]
        rows.append([m["description"], f"{m['feature_dims']:,}", f"{m['artifact_bytes'] / 2**20:.2f} MiB",
                     f"{mem['detector_load_rss_mb']:.1f} MB", f"{mem['extra_peak_rss_mb']:.1f} MB",
                     f"{mem['extra_rss_after_serving_mb']:.1f} MB",
                     f"{mem['plain']['rss_after_serving_mb']:.0f} / {mem['guarded']['rss_after_serving_mb']:.0f} MB"])
    lines += table(["model", "monitored features", "artifact file", "RSS added by loading the detector",
                    "extra peak RSS while serving (batch 32)", "extra RSS after serving",
                    "worker-like RSS plain / guarded"], rows)
    lines += ["", "Each configuration runs in a fresh process (load model; load artifact and detector; serve 10 "
              "batches of 32). Peak = the kernel's RSS high-water mark reset just before serving.", ""]
    return lines


def kept_rows_text(limit: int | dict[str, int]) -> str:
    """The kept-whole row limit a cost run used: one number (before compact responses had their own) or both."""
    if isinstance(limit, dict):
        return f"{limit['full']} rows ({limit['compact']} with `response: compact`)"
    return f"{limit} rows"


def profile_section(gp: dict[str, Any]) -> list[str]:
    """Where the guarded path spends its time beyond the forward pass, step by step (bench/guard_profile.py)."""
    lines = ["### Where the guarded path spends its time", "",
             f"`{gp['command']}`, {gp['date']}, {gp['machine']['torch_threads']} torch thread(s), rule "
             f"`{gp['rows'][0]['rule'] if gp['rows'] else '?'}`, median of {gp['repeats']} interleaved rounds; "
             f"{gp['allocator']}. Each row adds one piece of what a guarded worker does to a batch; the numbers are "
             "the time added over the plain forward pass, in % of it (random weights: timing does not depend on "
             "what the weights learned).", ""]
    kept_rows = (gp.get("crossover") or {}).get("keep_whole_up_to", 16)
    kept_rows = kept_rows["full"] if isinstance(kept_rows, dict) else kept_rows
    labels = {"hooks-keep": "hooks that keep each monitored output",
              "keep + score": "... then verdicts from the kept outputs, layers of equal shape reduced together, "
                              f"in numpy (what serving does up to {kept_rows} rows)",
              "keep + score (torch)": "... the same with the kept outputs reduced in torch (as on a GPU or in half "
                                      "precision; before 2026-12-08 also on the CPU)",
              "hooks-reduce": "hooks that reduce each output inside the hook (cosine profile + rule terms)",
              "hooks-compact": "the same without the cosine profile (`response: compact`)",
              "+ score": "hooks-reduce + verdicts (similarities, rule terms, score, threshold; what serving does "
                         f"over {kept_rows} rows)",
              "+ notes": "+ per-item JSON-ready notes",
              "+ json": "+ each item's response body as JSON (what TorchServe sends)"}
    rows = gp["rows"]
    head = ["step"] + [f"{r['arch']} b={r['batch']}" for r in rows]
    body = [["plain forward pass (ms)"] + [num(r["plain_ms"], 2) for r in rows]]
    for key, label in labels.items():
        if all(key in r for r in rows):  # a step added later is absent from older result files
            body.append([label] + [f"{r[key]['added_pct']:+.1f}% ({r[key]['added_ms']:+.2f} ms)" for r in rows])
    body.append(["response body per item (bytes)"] + [str(r["response_bytes_per_item"]) for r in rows])
    lines += table(head, body)
    first = rows[0] if rows else None
    note = (f"With {len(first['layers'])} monitored layers on {first['arch']}, each costs the hooks a few small tensor "
            "operations, and at batch 1 their dispatch is what the guard costs; `response: compact` drops the cosine "
            "profile's share." if first else "")
    arith = {r["arch"]: r["multiply_adds_per_input"] for r in rows if "multiply_adds_per_input" in r}
    if arith:
        note += (" Arithmetic alone sets a floor for the per-layer similarities the full response reports (each "
                 "monitored output against every class centroid, plus its norm; multiply-adds per input): "
                 + "; ".join(f"{a} {m['cosine_profile'] / 1e6:.2f} M against the forward pass's "
                             f"{m['forward'] / 1e6:.1f} M, {100 * m['cosine_profile'] / m['forward']:.1f}%"
                             for a, m in arith.items())
                 + ". Their share of the time (the hooks-reduce row minus the compact row) is larger than their "
                   "share of the arithmetic: short, wide matrix products run at a lower rate per multiply-add than "
                   "the convolutions do. Within a 3% budget at batch 32 on resnet20, the similarities alone leave "
                   "little for the rule, the verdicts and the response.")
    return lines + ["", note, ""] + crossover_section(gp.get("crossover"))


def crossover_section(cross: dict[str, Any] | None) -> list[str]:
    """Hooks against kept outputs, paired, by batch size: the measurement behind KEEP_WHOLE_UP_TO."""
    if not cross or not cross.get("rows"):
        return []
    paths = ["full, hooks", "full, kept", "compact, hooks", "compact, kept"]
    lines = ["#### Reduce in the hooks, or keep the outputs and reduce after the pass?", "",
             "The whole guarded path of bench/overhead.py (forward pass, verdicts, notes) both ways, CPU time added "
             f"to the plain pass (median over {cross['repeats']} rounds of the per-round ratio). Serving keeps the "
             f"outputs up to {kept_rows_text(cross['keep_whole_up_to'])} (`KEEP_WHOLE_UP_TO`, "
             "layerguard/core/grouped.py) and reduces in the hooks above.", ""]
    rows = [[r["arch"], str(r["batch"]), num(r["plain_ms"], 2)] + [f"{r[k]:+.1f}%" for k in paths]
            for r in cross["rows"]]
    lines += table(["model", "batch", "plain ms (CPU)", *paths], rows)
    return lines + [""]


def compile_section(cp: dict[str, Any] | None) -> list[str]:
    """Would torch.compile close the guard's cost gap? (bench/compile_probe.py; not a `make bench` step)."""
    if not cp or not cp.get("rows"):
        return []
    lines = ["#### Does `torch.compile` close the gap?", "",
             f"`{cp['command']}`, {cp['date']}, torch {cp['torch']}, one torch thread, rule `{cp['rule']}`, median "
             f"over {cp['repeats']} interleaved rounds of each path's CPU time over its plain pass's. Not part of "
             "`make bench`; the handler does not compile. Eager: the guarded path of bench/overhead.py (hooks "
             "reduce each output, then verdicts and notes) against the plain forward pass. Compiled: the same "
             "path with the forward pass and its hooks compiled by inductor (the verdicts and notes stay eager), "
             "against the compiled plain pass. Compile: the first call of one batch shape, with a cold compile "
             "cache, what a fresh worker's first request of that shape would wait.", ""]
    rows = [[r["arch"], str(r["batch"]), num(r["eager plain ms"], 2), f"{r['eager added %']:+.1f}%",
             num(r["compiled plain ms"], 2), f"{r['compiled added %']:+.1f}%",
             f"{r['compiled guarded vs eager plain %']:+.1f}%", f"{r['compile seconds']['guarded']:.0f}",
             "yes" if r["same verdicts"] else "NO"] for r in cp["rows"]]
    lines += table(["model", "batch", "eager plain ms", "eager: added", "compiled plain ms", "compiled: added",
                    "compiled guarded vs eager plain", "compile s", "same verdicts as eager"], rows)
    verdicts = []
    for r in cp["rows"]:
        target = 10 if r["batch"] == 1 else 3 if r["batch"] >= 32 else None
        if target is not None:
            verdicts.append(f"{r['arch']} batch {r['batch']} {'met' if r['compiled added %'] <= target else 'not met'}"
                            f" compiled ({'met' if r['eager added %'] <= target else 'not met'} eager)")
    return lines + ["", "Against issue 14's targets (at most 10% added at batch 1, 3% at batch 32, guarded over "
                    "plain in the same mode): " + "; ".join(verdicts) + ". Compiling changes the forward pass and "
                    "the reductions alike and leaves the verdicts and notes eager: the guard's added share moves by "
                    f"{max(abs(r['compiled added %'] - r['eager added %']) for r in cp['rows']):.1f} points at most "
                    "between the two modes.", ""]


def rule_note(entries: Any) -> str:
    """' Guarded with rule ...' when the result records the scoring rule the guarded model was calibrated with."""
    rules = sorted({f"`{e['rule']}` ({', '.join(f'{k} {v}' for k, v in (e.get('policy') or {}).items())})"
                    for e in entries if e.get("rule")})
    return f" Guarded model calibrated with rule {', '.join(rules)}." if rules else ""


def _bound_label(confidence: float | None) -> str:
    return "expected rate" if confidence is None else f"at most, {100 * confidence:g}% confidence"


def reference_rows(rs: dict[str, Any]) -> list[list[str]]:
    """One row per model, reference share, folds and threshold policy: the FPR delivered over the splits."""
    groups: dict[tuple[str, float, int, float | None], list[dict[str, Any]]] = {}
    for r in rs["rows"]:
        groups.setdefault((r["model"], r["share"], r["folds"], r.get("confidence")), []).append(r)
    rows = []
    for (model, share, folds, confidence), runs in groups.items():
        f = np.array([r["delivered_fpr"] for r in runs])
        rows.append([rs["dataset"].upper() if rs["dataset"] == "gtsrb" else "CIFAR-10 (well-trained)", model,
                     f"{share:.0%} ({runs[0]['n_reference']}; {runs[0]['floor_classes']} at the floor)", str(folds),
                     _bound_label(confidence), str(len(runs)), pct(f.mean(), 2), f"{pct(f.min(), 2)}-{pct(f.max(), 2)}",
                     f"{int(np.sum(f > rs['target_fpr']))} / {len(f)}", pct(runs[0]["expected_sd"], 2)])
    return rows


def reference_section(runs: list[dict[str, Any]]) -> list[str]:
    """How the reference count, their class mix, the cross-fitting folds and the threshold's confidence move
    the delivered FPR, per dataset measured."""
    lines = ["### Where the threshold's error comes from: reference count, class mix, folds", "",
             "The default rule calibrated as shipped at a 1% target on references drawn from each dataset's test "
             "images (a share of each class, at least the floor), over several random splits; the delivered FPR is "
             "measured on up to 8,000 other benign test images. Each calibration is thresholded twice, without "
             "refitting: with the 1% as the expected rate (the default) and as an upper bound held with a "
             "confidence (`fpr_confidence`). \"over target\" counts the splits that delivered more than 1%; "
             "\"expected sd\" is `fpr_spread`, the spread the reference count alone allows. "
             "Runs: " + "; ".join(f"{provenance(rs)}, rule `{rs['rule']}`" for rs in runs) + ".", ""]
    for rs in runs:
        by_folds: dict[int, list[float]] = {}
        for r in rs["rows"]:
            if r.get("confidence") is None:
                by_folds.setdefault(r["folds"], []).append(r["delivered_fpr"])
        lines += [f"Mean delivered FPR at the expected-rate threshold, {rs['dataset']}: " + ", ".join(
            f"{k} folds {pct(float(np.mean(v)), 2)}% ({len(v)} calibration{'s' if len(v) > 1 else ''})"
            for k, v in sorted(by_folds.items()))
            + "."]
    lines += ["", "This is why the benchmark uses 20% references and layerguard 10 folds by default "
              "(docs/method.md, section 4).", ""]
    lines += table(["dataset", "model", "references: share (count; classes at the floor)", "folds", "threshold",
                    "splits", "delivered FPR % (mean)", "min-max %", "over target", "expected sd (points)"],
                   [row for rs in runs for row in reference_rows(rs)])
    return lines + [""]


def calibration_section(cal: dict[str, Any], img_ok: bool) -> list[str]:
    folds = (cal.get("runs") or [{}])[0].get("folds", 5)
    lines = ["### Calibration throughput and peak memory", "",
             f"Made by {provenance(cal)}; {cal['model']}, batch {cal['batch']}, {cal['threads']} torch thread(s); "
             "each size in a fresh process, images streamed from disk one batch at a time."
             + (f" Rule `{cal['rule']}`, {folds} cross-fitted folds (two passes)." if cal.get("rule") else ""), ""]
    rows = [[str(r["images"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.0f}", f"{r['peak_extra_mb']:.1f}",
             f"{r['peak_rss_mb']:.0f}"] for r in cal["runs"]]
    lines += table(["reference images", "seconds", "images / s (2 passes)", "peak extra RSS MB",
                    "peak RSS MB"], rows)
    if img_ok:
        lines += ["", "![calibration cost](img/calibration_cost.png)"]
    lines += [""]
    return lines


def serving_archs(sl: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{arch: {setup, results, handler_in_process}}; a result file from before `--archs` holds one, ResNet-20."""
    return sl["archs"] if "archs" in sl else {"resnet20": sl}


def serving_section(sl: dict[str, Any], compact: dict[str, Any] | None = None) -> list[str]:
    """The TorchServe load test as wrapped by default, then (if measured) with `layerguard wrap --response
    compact`, each from its own run of bench/serving_load.py."""
    lines = ["### Through TorchServe (127.0.0.1)", "",
             f"Made by {provenance(sl)}. Memory allocator (this process and the TorchServe workers): "
             f"{sl.get('allocator', 'glibc defaults')}.", ""]
    for one in serving_archs(sl).values():
        lines += serving_arch_lines(one)
    if compact:
        lines += [f"The guarded archive wrapped with `layerguard wrap --response compact` (verdict, score, threshold "
                  "and layer of interest per prediction; no per-layer similarities or terms, so the hooks skip the "
                  f"cosine profile), in its own run: made by {provenance(compact)}. Memory allocator: "
                  f"{compact.get('allocator', 'glibc defaults')}.", ""]
        for one in serving_archs(compact).values():
            lines += serving_arch_lines(one)
    lines += ["Worker CPU per request is read from /proc of the worker processes, whose PIDs the management API "
              "reports; frontend = the Java process, client = this benchmark's own threads. Throughput and latency "
              "depend on every process sharing the 2 cores, so their ratios move from run to run more than the CPU "
              "per request does.", ""]
    return lines


def serving_arch_lines(one: dict[str, Any]) -> list[str]:
    s, r = one["setup"], one["results"]
    compact = " with `response: compact`" if s.get("response") == "compact" else ""
    lines = [f"#### {s['model']}{compact}", "",
             f"Weights: {s['weights']}. One worker per archive ({s['worker_threads']} torch thread), batchSize "
             f"{s['batch_size']}, maxBatchDelay {s['max_batch_delay_ms']} ms for both; closed loop, "
             f"{s['concurrency']} concurrent clients, {s['requests_per_phase']} requests per phase, {s['rounds']} "
             f"round(s), each {s['order']}, after {s['warmup_per_archive']} warm-up requests each. The guarded "
             f"archive is `wrap_mar` of the plain one (calibrated on {s['calibration_images']} test PNGs). The "
             "client runs on the same 2 cores." + rule_note([s]), ""]
    rows = []
    for m in ("plain", "guarded"):
        x = r[m]
        cpu = x.get("cpu_ms_per_request", {})
        rows.append([m, f"{x['ok']} / {x['requests']}", f"{x['rps']:.1f}",
                     ", ".join(f"{v:.0f}" for v in x["rps_per_phase"]), f"{x['p50_ms']:.1f}", f"{x['p99_ms']:.1f}",
                     *(num(cpu.get(k), 2) for k in ("worker", "frontend", "client"))])
    lines += table(["archive", "ok / requests", "requests/s", "requests/s per phase", "p50 ms", "p99 ms",
                    "worker CPU ms / request", "frontend CPU ms / request", "client CPU ms / request"], rows)
    cp, cg = r["plain"].get("cpu_ms_per_request"), r["guarded"].get("cpu_ms_per_request")
    worker = f", worker CPU per request x{cg['worker'] / cp['worker']:.3f}" if cp and cg and cp.get("worker") else ""
    lines += ["", f"Guarded / plain: throughput x{r['guarded_rps_ratio']:.3f}, p50 x{r['guarded_p50_ratio']:.3f}, "
              f"p99 x{r['guarded_p99_ratio']:.3f}{worker} (target: within 5%).{round_spread(r, s)}"]
    lines += formed_batches_lines(r, s)
    hp = one.get("handler_in_process")
    if hp:
        lines += ["", "The worker's share alone: each archive's handler called in one process (real "
                  "`ts.context.Context`, no HTTP), alternating, median CPU time per request:", ""]
        compact = all("compact_cpu_ms_per_request" in v for v in hp.values())
        lines += table(["batch", "plain ms / request", "guarded ms / request", "guarded / plain",
                        *(["compact ms / request", "compact / plain"] if compact else [])],
                       [[b, num(v["plain_cpu_ms_per_request"], 2), num(v["guarded_cpu_ms_per_request"], 2),
                         f"x{v['ratio']:.3f}",
                         *([num(v["compact_cpu_ms_per_request"], 2), f"x{v['compact_ratio']:.3f}"] if compact else [])]
                        for b, v in hp.items()])
        if compact:
            lines += ["", "compact: the same guarded archive with `response: compact` in its model-config.yaml "
                      "(verdict, score, threshold and layer of interest; no per-layer similarities or terms, so "
                      "the hooks skip the cosine profile)."]
    wb = one.get("worker_breakdown")
    if wb:
        lines += worker_breakdown_lines(wb)
    return lines + [""]


def _round_ratios(r: dict[str, Any]) -> list[float]:
    """Guarded / plain throughput per ABBA round, from the phases serving_load.py recorded ([] if it has no
    whole rounds)."""
    try:
        return round_ratios(r["plain"]["rps_per_phase"], r["guarded"]["rps_per_phase"])
    except (KeyError, ValueError, ZeroDivisionError):
        return []


def round_range(r: dict[str, Any]) -> str:
    """', x0.84-x1.00 over 6 rounds' for the headline: how far one round's ratio strays from the overall one."""
    ratios = _round_ratios(r)
    return f"; per round x{min(ratios):.2f}-x{max(ratios):.2f} over {len(ratios)} rounds" if len(ratios) > 1 else ""


def round_spread(r: dict[str, Any], setup: dict[str, Any]) -> str:
    """The paired per-round ratios behind the overall throughput ratio, so a reader can tell a met target from
    noise."""
    ratios = _round_ratios(r)
    if len(ratios) < 2:
        return ""
    return (f" Per round (each {setup['order']}, so every round pairs both archives under the same load), guarded "
            f"/ plain throughput: {', '.join(f'x{x:.3f}' for x in ratios)}; median x{float(np.median(ratios)):.3f}, "
            f"range x{min(ratios):.3f}-x{max(ratios):.3f}: the machine's load drifts between rounds, so a ratio "
            "within a few points of the target is not a measured pass or fail.")


def formed_batches_lines(r: dict[str, Any], setup: dict[str, Any]) -> list[str]:
    """The batches TorchServe formed during the recorded rounds, from its HandlerTime metric (bench/serving_load.py's
    `torchserve_batches`): batchSize is an upper bound, and the guard costs more per request in small batches."""
    formed = {m: r[m].get("torchserve_batches") for m in ("plain", "guarded")}
    if not all(formed.values()):
        return []
    p, g = formed["plain"], formed["guarded"]
    sizes = sorted({int(k) for f in formed.values() for k in f["batch_sizes"]})
    rows = [[m, str(f["batches"]), f"{f['mean_batch']:.2f}", *(str(f["batch_sizes"].get(str(n), 0)) for n in sizes),
             num(f["handler_ms_per_request"], 2)] for m, f in formed.items()]
    ratio = g["handler_ms_per_request"] / p["handler_ms_per_request"]
    # a compact run has no in-process tables of its own: the default run's, above, measure both settings
    where = "of the default run above" if setup.get("response") == "compact" else "below"
    return ["", "Batches TorchServe formed in the recorded rounds (its HandlerTime metric, one line per batch with "
            "the batch's request ids, in ts_log.log) and the handler's time per request it reports (wall time in "
            "`handle`):", "",
            *table(["archive", "batches", "requests per batch (mean)", *(f"batches of {n}" for n in sizes),
                    "handler ms / request"], rows),
            "", f"Handler time per request, guarded / plain: x{ratio:.3f}, at a mean batch of {p['mean_batch']:.1f} "
            f"and {g['mean_batch']:.1f} requests against a batchSize of {setup['batch_size']}: with a closed loop of "
            f"{setup['concurrency']} clients and {setup['max_batch_delay_ms']} ms of maxBatchDelay, many batches "
            "leave before they fill, and the guard's share of a batch grows as the batch shrinks (the in-process "
            f"table {where}: batches of 1, 4 and 8). This ratio and the worker CPU per request above agree when the "
            "worker's time outside `handle` (receiving, encoding, sending) costs both archives alike."]


def worker_breakdown_lines(wb: dict[str, Any]) -> list[str]:
    """Per stage of the worker's `handle`, CPU ms per batch for both archives (bench/serving_load.py)."""
    archives = wb["archives"]
    fullest = max(archives.values(), key=lambda a: len(a["stages"]))  # the guarded one: every stage, in order
    labels = [(st["stage"], st["parent"]) for st in fullest["stages"]]
    rows = []
    for label, parent in labels:
        cells = []
        for a in archives.values():
            hit = [st for st in a["stages"] if st["stage"] == label]
            cells.append(num(hit[0]["ms_per_batch"], 2) if hit else "-")
        rows.append([f"... of which {label}" if parent else label, *cells])
    rows.append(["**`handle` in all**", *(num(a["handle_ms_per_batch"], 2)
                                                             for a in archives.values())])
    rows.append(["response bodies as JSON (TorchServe's worker, after `handle`)",
                 *(num(a["response_json_ms_per_batch"], 3) for a in archives.values())])
    rows.append(["response body per item (bytes)", *(str(a["response_bytes"]) for a in archives.values())])
    return ["", f"Where the worker's time goes, batch of {wb['batch']}: CPU ms per batch by stage of `handle`, "
            f"median of {wb['repeats']} calls per archive, alternating (each stage's callable wrapped in a "
            "thread-CPU clock for this measurement; other = what `handle` spent outside every top-level stage):",
            "",
            *table(["stage", *(f"{n} ms / batch" for n in archives)], rows)]


def headline_section(dets: dict[str, dict[str, Any]], ov: dict[str, Any] | None, sl: dict[str, Any] | None,
                     slc: dict[str, Any] | None = None) -> list[str]:
    """A few sentences computed from the results: what a reader should take away first. The well-trained zoos
    lead, one line per model; a weakly trained zoo (not counted in the decision) gets one summary line."""
    lines = ["## Headline", ""]
    if dets:
        counted = deciding(dets)
        summary = decide(dets, set(counted))
        best = best_config(summary, config_index(dets))
        labels = config_labels(dets)
        if best:
            s = summary[best]
            zoos = " and ".join(dataset_label(d) for d in counted.values())
            lines.append(f"- Detection: the best rule by measurement is `{labels[best]}`: mean TPR "
                         f"{pct(s['mean_tpr_1'])}% at a delivered 1% FPR over {s['n_attacked']} backdoored models "
                         f"({zoos}), mean AUROC {num(s['mean_auroc'])}, delivered FPR within 0.5 points of the 1% "
                         f"target on {s['within_1']} of {s['n_models']} models.")
        for key, det in [*counted.items(), *((k, d) for k, d in dets.items() if k not in counted)]:
            if key not in counted:
                w = decide({key: det}).get(best) if best else None
                accs = clean_accs(det)
                if w and _ok(w["mean_tpr_1"]):
                    lines.append(f"- {dataset_label(det)} ({pct(min(accs))} to {pct(max(accs))}% clean accuracy; "
                                 f"not counted in the decision): `{labels[best]}` mean TPR {pct(w['mean_tpr_1'])}% "
                                 f"at a delivered 1% FPR over {w['n_attacked']} backdoored models (lowest "
                                 f"{pct(w['min_tpr_1'])}%), mean AUROC {num(w['mean_auroc'])}; per model in "
                                 "docs/benchmarks.md.")
                continue
            for a, m in det["models"].items():
                if best is None or best not in m["rules"]:
                    continue
                r = m["rules"][best]
                t1 = r["target_fpr"]["0.01"]
                if not attacked(m):
                    lines.append(f"- {dataset_label(det)}, {model_label(det, a)}: `{labels[best]}` flags "
                                 f"{pct(t1['fpr'], 2)}% of held-out benign images at the 1% target.")
                    continue
                peers = {n: d.get("roc_tpr_at_0.01") for n, d in m["peers"].items()}
                top = max(peers, key=lambda n: peers[n] if _ok(peers[n]) else -1) if peers else None
                peer = (f"; best peer at 1% FPR (ROC): {top} {pct(peers[top])}% (AUROC "
                        f"{num(m['peers'][top].get('auroc'))})") if top else ""
                lines.append(f"- {dataset_label(det)}, {model_label(det, a)}: TPR {pct(t1['tpr'])}% at a "
                             f"delivered FPR of {pct(t1['fpr'], 2)}%, AUROC {num(r.get('auroc'))}{peer}.")
        lines.append("- The paper's anchor: TPR 99.46% at FPR 1.22% (tau 2.5; ResNet-18, input-aware dynamic attack).")
    if ov:
        for m in ov["models"].values():
            for batch, target in (("32", 3), ("1", 10), ("32, compact", 3), ("1, compact", 10)):
                r = m["latency"].get(batch)
                if r:
                    added = 100 * (r["cpu_median_paired_ratio"] - 1)
                    shown = batch.replace(", compact", " with `response: compact`")
                    lines.append(f"- {m['description']}, batch {shown}: layerguard adds {added:+.1f}% CPU time "
                                 f"(paired; {100 * (r['cpu_ratio_of_medians'] - 1):+.1f}% ratio of medians, "
                                 f"{100 * (r['wall_ratio_of_medians'] - 1):+.1f}% wall) to a forward pass; scoring "
                                 f"alone is {100 * r['score_share_of_plain_cpu']:.1f}% of it (target: at most "
                                 f"{target}%: {'met' if added <= target else 'not met'}).")
    for one in [*(serving_archs(sl).values() if sl else ()), *(serving_archs(slc).values() if slc else ())]:
        r = one["results"]
        cp, cg = r["plain"].get("cpu_ms_per_request", {}), r["guarded"].get("cpu_ms_per_request", {})
        worker = f", worker CPU per request x{cg['worker'] / cp['worker']:.3f}" if cp.get("worker") else ""
        which = "guarded (`response: compact`)" if one["setup"].get("response") == "compact" else "guarded"
        lines.append(f"- TorchServe, {one['setup']['model']}, {which} vs plain .mar: throughput "
                     f"x{r['guarded_rps_ratio']:.3f}, p50 x{r['guarded_p50_ratio']:.3f}, p99 "
                     f"x{r['guarded_p99_ratio']:.3f}{worker} (target: throughput x0.97 or better and worker "
                     f"CPU per request within 5%){round_range(r)}.")
    return lines + [""]


def render(results: Path = RESULTS_DIR, docs: Path = DOCS) -> str:
    """docs/benchmarks.md (and docs/img/*.png) from the JSON files in ``results``; returns the markdown."""
    dets = load_detection(results)
    ov, cal, sl, run, gp, cp = (load(results, n) for n in ("overhead", "calibration_cost", "serving_load", "run_all",
                                                           "guard_profile", "compile_probe"))
    slc = load(results, "serving_load_compact")
    shares = [r for r in (load(results, f"reference_share_{d}") for d in ("gtsrb", "cifar10_full")) if r]
    rs = {"seconds": sum(r["seconds"] for r in shares), "machine": shares[0].get("machine")} if shares else None
    lines = ["# Benchmarks", "",
             "<!-- generated by bench/run_all.py from bench/results/*.json; do not edit by hand -->", ""]
    step_results = {**{f"detection ({dataset_label(d)})": d for d in dets.values()}, "reference_share": rs,
                    "overhead": ov,
                    "guard_profile": gp, "calibration_cost": cal, "serving_load": sl}
    secs = {k: v["seconds"] for k, v in step_results.items() if v and "seconds" in v}
    # the steps may come from different runs on different machines (each section names its own): list each CPU
    by_cpu: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for step, v in step_results.items():
        if v and v.get("machine"):
            by_cpu.setdefault(v["machine"]["cpu"], (v["machine"], []))[1].append(step)
    for machine, steps in by_cpu.values():
        which = "" if len(by_cpu) == 1 else f" ({', '.join(steps)})"
        lines += [f"Machine{which}: {machine['cpu']}, {machine['cores']} cores (shared with other jobs), "
                  f"{machine['os']}, Python {machine['python']}, torch {machine['torch']} (CPU), one torch thread "
                  "throughout."]
    if len(by_cpu) > 1:
        lines += ["Cost ratios depend on the machine (per-op dispatch and memory bandwidth differ), so compare "
                  "numbers within one section."]
    if secs:
        lines += ["Run time of each step as recorded in its result file: " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in secs.items()) + f"; `make bench` total about "
            f"{sum(secs.values()) / 60:.0f} min (plus model training, which `make bench` does not do)."]
    if run:
        lines += [f"Last `bench/run_all.py` run: `{run['command']}` on {run['date']}, "
                  f"{run['this_run_seconds'] / 60:.1f} min for {', '.join(run['ran'])}."]
        if run.get("quick"):
            lines += ["", "**Quick mode (`--quick`): reduced sizes, a smoke test; not the reported numbers.**"]
    lines += [""]
    lines += ["Reproduce everything with `make bench` (or `.venv/bin/python bench/run_all.py`; "
              "`--render-only` rebuilds this page from bench/results/). Data: `--data PATH` / `$LAYERGUARD_CIFAR` "
              "(default `../shared/data/cifar10_32_jpeg.npz`) and `$LAYERGUARD_GTSRB` (default "
              "`../shared/data/gtsrb_32_sub13k.npz`). The detection step alone: `.venv/bin/python bench/detection.py` "
              "(`--quick` for a smoke test of under a minute). The backdoored models come from `bench/train.py` "
              "(bench/README.md).", ""]
    lines += headline_section(dets, ov, sl, slc)
    if dets:
        lines += detection_section(dets, docs)
    if shares:
        lines += reference_section(shares)
    if ov:
        lines += overhead_section(ov)
    if gp:
        lines += profile_section(gp)
    lines += compile_section(cp)
    lines += ["### GPU", "", "Not measured: no session so far has had a GPU machine lent to it. The handler uses the "
              "device TorchServe assigns for the forward pass and the reductions of each monitored output (pooling, "
              "norms, the cosine against the centroids); what they leave, a few hundred numbers per input, is scored "
              "in numpy on the host. The serving tests and the cost tables above ran on the CPU only.", ""]
    if sl:
        lines += serving_section(sl, slc)
    if cal:
        lines += calibration_section(cal, plot_calibration(cal, docs / "img" / "calibration_cost.png"))
    text = "\n".join(lines).rstrip() + "\n"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(STEPS), help=f"comma list from {STEPS}")
    p.add_argument("--skip", default="", help="comma list of steps to leave out")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the whole pipeline")
    p.add_argument("--render-only", action="store_true", help="only regenerate docs/benchmarks.md from the JSON")
    p.add_argument("--data", default=None, help="CIFAR-10 npz (default: $LAYERGUARD_CIFAR or ../shared/data/...)")
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)
    if not args.render_only:
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        steps = [s.strip() for s in args.only.split(",") if s.strip() and s.strip() not in skip]
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            p.error(f"unknown step(s) {unknown}; choose from {STEPS}")
        t0 = time.time()
        done = run_steps(steps, args.quick, args.data, args.results)
        write_result("run_all", {
            "command": "make bench" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""),
            "date": now_utc(), "machine": machine_info(), "quick": args.quick, "ran": steps,
            "this_run_seconds": round(time.time() - t0, 1), "steps": done,
        }, args.results)
        failed = [s for s, v in done.items() if v["rc"] != 0]
    else:
        failed = []
    render(args.results, args.docs)
    log(f"wrote {args.docs / 'benchmarks.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

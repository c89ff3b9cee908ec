"""The calibration report: PNG plots and one self-contained HTML page that a person can read offline.

Why: the artifact's numbers (per-layer similarity curves, layers of interest, thresholds) decide what gets
flagged in production, and a table of floats does not show whether they make sense. The plots are the
paper's Figure 4 (mean benign similarity per layer, LOI marked) and Figure 5 (TPR/FPR against tau and the
ROC), plus the benign and poisoned score distributions around each class's threshold.

matplotlib is an optional extra (`pip install layerguard[report]`), imported only here and only when a
report is written; serving never imports this module. Figures are drawn with the Agg canvas directly (no
pyplot), so writing a report never touches a user's interactive backend or global state.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .artifact import CalibrationArtifact
from .data import ReferenceSource, open_reference
from .detector import ThresholdPolicy
from .evaluation import auroc, roc_curve
from .offline import ScoredSet, score_batches

TAUS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
MAX_PANELS = 25  # per-class small multiples beyond this are unreadable; the rest are listed in the table
INDEX = "index.html"
FIGURES = {
    "similarity": "similarity_by_layer.png",
    "scores": "score_distributions.png",
    "tau": "tpr_fpr_vs_tau.png",
    "roc": "roc.png",
}
BENIGN_COLOR, POISON_COLOR, LOI_COLOR = "#1f77b4", "#d62728", "#d62728"


class ReportError(RuntimeError):
    """The report cannot be written (most often: matplotlib is missing); the message says how to fix it."""


def _figure_class() -> Any:
    """matplotlib's Figure, imported lazily: the extra is needed only for reports."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError("the calibration report needs matplotlib: pip install layerguard[report] "
                          "(or pip install matplotlib)") from exc

    def make(**kwargs: Any) -> Any:
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    return make


@dataclass(frozen=True)
class ReportData:
    """What the plots are drawn from. `benign`/`poisoned` are optional scored sets (see offline.py)."""

    artifact: CalibrationArtifact
    benign: ScoredSet | None = None
    benign_label: str = "benign"
    poisoned: ScoredSet | None = None
    target_class: int | None = None

    @property
    def attack_mask(self) -> np.ndarray | None:
        """Poisoned inputs that count for the TPR: successful attacks when the target is known (the paper)."""
        if self.poisoned is None:
            return None
        if self.target_class is None:
            return np.ones(len(self.poisoned.scores), dtype=bool)
        return (self.poisoned.predicted == self.target_class) & (self.poisoned.labels != self.target_class)


@dataclass(frozen=True)
class TauPoint:
    tau: float
    tpr: float
    fpr: float


# ---- the public entry point ---------------------------------------------------------------------------------
def write_report(
    out_dir: str | Path,
    artifact: CalibrationArtifact,
    *,
    model: nn.Module | None = None,
    reference: ReferenceSource | None = None,
    args: argparse.Namespace | None = None,
    benign: ScoredSet | None = None,
    benign_label: str | None = None,
    poisoned: ScoredSet | None = None,
    target_class: int | None = None,
    title: str | None = None,
    batch_size: int = 64,
) -> Path:
    """Write the PNGs and `index.html` into `out_dir` and return the HTML's path.

    Scored sets may be given directly (the demo does); otherwise, with `model`, they are scored here: the
    benign set from `args.benign_test` (held out) or else `reference` (in-sample), the poisoned set from
    `args.poisoned` - the calibrate CLI's arguments, read with the reference's own transform.
    """
    make_figure = _figure_class()  # fail before any scoring work when matplotlib is missing
    data = _gather(artifact, model, reference, args, benign, benign_label, poisoned, target_class, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"similarity": plot_similarity(make_figure, data, out / FIGURES["similarity"]),
               "scores": plot_scores(make_figure, data, out / FIGURES["scores"])}
    points = tau_sweep(data)
    if points:
        written["tau"] = plot_tau(make_figure, data, points, out / FIGURES["tau"])
    if data.poisoned is not None and data.benign is not None and data.attack_mask.any():
        written["roc"] = plot_roc(make_figure, data, points, out / FIGURES["roc"])
    index = out / INDEX
    index.write_text(render_html(data, points, {k: p.name for k, p in written.items()}, title), encoding="utf-8")
    return index


def _gather(artifact: CalibrationArtifact, model: nn.Module | None, reference: ReferenceSource | None,
            args: argparse.Namespace | None, benign: ScoredSet | None, benign_label: str | None,
            poisoned: ScoredSet | None, target_class: int | None, batch_size: int) -> ReportData:
    """Score whatever was named but not given, so the CLI's one-line call gets every plot it can."""
    get = (lambda name: getattr(args, name, None)) if args is not None else (lambda name: None)
    batch_size = get("batch_size") or batch_size
    target_class = target_class if target_class is not None else get("target_class")
    label = benign_label
    if model is not None:
        detector = artifact.detector(device=get("device") or "cpu")

        def score(source: ReferenceSource) -> ScoredSet:
            return score_batches(model, detector, source.batches(batch_size))

        if benign is None and get("benign_test") is not None and reference is not None:
            benign, label = score(_open_like(reference, get("benign_test"), artifact, args)), "held-out benign"
        elif benign is None and reference is not None:
            benign, label = score(reference), "benign reference (in-sample)"
        if poisoned is None and get("poisoned") is not None and reference is not None:
            poisoned = score(_open_like(reference, get("poisoned"), artifact, args))
    return ReportData(artifact, benign, label or "benign", poisoned, target_class)


def _open_like(reference: ReferenceSource, path: Path, artifact: CalibrationArtifact,
               args: argparse.Namespace | None) -> ReferenceSource:
    """Open more data exactly as the reference was opened (same transform, class names and npz keys)."""
    transform = getattr(reference, "transform", None)
    if transform is None:
        raise ReportError(f"cannot read {path} for the report: the reference source has no transform")
    return open_reference(path, transform, artifact.class_names, getattr(args, "x_key", "x"),
                          getattr(args, "y_key", "y"))


# ---- numbers behind the plots --------------------------------------------------------------------------------
def flags_under(artifact: CalibrationArtifact, scored: ScoredSet, policy: ThresholdPolicy) -> np.ndarray:
    """Which items `policy`'s per-class thresholds would flag (score strictly below, by predicted class)."""
    return scored.scores < artifact.thresholds(policy)[scored.predicted]


def tau_sweep(data: ReportData, taus: Sequence[float] = TAUS) -> list[TauPoint]:
    """TPR (over counted attacks) and FPR (over all benign) for each tau; NaN where a set is missing."""
    if data.benign is None and data.poisoned is None:
        return []
    points = []
    mask = data.attack_mask
    for tau in taus:
        policy = ThresholdPolicy(tau=tau)
        fpr = float(flags_under(data.artifact, data.benign, policy).mean()) if data.benign is not None else math.nan
        tpr = math.nan
        if data.poisoned is not None and mask.any():
            tpr = float(flags_under(data.artifact, data.poisoned, policy)[mask].mean())
        points.append(TauPoint(tau, tpr, fpr))
    return points


def standardized(artifact: CalibrationArtifact, scored: ScoredSet) -> np.ndarray:
    """(score - mean) / std of the predicted class: flagged under tau exactly when this is below -tau,
    so sweeping a single cut over it traces the ROC of the deployed per-class-threshold detector."""
    std = np.maximum(artifact.score_std[scored.predicted], 1e-12)
    return (scored.scores - artifact.score_mean[scored.predicted]) / std


def _panel_classes(data: ReportData) -> list[int]:
    """Classes drawn as panels: all of them, or (many classes) those with poisoned inputs first."""
    c = data.artifact.num_classes
    if c <= MAX_PANELS:
        return list(range(c))
    first = [] if data.poisoned is None else sorted(set(data.poisoned.predicted.tolist()))
    rest = [k for k in range(c) if k not in first]
    return (first + rest)[:MAX_PANELS]


def _grid(make_figure: Any, n: int, width: float = 3.0, height: float = 2.6) -> tuple[Any, list[Any]]:
    """Small multiples with fixed margins in inches (constrained layout would double the drawing time)."""
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig_w, fig_h = width * cols, height * rows + 0.5
    fig = make_figure(figsize=(fig_w, fig_h))
    fig.subplots_adjust(left=0.45 / fig_w, right=1 - 0.15 / fig_w, top=1 - 0.75 / fig_h, bottom=0.75 / fig_h,
                        wspace=0.28, hspace=1.05 / height)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


# ---- the plots -----------------------------------------------------------------------------------------------
def plot_similarity(make_figure: Any, data: ReportData, path: Path) -> Path:
    """Figure 4: mean benign cosine similarity to the class centroid at every monitored layer (band: one
    std), the score window LOI-2..LOI shaded and the LOI starred; poisoned inputs predicted as the class
    in red, when known."""
    art = data.artifact
    k = len(art.layer_names)
    x = np.arange(k)
    classes = _panel_classes(data)
    fig, axes = _grid(make_figure, len(classes))
    for ax, c in zip(axes, classes):
        mean, std, loi = art.sim_mean[c], art.sim_std[c], int(art.loi[c])
        ax.axvspan(max(0, loi - 2) - 0.3, loi + 0.3, color="#f2c9c9", alpha=0.5, lw=0)
        ax.fill_between(x, mean - std, mean + std, color=BENIGN_COLOR, alpha=0.18, lw=0)
        ax.plot(x, mean, "o-", color=BENIGN_COLOR, ms=3.5, lw=1.5, label="benign")
        ax.plot([loi], [mean[loi]], marker="*", ms=13, color=LOI_COLOR, ls="none", label="LOI")
        if data.poisoned is not None:
            mine = data.poisoned.predicted == c
            if mine.any():
                ax.plot(x, data.poisoned.similarities[mine].mean(axis=0), "s--", color=POISON_COLOR, ms=3,
                        lw=1.2, label=f"poisoned (n={int(mine.sum())})")
        ax.set_title(f"class {art.class_names[c]}  LOI {art.layer_names[loi]}", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels([_short(n) for n in art.layer_names], rotation=60, fontsize=7, ha="right")
        low = [float(np.min(mean - std))] + [min(line.get_ydata()) for line in ax.get_lines()]
        ax.set_ylim(max(-1.05, min(low) - 0.05), 1.02)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3)
        if ax is axes[0] or (data.poisoned is not None and (data.poisoned.predicted == c).any()):
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Mean benign cosine similarity to the class centroid per layer (shaded: score window)",
                 fontsize=11)
    fig.savefig(path, dpi=100)
    return path


def plot_scores(make_figure: Any, data: ReportData, path: Path) -> Path:
    """Per class: benign scores (scored set by predicted class, else the calibration histogram), poisoned
    scores predicted as that class, and the class's threshold."""
    art = data.artifact
    thresholds = art.thresholds()
    classes = _panel_classes(data)
    fig, axes = _grid(make_figure, len(classes))
    edges = art.hist_edges()
    for ax, c in zip(axes, classes):
        benign = None if data.benign is None else data.benign.scores[data.benign.predicted == c]
        poisoned = None if data.poisoned is None else data.poisoned.scores[data.poisoned.predicted == c]
        values = [v for v in (benign, poisoned) if v is not None and v.size]
        lo = min([thresholds[c]] + [float(v.min()) for v in values]) if values else edges[0]
        hi = max([thresholds[c]] + [float(v.max()) for v in values]) if values else edges[-1]
        pad = 0.05 * max(hi - lo, 1e-3)
        bins = np.linspace(lo - pad, hi + pad, 31)
        if benign is not None:
            ax.hist(benign, bins=bins, color=BENIGN_COLOR, alpha=0.6, label=f"{data.benign_label} (n={benign.size})")
        else:
            counts = art.score_hist[c]
            ax.stairs(counts, edges, fill=True, color=BENIGN_COLOR, alpha=0.6,
                      label=f"benign, calibration (n={int(counts.sum())})")
            nz = np.nonzero(counts)[0]
            if nz.size:
                ax.set_xlim(min(edges[nz[0]], thresholds[c]) - 0.05, edges[nz[-1] + 1] + 0.05)
        if poisoned is not None and poisoned.size:
            ax.hist(poisoned, bins=bins, color=POISON_COLOR, alpha=0.6, label=f"poisoned (n={poisoned.size})")
        ax.axvline(thresholds[c], color="black", ls="--", lw=1.2, label=f"threshold {thresholds[c]:.3f}")
        ax.set_title(f"class {art.class_names[c]}", fontsize=9)
        ax.set_xlabel("score", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle(f"Scores by predicted class; flagged when below the threshold ({art.policy.describe()})",
                 fontsize=11)
    fig.savefig(path, dpi=100)
    return path


def plot_tau(make_figure: Any, data: ReportData, points: list[TauPoint], path: Path) -> Path:
    """Figure 5 (left): detection rate and false-positive rate for each tau of the paper's grid."""
    fig = make_figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    taus = [p.tau for p in points]
    if not all(math.isnan(p.tpr) for p in points):
        ax.plot(taus, [100 * p.tpr for p in points], "o-", color=POISON_COLOR, label="TPR (poisoned flagged)")
    ax.plot(taus, [100 * p.fpr for p in points], "s-", color=BENIGN_COLOR, label=f"FPR ({data.benign_label})")
    chosen = data.artifact.policy.tau
    if chosen is not None:
        ax.axvline(chosen, color="gray", ls=":", label=f"calibrated tau = {chosen}")
    ax.set_xlabel("tau (threshold = mean - tau x std of benign scores)")
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("TPR and FPR against tau")
    fig.savefig(path, dpi=100)
    return path


def plot_roc(make_figure: Any, data: ReportData, points: list[TauPoint], path: Path) -> Path:
    """Figure 5 (right): ROC of the deployed detector (per-class thresholds, tau swept) with the paper's
    tau values marked, and of the raw score under one global threshold for comparison; the right panel
    zooms into the corner where a usable detector lives."""
    art, mask = data.artifact, data.attack_mask
    zb, zp = standardized(art, data.benign), standardized(art, data.poisoned)[mask]
    rb, rp = data.benign.scores, data.poisoned.scores[mask]
    curves = [(roc_curve(zb, zp), dict(color=POISON_COLOR, lw=2),
               f"per-class thresholds, AUROC {auroc(zb, zp):.4f}"),
              (roc_curve(rb, rp), dict(color="gray", ls="--", lw=1),
               f"raw score, one threshold, AUROC {auroc(rb, rp):.4f}")]
    fig = make_figure(figsize=(10, 4.8), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    fpr_max = max([p.fpr for p in points if not math.isnan(p.fpr)] + [0.02])
    tpr_min = min([p.tpr for p in points if not math.isnan(p.tpr)] + [0.98])
    for ax in (full, zoom):
        for (fpr, tpr), style, label in curves:
            ax.plot(fpr, tpr, label=label, **style)
        ax.plot([p.fpr for p in points], [p.tpr for p in points], "ko", ms=4, label="paper's tau values")
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8)
        ax.grid(alpha=0.3)
        ax.set_xlabel("false-positive rate (benign flagged)")
        ax.set_ylabel("true-positive rate (poisoned flagged)")
    full.set_xlim(-0.01, 1.0)
    full.set_ylim(0.0, 1.01)
    full.legend(fontsize=8, loc="lower right")
    full.set_title("ROC")
    zoom.set_xlim(-0.005, min(1.0, 1.25 * fpr_max))
    zoom.set_ylim(max(0.0, tpr_min - 0.25 * (1.0 - tpr_min) - 0.01), 1.002)
    for p in points:
        zoom.annotate(f"tau {p.tau:g}", (p.fpr, p.tpr), textcoords="offset points", xytext=(4, -11), fontsize=7)
    zoom.set_title("ROC, zoomed on the paper's tau range")
    fig.savefig(path, dpi=100)
    return path


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


# ---- the HTML page -------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:.92em}code{background:#f4f4f4;padding:0 .2em}
"""

EXPLAIN = {
    "similarity": (
        "Each panel is one class. The blue line is the mean cosine similarity of benign inputs of that class "
        "to the class centroid at every monitored layer (band: one standard deviation). Benign similarity rises "
        "sharply at some late layer, where the network has made up its mind; that jump is the class's "
        "<b>layer of interest</b> (red star). The score of an input is the sum of its similarities over the "
        "shaded window LOI-2..LOI. When known-poisoned inputs are given, the red dashed line is their mean "
        "similarity to the centroid of the class they were (wrongly) predicted as: it stays low where benign "
        "inputs are already close to their class, which is what the detector catches."
    ),
    "scores": (
        "Scores by predicted class (a served input is scored against the class the model predicts). Blue: "
        "benign inputs; red: known-poisoned inputs; dashed line: the class's threshold. An input scoring "
        "below the threshold is flagged as poisoned. Poisoned inputs appear under the attack's target class, "
        "because that is what the backdoor makes the model predict."
    ),
    "tau": (
        "The paper's threshold rule is mean - tau x std of benign scores per class. A larger tau flags fewer "
        "benign inputs (lower FPR) but lets more poisoned ones through (lower TPR). The dotted line is the tau "
        "this artifact was calibrated with."
    ),
    "roc": (
        "Solid: the detector as deployed (one threshold per class, tau swept continuously); dots: the paper's "
        "tau values. Dashed: a single global threshold on the raw score, for comparison; its AUROC is the one "
        "<code>calibrate.py --poisoned</code> prints."
    ),
}
TITLES = {"similarity": "Layer-wise similarity and layer of interest (paper Fig. 4)",
          "scores": "Score distributions and thresholds",
          "tau": "TPR and FPR against tau (paper Fig. 5)",
          "roc": "ROC curve (paper Fig. 5)"}


def render_html(data: ReportData, points: list[TauPoint], figures: dict[str, str], title: str | None = None) -> str:
    """One page, no external CSS or JS: relative <img> links to the PNGs next to it."""
    art = data.artifact
    e = html.escape
    title = title or "layerguard calibration report"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fingerprint = str(art.meta.get("model_fingerprint", ""))[:16]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p class=\"note\">Written {when}. Model fingerprint <code>{e(fingerprint)}</code>; "
             f"{art.num_classes} classes; threshold rule <code>{e(art.policy.describe())}</code>; "
             f"{len(art.layer_names)} monitored layers of L = {e(str(art.meta.get('total_layers', '?')))}: "
             f"<code>{e(', '.join(art.layer_names))}</code>.</p>"]
    parts.append(_data_paragraph(data))
    parts.append("<h2>Per-class summary</h2>" + _summary_table(data))
    if points:
        parts.append("<h2>Detection quality by tau</h2>" + _tau_table(data, points))
    for key in ("similarity", "scores", "tau", "roc"):
        if key in figures:
            parts.append(f"<h2>{e(TITLES[key])}</h2><p>{EXPLAIN[key]}</p>"
                         f"<p><a href=\"{e(figures[key])}\"><img src=\"{e(figures[key])}\" "
                         f"alt=\"{e(TITLES[key])}\"></a></p>")
    if "roc" not in figures:
        parts.append("<p class=\"note\">No known-poisoned inputs were given, so there is no TPR or ROC. Pass "
                     "<code>--poisoned</code> (and <code>--target-class</code>) to calibrate.py to add them.</p>")
    if art.num_classes > MAX_PANELS:
        parts.append(f"<p class=\"note\">The plots show {MAX_PANELS} of {art.num_classes} classes; the table "
                     "lists all.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _data_paragraph(data: ReportData) -> str:
    art = data.artifact
    bits = [f"Calibration used {int(art.counts_centroid.sum())} reference images for the centroids and "
            f"{int(art.counts_threshold.sum())} for the threshold statistics "
            f"(holdout fraction {art.meta.get('holdout_fraction', '?')})."]
    if data.benign is not None:
        bits.append(f"Benign scores shown: {len(data.benign.scores)} images ({html.escape(data.benign_label)}).")
    if data.poisoned is not None:
        counted = int(data.attack_mask.sum())
        how = (f"the {counted} successful attacks (predicted as target class "
               f"{html.escape(art.class_names[data.target_class])}, true label another class)"
               if data.target_class is not None else f"all {counted}")
        bits.append(f"Known-poisoned images: {len(data.poisoned.scores)}; the TPR counts {how}.")
    return f"<p>{' '.join(bits)}</p>"


def _summary_table(data: ReportData) -> str:
    """The calibrate CLI's per-class summary, plus flag counts on the scored sets when present."""
    art = data.artifact
    thresholds = art.thresholds()
    head = ["class", "centroid n", "threshold n", "layer of interest", "score mean", "score std", "threshold"]
    if data.benign is not None:
        head.append("benign flagged")
    if data.poisoned is not None:
        head.append("poisoned flagged")
    rows = []
    for c, name in enumerate(art.class_names):
        row = [name, str(art.counts_centroid[c]), str(art.counts_threshold[c]), art.layer_names[art.loi[c]],
               f"{art.score_mean[c]:.4f}", f"{art.score_std[c]:.4f}", f"{thresholds[c]:.4f}"]
        for scored in (data.benign, data.poisoned):
            if scored is not None:
                mine = scored.predicted == c
                row.append(f"{int(scored.poisoned[mine].sum())} / {int(mine.sum())}" if mine.any() else "-")
        rows.append(row)
    return _table(head, rows) + ("<p class=\"note\">Flag counts are by predicted class, under the calibrated "
                                 "threshold.</p>" if data.benign is not None or data.poisoned is not None else "")


def _tau_table(data: ReportData, points: list[TauPoint]) -> str:
    chosen = data.artifact.policy.tau
    rows = [[f"{p.tau:g}" + (" (calibrated)" if chosen is not None and math.isclose(p.tau, chosen) else ""),
             _pct(p.tpr), _pct(p.fpr)] for p in points]
    return _table(["tau", "TPR", "FPR"], rows)


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}%"


def _table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"

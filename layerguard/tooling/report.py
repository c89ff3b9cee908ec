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

import datetime as _dt
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.artifact import CalibrationArtifact
from ..core.detector import Detector
from ..core.thresholds import ThresholdPolicy
from .evaluation import ScoredSet, attack_mask, auroc, roc_curve
from .summary import CLASS_TABLE_HEAD, class_table_rows, describe_calibration

__all__ = ["FIGURES", "INDEX", "Figure", "ReportData", "ReportError", "TauPoint", "figure_factory", "tau_sweep",
           "write_report"]

TAUS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
MAX_PANELS = 25  # per-class small multiples beyond this are unreadable; the rest are listed in the table
INDEX = "index.html"
BENIGN_COLOR, POISON_COLOR, LOI_COLOR = "#1f77b4", "#d62728", "#d62728"


class ReportError(RuntimeError):
    """The report cannot be written (most often: matplotlib is missing); the message says how to fix it."""


def figure_factory() -> Any:
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


@dataclass
class ReportData:
    """What the plots are drawn from: the artifact and, optionally, scored benign and poisoned sets
    (tooling.evaluation.score_batches). Without a benign set, the out-of-fold calibration scores are shown."""

    artifact: CalibrationArtifact
    benign: ScoredSet | None = None
    benign_label: str = "benign"
    poisoned: ScoredSet | None = None
    target_class: int | None = None
    title: str | None = None
    detector: Detector = field(init=False)

    def __post_init__(self) -> None:
        self.detector = self.artifact.detector()

    @property
    def attack_mask(self) -> np.ndarray | None:
        return None if self.poisoned is None else attack_mask(self.poisoned, self.target_class)

    @property
    def delivered_fpr(self) -> float:
        """Share of the benign set flagged under the calibrated threshold (out-of-fold references if none)."""
        if self.benign is not None:
            return float(self.benign.poisoned.mean())
        return self.detector.benign.flagged_share(self.detector.policy)


@dataclass(frozen=True)
class TauPoint:
    tau: float
    tpr: float
    fpr: float


# ---- the public entry point ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    """One figure of the report: file name, title, what it shows, how to draw it, and when it applies."""

    key: str
    filename: str
    title: str
    explanation: str
    plot: Callable[[Any, ReportData, list[TauPoint], Path], Path]
    applies: Callable[[ReportData, list[TauPoint]], bool] = lambda data, points: True


def write_report(out_dir: str | Path, data: ReportData) -> Path:
    """Write the PNGs and `index.html` into `out_dir` and return the HTML's path."""
    make_figure = figure_factory()  # fail before any work when matplotlib is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = tau_sweep(data)
    written = {f.key: f.plot(make_figure, data, points, out / f.filename).name
               for f in FIGURES if f.applies(data, points)}
    index = out / INDEX
    index.write_text(render_html(data, points, written), encoding="utf-8")
    return index


# ---- numbers behind the plots --------------------------------------------------------------------------------
def tau_sweep(data: ReportData, taus: Sequence[float] = TAUS) -> list[TauPoint]:
    """TPR (over counted attacks) and FPR (over all benign) for each tau of the paper's grid; NaN where a set
    is missing. Uses the benign set given, else the out-of-fold calibration scores."""
    det = data.detector
    benign_scores = data.benign.scores if data.benign is not None else det.benign.scores
    benign_classes = data.benign.predicted if data.benign is not None else det.benign.labels
    mask = data.attack_mask
    points = []
    for tau in taus:
        thresholds = det.benign.thresholds(ThresholdPolicy(tau=tau, target_fpr=None))
        fpr = float(np.mean(benign_scores < thresholds[benign_classes]))
        tpr = math.nan
        if data.poisoned is not None and mask.any():
            tpr = float(np.mean((data.poisoned.scores < thresholds[data.poisoned.predicted])[mask]))
        points.append(TauPoint(tau, tpr, fpr))
    return points


def standardized(data: ReportData, scored: ScoredSet) -> np.ndarray:
    """(score - mean) / std of the predicted class: thresholds of either policy are one cut on this value, so
    sweeping a single cut over it traces the ROC of the deployed per-class-threshold detector."""
    return data.detector.benign.standardize(scored.scores, scored.predicted)


def _panel_classes(data: ReportData) -> list[int]:
    """Classes drawn as panels: all of them, or (many classes) those with poisoned inputs first."""
    c = data.artifact.num_classes
    if c <= MAX_PANELS:
        return list(range(c))
    first = [] if data.poisoned is None else sorted(set(data.poisoned.predicted.tolist()))
    rest = [k for k in range(c) if k not in first]
    return (first + rest)[:MAX_PANELS]


def _grid(make_figure: Any, n: int, width: float = 3.0, height: float = 2.8) -> tuple[Any, list[Any]]:
    """Small multiples with fixed margins in inches (constrained layout would double the drawing time), and
    room at the top for one shared legend."""
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig_w, fig_h = width * cols, height * rows + 1.2
    fig = make_figure(figsize=(fig_w, fig_h))
    fig.subplots_adjust(left=0.7 / fig_w, right=1 - 0.15 / fig_w, top=1 - 1.25 / fig_h, bottom=0.85 / fig_h,
                        wspace=0.32, hspace=1.45 / height)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _shared_legend(fig: Any, axes: list[Any]) -> None:
    """One legend for all panels, from every distinct label drawn on any of them, under the title."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.985 - 0.45 /
               fig.get_figheight()), ncol=min(4, len(handles)), fontsize=8, frameon=False)


def _policy_note(data: ReportData) -> str:
    return (f"rule {data.artifact.meta.rule}, threshold {data.detector.policy.describe()}, "
            f"delivered FPR {100 * data.delivered_fpr:.2f}% on {data.benign_label}")


# ---- the plots -----------------------------------------------------------------------------------------------
def plot_similarity(make_figure: Any, data: ReportData, points: list[TauPoint], path: Path) -> Path:
    """Figure 4: mean benign cosine similarity to the class centroid at every monitored layer (band: one
    std), the score window LOI-2..LOI shaded and the layer of interest starred; poisoned inputs predicted as
    the class in red, when known."""
    art, det = data.artifact, data.detector
    k = len(art.layer_names)
    x = np.arange(k)
    classes = _panel_classes(data)
    fig, axes = _grid(make_figure, len(classes))
    for ax, c in zip(axes, classes):
        mean, std, loi = det.sim_mean[c], det.sim_std[c], int(det.loi[c])
        ax.axvspan(max(0, loi - 2) - 0.3, loi + 0.3, color="#f2c9c9", alpha=0.5, lw=0,
                   label="score window of cosine-loi (layer of interest and the two before)")
        ax.fill_between(x, mean - std, mean + std, color=BENIGN_COLOR, alpha=0.18, lw=0, label="benign, +-1 std")
        ax.plot(x, mean, "o-", color=BENIGN_COLOR, ms=3.5, lw=1.5, label="benign references, mean (out-of-fold)")
        ax.plot([loi], [mean[loi]], marker="*", ms=13, color=LOI_COLOR, ls="none",
                label="layer of interest (largest rise in similarity)")
        if data.poisoned is not None:
            mine = data.poisoned.predicted == c
            if mine.any():
                ax.plot(x, data.poisoned.similarities[mine].mean(axis=0), "s--", color=POISON_COLOR, ms=3,
                        lw=1.2, label="poisoned inputs predicted as the class, mean")
        ax.set_title(f"class {art.class_names[c]}: layer of interest {_short(art.layer_names[loi], 18)}", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([_short(n) for n in art.layer_names], rotation=60, fontsize=7, ha="right")
        low = [float(np.min(mean - std))] + [min(line.get_ydata()) for line in ax.get_lines()]
        ax.set_ylim(max(-1.05, min(low) - 0.05), 1.02)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("cosine similarity", fontsize=7)
        if ax in axes[-min(5, len(axes)):]:
            ax.set_xlabel("monitored layer (forward order)", fontsize=7)
        ax.grid(alpha=0.3)
    _shared_legend(fig, axes)
    fig.suptitle("Cosine similarity of each input's activations to its class centroid, per monitored layer",
                 fontsize=11)
    fig.savefig(path, dpi=100)
    return path


def plot_scores(make_figure: Any, data: ReportData, points: list[TauPoint], path: Path) -> Path:
    """Per class: benign scores (the scored set by predicted class, else the out-of-fold calibration scores by
    true class), poisoned scores predicted as that class, and the class's threshold."""
    art, det = data.artifact, data.detector
    thresholds = det.thresholds
    classes = _panel_classes(data)
    fig, axes = _grid(make_figure, len(classes))
    for ax, c in zip(axes, classes):
        if data.benign is not None:
            benign, label = data.benign.scores[data.benign.predicted == c], data.benign_label
        else:
            benign, label = det.benign.scores[det.benign.labels == c], "benign references (out-of-fold)"
        poisoned = None if data.poisoned is None else data.poisoned.scores[data.poisoned.predicted == c]
        values = [v for v in (benign, poisoned) if v is not None and v.size]
        lo = min([thresholds[c]] + [float(v.min()) for v in values])
        hi = max([thresholds[c]] + [float(v.max()) for v in values])
        pad = 0.05 * max(hi - lo, 1e-3)
        bins = np.linspace(lo - pad, hi + pad, 31)
        if benign.size:
            ax.hist(benign, bins=bins, color=BENIGN_COLOR, alpha=0.6, label=label)
        if poisoned is not None and poisoned.size:
            ax.hist(poisoned, bins=bins, color=POISON_COLOR, alpha=0.6, label="poisoned inputs")
        ax.axvline(thresholds[c], color="black", ls="--", lw=1.2, label="threshold (flagged when below)")
        counts = f"benign n={benign.size}" + (f", poisoned n={poisoned.size}" if poisoned is not None else "")
        ax.set_title(f"class {art.class_names[c]}  ({counts})", fontsize=8)
        ax.set_xlabel(f"score ({art.meta.rule}; lower = more suspicious)", fontsize=7)
        ax.set_ylabel("images", fontsize=7)
        ax.tick_params(labelsize=7)
    _shared_legend(fig, axes)
    fig.suptitle(f"Scores by predicted class and the class threshold - {_policy_note(data)}", fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def plot_tau(make_figure: Any, data: ReportData, points: list[TauPoint], path: Path) -> Path:
    """Figure 5 (left): detection rate and false-positive rate for each tau of the paper's grid."""
    fig = make_figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    taus = [p.tau for p in points]
    if not all(math.isnan(p.tpr) for p in points):
        ax.plot(taus, [100 * p.tpr for p in points], "o-", color=POISON_COLOR, label="TPR: poisoned inputs flagged")
    ax.plot(taus, [100 * p.fpr for p in points], "s-", color=BENIGN_COLOR,
            label=f"FPR: benign flagged ({data.benign_label})")
    chosen = data.detector.policy.tau
    if chosen is not None:
        ax.axvline(chosen, color="gray", ls=":", label=f"calibrated tau = {chosen}")
    ax.set_xlabel("tau (threshold = class mean - tau x class std of benign scores)")
    ax.set_ylabel("share of inputs flagged (%)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"TPR and FPR against tau ({data.artifact.meta.rule})", fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def plot_roc(make_figure: Any, data: ReportData, points: list[TauPoint], path: Path) -> Path:
    """Figure 5 (right): ROC of the deployed detector (per-class thresholds, one cut swept) with the paper's
    tau values and the calibrated operating point marked; the right panel zooms into the low-FPR corner."""
    mask = data.attack_mask
    zb, zp = standardized(data, data.benign), standardized(data, data.poisoned)[mask]
    fpr_curve, tpr_curve = roc_curve(zb, zp)
    here_fpr = float(data.benign.poisoned.mean())
    here_tpr = float(data.poisoned.poisoned[mask].mean())
    fig = make_figure(figsize=(10, 4.8), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    for ax in (full, zoom):
        ax.plot(fpr_curve, tpr_curve, color=POISON_COLOR, lw=2,
                label=f"{data.artifact.meta.rule}, per-class thresholds (AUROC {auroc(zb, zp):.4f})")
        ax.plot([p.fpr for p in points], [p.tpr for p in points], "ko", ms=4, label="paper's tau values")
        ax.plot([here_fpr], [here_tpr], marker="D", ms=8, color="#2ca02c", ls="none",
                label=f"calibrated ({data.detector.policy.describe()}): FPR {100 * here_fpr:.2f}%, "
                      f"TPR {100 * here_tpr:.2f}%")
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, label="chance")
        ax.grid(alpha=0.3)
        ax.set_xlabel("false-positive rate (share of benign inputs flagged)")
        ax.set_ylabel("true-positive rate (share of attacks flagged)")
    full.set_xlim(-0.01, 1.0)
    full.set_ylim(0.0, 1.01)
    full.legend(fontsize=7, loc="lower right")
    full.set_title("ROC")
    fpr_max = max([p.fpr for p in points if not math.isnan(p.fpr)] + [here_fpr, 0.02])
    tpr_min = min([p.tpr for p in points if not math.isnan(p.tpr)] + [here_tpr, 0.98])
    zoom.set_xlim(-0.005, min(1.0, 1.25 * fpr_max))
    zoom.set_ylim(max(0.0, tpr_min - 0.25 * (1.0 - tpr_min) - 0.01), 1.002)
    for p in points:
        zoom.annotate(f"tau {p.tau:g}", (p.fpr, p.tpr), textcoords="offset points", xytext=(4, -11), fontsize=7)
    zoom.set_title("ROC, zoomed on low false-positive rates")
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

FIGURES: tuple[Figure, ...] = (
    Figure("similarity", "similarity_by_layer.png", "Layer-wise similarity and layer of interest (paper Fig. 4)",
           "Each panel is one class. The blue line is the mean cosine similarity of benign reference inputs of that "
           "class to the class centroid at every monitored layer (band: one standard deviation; out-of-fold: each "
           "reference is measured against centroids it did not help make). Benign similarity rises sharply at some "
           "late layer, where the network has made up its mind; that rise is the class's <b>layer of interest</b> "
           "(red star). The paper's score (rule cosine-loi) sums an input's similarities over the shaded window. "
           "When known-poisoned inputs are given, the red dashed line is their mean similarity to the centroid of "
           "the class they were (wrongly) predicted as.", plot_similarity),
    Figure("scores", "score_distributions.png", "Score distributions and thresholds",
           "Scores by predicted class (a served input is scored against the class the model predicts), under this "
           "artifact's rule. Blue: benign inputs; red: known-poisoned inputs; dashed line: the class's threshold. An "
           "input scoring below the threshold is flagged. Poisoned inputs appear under the attack's target class, "
           "because that is what the backdoor makes the model predict.", plot_scores),
    Figure("tau", "tpr_fpr_vs_tau.png", "TPR and FPR against tau (paper Fig. 5)",
           "The paper's threshold rule is mean - tau x std of benign scores per class. A larger tau flags fewer "
           "benign inputs (lower FPR) but lets more poisoned ones through (lower TPR).", plot_tau),
    Figure("roc", "roc.png", "ROC curve (paper Fig. 5)",
           "The detector as deployed (one threshold per class: the class mean plus a common multiple of the class "
           "std, swept); black dots: the paper's tau values; green diamond: the calibrated threshold.", plot_roc,
           lambda data, points: data.poisoned is not None and data.benign is not None and data.attack_mask.any()),
)


def render_html(data: ReportData, points: list[TauPoint], figures: dict[str, str]) -> str:
    """One page, no external CSS or JS: relative <img> links to the PNGs next to it."""
    art = data.artifact
    e = html.escape
    title = data.title or "layerguard calibration report"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fingerprint = art.meta.model_fingerprint[:16]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<p class=\"note\">Written {when}. Model fingerprint <code>{e(fingerprint)}</code>; "
             f"{art.num_classes} classes.</p><pre>{e(describe_calibration(art, data.detector))}</pre>"]
    parts.append(_data_paragraph(data))
    parts.append("<h2>Per-class summary</h2>" + _summary_table(data))
    if points:
        parts.append("<h2>Detection quality by tau</h2>" + _tau_table(data, points))
    for fig in FIGURES:
        if fig.key in figures:
            name = e(figures[fig.key])
            parts.append(f"<h2>{e(fig.title)}</h2><p>{fig.explanation}</p>"
                         f"<p><a href=\"{name}\"><img src=\"{name}\" alt=\"{e(fig.title)}\"></a></p>")
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
    bits = [f"Calibration used {int(data.detector.counts.sum())} benign reference images"
            + (" in-sample (statistics and thresholds from the same images, as the paper's notebook)."
               if art.meta.folds == 1 else f", {art.meta.folds}-fold cross-fitted: every reference was scored by "
               "statistics fitted without it, and the thresholds come from those scores.")]
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
    """The calibrate CLI's per-class table, plus flag counts on the scored sets when present."""
    head = list(CLASS_TABLE_HEAD)
    rows = class_table_rows(data.artifact, data.detector)
    for scored, label in ((data.benign, "benign flagged"), (data.poisoned, "poisoned flagged")):
        if scored is None:
            continue
        head.append(label)
        for c, row in enumerate(rows):
            mine = scored.predicted == c
            row.append(f"{int(scored.poisoned[mine].sum())} / {int(mine.sum())}" if mine.any() else "-")
    return _table(head, rows) + ("<p class=\"note\">Flag counts are by predicted class, under the calibrated "
                                 "threshold.</p>" if data.benign is not None or data.poisoned is not None else "")


def _tau_table(data: ReportData, points: list[TauPoint]) -> str:
    chosen = data.detector.policy.tau
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

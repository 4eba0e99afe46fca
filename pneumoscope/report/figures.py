"""The report's figures, one matplotlib function each (Agg backend; numbers in, Figure out)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumoscope.report.reliability import Reliability
from pneumoscope.tasks import CLASSES

# Colour-blind safe (Okabe-Ito): NORMAL blue, PNEUMONIA orange, operating point red;
# misclassified images are ringed in black.
CLASS_COLOURS = ("#0072B2", "#E69F00")
THREE_CLASS_COLOURS = ("#0072B2", "#E69F00", "#009E73")  # NORMAL, BACTERIAL, VIRAL (bluish green)
MARK = "#D55E00"
WRONG = "#000000"
DPI = 120

plt.rcParams.update(
    {
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.titleweight": "bold",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "legend.frameon": False,
    }
)


def png_of(fig: Figure) -> bytes:
    """PNG bytes of a figure; the figure is closed (matplotlib keeps them otherwise)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def roc_figure(y: np.ndarray, p: np.ndarray, metrics: dict) -> Figure:
    """ROC curve with the operating point (sensitivity, 1 - specificity at the threshold)."""
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(fpr, tpr, color=CLASS_COLOURS[0], lw=2, label=f"ROC AUC {metrics['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.plot(
        1 - metrics["specificity"],
        metrics["sensitivity"],
        "o",
        ms=9,
        color=MARK,
        label=f"operating point (t = {metrics['threshold']:.3f})",
    )
    ax.set(
        xlabel="1 − specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title="ROC curve",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        aspect="equal",
    )
    ax.legend(loc="lower right")
    return fig


def pr_figure(y: np.ndarray, p: np.ndarray, metrics: dict) -> Figure:
    """Precision-recall curve of the pneumonia class, operating point and prevalence."""
    precision, recall, _ = precision_recall_curve(y, p)
    prevalence = float(np.mean(y))
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot(
        recall,
        precision,
        color=CLASS_COLOURS[1],
        lw=2,
        drawstyle="steps-post",
        label=f"average precision {metrics['pr_auc']:.3f}",
    )
    ax.axhline(prevalence, color="grey", lw=1, ls="--", label=f"prevalence {prevalence:.2f}")
    ax.plot(
        metrics["sensitivity"],
        metrics["precision"],
        "o",
        ms=9,
        color=MARK,
        label=f"operating point (t = {metrics['threshold']:.3f})",
    )
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Precision-recall curve",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        aspect="equal",
    )
    ax.legend(loc="lower left")
    return fig


def confusion_figure(confusion: dict) -> Figure:
    """2x2 confusion matrix: counts and the share of each true class."""
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.0, 3.6))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    names = [["TN", "FP"], ["FN", "TP"]]
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                f"{m[i, j]}\n{share[i, j]:.1%} · {names[i][j]}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=11,
            )
    ax.set_xticks([0, 1], [f"pred. {c}" for c in CLASSES])
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASSES])
    ax.grid(False)
    ax.set_title("Confusion matrix")
    return fig


def confusion_matrix_figure(matrix, names) -> Figure:
    """A CxC confusion matrix (rows true, columns predicted): counts and row shares."""
    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(
                j,
                i,
                f"{m[i, j]}\n{share[i, j]:.1%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ticks = list(range(len(m)))
    ax.set_xticks(ticks, [f"pred. {c}" for c in names], fontsize=8)
    ax.set_yticks(ticks, [f"true {c}" for c in names], fontsize=8)
    ax.grid(False)
    ax.set_title(f"Confusion matrix ({len(m)} classes)")
    return fig


def roc_ovr_figure(y: np.ndarray, probs: np.ndarray, metrics: dict, names) -> Figure:
    """One-vs-rest ROC curve of each class (its probability against all other films)."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for c, (name, colour) in enumerate(zip(names, THREE_CLASS_COLOURS)):
        positive = (np.asarray(y) == c).astype(int)
        if 0 < positive.sum() < len(positive):
            fpr, tpr, _ = roc_curve(positive, probs[:, c])
            auc = metrics["per_class"][name.lower()]["roc_auc"]
            ax.plot(fpr, tpr, color=colour, lw=2, label=f"{name} vs rest: AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set(
        xlabel="1 − specificity (false positive rate)",
        ylabel="sensitivity (true positive rate)",
        title=f"One-vs-rest ROC (macro AUC {metrics['macro_roc_auc']:.3f})",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        aspect="equal",
    )
    ax.legend(loc="lower right", fontsize=7.5)
    return fig


def reliability_figure(rel: Reliability) -> Figure:
    """Reliability diagram (observed pneumonia fraction per p bin) over a count histogram."""
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(4.2, 4.8), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    centres = (rel.edges[:-1] + rel.edges[1:]) / 2
    width = rel.edges[1] - rel.edges[0]
    filled = rel.count > 0
    ax.bar(
        centres[filled],
        rel.frequency[filled],
        width=width * 0.9,
        color=CLASS_COLOURS[0],
        alpha=0.75,
        label="observed fraction of pneumonia",
    )
    ax.plot(
        rel.confidence[filled],
        rel.frequency[filled],
        "o-",
        color=MARK,
        ms=4,
        lw=1,
        label="(mean p, observed) per bin",
    )
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set(
        ylabel="observed fraction of pneumonia",
        ylim=(0, 1.02),
        title=f"Reliability diagram  (ECE = {rel.ece:.3f})",
    )
    # Upper left: where a model would have to be badly under-confident to put points.
    ax.legend(loc="upper left", fontsize=7.5, frameon=True, framealpha=0.9)
    hist.bar(centres, rel.count, width=width * 0.9, color="grey")
    for x, n in zip(centres[filled], rel.count[filled]):
        # A bin of 3 images can sit far off the diagonal by chance: say how many it holds.
        hist.text(x, n, str(n), ha="center", va="bottom", fontsize=7)
    hist.set(
        xlabel="predicted p(pneumonia)",
        ylabel="images",
        xlim=(0, 1),
        ylim=(0, rel.count.max() * 1.3),
    )
    return fig


def training_figure(rows: list[dict], max_epochs: int | None = None) -> Figure:
    """Loss and validation ROC AUC per epoch; the selected (best) epoch and an early stop
    are marked. `rows` are metrics.jsonl lines (0-based epochs, shown 1-based)."""
    epochs = np.array([r["epoch"] + 1 for r in rows])
    best = rows[-1].get("best_epoch", -1) + 1
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(8.4, 3.4))
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=4, label="train loss")
    loss_ax.plot(epochs, [r["val_loss"] for r in rows], "o-", ms=4, label="validation loss")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    auc_ax.plot(
        epochs,
        [r["val_roc_auc"] for r in rows],
        "o-",
        ms=4,
        color=CLASS_COLOURS[1],
        label="validation ROC AUC",
    )
    auc_ax.set(xlabel="epoch", ylabel="ROC AUC", title="Validation ROC AUC")
    low, high = auc_ax.get_ylim()
    if high > 1.0:  # AUC cannot pass 1: no axis room above it
        auc_ax.set_ylim(low, 1.0 + 0.03 * (1.0 - low))
    stopped_early = max_epochs is not None and len(rows) < max_epochs
    for ax in (loss_ax, auc_ax):
        if best > 0:
            ax.axvline(best, color=MARK, ls="--", lw=1.2, label=f"selected epoch {best}")
        if stopped_early:
            ax.axvline(
                epochs[-1],
                color="black",
                ls=":",
                lw=1.2,
                label=f"early stop after epoch {epochs[-1]} of {max_epochs}",
            )
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def embedding_figure(
    points: np.ndarray,
    labels: np.ndarray,
    wrong: np.ndarray,
    title: str,
    class_names: tuple[str, ...] = CLASSES,
) -> Figure:
    """2-D map coloured by true class (two or three); misclassified images ringed in black."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    size = 14 if len(points) < 2000 else 6
    colours = CLASS_COLOURS if len(class_names) == 2 else THREE_CLASS_COLOURS
    for label, colour in enumerate(colours):
        sel = labels == label
        ax.scatter(
            points[sel, 0],
            points[sel, 1],
            s=size,
            color=colour,
            alpha=0.75,
            lw=0,
            label=f"true {class_names[label]} ({int(sel.sum())})",
        )
    ax.scatter(
        points[wrong, 0],
        points[wrong, 1],
        s=size * 4,
        facecolors="none",
        edgecolors=WRONG,
        lw=1.0,
        label=f"misclassified ({int(wrong.sum())})",
    )
    ax.set(title=title, xticks=[], yticks=[])
    ax.grid(False)
    ax.legend(loc="best", fontsize=8, markerscale=1.5, frameon=True, framealpha=0.85)
    return fig


def gradcam_gallery_figure(
    groups: list[tuple[str, list[tuple[np.ndarray, float, str]]]], evidence_for: str = "pneumonia"
) -> Figure:
    """Rows of Grad-CAM overlays: (row title, [(rgb overlay, p, file name), ...]) each."""
    cols = max([len(items) for _, items in groups] + [1])
    fig, axes = plt.subplots(
        len(groups),
        cols,
        figsize=(2.45 * cols + 0.4, 2.75 * len(groups) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, (title, items) in enumerate(groups):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(items):
                rgb, p, name = items[c]
                ax.imshow(rgb)
                ax.set_title(f"{_p_text(p)}\n{_short(name)}", fontsize=7.5, fontweight="normal")
        axes[r, 0].text(
            -0.08,
            0.5,
            title,
            rotation=90,
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=10,
            fontweight="bold",
        )
        if not items:
            axes[r, 0].text(
                0.5,
                0.5,
                "none at this threshold",
                transform=axes[r, 0].transAxes,
                ha="center",
                va="center",
                fontsize=9,
                color="grey",
            )
    colourbar = fig.colorbar(
        matplotlib.cm.ScalarMappable(cmap="jet"),
        ax=axes,
        location="bottom",
        shrink=0.6,
        pad=0.03,
        aspect=40,
    )
    colourbar.set_label(f"Grad-CAM: relative evidence for {evidence_for}")
    return fig


def _p_text(p: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    return "p > 0.999" if p > 0.999 else f"p = {p:.3f}"


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def drift_figure(drift: dict) -> Figure:
    """Histograms of p(pneumonia) of the run's validation images and of the drift folder
    (shares of each set per bin), with the operating threshold."""
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    for (key, label), colour in zip(
        (("validation", "validation"), ("folder", "folder")), ("#0072B2", MARK)
    ):
        hist = drift["scores"][key]["histogram"]
        counts = np.asarray(hist["counts"], float)
        edges = np.asarray(hist["edges"])
        ax.stairs(
            counts / max(counts.sum(), 1),
            edges,
            label=f"{label} (n={int(counts.sum())})",
            color=colour,
            linewidth=1.6,
        )
    ax.axvline(drift["threshold"], color=WRONG, linestyle="--", linewidth=1, label="threshold")
    ax.set(
        xlabel="p(pneumonia)",
        ylabel="share of the set",
        xlim=(0, 1),
        title=f"Score distributions (domain AUC {drift['domain_auc']:.2f})",
    )
    ax.legend(loc="upper center")
    return fig

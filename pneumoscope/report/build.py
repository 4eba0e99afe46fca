"""`pneumoscope report`: one HTML page showing how good a run's model is on a labelled
split, where it fails and what it looks at.

Writes into OUT (default RUN_DIR/report):

    index.html             self-contained (figures inlined as data: URIs)
    *.png                  every figure on its own
    metrics.json           the `evaluate` metrics (+ metrics_predictions.csv)
    embeddings.npy         penultimate-layer embeddings (N, D) float32
    embeddings_meta.csv    path, label, p, prediction and t-SNE/UMAP coordinates per row
    report.json            what was reported on, and how long each step took
    drift.json             with drift=FOLDER: `pneumoscope drift` of that folder (+ drift.png)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscope import __version__
from pneumoscope.data.cache import decode_samples
from pneumoscope.data.discover import Sample, discover_split, kermany_named
from pneumoscope.data.manifest import read_manifest
from pneumoscope.errors import DataError, MissingFileError, OptionError
from pneumoscope.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text
from pneumoscope.inference import Predictor
from pneumoscope.report import figures, html
from pneumoscope.report.embeddings import embed_and_predict, save_embeddings, tsne_2d, umap_2d
from pneumoscope.report.evaluate import check_leakage, score_predictions, write_evaluation
from pneumoscope.report.gradcam import gradcam_heatmaps, overlay_heatmap
from pneumoscope.report.model_card import adaptation_summary, read_adaptation
from pneumoscope.report.reliability import reliability
from pneumoscope.rundir import DRIFT, EVALUATION, MANIFEST, SUMMARY, RunDir, read_json
from pneumoscope.tasks import (
    CLASS_NAMES,
    CLASSES,
    THREE_CLASS,
    p_pneumonia,
    predicted_classes,
    task_labels,
    val_auc_name,
)

log = logging.getLogger(__name__)

DATA_SOURCE = (
    'Kermany, Daniel; Zhang, Kang; Goldbaum, Michael (2018), "Labeled Optical Coherence Tomography '
    '(OCT) and Chest X-Ray Images for Classification", Mendeley Data, v2, '
    '<a href="https://doi.org/10.17632/rscbjbr9sj">doi:10.17632/rscbjbr9sj</a>; '
    'Kermany et al., "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep '
    'Learning", Cell 172(5), 2018. Also distributed as Kaggle "chest-xray-pneumonia".'
)
DATA_LICENCE = (
    '<a href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a> (attribution required)'
)


def select_samples(
    run_dir: str | Path, split_dir: str | Path | None, split: str | None
) -> tuple[list[Sample], str]:
    """The labelled images to report on: a folder with NORMAL/ and PNEUMONIA/, or a role
    (train/val) of the run's manifest.csv. Returns (samples, description)."""
    if (split_dir is None) == (split is None):
        raise OptionError("report: give exactly one of --data SPLIT_DIR or --split ROLE")
    if split_dir is not None:
        return discover_split(split_dir), str(split_dir)
    roles = read_manifest(_manifest_path(run_dir))
    if split not in roles:
        raise OptionError(
            f"{Path(run_dir) / MANIFEST}: no rows with role {split!r}; roles: {sorted(roles)}"
        )
    return roles[split], f"{split} part of the run's split ({Path(run_dir) / MANIFEST})"


def _manifest_path(run_dir: str | Path) -> Path:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise MissingFileError(f"{path}: no manifest in this run directory (needed for --split)")
    return path


def pick_examples(
    labels: np.ndarray, probs: np.ndarray, threshold: float, per_group: int
) -> list[tuple[str, np.ndarray, int]]:
    """The Grad-CAM gallery: per outcome (TP, FP, FN, TN) its name, the indices of its
    `per_group` most confident images (confident mistakes are the ones worth looking at)
    and how many images it holds."""
    predicted = probs >= threshold
    order_desc, order_asc = np.argsort(-probs, kind="stable"), np.argsort(probs, kind="stable")
    groups = [
        ("True positives", (labels == 1) & predicted, order_desc),
        ("False positives", (labels == 0) & predicted, order_desc),
        ("False negatives", (labels == 1) & ~predicted, order_asc),
        ("True negatives", (labels == 0) & ~predicted, order_asc),
    ]
    return [(name, order[mask[order]][:per_group], int(mask.sum())) for name, mask, order in groups]


class _Steps:
    """Times each step (kept in report.json); a step with no progress bar of its own
    (t-SNE, figures) gets a one-tick tqdm bar, so the user sees what is running."""

    def __init__(self, show_progress: bool):
        self.show_progress = show_progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, own_bar: bool = False):
        bar = tqdm(total=1, desc=name, unit="step", disable=own_bar or not self.show_progress)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)
            bar.update(1)
            bar.close()


def build_report(
    run_dir: str | Path,
    split_dir: str | Path | None = None,
    out: str | Path | None = None,
    *,
    split: str | None = None,
    threshold_rule: str | None = None,
    n_boot: int = 1000,
    per_group: int = 4,
    perplexity: float = 30.0,
    seed: int = 0,
    strict: bool = False,
    show_progress: bool = True,
    drift: str | Path | None = None,
) -> Path:
    """Write the report of `run_dir` on a labelled split; returns the path of index.html.

    split_dir: folder with NORMAL/ and PNEUMONIA/; or split: a role ("val", "train") of the
    run's manifest.csv. Exactly one of them. drift: a folder of (unlabelled) images to
    compare with the run's validation images, as `pneumoscope drift` does (a section)."""
    started = time.perf_counter()
    steps = _Steps(show_progress)
    out = Path(out) if out else Path(run_dir) / "report"
    predictor = Predictor.from_run(run_dir)  # first: a wrong RUN_DIR is the likelier mistake
    samples, data_name = select_samples(run_dir, split_dir, split)
    with steps("decode", own_bar=True):
        data = decode_samples(
            samples, predictor.image_size, strict=strict, desc="decode", show_progress=show_progress
        )
    labels = data.labels
    _check_both_classes(labels, data_name)
    with steps("predict + embed", own_bar=True):
        emb, class_probs = embed_and_predict(
            predictor.model,
            data.images,
            device=predictor.device,
            show_progress=show_progress,
            class_probs=True,
        )
    probs = p_pneumonia(class_probs)
    with steps("metrics (bootstrap)"):
        metrics = score_predictions(predictor, data, class_probs, threshold_rule, data_name, n_boot)
    # the reported role itself is in the manifest by design; overlap with the other is leakage
    metrics["leakage"] = check_leakage(run_dir, data, skip_roles=(split,) if split else ())
    three = metrics if metrics.get("task") == THREE_CLASS else None
    if three:  # the pneumonia-vs-normal part of the page reads the binary block
        three["binary"]["leakage"] = metrics["leakage"]
    write_evaluation(out / EVALUATION, metrics, data, class_probs)
    metrics = three["binary"] if three else metrics
    threshold = metrics["threshold"]
    wrong = (probs >= threshold).astype(int) != labels

    with steps("t-SNE"):
        tsne = tsne_2d(emb, seed=seed, perplexity=perplexity)
    with steps("UMAP", own_bar=True):
        umap_points = umap_2d(emb, seed=seed, show_progress=show_progress)
    paths = [str(s.path) for s in data.samples]
    save_embeddings(out, emb, paths, labels, probs, threshold, {"tsne": tsne, "umap": umap_points})

    with steps("Grad-CAM", own_bar=True):
        gallery = _gradcam_gallery(predictor, data, probs, threshold, per_group, show_progress)
        if three:
            class_gallery = _class_gradcam_gallery(predictor, data, class_probs, per_group)
    rel = reliability(labels, probs)
    drift_result = None
    if drift is not None:
        from pneumoscope.site.drift import compute_drift

        with steps("drift", own_bar=True):
            drift_result = compute_drift(
                predictor,
                run_dir,
                drift,
                threshold_rule,
                seed=seed,
                strict=strict,
                show_progress=show_progress,
            )
        atomic_write_json(out / DRIFT, drift_result)
    with steps("figures"):
        pngs = _figures(run_dir, labels, probs, metrics, rel, tsne, umap_points, wrong, gallery)
        if three:
            pngs.update(
                _three_class_figures(three, data, class_probs, tsne, umap_points, class_gallery)
            )
        if drift_result is not None:
            pngs["drift"] = figures.png_of(figures.drift_figure(drift_result))
        for name, png in pngs.items():
            atomic_write_bytes(out / f"{name}.png", png)
    index = out / "index.html"
    atomic_write_text(
        index,
        _page(
            run_dir,
            predictor,
            data,
            data_name,
            metrics,
            rel,
            pngs,
            emb.shape,
            seed,
            drift_result,
            three,
        ),
    )
    steps.seconds["total"] = round(time.perf_counter() - started, 2)
    atomic_write_json(
        out / "report.json",
        {
            "run_dir": str(run_dir),
            "data": data_name,
            "n": len(labels),
            "threshold": threshold,
            "threshold_rule": metrics["threshold_rule"],
            "ece": rel.ece,
            "seed": seed,
            "timings_s": steps.seconds,
            "files": sorted(f"{name}.png" for name in pngs),
        },
    )
    log.info("report written to %s (%.1f s)", index, steps.seconds["total"])
    return index


def _check_both_classes(labels: np.ndarray, data_name: str) -> None:
    counts = np.bincount(labels, minlength=2)
    if counts.min() == 0:
        raise DataError(
            f"{data_name}: the report needs images of both classes; readable images: "
            + ", ".join(f"{c} {n}" for c, n in zip(CLASSES, counts))
        )


def _gradcam_gallery(predictor, data, probs, threshold, per_group, show_progress):
    picks = pick_examples(data.labels, probs, threshold, per_group)
    total = sum(len(ix) for _, ix, _ in picks)
    gallery = []
    with tqdm(total=total, desc="Grad-CAM", unit="img", disable=not show_progress) as bar:
        for name, indices, count in picks:
            heats = gradcam_heatmaps(predictor.model, data.images[indices]) if len(indices) else []
            items = [
                (overlay_heatmap(data.images[i], heat), float(probs[i]), data.samples[i].path.name)
                for i, heat in zip(indices, heats)
            ]
            bar.update(len(indices))
            gallery.append((f"{name} ({count})", items))
    return gallery


def _class_gradcam_gallery(predictor, data, class_probs, per_group):
    """Grad-CAM per class: for each true class, its `per_group` films with the highest
    probability of that class, each map of that class's one-vs-rest log-odds."""
    y = task_labels(data.samples, THREE_CLASS)
    gallery = []
    for c, name in enumerate(CLASS_NAMES[THREE_CLASS]):
        members = np.flatnonzero(y == c)
        picked = members[np.argsort(-class_probs[members, c], kind="stable")][:per_group]
        heats = (
            gradcam_heatmaps(predictor.model, data.images[picked], target_class=c)
            if len(picked)
            else []
        )
        items = [
            (
                overlay_heatmap(data.images[i], heat),
                float(class_probs[i, c]),
                data.samples[i].path.name,
            )
            for i, heat in zip(picked, heats)
        ]
        gallery.append((f"true {name} ({len(members)})", items))
    return gallery


def _three_class_figures(m, data, class_probs, tsne, umap_points, gallery) -> dict[str, bytes]:
    """The three-class section's figures: 3x3 confusion, one-vs-rest ROC, the maps
    coloured by the three classes (rings: wrong three-class label), Grad-CAM per class."""
    names = CLASS_NAMES[THREE_CLASS]
    y = task_labels(data.samples, THREE_CLASS)
    wrong = predicted_classes(class_probs, m["threshold"], m["bacterial_vs_viral_threshold"]) != y
    return {
        "confusion_3class": figures.png_of(
            figures.confusion_matrix_figure(m["confusion"]["matrix"], names)
        ),
        "roc_ovr": figures.png_of(figures.roc_ovr_figure(y, class_probs, m, names)),
        "tsne_3class": figures.png_of(
            figures.embedding_figure(tsne, y, wrong, "t-SNE, three classes", names)
        ),
        "umap_3class": figures.png_of(
            figures.embedding_figure(umap_points, y, wrong, "UMAP, three classes", names)
        ),
        "gradcam_classes": figures.png_of(
            figures.gradcam_gallery_figure(gallery, "the row's class")
        ),
    }


def _three_class_section(m: dict, fig) -> str:
    bv = m["bacterial_vs_viral"]
    intro = (
        f"<p class=note>Three-class run (NORMAL / BACTERIAL / VIRAL). A film is pneumonia when "
        f"p(bacterial) + p(viral) reaches {m['threshold']:.4f} (the binary threshold, so the figures "
        f"above stay comparable with binary runs); a pneumonia film is BACTERIAL when p(bacterial) / "
        f"p(pneumonia) reaches {m['bacterial_vs_viral_threshold']:.4f} (Youden's J on the validation "
        f"pneumonia films), else VIRAL. Accuracy {m['accuracy']:.4f}, macro one-vs-rest ROC AUC "
        f"{m['macro_roc_auc']:.4f}; bacterial vs viral on the {bv['n']} pneumonia films: ROC AUC "
        f"{bv['roc_auc']:.4f}, accuracy {bv['accuracy']:.4f}. Intervals in <code>metrics.json</code>.</p>"
    )
    return (
        intro
        + html.grid(
            fig(
                "confusion_3class",
                "3x3 confusion matrix",
                "Rows: true class; columns: predicted; row shares.",
            ),
            fig(
                "roc_ovr",
                "One-vs-rest ROC curves",
                "Each class's probability against all other films.",
            ),
            fig(
                "tsne_3class",
                "t-SNE by three classes",
                "t-SNE coloured by the three true classes; rings: wrong three-class label.",
            ),
            fig("umap_3class", "UMAP by three classes", "UMAP coloured by the three true classes."),
        )
        + fig(
            "gradcam_classes",
            "Grad-CAM per class",
            "Per true class, its most confident films; the map is Grad-CAM of that class's one-vs-rest "
            "log-odds, p = predicted probability of that class.",
        )
    )


def _figures(
    run_dir, labels, probs, metrics, rel, tsne, umap_points, wrong, gallery
) -> dict[str, bytes]:
    """Every figure as PNG bytes, keyed by file stem."""
    run = RunDir(run_dir)
    config = run.read_config()
    pngs = {
        "roc": figures.png_of(figures.roc_figure(labels, probs, metrics)),
        "pr": figures.png_of(figures.pr_figure(labels, probs, metrics)),
        "confusion": figures.png_of(figures.confusion_figure(metrics["confusion"])),
        "reliability": figures.png_of(figures.reliability_figure(rel)),
        "tsne": figures.png_of(
            figures.embedding_figure(tsne, labels, wrong, "t-SNE of the embeddings")
        ),
        "umap": figures.png_of(
            figures.embedding_figure(umap_points, labels, wrong, "UMAP of the embeddings")
        ),
        "gradcam_gallery": figures.png_of(figures.gradcam_gallery_figure(gallery)),
    }
    rows = run.read_metrics()
    if rows:
        pngs["training"] = figures.png_of(figures.training_figure(rows, config.get("epochs")))
    return pngs


# ----------------------------------------------------------------------------- page


def _page(
    run_dir,
    predictor: Predictor,
    data,
    data_name,
    metrics,
    rel,
    pngs,
    emb_shape,
    seed,
    drift: dict | None = None,
    three: dict | None = None,
) -> str:
    config = predictor.config

    def fig(name: str, alt: str, caption: str, anchor: str = "") -> str:
        return html.figure(pngs[name], alt, caption, f"{name}.png", anchor)

    t = metrics["threshold"]
    sections = [
        (
            "metrics",
            "Metrics at the operating threshold",
            html.grid(
                _metrics_body(metrics, data_name, adapted=read_adaptation(run_dir) is not None),
                fig(
                    "confusion",
                    "Confusion matrix",
                    f"Counts at threshold {t:.3f}; percentages of each true class.",
                    anchor="confusion",
                ),
            ),
        ),
        (
            "curves",
            "ROC, precision-recall and calibration",
            html.grid(
                fig("roc", "ROC curve", "ROC curve; the dot is the operating threshold."),
                fig(
                    "pr",
                    "Precision-recall curve",
                    "Precision-recall of the pneumonia class; dashed: the precision of guessing (prevalence).",
                ),
                fig(
                    "reliability",
                    "Reliability diagram",
                    f"Observed fraction of pneumonia per bin of predicted probability (10 bins). Expected "
                    f"calibration error {rel.ece:.3f}: the mean gap between predicted and observed, "
                    f"weighted by images per bin. Bottom: images per bin.",
                    anchor="calibration",
                ),
            ),
        ),
        (
            "training",
            "Training curves",
            fig(
                "training",
                "Training curves",
                "From metrics.jsonl. The dashed line marks the epoch whose "
                "weights were kept (best validation ROC AUC); a dotted line marks an early stop.",
            )
            if "training" in pngs
            else "<p class=note>No metrics.jsonl in the run directory.</p>",
        ),
        (
            "embeddings",
            "Embeddings: t-SNE and UMAP",
            html.grid(
                fig(
                    "tsne", "t-SNE map", f"t-SNE (scikit-learn, PCA to 50 dims first, seed {seed})."
                ),
                fig("umap", "UMAP map", f"UMAP (umap-learn, 15 neighbours, seed {seed})."),
            )
            + f"<p class=note>Penultimate-layer embeddings ({emb_shape[1]} values per image) of all "
            f"{emb_shape[0]} images, coloured by the true class; black rings: images the model gets wrong at "
            f"threshold {t:.3f}. Saved as <code>embeddings.npy</code> + <code>embeddings_meta.csv</code>.</p>",
        ),
        (
            "gradcam",
            "Grad-CAM: what the model looks at",
            fig(
                "gradcam_gallery",
                "Grad-CAM gallery",
                "Grad-CAM (pytorch-grad-cam) on the last convolutional stage, for the pneumonia "
                "log-odds: red regions raise p(pneumonia). Each map is scaled to its own maximum, so it "
                "shows where the evidence is, not how strong it is. Per row the most confident cases of that "
                "outcome (count in brackets); p = predicted probability of pneumonia. An all-blue map: "
                "nothing in the image raises p(pneumonia). Rows: "
                + _outcome_counts(metrics["confusion"])
                + ".",
            ),
        ),
        (
            "data-card",
            "Data card",
            data_card(run_dir, config, data.samples, len(data.failures), data_name),
        ),
    ]
    nav = [
        ("metrics", "Metrics"),
        ("confusion", "Confusion matrix"),
        ("curves", "ROC / PR"),
        ("calibration", "Calibration"),
        ("training", "Training curves"),
        ("embeddings", "t-SNE / UMAP"),
        ("gradcam", "Grad-CAM"),
        ("data-card", "Data card"),
    ]
    if three is not None:
        sections.insert(
            1,
            (
                "three-class",
                "Three classes: normal, bacterial, viral",
                _three_class_section(three, fig),
            ),
        )
        nav.insert(1, ("three-class", "Three classes"))
    if drift is not None:
        sections.insert(
            -1,
            (
                "drift",
                "Drift: another folder against the validation images",
                html.grid(
                    html.drift_table(drift),
                    fig(
                        "drift",
                        "Score distributions",
                        "p(pneumonia) of the run's validation images and of "
                        f"<code>{escape(drift['data'])}</code>; dashed: the threshold. Numbers in "
                        "<code>drift.json</code>, as <code>pneumoscope drift</code> writes them.",
                    ),
                ),
            ),
        )
        nav.insert(-1, ("drift", "Drift"))
    subtitle = (
        f"Run <code>{escape(str(run_dir))}</code> · {escape(config['backbone'])} at "
        f"{predictor.image_size}×{predictor.image_size} · {len(data.labels)} images of "
        f"{escape(data_name)}"
    )
    source = "data: Kermany et al. 2018, CC BY 4.0 · " if is_kermany_set(data.samples) else ""
    footer = (
        f"pneumoscope {__version__} · generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · "
        f"{source}research use, not a medical device"
    )
    return html.page("pneumoscope report", subtitle, sections, footer, nav)


def _outcome_counts(confusion: dict) -> str:
    names = (
        ("tp", "true positives"),
        ("fp", "false positives"),
        ("fn", "false negatives"),
        ("tn", "true negatives"),
    )
    return ", ".join(f"{name} ({confusion[key]})" for key, name in names)


def _metrics_body(metrics: dict, data_name: str, adapted: bool = False) -> str:
    where = "run's validation split"
    if metrics["threshold_rule"] == "site":
        where = (
            "out-of-fold scores of the site sample of <code>pneumoscope adapt</code>"
            if adapted
            else "site sample of <code>pneumoscope calibrate</code>"
        )
    intro = (
        f"<p class=note>{metrics['n']} images of {escape(data_name)}. Threshold "
        f"{metrics['threshold']:.4f} (rule <b>{escape(metrics['threshold_rule'])}</b>, chosen on the "
        f"{where}). Intervals: 95%, bootstrap over the {metrics.get('n_patients', metrics['n'])} "
        f"patients (all images of a drawn patient together; stratified by the patient's class, a "
        f"patient with any pneumonia image counting as pneumonia). Same numbers as "
        f"<code>pneumoscope evaluate</code>; saved as <code>metrics.json</code>.</p>"
    )
    for role, info in ((metrics.get("leakage") or {}).get("shared") or {}).items():
        files = ", ".join(f"<code>{escape(Path(f).name)}</code>" for f in info["examples"])
        intro += (
            f"<p class=note><b>Not held out:</b> {info['count']} of these images are also in the "
            f"run's {escape(role)} part (same file content), e.g. {files}.</p>"
        )
    unreadable = metrics.get("unreadable") or []
    if unreadable:
        items = "".join(
            f"<li><code>{escape(u['path'])}</code>: {escape(u['problem'])}</li>" for u in unreadable
        )
        intro += f"<p class=note>{len(unreadable)} unreadable file(s) left out:</p><ul>{items}</ul>"
    return intro + html.metrics_table(metrics)


def _class_counts(samples) -> dict[str, int]:
    counts = Counter(CLASSES[s.label] for s in samples)
    return {c: counts.get(c, 0) for c in CLASSES}


def is_kermany_set(samples) -> bool:
    """Whether the reported images are (as far as names tell) the Kermany et al. 2018 set:
    only then may the card name its source, population and licence."""
    return bool(samples) and all(kermany_named(Path(s.path).name) for s in samples)


def _selection_row(summary: dict) -> tuple[str, str]:
    """What was chosen on validation: a trained run's epoch, or an ensemble's members and
    views (it has no epoch); its validation ROC AUC, macro one-vs-rest for three classes."""
    chosen_by = f"(validation {val_auc_name(summary)} {summary.get('val_roc_auc', float('nan')):.4f}, optimistic)"
    if summary.get("kind") == "ensemble":
        return (
            "Ensemble",
            escape(
                f"{len(summary.get('members', []))} members x {summary.get('n_views', 1)} views "
                + chosen_by
            ),
        )
    return (
        "Selected epoch",
        escape(
            f"{summary.get('best_epoch', '?')} of {summary.get('epochs_run', '?')} " + chosen_by
        ),
    )


def data_card(run_dir, config: dict, samples, n_unreadable: int, data_name: str) -> str:
    """The data card of the folder reported on: its counts, classes and patients, and the
    run's own train/val parts; the Kermany source only when the files are that set's."""
    patients = len({s.patient for s in samples})
    sets = [(f"Reported: {data_name} ({patients} patients)", _class_counts(samples))]
    manifest = Path(run_dir) / MANIFEST
    if manifest.exists():
        for role, part in read_manifest(manifest).items():
            sets.append(
                (
                    f"Run's {role} part ({len({s.patient for s in part})} patients)",
                    _class_counts(part),
                )
            )
    summary_path = Path(run_dir) / SUMMARY
    summary = read_json(summary_path) if summary_path.exists() else {}
    model = [
        ("Backbone", escape(f"{config['backbone']} (weights: {config.get('weights', '?')})")),
        (
            "Input",
            escape(
                f"{config['image_size']}×{config['image_size']} grayscale, "
                f"{config.get('preprocessing', {}).get('geometry', 'stretch')} (aspect ratio not kept)"
            ),
        ),
        _selection_row(summary),
    ]
    record = read_adaptation(run_dir)
    if record is not None:  # the card's paragraph, without its Markdown code marks
        model.append(("Adapted", escape(adaptation_summary(record).replace("`", ""))))
    counts = _class_counts(samples)
    reported = [
        ("Folder", f"<code>{escape(data_name)}</code>"),
        (
            "Images",
            escape(
                f"{len(samples)} readable ("
                + ", ".join(f"{c} {n}" for c, n in counts.items())
                + f"); {n_unreadable} unreadable"
            ),
        ),
        (
            "Patients",
            escape(
                f"{patients}, from the file names (a name not in the Kermany style is its "
                "own patient)"
            ),
        ),
    ]
    if is_kermany_set(samples):
        reported += [
            ("Source", DATA_SOURCE),
            ("Licence", DATA_LICENCE),
            (
                "Population",
                "Pediatric chest X-rays (anterior-posterior), patients aged one to five, "
                "Guangzhou Women and Children's Medical Center; labels by expert graders.",
            ),
        ]
    else:
        reported.append(
            (
                "Source",
                "not known to pneumoscope: the file names are not those of the "
                "Kermany et al. 2018 set, so its source, population and licence "
                "are yours to record",
            )
        )
    return (
        "<div class=grid><div><h3>Images per class</h3>"
        + html.counts_table(sets, CLASSES)
        + "</div><div><h3>Model</h3>"
        + html.key_values(model)
        + "</div></div><h3>Data reported on</h3>"
        + html.key_values(reported)
        + "<p class=note>Counts are of readable images. The run's train/val parts are a "
        "patient-grouped split of the training folder; no patient is on both sides.</p>"
    )

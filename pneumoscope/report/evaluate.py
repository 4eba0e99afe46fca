"""Evaluate a run on a labelled folder: metrics.json and its per-image predictions
(`pneumoscope evaluate`; the report computes its numbers through the same functions)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import DecodedSet, decode_samples
from pneumoscope.data.discover import discover_split, load_patients
from pneumoscope.data.manifest import shared_with_manifest
from pneumoscope.evaluation.metrics import evaluate_predictions, format_metrics
from pneumoscope.fsio import atomic_write_csv, atomic_write_json
from pneumoscope.inference import Predictor
from pneumoscope.report.model_card import update_model_card
from pneumoscope.rundir import EVALUATION, MANIFEST
from pneumoscope.tasks import (
    BINARY,
    THREE_CLASS,
    bv_threshold_of,
    p_pneumonia,
    prediction_columns,
    task_labels,
)

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path,
    split_dir: str | Path,
    out: str | Path | None = None,
    threshold_rule: str | None = None,
    strict: bool = False,
    n_boot: int = 1000,
    show_progress: bool = True,
    patients: str | Path | None = None,
    engine: str | None = None,
) -> dict:
    """Metrics of a run's model on one labelled folder, written to metrics.json.
    patients: a CSV of file -> patient id (--patients), else ids from Kermany file names.
    engine: auto | onnxruntime | torch (pneumoscope.deploy.scoring)."""
    from pneumoscope.deploy.scoring import load_scorer

    predictor = load_scorer(run_dir, engine)
    samples = discover_split(split_dir, patients=load_patients(patients))
    data = decode_samples(
        samples, predictor.image_size, strict=strict, desc="decode", show_progress=show_progress
    )
    probs = predictor.predict_class_probs(data.images, show_progress=show_progress)
    metrics = score_predictions(predictor, data, probs, threshold_rule, str(split_dir), n_boot)
    metrics["leakage"] = check_leakage(run_dir, data)
    if "binary" in metrics:  # three-class: the binary block carries every binary key
        metrics["binary"]["leakage"] = metrics["leakage"]
    out = Path(out) if out else Path(run_dir) / EVALUATION
    write_evaluation(out, metrics, data, probs)
    update_model_card(run_dir, evaluation=(metrics, out))  # every evaluated folder in MODEL_CARD.md
    return metrics


def score_predictions(
    predictor: Predictor,
    data: DecodedSet,
    probs: np.ndarray,
    threshold_rule: str | None,
    data_name: str,
    n_boot: int = 1000,
) -> dict:
    """The metrics.json content (evaluate and report share it) at the rule's threshold.
    probs: p(pneumonia) (N,) or class probabilities (N, C); a three-class run's metrics
    (pneumoscope.evaluation.three_class) need the (N, 3) ones."""
    threshold = predictor.threshold_for(threshold_rule)
    patients = [s.patient for s in data.samples]  # intervals resample patients, not images
    probs = np.asarray(probs)
    task = getattr(predictor, "task", BINARY)
    if task == BINARY:
        p = p_pneumonia(probs) if probs.ndim == 2 else probs
        metrics = evaluate_predictions(data.labels, p, threshold, n_boot=n_boot, patients=patients)
    else:
        from pneumoscope.evaluation.three_class import evaluate_three_class

        metrics = evaluate_three_class(
            task_labels(data.samples, task),
            probs,
            threshold,
            bv_threshold_of(predictor.thresholds, task),
            n_boot=n_boot,
            patients=patients,
        )
    extra = {
        "threshold_rule": threshold_rule or predictor.thresholds["default"],
        "data": data_name,
        "unreadable": [{"path": p, "problem": why} for p, why in data.failures],
    }
    metrics.update(extra)
    if task != BINARY:
        metrics["binary"].update(extra)
    return metrics


def format_evaluation(metrics: dict) -> str:
    """The console table of either task's metrics.json."""
    if metrics.get("task") == THREE_CLASS:
        from pneumoscope.evaluation.three_class import format_three_class

        return format_three_class(metrics)
    return format_metrics(metrics)


def check_leakage(
    run_dir: str | Path, data: DecodedSet, skip_roles: tuple[str, ...] = ()
) -> dict | None:
    """Images of `data` that the run trained or selected its threshold on (same bytes,
    by the sha1 decoding computed; by path for an old manifest), with a warning: metrics
    on them are not held out. None when the run has no manifest.csv."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.exists():
        return None
    found = shared_with_manifest(manifest, data.samples, data.keys, skip_roles)
    for role, info in found["shared"].items():
        log.warning(
            "%d of the %d evaluated images are also in the run's %s part (same %s), so the "
            "metrics are not on held-out data; e.g. %s",
            info["count"],
            len(data.samples),
            role,
            "file content" if found["compared_by"].startswith("sha1") else "path",
            ", ".join(info["examples"][:3]),
        )
    return found


def write_evaluation(out: Path, metrics: dict, data: DecodedSet, probs: np.ndarray) -> None:
    """metrics.json at `out` and the per-image predictions beside it (OUT_predictions.csv:
    path, label, p_pneumonia; three-class: path, label (0/1/2), p_normal, p_bacterial,
    p_viral, p_pneumonia)."""
    atomic_write_json(out, metrics)
    probs = np.asarray(probs)
    task = metrics.get("task", BINARY)
    if probs.ndim == 1:
        values, labels = probs[:, None], data.labels
    elif task == BINARY:
        values, labels = p_pneumonia(probs)[:, None], data.labels
    else:
        values, labels = (
            np.column_stack([probs, p_pneumonia(probs)]),
            task_labels(data.samples, task),
        )
    atomic_write_csv(
        out.with_name(out.stem + "_predictions.csv"),
        ["path", "label", *prediction_columns(task)],
        [
            [str(s.path), int(y), *(repr(float(v)) for v in row)]
            for s, y, row in zip(data.samples, labels, values)
        ],
    )

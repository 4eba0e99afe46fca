"""The work behind each CLI verb, as functions a test or a notebook can call directly."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import DecodedSet, decode_samples, report_failures
from pneumoscope.data.decode import IMAGE_SUFFIXES, ImageDecodeError
from pneumoscope.data.discover import discover_split, load_patients
from pneumoscope.data.manifest import shared_with_manifest
from pneumoscope.errors import DataError, OptionError
from pneumoscope.evaluation import evaluate_predictions, format_metrics
from pneumoscope.inference import Predictor
from pneumoscope.model_card import update_model_card
from pneumoscope.rundir import MANIFEST, atomic_write_csv, atomic_write_json, atomic_write_text
from pneumoscope.tasks import (
    BINARY, THREE_CLASS, bv_threshold_of, p_pneumonia, prediction_columns, prediction_rows, task_labels,
)

log = logging.getLogger(__name__)


def evaluate_run(run_dir: str | Path, split_dir: str | Path, out: str | Path | None = None,
                 threshold_rule: str | None = None, strict: bool = False,
                 n_boot: int = 1000, show_progress: bool = True, patients: str | Path | None = None,
                 engine: str | None = None) -> dict:
    """Metrics of a run's model on one labelled folder, written to metrics.json.
    patients: a CSV of file -> patient id (--patients), else ids from Kermany file names.
    engine: auto | onnxruntime | torch (pneumoscope.scoring)."""
    from pneumoscope.scoring import load_scorer

    predictor = load_scorer(run_dir, engine)
    samples = discover_split(split_dir, patients=load_patients(patients))
    data = decode_samples(samples, predictor.image_size, strict=strict, desc="decode",
                          show_progress=show_progress)
    probs = predictor.predict_class_probs(data.images, show_progress=show_progress)
    metrics = score_predictions(predictor, data, probs, threshold_rule, str(split_dir), n_boot)
    metrics["leakage"] = check_leakage(run_dir, data)
    if "binary" in metrics:  # three-class: the binary block carries every binary key
        metrics["binary"]["leakage"] = metrics["leakage"]
    out = Path(out) if out else Path(run_dir) / "metrics.json"
    write_evaluation(out, metrics, data, probs)
    update_model_card(run_dir, evaluation=(metrics, out))  # every evaluated folder in MODEL_CARD.md
    return metrics


def score_predictions(predictor: Predictor, data: DecodedSet, probs: np.ndarray,
                      threshold_rule: str | None, data_name: str, n_boot: int = 1000) -> dict:
    """The metrics.json content (evaluate and report share it) at the rule's threshold.
    probs: p(pneumonia) (N,) or class probabilities (N, C); a three-class run's metrics
    (pneumoscope.three_class) need the (N, 3) ones."""
    threshold = predictor.threshold_for(threshold_rule)
    patients = [s.patient for s in data.samples]  # intervals resample patients, not images
    probs = np.asarray(probs)
    task = getattr(predictor, "task", BINARY)
    if task == BINARY:
        p = p_pneumonia(probs) if probs.ndim == 2 else probs
        metrics = evaluate_predictions(data.labels, p, threshold, n_boot=n_boot, patients=patients)
    else:
        from pneumoscope.three_class import evaluate_three_class

        metrics = evaluate_three_class(task_labels(data.samples, task), probs, threshold,
                                       bv_threshold_of(predictor.thresholds, task), n_boot=n_boot, patients=patients)
    extra = {"threshold_rule": threshold_rule or predictor.thresholds["default"], "data": data_name,
             "unreadable": [{"path": p, "problem": why} for p, why in data.failures]}
    metrics.update(extra)
    if task != BINARY:
        metrics["binary"].update(extra)
    return metrics


def format_evaluation(metrics: dict) -> str:
    """The console table of either task's metrics.json."""
    if metrics.get("task") == THREE_CLASS:
        from pneumoscope.three_class import format_three_class

        return format_three_class(metrics)
    return format_metrics(metrics)


def check_leakage(run_dir: str | Path, data: DecodedSet, skip_roles: tuple[str, ...] = ()) -> dict | None:
    """Images of `data` that the run trained or selected its threshold on (same bytes,
    by the sha1 decoding computed; by path for an old manifest), with a warning: metrics
    on them are not held out. None when the run has no manifest.csv."""
    manifest = Path(run_dir) / MANIFEST
    if not manifest.exists():
        return None
    found = shared_with_manifest(manifest, data.samples, data.keys, skip_roles)
    for role, info in found["shared"].items():
        log.warning("%d of the %d evaluated images are also in the run's %s part (same %s), so the "
                    "metrics are not on held-out data; e.g. %s", info["count"], len(data.samples), role,
                    "file content" if found["compared_by"].startswith("sha1") else "path",
                    ", ".join(info["examples"][:3]))
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
        values, labels = np.column_stack([probs, p_pneumonia(probs)]), task_labels(data.samples, task)
    atomic_write_csv(
        out.with_name(out.stem + "_predictions.csv"), ["path", "label", *prediction_columns(task)],
        [[str(s.path), int(y), *(repr(float(v)) for v in row)] for s, y, row in zip(data.samples, labels, values)],
    )


class NothingScoredError(DataError):
    """predict or explain could score no image: an empty result must not pass for one in
    a pipeline (exit 2, one line)."""


def require_image_files(files: list[Path], given: list[str | Path]) -> None:
    """Stop when the paths given hold no image file at all (an empty folder)."""
    if not files:
        raise NothingScoredError(f"nothing scored: no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                                 + ", ".join(str(p) for p in given))


def require_some_readable(n_read: int, failures: list[tuple[str, str]]) -> None:
    """Stop, in one line, when every file was unreadable (a missing path included): with
    or without --strict, nothing scored is an error, not an empty CSV."""
    if n_read == 0 and failures:
        path, problem = failures[0]
        more = f" (and {len(failures) - 1} more unreadable file(s))" if len(failures) > 1 else ""
        raise NothingScoredError(f"nothing scored: {path}: {problem}{more}")


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            # not is_dir() rather than is_file(): a symlink loop or a FIFO named like an
            # image is named in the unreadable-files warning, not dropped silently.
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        else:
            files.append(path)
    return files


def load_predictor(run_dir: str | Path, onnx: str | Path | None = None, device: str | None = None):
    """The run's torch Predictor, or with `onnx` that exported model under onnxruntime (same
    decode; contract and thresholds from its model.onnx.json)."""
    if onnx:
        from pneumoscope.onnx_predictor import OnnxPredictor

        return OnnxPredictor.from_file(onnx, run_dir=run_dir)
    return Predictor.from_run(run_dir, device=device)


def decode_sources(predictor, sources: list) -> tuple[list, list[np.ndarray], list[tuple[str, str]]]:
    """(kept sources, their model-size images, failures) of image paths or uint8 arrays
    (an array goes through the same decode as a file, as a lossless PNG)."""
    kept, images, failures = [], [], []
    for source in sources:
        try:
            if isinstance(source, np.ndarray):
                images.append(predictor.load(array_png(source), name="array"))
            else:
                images.append(predictor.load(source))
            kept.append(source)
        except (ImageDecodeError, OSError) as err:
            failures.append((str(source) if not isinstance(source, np.ndarray) else "array",
                             getattr(err, "problem", None) or str(err)))
    return kept, images, failures


def array_png(image: np.ndarray) -> bytes:
    """A uint8 gray (H, W) or RGB (H, W, 3) array as PNG bytes; anything else is refused."""
    from pneumoscope.report.gradcam import png_bytes

    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
        raise DataError(f"expected a uint8 image array (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    return png_bytes(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)


def predict_sources(predictor, sources: list, threshold_rule: str | None = None, strict: bool = False,
                    show_progress: bool = False) -> list[dict]:
    """One row per readable source (path or uint8 array): path (None for an array),
    p_pneumonia and label at the rule's threshold."""
    kept, images, failures = decode_sources(predictor, sources)
    require_some_readable(len(kept), failures)
    report_failures(failures, strict)
    stack = np.stack(images) if images else np.empty((0, predictor.image_size, predictor.image_size), np.uint8)
    probs = predictor.predict_class_probs(stack, show_progress=show_progress)
    threshold = predictor.threshold_for(threshold_rule)
    rows = prediction_rows(predictor.task, probs, threshold, bv_threshold_of(predictor.thresholds))
    return [{"path": None if isinstance(s, np.ndarray) else str(s), **r} for s, r in zip(kept, rows)]


def predictions_csv(rows: list[dict], handle, header: list[str] | None = None, task: str = BINARY) -> None:
    """rows as CSV through the csv module (a comma or quote in a path stays one field);
    the columns are the task's (three-class: path, p_normal, p_bacterial, p_viral,
    p_pneumonia, label), also when no row was readable; probabilities with 6 decimals."""
    header = header or ["path", *prediction_columns(task), "label"]
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in (row[k] for k in header)])


def predict_paths(run_dir: str | Path, paths: list[str | Path], out: str | Path | None = None,
                  threshold_rule: str | None = None, strict: bool = False,
                  show_progress: bool = True, onnx: str | Path | None = None) -> list[dict]:
    """p(pneumonia) and label for every readable image among `paths` (folders searched);
    CSV at `out` when given. onnx: see load_predictor."""
    from pneumoscope.scoring import load_scorer

    # the engine `pneumoscope predict` scores with (onnxruntime where it applies), so a notebook
    # gets the CLI's numbers to the last digit; a broken run is named first, whatever the paths
    predictor = load_scorer(run_dir, onnx=onnx)
    files = expand_paths(paths)
    require_image_files(files, paths)
    rows = predict_sources(predictor, files, threshold_rule, strict, show_progress)
    if out:
        buffer = io.StringIO()
        predictions_csv(rows, buffer, task=predictor.task)
        atomic_write_text(out, buffer.getvalue())
    return rows


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
               opset: int | None = None) -> Path:
    """Export a run's model (ONNX only) with its preprocessing contract beside it."""
    if fmt != "onnx":
        raise OptionError(f"unknown export format {fmt!r}; supported: onnx")
    from pneumoscope.export import export_onnx
    from pneumoscope.onnx_contract import DEFAULT_OPSET

    return export_onnx(run_dir, out, opset=opset or DEFAULT_OPSET)

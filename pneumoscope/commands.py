"""The work behind each CLI verb, as functions a test or a notebook can call directly."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from pneumoscope.data.cache import report_failures
from pneumoscope.data.sources import expand_paths, require_image_files, require_some_readable
from pneumoscope.errors import OptionError
from pneumoscope.fsio import CsvWriter, atomic_write_text
from pneumoscope.inference import decode_sources
from pneumoscope.tasks import (
    BINARY,
    bv_threshold_of,
    prediction_cells,
    prediction_columns,
    prediction_rows,
)

log = logging.getLogger(__name__)


def predict_sources(
    predictor,
    sources: list,
    threshold_rule: str | None = None,
    strict: bool = False,
    show_progress: bool = False,
) -> list[dict]:
    """One row per readable source (path or uint8 array): path (None for an array),
    p_pneumonia and label at the rule's threshold."""
    kept, images, failures = decode_sources(predictor, sources)
    require_some_readable(len(kept), failures)
    report_failures(failures, strict)
    stack = (
        np.stack(images)
        if images
        else np.empty((0, predictor.image_size, predictor.image_size), np.uint8)
    )
    probs = predictor.predict_class_probs(stack, show_progress=show_progress)
    threshold = predictor.threshold_for(threshold_rule)
    rows = prediction_rows(predictor.task, probs, threshold, bv_threshold_of(predictor.thresholds))
    return [
        {"path": None if isinstance(s, np.ndarray) else str(s), **r} for s, r in zip(kept, rows)
    ]


def predictions_csv(
    rows: list[dict], handle, header: list[str] | None = None, task: str = BINARY
) -> None:
    """rows as CSV through the csv module (a comma or quote in a path stays one field);
    the columns are the task's (three-class: path, p_normal, p_bacterial, p_viral,
    p_pneumonia, label), also when no row was readable; probabilities with 6 decimals."""
    header = header or ["path", *prediction_columns(task), "label"]
    writer = CsvWriter(handle)
    writer.writerow(header)
    writer.writerows(prediction_cells(row, header) for row in rows)


def predict_paths(
    run_dir: str | Path,
    paths: list[str | Path],
    out: str | Path | None = None,
    threshold_rule: str | None = None,
    strict: bool = False,
    show_progress: bool = True,
    onnx: str | Path | None = None,
) -> list[dict]:
    """p(pneumonia) and label for every readable image among `paths` (folders searched);
    CSV at `out` when given. onnx: see load_predictor."""
    from pneumoscope.deploy.scoring import load_scorer

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


def export_run(
    run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, opset: int | None = None
) -> Path:
    """Export a run's model (ONNX only) with its preprocessing contract beside it."""
    if fmt != "onnx":
        raise OptionError(f"unknown export format {fmt!r}; supported: onnx")
    from pneumoscope.deploy.export import export_onnx
    from pneumoscope.deploy.onnx_contract import DEFAULT_OPSET

    return export_onnx(run_dir, out, opset=opset or DEFAULT_OPSET)

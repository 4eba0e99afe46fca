"""`pneumoscope explain`: a Grad-CAM overlay PNG and p(pneumonia) per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscope.data.cache import report_failures
from pneumoscope.data.decode import ImageDecodeError
from pneumoscope.data.sources import (
    expand_paths,
    png_bytes,
    require_image_files,
    require_some_readable,
)
from pneumoscope.fsio import atomic_write_bytes
from pneumoscope.inference import Predictor
from pneumoscope.report.gradcam import gradcam_heatmap, overlay_heatmap
from pneumoscope.tasks import CLASSES


def _out_names(paths: list[Path]) -> list[str]:
    """STEM_gradcam.png per image; a stem seen before gets _2, _3, ... (same file names
    in different folders must not overwrite each other)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        n = seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(f"{path.stem}_gradcam.png" if n == 1 else f"{path.stem}_{n}_gradcam.png")
    return names


def explain_images(
    run_dir: str | Path,
    images: list[str | Path],
    out: str | Path | None = None,
    *,
    threshold_rule: str | None = None,
    alpha: float = 0.4,
    strict: bool = False,
    show_progress: bool = True,
) -> list[dict]:
    """For each readable image (files, or folders searched for images): the Grad-CAM
    overlay written to OUT (default RUN_DIR/explain) and a dict with path, p_pneumonia,
    label (at the run's threshold, or `threshold_rule`'s), threshold and overlay path.
    Unreadable files are named in a warning and skipped (an error with `strict`); none
    readable, or no image among `images`, is a NothingScoredError."""
    predictor = Predictor.from_run(run_dir)
    threshold = predictor.threshold_for(threshold_rule)
    out = Path(out) if out else Path(run_dir) / "explain"
    files = expand_paths(images)
    require_image_files(files, images)
    loaded, failures = [], []
    for path in files:
        try:
            loaded.append((path, predictor.load(path)))
        except (ImageDecodeError, OSError) as err:
            failures.append((str(path), getattr(err, "problem", None) or str(err)))
    require_some_readable(len(loaded), failures)
    report_failures(failures, strict)
    probs = predictor.predict_images(np.stack([image for _, image in loaded]))
    results = []
    names = _out_names([path for path, _ in loaded])
    for (path, image), p, name in tqdm(
        list(zip(loaded, probs, names)), desc="Grad-CAM", unit="img", disable=not show_progress
    ):
        overlay = overlay_heatmap(image, gradcam_heatmap(predictor.model, image), alpha=alpha)
        atomic_write_bytes(out / name, png_bytes(overlay))
        results.append(
            {
                "path": str(path),
                "p_pneumonia": float(p),
                "label": CLASSES[int(p >= threshold)],
                "threshold": threshold,
                "overlay": str(out / name),
            }
        )
    return results

"""The HTML report and Grad-CAM explanations of a run (`pneumoscope report` / `explain`).

Submodules load lazily: the web app imports only ``pneumoscope.report.gradcam`` and does
not pay for umap/numba.
"""

from __future__ import annotations

from pathlib import Path


def build_report(run_dir, split_dir=None, out=None, **kwargs) -> Path:
    """See pneumoscope.report.build.build_report."""
    from pneumoscope.report.build import build_report as _build

    return _build(run_dir, split_dir, out, **kwargs)


def explain_images(run_dir, images, out=None, **kwargs) -> list[dict]:
    """See pneumoscope.report.explain.explain_images."""
    from pneumoscope.report.explain import explain_images as _explain

    return _explain(run_dir, images, out, **kwargs)

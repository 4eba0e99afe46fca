"""The Python API: `load` a run to predict and explain, `train` a run.

    import pneumoscope
    model = pneumoscope.load("runs/lite0")
    model.predict(["a.jpeg", "folder/"])   # [{"path", "p_pneumonia", "label"}, ...]
    overlay = model.explain("a.jpeg")      # uint8 (S, S, 3) Grad-CAM overlay

The command line calls these same functions (cli.cmd_train -> train, cmd_predict ->
commands.predict_paths, which shares predict_sources with Model.predict), so a notebook
gets the CLI's numbers.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import numpy as np

from pneumoscope.commands import predict_sources
from pneumoscope.data.cache import report_failures
from pneumoscope.data.sources import expand_paths
from pneumoscope.deploy.scoring import load_predictor
from pneumoscope.errors import OptionError
from pneumoscope.inference import decode_sources


class Model:
    """A trained run, loaded once. threshold_rule: youden, sensitivity95, site (after
    calibrate) or None for the run's default."""

    def __init__(
        self,
        run_dir: str | Path,
        onnx: str | Path | None = None,
        threshold_rule: str | None = None,
        device: str | None = None,
        engine: str | None = None,
    ):
        from pneumoscope.deploy.scoring import load_scorer

        self.run_dir = Path(run_dir)
        self.onnx = onnx
        self.device = device
        # the engine `pneumoscope predict` scores with (pneumoscope.deploy.scoring), so the numbers agree
        self.predictor = load_scorer(run_dir, engine, device, onnx=onnx)
        self.threshold_rule = threshold_rule
        self.threshold = self.predictor.threshold_for(threshold_rule)  # an unknown rule fails here
        self._torch = None if onnx else getattr(self.predictor, "torch", self.predictor)

    def __repr__(self) -> str:
        engine = f"onnx={self.onnx}" if self.onnx else self.predictor.runtime
        return f"pneumoscope.Model({str(self.run_dir)!r}, {engine}, threshold={self.threshold:.4f})"

    def predict(self, images, *, strict: bool = False, show_progress: bool = False) -> list[dict]:
        """One dict per readable image: path (None for an array), p_pneumonia, label.
        images: paths (folders are searched),
        uint8 arrays (H, W) or (H, W, 3), or a mix; one path or array alone is fine too.
        Unreadable files are named in a warning and skipped (an error with strict)."""
        return predict_sources(
            self.predictor, _sources(images), self.threshold_rule, strict, show_progress
        )

    def explain(self, image, alpha: float = 0.4) -> np.ndarray:
        """The Grad-CAM overlay of one image (path or uint8 array) as `pneumoscope explain`
        writes it: uint8 (S, S, 3). Grad-CAM needs the torch model, also for an ONNX run."""
        from pneumoscope.report.gradcam import gradcam_heatmap, overlay_heatmap

        if self._torch is None:
            self._torch = load_predictor(self.run_dir, device=self.device)
        sources = _sources(image)
        if len(sources) != 1:
            raise OptionError(
                f"explain takes one image, got {len(sources)} (call it once per image)"
            )
        _, loaded, failures = decode_sources(self._torch, sources)
        report_failures(failures, strict=True)
        return overlay_heatmap(
            loaded[0], gradcam_heatmap(self._torch.model, loaded[0]), alpha=alpha
        )


def _sources(images) -> list:
    """A flat list of paths (folders expanded) and arrays."""
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim in (2, 3):
        # one image, whatever its channels (the decode refuses what it cannot read)
        images = [images]
    out = []
    for item in images:
        out += [item] if isinstance(item, np.ndarray) else expand_paths([item])
    return out


def load(
    run_dir: str | Path,
    onnx: str | Path | None = None,
    *,
    threshold_rule: str | None = None,
    device: str | None = None,
    engine: str | None = None,
) -> Model:
    """The run in RUN_DIR (written by train) on predict's engine (engine: auto, onnxruntime
    or torch; pneumoscope.deploy.scoring) or, with onnx, that export run by onnxruntime; device:
    cpu, cuda, cuda:N (default cuda when available)."""
    return Model(run_dir, onnx, threshold_rule, device, engine)


def train(
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    **options,
) -> Path:
    """Train a run as `pneumoscope train` does; returns RUN_DIR.

    options: TrainConfig's fields (epochs=8, backbone="efficientnet_lite0", log="tensorboard",
    ...). config: a JSON or YAML file of options (a run's config.json replays it); data,
    out and options given here override it. resume / overwrite: as --resume / --overwrite."""
    from pneumoscope.report.trackers import open_trackers
    from pneumoscope.training.config import TrainConfig
    from pneumoscope.training.loop import fit
    from pneumoscope.training.options import checked_options, merge_options

    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(
            f"train: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    given = {**options, **{k: str(v) for k, v in (("data", data), ("out", out)) if v is not None}}
    given = checked_options(given, "pneumoscope.train")  # the CLI's types and choices
    cfg = TrainConfig(**merge_options(config, given))
    main = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone writes and logs
    trackers = open_trackers(cfg, enabled=main)  # they write nothing before the first epoch
    try:
        summary = fit(
            cfg,
            resume=resume,
            overwrite=overwrite,
            show_progress=show_progress,
            on_epoch=trackers.log_epoch,
        )
        if summary is not None and main:
            from pneumoscope.report.model_card import update_model_card

            update_model_card(cfg.out)
            trackers.finish()
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()
    return Path(cfg.out)


def adapt(run_dir: str | Path, data: str | Path, out: str | Path, **options) -> Path:
    """Adapt a run to a labelled site sample (`pneumoscope adapt`); returns the new run
    directory. options: adapt.adapt_run's (site_weight, folds, epochs, target_sensitivity,
    n_boot, seed, device, overwrite, strict, show_progress)."""
    from pneumoscope.site.adapt import adapt_run

    adapt_run(run_dir, data, out, **options)
    return Path(out)

"""Experiment trackers for `train --log tensorboard,mlflow` (rank 0 only; off by default).

Both get the options as parameters, each epoch's train loss, validation ROC AUC / PR AUC /
loss and learning rate, and at the end what the run directory holds: TensorBoard the
validation ROC curve and a few Grad-CAM overlays, MLflow the model, thresholds, config,
summary, model card and report (when there is one) as artifacts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pneumoscope.errors import OptionError, UserError
from pneumoscope.rundir import MODEL_CARD, SUMMARY

TRACKERS = ("tensorboard", "mlflow")
EXTRA = "pip install 'pneumoscope[track]'"
EPOCH_SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "val_roc_auc": "val/roc_auc",
    "val_pr_auc": "val/pr_auc",
    "lr": "lr",
}
N_GRADCAM = 4  # overlays at the end: the first validation images of each class, two apiece


class MissingExtraError(UserError, ImportError):
    """A tracker's package is not installed."""


def parse_log(spec: str) -> list[str]:
    names = [s.strip().lower() for s in (spec or "").split(",") if s.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise OptionError(
            f"--log: unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)}"
        )
    return list(dict.fromkeys(names))


def _require(module: str, package: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"--log {tracker} needs the {package} package ({EXTRA})") from err


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def start(self, params: dict) -> None:
        self.writer.add_text(
            "config", "```\n" + json.dumps(params, indent=2, default=str) + "\n```"
        )

    def log_epoch(self, row: dict) -> None:
        for key, tag in EPOCH_SCALARS.items():
            if key in row:
                self.writer.add_scalar(tag, float(row[key]), row["epoch"] + 1)
        self.writer.flush()

    def finish(self, run_dir: Path) -> None:
        roc, overlays = end_of_run_figures(run_dir)
        self.writer.add_figure("val/roc_curve", roc)
        for name, overlay in overlays:
            self.writer.add_image(f"gradcam/{name}", overlay, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, run_dir: Path):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pneumoscope")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(
            experiment, run_name=run_dir.name, tags={"run_dir": str(run_dir.resolve())}
        ).info.run_id

    def start(self, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(
            self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )

    def log_epoch(self, row: dict) -> None:
        import time

        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), row["epoch"] + 1
        self.client.log_batch(
            self.run_id,
            metrics=[
                Metric(key, float(row[key]), now, step) for key in EPOCH_SCALARS if key in row
            ],
        )

    def finish(self, run_dir: Path) -> None:
        from pneumoscope.rundir import BEST_MODEL, CONFIG, THRESHOLD

        for name in (BEST_MODEL, THRESHOLD, CONFIG, SUMMARY, MODEL_CARD):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "report").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "report"), "report")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def close(self, failed: bool = False) -> None:
        if self.run_id:  # not finished: interrupted or failed
            self.client.set_terminated(self.run_id, "FAILED" if failed else "KILLED")


def tracking_uri(run_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI, else a file: store in RUN_DIR/mlruns. MLflow 3 refuses file
    stores unless MLFLOW_ALLOW_FILE_STORE is set; a file store is what we ask for here."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.resolve() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def end_of_run_figures(run_dir: Path):
    """The validation ROC curve (a matplotlib figure) and N_GRADCAM (name, overlay) pairs."""
    import numpy as np

    from pneumoscope.deploy.scoring import load_predictor
    from pneumoscope.evaluation.metrics import evaluate_predictions
    from pneumoscope.inference import decode_sources
    from pneumoscope.report.figures import roc_figure
    from pneumoscope.report.gradcam import gradcam_heatmaps, overlay_heatmap
    from pneumoscope.report.model_card import read_val_predictions

    predictor = load_predictor(run_dir)
    paths, labels, probs = read_val_predictions(run_dir)
    metrics = evaluate_predictions(labels, probs, predictor.threshold, n_boot=0)
    picked = [i for c in (0, 1) for i in np.flatnonzero(labels == c)[: N_GRADCAM // 2]]
    kept, images, _ = decode_sources(predictor, [Path(paths[i]) for i in picked])
    heat = gradcam_heatmaps(predictor.model, np.stack(images)) if images else []
    overlays = [(Path(p).stem, overlay_heatmap(img, h)) for p, img, h in zip(kept, images, heat)]
    return roc_figure(labels, probs, metrics), overlays


class Trackers:
    """The chosen trackers as one. They open with the first finished epoch: after train has
    checked RUN_DIR (a refused call leaves the folder as it was) and resolved cfg (backbone
    auto -> a name), which then go out as the params."""

    def __init__(self, cfg, names: list[str]):
        self.cfg, self.names, self.trackers, self.started = cfg, names, [], False

    def _open(self) -> None:
        self.started = True
        for name in self.names:
            try:
                tracker = MAKERS[name](Path(self.cfg.out))
                tracker.start(self.cfg.to_dict())
            except BaseException:
                self.close(failed=True)  # those already open are not left running
                raise
            self.trackers.append(tracker)

    def log_epoch(self, row: dict) -> None:
        if not self.started:
            self._open()
        for t in self.trackers:
            t.log_epoch(row)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish(Path(self.cfg.out))

    def close(self, failed: bool = False) -> None:
        for t in self.trackers:
            t.close(failed)
        self.trackers = []


MAKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


def open_trackers(cfg, enabled: bool = True) -> Trackers:
    """cfg.log's trackers (none when empty or not enabled: ranks other than 0). A missing
    package fails here, before any work; the trackers themselves open with the first epoch."""
    names = parse_log(cfg.log)  # checked on every rank: a typo fails everywhere alike
    if not enabled:
        return Trackers(cfg, [])
    for name in names:
        _require(*PACKAGES[name], name)
    return Trackers(cfg, names)

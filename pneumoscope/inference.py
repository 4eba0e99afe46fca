"""Load a finished run and turn images into probabilities of pneumonia.

evaluate, predict, report, explain and serve all come through here, so they share one
decode (data.decode.load_image) and one model input contract (see docs/architecture.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pneumoscope.data.decode import ImageDecodeError, load_image
from pneumoscope.data.sources import array_png
from pneumoscope.errors import OptionError
from pneumoscope.models import build_model
from pneumoscope.models.classifier import images_to_input
from pneumoscope.models.precision import autocast, resolve_precision
from pneumoscope.rundir import THRESHOLD, RunDir, RunDirError, load_model_weights
from pneumoscope.tasks import bv_threshold_of, n_classes, p_pneumonia, task_of


def inference_precision(device: str | torch.device) -> str:
    """The precision predict_probs uses by default: fp32, so predict, serve, report and the
    ONNX export give the same probabilities (to 1e-4) on every machine.

    PNEUMOSCOPE_PRECISION=bf16 (or auto: bf16 where the hardware runs it natively, see
    pneumoscope.models.precision) trades that for speed: about 2x for ResNet50 on a CPU with
    AVX512-BF16 / AMX with the same validation ROC AUC, but single probabilities move by
    up to ~0.1 (benchmarks/RESULTS.md)."""
    forced = os.environ.get("PNEUMOSCOPE_PRECISION", "fp32").lower()
    return resolve_precision(forced, device, option="PNEUMOSCOPE_PRECISION")


@torch.inference_mode()
def predict_class_probs(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    desc: str = "predict",
    precision: str | None = None,
) -> np.ndarray:
    """Class probabilities (N, C) (softmax of the head) for a uint8 image array (N,S,S), in
    eval mode, batch by batch.

    precision: fp32 | bf16 (autocast) | None: inference_precision(device). Inputs go in
    channels_last (fastest for the convolutions on CPU and GPU alike)."""
    model.eval()
    precision = precision or inference_precision(device)
    dev = torch.device(device)
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
        x = images_to_input(images[start : start + batch_size]).to(dev)
        with autocast(dev, precision):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    n_out = getattr(model, "n_classes", 2)  # a Classifier's or an Ensemble's class count
    return torch.cat(out).numpy() if out else np.empty((0, n_out), dtype=np.float32)


def predict_probs(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    desc: str = "predict",
    precision: str | None = None,
) -> np.ndarray:
    """p(pneumonia) for a uint8 image array (N,S,S): softmax column 1 of a binary model,
    p(bacterial) + p(viral) of a three-class one (pneumoscope.tasks.p_pneumonia); the
    arguments as predict_class_probs."""
    return p_pneumonia(
        predict_class_probs(model, images, batch_size, device, show_progress, desc, precision)
    )


def load_trained_model(run: RunDir, config: dict) -> torch.nn.Module:
    """The run's selected model, built from config and loaded from safetensors (no code):
    a Classifier, or for an ensemble directory (`pneumoscope ensemble`) the Ensemble of
    its members and test-time views, whose weights it holds in one file."""
    classes = n_classes(task_of(config))  # an ensemble's members all have its task
    if config.get("kind") == "ensemble":
        from pneumoscope.models.ensemble import Ensemble

        members = [
            build_model(
                m["backbone"], weights="none", dropout=m.get("dropout", 0.0), n_classes=classes
            )
            for m in config["members"]
        ]
        model, what = (
            Ensemble(members, config["tta"]["views"], int(config["image_size"])),
            "ensemble",
        )
    else:
        model = build_model(
            config["backbone"],
            weights="none",
            dropout=config.get("dropout", 0.0),
            n_classes=classes,
        )
        what = f"{config['backbone']} model"
    path = run.best_model_path()
    try:
        model.load_state_dict(load_model_weights(path), strict=True)
    except RuntimeError as err:  # wrong keys or shapes: a file from another model
        first = str(err).strip().splitlines()[:3]
        raise RunDirError(
            f"{path}: does not fit the {what} of config.json: " + " ".join(first)
        ) from err
    return model.eval()


class OperatingPoint:
    """What every predictor (torch or ONNX) shares: the decode contract and the operating
    thresholds chosen on validation. Subclasses provide `thresholds` and `image_size`."""

    thresholds: dict
    image_size: int

    @property
    def threshold(self) -> float:
        return float(self.thresholds["threshold"])

    def threshold_for(self, rule: str | None) -> float:
        """The threshold of a named rule (youden, sensitivity95, site after `calibrate`)
        or the default one."""
        if rule is None:
            return self.threshold
        rules = self.thresholds["rules"]
        if rule not in rules:
            hint = " (`pneumoscope calibrate` adds the site rule)" if rule == "site" else ""
            raise OptionError(
                f"threshold rule {rule!r} is not in this run's threshold.json; "
                f"it has: {', '.join(sorted(rules))}{hint}"
            )
        return float(rules[rule])

    def load(self, source, name: str | None = None) -> np.ndarray:
        """One image (path or bytes) through the shared decode + geometry."""
        return load_image(source, self.image_size, name=name)


@dataclass
class Predictor(OperatingPoint):
    model: torch.nn.Module
    config: dict
    thresholds: dict
    device: torch.device
    precision: str | None = None  # fp32 | bf16 | None: inference_precision(device)
    runtime = "torch"  # what scores (pneumoscope.deploy.scoring names the engine in use)

    @classmethod
    def from_run(
        cls, run_dir: str | Path, device: str | None = None, precision: str | None = None
    ) -> Predictor:
        run = RunDir(run_dir)
        config = run.read_config()
        thresholds = run.read_threshold()
        # a three-class run's: refused when missing
        bv_threshold_of(thresholds, task_of(config), run / THRESHOLD)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # channels_last weights: the convolutions' fastest layout (no reorder per call)
        model = load_trained_model(run, config).to(dev).to(memory_format=torch.channels_last)
        return cls(
            model=model, config=config, thresholds=thresholds, device=dev, precision=precision
        )

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def task(self) -> str:
        return task_of(self.config)

    def predict_class_probs(self, images: np.ndarray, show_progress: bool = False) -> np.ndarray:
        """(N, C) class probabilities (C = 3 for a three-class run)."""
        return predict_class_probs(
            self.model,
            images,
            device=self.device,
            show_progress=show_progress,
            precision=self.precision,
        )

    def predict_images(self, images: np.ndarray, show_progress: bool = False) -> np.ndarray:
        """p(pneumonia) of every image (both tasks)."""
        return predict_probs(
            self.model,
            images,
            device=self.device,
            show_progress=show_progress,
            precision=self.precision,
        )


def decode_sources(
    predictor, sources: list
) -> tuple[list, list[np.ndarray], list[tuple[str, str]]]:
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
            failures.append(
                (
                    str(source) if not isinstance(source, np.ndarray) else "array",
                    getattr(err, "problem", None) or str(err),
                )
            )
    return kept, images, failures

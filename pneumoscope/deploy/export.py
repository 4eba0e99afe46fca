"""ONNX export of a run's model, with the preprocessing contract written beside it.

``export_onnx(RUN_DIR)`` writes two files:

* ``model.onnx`` — input ``image``: float32 ``(batch, 1, S, S)``, the grayscale image
  scaled to ``[0, 1]`` (uint8 / 255) after the shared decode stretched it to ``S x S``.
  The backbone's normalisation (mean/std, gray -> 3 channels) is inside the graph.
  Outputs: ``logits`` float32 ``(batch, 2)`` (column 0 NORMAL, column 1 PNEUMONIA) and
  ``p_pneumonia`` float32 ``(batch,)`` = ``softmax(logits)[:, 1]``. A three-class run
  (``--task three-class``): ``logits`` ``(batch, 3)`` (NORMAL, BACTERIAL, VIRAL),
  ``probabilities`` ``(batch, 3)`` = their softmax, and ``p_pneumonia`` = p(bacterial) +
  p(viral). The batch axis is dynamic; the spatial size is fixed to the run's ``image_size``.
* ``model.onnx.json`` — the contract a consumer needs to feed it and read it: input
  size, geometry (``stretch``), scaling, the DICOM decode rule (``dicom_decode``), output
  meaning, the run's thresholds and the default rule, backbone, versions, the SHA-256 of
  the weights it came from and of the ONNX file itself (a model swapped after export is
  refused).

Whatever ``Predictor.model`` is (a plain Classifier, or a wrapper with the same
``(B,1,S,S) -> (B,C)`` logits forward, C = 2 or 3) is what gets exported.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from pneumoscope import __version__
from pneumoscope.data.dicom import dicom_decode_contract
from pneumoscope.deploy.onnx_contract import (
    CONTRACT_FORMAT,
    CONTRACT_VERSION,
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAMES,
    write_contract,
)
from pneumoscope.deploy.onnx_predictor import run_session
from pneumoscope.fsio import default_file_mode, file_sha256
from pneumoscope.inference import Predictor, predict_class_probs
from pneumoscope.models import PNEUMONIA_INDEX
from pneumoscope.models.onnx_session import open_session
from pneumoscope.rundir import ONNX_MODEL, RunDir
from pneumoscope.tasks import BINARY, CLASS_NAMES, CLASSES, THREE_CLASS, p_pneumonia

log = logging.getLogger(__name__)

THREE_CLASS_OUTPUT_NAMES = ("logits", "probabilities", "p_pneumonia")

# The parity the export itself checks (and the tests demand on real images).
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph disagrees with the torch model, or the export failed."""


class _WithProbability(torch.nn.Module):
    """(B,1,S,S) -> (logits (B,2), p_pneumonia (B,)): both outputs in one graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x).float()
        return logits, torch.softmax(logits, dim=1)[:, PNEUMONIA_INDEX]


class _WithProbabilities(torch.nn.Module):
    """Three-class: (B,1,S,S) -> (logits (B,3), probabilities (B,3), p_pneumonia (B,))."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(x).float()
        probs = torch.softmax(logits, dim=1)
        return logits, probs, probs[:, 1] + probs[:, 2]


def build_contract(predictor: Predictor, run_dir: Path, onnx_name: str, opset: int) -> dict:
    """The JSON written beside the ONNX file (see the module docstring)."""
    size = predictor.image_size
    pre = predictor.config.get("preprocessing", {})
    weights = RunDir(run_dir).best_model_path()
    return {
        "format": CONTRACT_FORMAT,
        "format_version": CONTRACT_VERSION,
        "model_file": onnx_name,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 1, size, size],
            "meaning": "grayscale image, uint8 gray levels / 255 (range [0, 1]); "
            "normalisation to the backbone's statistics is inside the graph",
        },
        "preprocessing": {
            "decode": pre.get("decode", "pneumoscope.data.decode.load_image (grayscale uint8)"),
            "geometry": pre.get("geometry", "stretch"),
            "geometry_meaning": "resize to image_size x image_size without keeping the aspect "
            "ratio (PIL bilinear, antialiased when shrinking)",
            "image_size": size,
            "scaling": "x / 255",
            "input": pre.get("input", "gray01"),
            # the rule this version's decode applies (predict --onnx decodes with it)
            "dicom_decode": dicom_decode_contract(),
        },
        **_task_contract(predictor.task),
        "thresholds": predictor.thresholds,
        "backbone": predictor.config.get("backbone"),
        "opset": opset,
        "source": {
            "run_dir": str(Path(run_dir).resolve()),
            "weights_file": weights.name,
            "weights_sha256": file_sha256(weights),
        },
        "pneumoscope_version": __version__,
        "torch_version": torch.__version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _task_contract(task: str) -> dict:
    """The contract's task, outputs, classes and decision rule."""
    if task == BINARY:
        return {
            "outputs": {
                "logits": "float32 (batch, 2): raw class scores, column 0 NORMAL, column 1 PNEUMONIA",
                "p_pneumonia": "float32 (batch,): softmax(logits)[:, 1], the probability of pneumonia",
            },
            "classes": list(CLASSES),
            "decision": "label = PNEUMONIA if p_pneumonia >= threshold else NORMAL; threshold = "
            "thresholds.rules[rule], rule defaulting to thresholds.default",
        }
    return {
        "task": THREE_CLASS,
        "outputs": {
            "logits": "float32 (batch, 3): raw class scores, columns NORMAL, BACTERIAL, VIRAL",
            "probabilities": "float32 (batch, 3): softmax(logits): p_normal, p_bacterial, p_viral",
            "p_pneumonia": "float32 (batch,): p_bacterial + p_viral",
        },
        "classes": list(CLASS_NAMES[THREE_CLASS]),
        "decision": "NORMAL if p_pneumonia < threshold (thresholds.rules[rule], rule defaulting to "
        "thresholds.default); else BACTERIAL if p_bacterial / (p_bacterial + p_viral) >= "
        "thresholds.bacterial_vs_viral.threshold, else VIRAL",
    }


def _export_graph(
    model: torch.nn.Module,
    size: int,
    path: Path,
    opset: int,
    task: str = BINARY,
    dynamo: bool = True,
) -> None:
    """torch.onnx.export with a dynamic batch axis, one self-contained file. dynamo=False:
    the TorchScript exporter, ~5x quicker (3 s against 14 s for EfficientNet-Lite0 on the
    2-core VM), for the engine predict builds on the fly (pneumoscope.deploy.scoring); where a
    later torch has dropped it, the dynamo one runs instead."""
    example = torch.rand(2, 1, size, size)
    wrapper, names = (
        (_WithProbability, OUTPUT_NAMES)
        if task == BINARY
        else (_WithProbabilities, THREE_CLASS_OUTPUT_NAMES)
    )
    with _quiet_exporter():
        if not dynamo:
            try:
                torch.onnx.export(
                    wrapper(model).eval(),
                    (example,),
                    str(path),
                    input_names=[INPUT_NAME],
                    output_names=list(names),
                    dynamic_axes={INPUT_NAME: {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
                return
            except Exception as err:  # noqa: BLE001 - a torch without the TorchScript exporter
                log.info("TorchScript export failed (%s); using the dynamo exporter", err)
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(
            wrapper(model).eval(),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            external_data=False,
            dynamo=True,
            verbose=False,
        )


@contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter (per-initializer INFO lines, deprecation notes)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_parity(
    model: torch.nn.Module, onnx_path: Path, images: np.ndarray, task: str = BINARY
) -> float:
    """Max |p_torch - p_onnx| over uint8 images (N,S,S), of p_pneumonia and (three-class)
    every class probability; ExportError past the tolerance."""
    expected = predict_class_probs(model, images, precision="fp32")  # the graph computes in fp32
    session = open_session(onnx_path)
    pairs = [(p_pneumonia(expected), run_session(session, images))]
    if task != BINARY:
        pairs.append((expected, run_session(session, images, output="probabilities")))
    diff = max(float(np.max(np.abs(want - got))) for want, got in pairs) if len(images) else 0.0
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"{onnx_path}: onnxruntime and torch disagree (max |dp| = {diff:.2e} "
            f"> {PARITY_TOLERANCE:.0e})"
        )
    return diff


def export_onnx(
    run_dir: str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    predictor: Predictor | None = None,
) -> Path:
    """Export RUN_DIR's model to ``out`` (default RUN_DIR/model.onnx) plus its contract.

    Both files are written atomically; the graph is checked against torch (on a smooth
    synthetic batch of 3, so a dynamic batch > 1 is exercised) before it is kept.
    dynamo: which exporter (see _export_graph); predictor: the run's, already loaded on the CPU."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / ONNX_MODEL
    predictor = predictor or Predictor.from_run(run_dir, device="cpu")
    model, size = predictor.model.eval(), predictor.image_size
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info(
            "exporting %s (%s, %dx%d) to ONNX opset %d",
            run_dir,
            predictor.config.get("backbone"),
            size,
            size,
            opset,
        )
        _export_graph(model, size, tmp, opset, predictor.task, dynamo=dynamo)
        diff = check_parity(model, tmp, probe_images(size), predictor.task)
        contract = build_contract(predictor, run_dir, out.name, opset)
        contract["export_check"] = {"max_abs_diff_p": diff, "images": "3 synthetic gradients"}
        contract["exporter"] = "dynamo" if dynamo else "torchscript (dynamo where unavailable)"
        contract["model_sha256"] = file_sha256(tmp)  # ties the contract to this very file
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 is not what an export should keep
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_contract(out, contract)
    return out


def probe_images(size: int) -> np.ndarray:
    """Three smooth uint8 images (gradients and a blob): deterministic, image-like input."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    blob = np.exp(-((xx - 0.4) ** 2 + (yy - 0.5) ** 2) / 0.05)
    return np.rint(np.stack([xx, yy, blob]) * 255).astype(np.uint8)

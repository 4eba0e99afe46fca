"""The fastest correct engine for scoring films: onnxruntime where it runs, torch elsewhere.

predict, evaluate, report's scoring and serve all load their model through
``load_scorer``. On a CPU, onnxruntime runs the same graph about three times faster than
torch's eager kernels (EfficientNet-Lite's depthwise convolutions; benchmarks/RESULTS.md),
so ``--engine auto`` (the default) takes it whenever it applies: a CPU device, fp32
(``PNEUMOSCOPE_PRECISION`` unset or fp32) and the onnxruntime package importable. The
graph is the run's own model, exported on the first use and cached in the run directory
(``RUN_DIR/engine.onnx`` and its contract; built under a file lock, written atomically,
refused and rebuilt when the weights changed). As the trunk engine of training does, the
first batch is also run by torch and compared: an engine that disagrees by more than
``export.PARITY_TOLERANCE`` is dropped for torch, with a warning, before a row is written.

``--engine torch`` (or ``PNEUMOSCOPE_ENGINE=torch``) forces the torch path.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pneumoscope.errors import DataError, MissingFileError, OptionError
from pneumoscope.inference import Predictor, inference_precision
from pneumoscope.tasks import p_pneumonia

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "torch")
ENGINE_ENV = "PNEUMOSCOPE_ENGINE"
ENGINE_FILE = "engine.onnx"  # in the run directory; `calibrate` refreshes its thresholds (*.onnx)
# Images of the first batch that torch scores too, to check the engine (a few: torch is the slow one).
CHECK_IMAGES = 4


def resolve_engine(engine: str | None, device: torch.device) -> str:
    """torch or onnxruntime. engine None: $PNEUMOSCOPE_ENGINE, else auto."""
    from pneumoscope.training.trunk_engine import onnxruntime_available

    engine = (engine or os.environ.get(ENGINE_ENV) or "auto").lower()
    if engine not in ENGINES:
        raise OptionError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    applies = device.type == "cpu" and inference_precision(device) == "fp32"
    if engine == "onnxruntime":
        if not applies:
            raise OptionError(
                f"--engine onnxruntime runs fp32 on a CPU (here: {device.type}, "
                f"{inference_precision(device)}); use --engine torch"
            )
        if not onnxruntime_available():
            raise OptionError(
                "--engine onnxruntime needs the onnxruntime package (pip install onnxruntime)"
            )
        return engine
    if engine == "auto":
        return "onnxruntime" if applies and onnxruntime_available() else "torch"
    return engine


def load_scorer(
    run_dir: str | Path,
    engine: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    onnx: str | Path | None = None,
    int8: bool = False,
):
    """The run's predictor on the resolved engine (see fast_scorer). onnx: a user's own
    export (`--onnx`), taken as it is (its contract was checked at export). int8: the
    engine quantized (pneumoscope.deploy.quantize), where its validation ROC AUC holds. Each has
    `runtime` (torch or onnxruntime)."""
    if int8:
        if onnx:
            raise OptionError("--int8 quantizes the run's own engine; it does not take --onnx")
        return int8_scorer(run_dir, Predictor.from_run(run_dir, device=device), engine, threads)
    if onnx:
        from pneumoscope.deploy.onnx_predictor import OnnxPredictor

        return OnnxPredictor.from_file(onnx, run_dir=run_dir, threads=threads)
    return fast_scorer(run_dir, Predictor.from_run(run_dir, device=device), engine, threads)


def load_predictor(run_dir: str | Path, onnx: str | Path | None = None, device: str | None = None):
    """The run's torch Predictor, or with `onnx` that exported model under onnxruntime (same
    decode; contract and thresholds from its model.onnx.json)."""
    if onnx:
        from pneumoscope.deploy.onnx_predictor import OnnxPredictor

        return OnnxPredictor.from_file(onnx, run_dir=run_dir)
    return Predictor.from_run(run_dir, device=device)


def fast_scorer(
    run_dir: str | Path, predictor: Predictor, engine: str | None = None, threads: int | None = None
):
    """`predictor` (torch), or a CheckedOnnx: the cached export under onnxruntime, checked
    against `predictor` on its first batch (its threads sleep between batches, not spin:
    decode workers and serving threads share the cores). An engine that cannot be built
    (a read-only run directory, an exporter missing) leaves torch scoring, with a warning;
    asked for by name (--engine onnxruntime), it is an error."""
    chosen = resolve_engine(engine, predictor.device)
    if chosen == "torch":
        return predictor
    try:
        return CheckedOnnx(cached_engine(run_dir, predictor, threads), predictor)
    except Exception as err:  # noqa: BLE001 - any failure to build it: torch scores the same
        if (engine or os.environ.get(ENGINE_ENV, "auto")).lower() == "onnxruntime":
            raise
        log.warning(
            "no onnxruntime engine for %s (%s); scoring with torch",
            run_dir,
            str(err).splitlines()[0],
        )
        return predictor


def int8_scorer(run_dir: str | Path, predictor: Predictor, engine: str | None, threads: int | None):
    """The int8 engine where pneumoscope.deploy.quantize keeps it, else the fp32 one (a warning says why)."""
    from pneumoscope.deploy.onnx_predictor import OnnxPredictor
    from pneumoscope.deploy.quantize import int8_engine

    if resolve_engine(engine, predictor.device) != "onnxruntime":
        raise OptionError(
            "--int8 runs on onnxruntime on a CPU (installed, fp32, not --engine torch)"
        )
    fp32 = fast_scorer(run_dir, predictor, "onnxruntime", threads)
    with _locked(Path(run_dir) / f".{ENGINE_FILE}.lock"):
        path = int8_engine(run_dir, fp32.onnx.path)
    if path is None:
        return fp32
    int8 = OnnxPredictor.from_file(path, run_dir=run_dir, threads=threads, spinning=False)
    int8.runtime = "onnxruntime int8"
    return int8


def cached_engine(run_dir: str | Path, predictor: Predictor, threads: int | None = None):
    """RUN_DIR/engine.onnx as an OnnxPredictor, exported first where it is missing or was
    made from other weights. The lock makes concurrent runs (torchrun's ranks, two
    predicts) export it once."""
    from pneumoscope.deploy.onnx_predictor import OnnxPredictor

    path = Path(run_dir) / ENGINE_FILE
    with _locked(Path(run_dir) / f".{ENGINE_FILE}.lock"):
        if not _usable(path, run_dir, predictor.thresholds):
            from pneumoscope.deploy.export import export_onnx

            export_onnx(run_dir, path, dynamo=False, predictor=predictor)
        return OnnxPredictor.from_file(path, run_dir=run_dir, threads=threads, spinning=False)


def _usable(path: Path, run_dir: str | Path, thresholds: dict) -> bool:
    """The cached export is there, intact and of the run's weights (its thresholds are
    brought up to date: `calibrate` may have changed them since)."""
    from pneumoscope.deploy.onnx_contract import read_contract, refresh_contract_thresholds
    from pneumoscope.deploy.onnx_predictor import check_same_weights
    from pneumoscope.fsio import file_sha256

    try:
        contract = read_contract(path)
        if not path.exists() or contract.get("model_sha256") != file_sha256(path):
            return False
        check_same_weights(contract, run_dir, path)
    except (MissingFileError, DataError):
        log.info("building the onnxruntime engine of %s", run_dir)
        return False
    if contract.get("thresholds") != thresholds:
        refresh_contract_thresholds(path, thresholds)
    return True


@contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CheckedOnnx:
    """An OnnxPredictor whose first batch is compared with torch (CHECK_IMAGES images);
    past the tolerance it scores with torch from then on (a warning says so). The
    Predictor interface predict, evaluate and serve use; `torch` is the run's Predictor
    (Grad-CAM, embeddings)."""

    def __init__(self, onnx, torch_predictor: Predictor):
        self.onnx, self.torch = onnx, torch_predictor
        self.scorer, self.checked = onnx, False
        self.runtime = "onnxruntime"

    def __getattr__(self, name):  # image_size, thresholds, threshold_for, load, task, config
        return getattr(self.scorer, name)

    def predict_class_probs(self, images: np.ndarray, show_progress: bool = False) -> np.ndarray:
        probs = self.scorer.predict_class_probs(images, show_progress=show_progress)
        if not self.checked and len(images):
            self.checked = True
            self._check(images[:CHECK_IMAGES], probs[:CHECK_IMAGES])
            if self.scorer is self.torch:
                probs = self.torch.predict_class_probs(images, show_progress=show_progress)
        return probs

    def predict_images(self, images: np.ndarray, show_progress: bool = False) -> np.ndarray:
        return p_pneumonia(self.predict_class_probs(images, show_progress))

    def check_now(self) -> None:
        """The check on three smooth synthetic films instead of the first batch (serve: before any request)."""
        from pneumoscope.deploy.export import probe_images

        self.predict_class_probs(probe_images(self.image_size))

    def _check(self, images: np.ndarray, got: np.ndarray) -> None:
        from pneumoscope.deploy.export import PARITY_TOLERANCE

        want = self.torch.predict_class_probs(images)
        diff = float(np.max(np.abs(want - got)))
        if not diff <= PARITY_TOLERANCE:
            log.warning(
                "the onnxruntime engine (%s) differs from torch by %.2e > %.0e on the first "
                "batch; scoring with torch",
                self.onnx.path,
                diff,
                PARITY_TOLERANCE,
            )
            self.scorer, self.runtime = self.torch, "torch"

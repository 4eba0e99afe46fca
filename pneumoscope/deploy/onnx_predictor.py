"""Run an exported ONNX model with onnxruntime, through the same decode as torch.

``OnnxPredictor`` has the interface of ``inference.Predictor`` that predict and serve use
(``image_size``, ``thresholds``, ``threshold``, ``threshold_for``, ``load``,
``predict_images``), but reads everything from the contract beside the ONNX file
(``model.onnx.json``, written by ``pneumoscope export``), not from torch. Given the run
directory (predict and serve always give it), the thresholds come from the run's
threshold.json instead: it is the one source of truth, which `calibrate` may have changed
after the export (a warning names a contract whose thresholds are stale).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscope.deploy.onnx_contract import INPUT_NAME, read_contract
from pneumoscope.errors import DataError, MissingFileError
from pneumoscope.fsio import file_sha256
from pneumoscope.inference import OperatingPoint
from pneumoscope.models.onnx_session import open_session
from pneumoscope.rundir import THRESHOLD, RunDir
from pneumoscope.tasks import BINARY, bv_threshold_of, task_of

log = logging.getLogger(__name__)


def run_session(
    session,
    images: np.ndarray,
    batch_size: int = 64,
    show_progress: bool = False,
    output: str = "p_pneumonia",
) -> np.ndarray:
    """p(pneumonia) (or another output, e.g. a three-class export's `probabilities`) for
    uint8 images (N,S,S): the contract's x / 255 as float32 (N,1,S,S)."""
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="predict (onnx)", unit="batch", disable=not show_progress):
        x = np.asarray(images[start : start + batch_size], dtype=np.float32)[:, None] / np.float32(
            255.0
        )
        out.append(session.run([output], {INPUT_NAME: x})[0])
    return np.concatenate(out).astype(np.float32) if out else np.empty(0, dtype=np.float32)


@dataclass
class OnnxPredictor(OperatingPoint):
    path: Path
    contract: dict
    session: object = field(repr=False)
    run_thresholds: dict | None = None  # the run's threshold.json, when a run_dir was given
    runtime = "onnxruntime"

    @classmethod
    def from_file(
        cls,
        onnx_path: str | Path,
        run_dir: str | Path | None = None,
        threads: int | None = None,
        spinning: bool = True,
    ) -> OnnxPredictor:
        """Open `onnx_path` and its contract; with `run_dir`, refuse a model exported from
        other weights than the run's (a stale export after retraining) and take the
        thresholds from the run's threshold.json. spinning: see open_session."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise MissingFileError(f"{onnx_path}: no such ONNX file")
        contract = read_contract(onnx_path)
        if contract.get("model_sha256") != file_sha256(onnx_path):
            raise DataError(
                f"{onnx_path}: does not match its contract {onnx_path.name}.json "
                "(replaced or modified after export); export it again"
            )
        run_thresholds = None
        if run_dir is not None:
            check_same_weights(contract, run_dir, onnx_path)
            run_thresholds = run_thresholds_for(contract, run_dir, onnx_path)
        return cls(
            path=onnx_path,
            contract=contract,
            session=open_model_session(onnx_path, threads, spinning),
            run_thresholds=run_thresholds,
        )

    @property
    def config(self) -> dict:
        return {"backbone": self.contract.get("backbone"), "image_size": self.image_size}

    @property
    def image_size(self) -> int:
        return int(self.contract["preprocessing"]["image_size"])

    @property
    def thresholds(self) -> dict:
        return (
            self.run_thresholds if self.run_thresholds is not None else self.contract["thresholds"]
        )

    @property
    def task(self) -> str:
        return task_of(self.contract)

    def predict_images(
        self, images: np.ndarray, show_progress: bool = False, batch_size: int = 64
    ) -> np.ndarray:
        return run_session(self.session, images, batch_size=batch_size, show_progress=show_progress)

    def predict_class_probs(
        self, images: np.ndarray, show_progress: bool = False, batch_size: int = 64
    ) -> np.ndarray:
        """(N, C): a three-class export's `probabilities`; for a binary one (1 - p, p)."""
        if self.task == BINARY:
            p = self.predict_images(images, show_progress, batch_size)
            return (
                np.column_stack([1.0 - p, p]).astype(np.float32)
                if len(p)
                else np.empty((0, 2), np.float32)
            )
        probs = run_session(
            self.session,
            images,
            batch_size=batch_size,
            show_progress=show_progress,
            output="probabilities",
        )
        return probs if len(probs) else np.empty((0, 3), np.float32)


def open_model_session(onnx_path: Path, threads: int | None = None, spinning: bool = True):
    """open_session, with a file onnxruntime cannot load (garbage whose contract was made to
    match it, a truncated copy) named in one line instead of onnxruntime's traceback."""
    try:
        return open_session(onnx_path, threads, spinning)
    except Exception as err:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, Fail, InvalidGraph, ...
        if not type(err).__module__.startswith("onnxruntime"):
            raise  # not the model file's fault: a bug, with its traceback
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(
            f"{onnx_path}: onnxruntime cannot load this model ({detail}); "
            "export it again with `pneumoscope export`"
        ) from err


def check_same_weights(contract: dict, run_dir: str | Path, onnx_path: Path) -> None:
    source = contract.get("source", {})
    weights = RunDir(run_dir).best_model_path()
    if source.get("weights_sha256") != file_sha256(weights):
        raise DataError(
            f"{onnx_path}: exported from other weights than {weights} (run retrained or another "
            f"run: {source.get('run_dir', '?')}); export again with `pneumoscope export {os.fspath(run_dir)}`"
        )


def run_thresholds_for(contract: dict, run_dir: str | Path, onnx_path: Path) -> dict:
    """The run's threshold.json; a warning when the contract carries other thresholds
    (an export made before `calibrate`, outside the run directory it refreshes)."""
    thresholds = RunDir(run_dir).read_threshold()
    # a three-class run's: refused when missing
    bv_threshold_of(thresholds, task_of(contract), Path(run_dir) / THRESHOLD)
    if contract.get("thresholds") != thresholds:
        log.warning(
            "%s.json: its thresholds differ from %s (changed after the export, e.g. by "
            "`pneumoscope calibrate`); using the run's (default rule %s)",
            onnx_path,
            Path(run_dir) / THRESHOLD,
            thresholds.get("default"),
        )
    return thresholds

"""`predict --int8`: the run's engine quantized to int8 by onnxruntime, kept only where it
ranks the run's validation films as well as fp32.

``int8_engine(run_dir, fp32_path)`` quantizes the cached fp32 engine (static QDQ
quantization: int8 weights per channel, uint8 activations) with activation ranges
calibrated on the run's own validation films (manifest.csv, role val), then scores those
films with both graphs. The int8 graph is kept (``RUN_DIR/engine.int8.onnx`` and its
contract) only where its validation ROC AUC is within ``MAX_AUC_DIFF`` (0.001) of fp32's,
either way (a rise that large on a few hundred films is chance, and the thresholds were
chosen on fp32's probabilities);
the comparison (both AUCs, max and mean |dp|, films) is recorded in the contract's
``quantization`` block either way, and in ``RUN_DIR/engine.int8.check.json``. Refused,
predict scores with fp32 and says why. Its probabilities are not torch's within 1e-4 (that
is what int8 trades), so it is an opt-in.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from pneumoscope.errors import DataError

log = logging.getLogger(__name__)

MAX_AUC_DIFF = 0.001
INT8_FILE = "engine.int8.onnx"
CHECK_FILE = "engine.int8.check.json"


def val_films(run_dir: str | Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's validation films (decoded) and their labels (pneumonia = 1)."""
    from pneumoscope.data.cache import decode_samples
    from pneumoscope.data.manifest import read_manifest
    from pneumoscope.rundir import MANIFEST

    roles = read_manifest(Path(run_dir) / MANIFEST)
    if not roles.get("val"):
        raise DataError(f"{Path(run_dir) / MANIFEST}: no validation films to calibrate --int8 on")
    data = decode_samples(roles["val"], size, show_progress=False)
    return data.images, (data.labels > 0).astype(int)


class _Calibration:
    """onnxruntime's CalibrationDataReader over uint8 films: the contract's x / 255."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 16):
        self.batches = iter([images[s : s + batch] for s in range(0, len(images), batch)])
        self.input_name = input_name

    def get_next(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        return {self.input_name: batch.astype(np.float32)[:, None] / np.float32(255.0)}


def quantize(fp32_path: Path, images: np.ndarray, out: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from pneumoscope.deploy.onnx_contract import INPUT_NAME

    logging.disable(logging.WARNING)  # the quantizer's per-tensor notes on the root logger
    try:
        quantize_static(
            str(fp32_path),
            str(out),
            _Calibration(images, INPUT_NAME),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.disable(logging.NOTSET)


def compare(fp32_path: Path, int8_path: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """Validation ROC AUC of both graphs and how far their p(pneumonia) differ."""
    from sklearn.metrics import roc_auc_score

    from pneumoscope.deploy.onnx_predictor import run_session
    from pneumoscope.models.onnx_session import open_session

    p32 = run_session(open_session(fp32_path), images)
    p8 = run_session(open_session(int8_path), images)
    auc32, auc8 = float(roc_auc_score(labels, p32)), float(roc_auc_score(labels, p8))
    return {
        "val_roc_auc_fp32": auc32,
        "val_roc_auc_int8": auc8,
        "auc_diff": auc8 - auc32,
        "max_abs_dp": float(np.max(np.abs(p32 - p8))),
        "mean_abs_dp": float(np.mean(np.abs(p32 - p8))),
        "films": int(len(labels)),
        "max_auc_diff": MAX_AUC_DIFF,
        "kept": abs(auc8 - auc32) <= MAX_AUC_DIFF,
    }


def int8_engine(run_dir: str | Path, fp32_path: Path) -> Path | None:
    """RUN_DIR/engine.int8.onnx, built (once per fp32 engine) and kept where its
    validation ROC AUC is within MAX_AUC_DIFF of fp32's; None where it was refused."""
    from pneumoscope.deploy.onnx_contract import read_contract, write_contract
    from pneumoscope.fsio import atomic_write_json, file_sha256
    from pneumoscope.rundir import read_json

    run_dir = Path(run_dir)
    out, check = run_dir / INT8_FILE, run_dir / CHECK_FILE
    fp32_sha = file_sha256(fp32_path)
    if check.exists():
        record = read_json(check)
        if record.get("fp32_sha256") == fp32_sha:  # this engine was judged already
            if record["kept"] and out.exists():
                return out
            if not record["kept"]:
                _refused(record)
                return None
    contract = read_contract(fp32_path)
    images, labels = val_films(run_dir, int(contract["preprocessing"]["image_size"]))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{INT8_FILE}.", suffix=".tmp", dir=run_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        quantize(fp32_path, images, tmp)
        record = {
            **compare(fp32_path, tmp, images, labels),
            "fp32_sha256": fp32_sha,
            "calibration": "the run's validation films (manifest.csv, role val)",
        }
        if record["kept"]:
            os.replace(tmp, out)
            write_contract(
                out,
                {
                    **contract,
                    "model_file": out.name,
                    "model_sha256": file_sha256(out),
                    "quantization": record,
                },
            )
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(check, record)
    if not record["kept"]:
        _refused(record)
        return None
    log.info(
        "int8 engine kept: validation ROC AUC %.4f (fp32 %.4f), max |dp| %.4f",
        record["val_roc_auc_int8"],
        record["val_roc_auc_fp32"],
        record["max_abs_dp"],
    )
    return out


def _refused(record: dict) -> None:
    log.warning(
        "--int8 refused: validation ROC AUC %.4f against fp32's %.4f (more than %.3f apart); "
        "scoring in fp32 (%s)",
        record["val_roc_auc_int8"],
        record["val_roc_auc_fp32"],
        MAX_AUC_DIFF,
        CHECK_FILE,
    )

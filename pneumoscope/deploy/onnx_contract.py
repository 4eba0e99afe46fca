"""The contract beside an exported ONNX model (``model.onnx.json``): its names, where it
lives, reading and refreshing it, and the file hashing that ties it to the model.

Torch-free on purpose: `export` (torch -> ONNX) writes the contract and `onnx_predictor`
(onnxruntime) reads it; both depend on this module, not on each other.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pneumoscope.errors import DataError, MissingFileError

CONTRACT_FORMAT = "pneumoscope-onnx-contract"
CONTRACT_VERSION = 1
DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "p_pneumonia")


def contract_path(onnx_path: str | Path) -> Path:
    """Where the contract of an ONNX file lives: ``model.onnx`` -> ``model.onnx.json``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.name + ".json")


def read_contract(onnx_path: str | Path) -> dict:
    """The contract beside an ONNX file, checked for format and version."""
    path = contract_path(onnx_path)
    if not path.exists():
        raise MissingFileError(
            f"{path}: missing; an ONNX model needs the contract that "
            "`pneumoscope export` writes beside it"
        )
    try:
        contract = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); export the model again") from err
    if (
        not isinstance(contract, dict)
        or contract.get("format") != CONTRACT_FORMAT
        or contract.get("format_version") != CONTRACT_VERSION
    ):
        found = contract if isinstance(contract, dict) else {}
        raise DataError(
            f"{path}: not a pneumoscope ONNX contract version {CONTRACT_VERSION} "
            f"(format {found.get('format')!r}, version {found.get('format_version')!r})"
        )
    return contract


def write_contract(onnx_path: str | Path, contract: dict) -> None:
    """Write the contract beside `onnx_path` atomically."""
    from pneumoscope.fsio import atomic_write_json

    atomic_write_json(contract_path(onnx_path), contract)


def refresh_contract_thresholds(onnx_path: str | Path, thresholds: dict) -> None:
    """Rewrite the thresholds of an export's contract (atomically), after `calibrate`
    changed the run's threshold.json; the model and its SHA-256 stay as they are."""
    contract = read_contract(onnx_path)
    contract["thresholds"] = thresholds
    contract["thresholds_updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_contract(onnx_path, contract)

"""The run directory: the only hand-off between train and everything after it.

    config.json       every option, versions, the preprocessing contract
    manifest.csv      which file went where (train/val), with patient and sha1
    metrics.jsonl     one line per finished epoch
    checkpoint_last.pt  full training state for --resume (loaded with weights_only=True)
    model_best.safetensors  the selected model's weights (safetensors, no code)
    threshold.json    operating thresholds chosen on validation
    val_predictions.csv  the validation probabilities of the best model
    adapt.json        only in a run written by `pneumoscope adapt`: what it was adapted from and on
    summary.json      the finished run: best epoch, its validation metrics, wall time, CPU

Every file is written atomically (temporary file, flush, fsync, rename), so a kill
never leaves a half-written file that a later run trusts.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from pneumoscope import __version__
from pneumoscope.errors import UserError
from pneumoscope.fsio import atomic_write_bytes, atomic_write_json, atomic_write_text

FORMAT_VERSION = 1

CONFIG = "config.json"
MANIFEST = "manifest.csv"
METRICS = "metrics.jsonl"
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_MODEL = "model_best.safetensors"
THRESHOLD = "threshold.json"
VAL_PREDICTIONS = "val_predictions.csv"
ADAPT = "adapt.json"  # `pneumoscope adapt`: the source, the site sample, the cross-validation
SUMMARY = "summary.json"  # the finished run: best epoch, validation metrics, wall time, CPU
# What later verbs write into a run directory (never read back by training):
EVALUATION = "metrics.json"  # evaluate's default output (report writes one in its folder)
DRIFT = "drift.json"
MODEL_CARD = "MODEL_CARD.md"
EVALUATIONS = "evaluations.json"  # every evaluated folder, for the model card
ONNX_MODEL = "model.onnx"  # export's default output (its contract: model.onnx.json)


class RunDirError(UserError, RuntimeError):
    """A run directory that is missing, incomplete or of an incompatible version."""


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: damaged after writing
            raise RunDirError(f"{path}: not valid JSON ({err})") from err


def save_model_weights(path: str | Path, state_dict: dict, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, canonical_safetensors(safetensors_save(tensors, metadata=meta)))


def canonical_safetensors(data: bytes) -> bytes:
    """The file with its JSON header's keys sorted. safetensors writes the metadata in a
    hash map's order, which changes from process to process, yet the same weights must be
    the same bytes (a resumed run is bit-for-bit the uninterrupted one; the ensemble config
    and the ONNX contract record the file's sha256). Tensor offsets count from the end of
    the header, so only the header changes; it stays padded to 8 bytes with spaces."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def load_model_weights(path: str | Path) -> dict:
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return safetensors_load(data)  # safetensors: tensors only, no code path
    except Exception as err:  # SafetensorError: truncated, or not safetensors at all
        raise RunDirError(f"{path}: not a readable safetensors model ({_first_line(err)})") from err


def save_training_state(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# What save_checkpoint always writes; a file without them is not a training state.
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "epoch")


def load_training_state(path: str | Path) -> dict:
    # weights_only: a checkpoint from a stranger can hold tensors and plain containers,
    # never code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RunDirError(
            f"{path}: refused to load: it holds Python objects other than tensors, "
            f"not run{_refused_global(err)}"
        ) from err
    except Exception as err:  # a truncated or foreign file (writes are atomic: not ours)
        raise RunDirError(
            f"{path}: cannot resume from an unreadable checkpoint ({_first_line(err)}); "
            "delete it to start the run over"
        ) from err
    missing = [k for k in TRAINING_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunDirError(
            f"{path}: not a pneumoscope training state (no {', '.join(missing)}); "
            "delete it to start the run over"
        )
    return state


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].split(". ")[0] if lines else type(err).__name__


def _refused_global(err: BaseException) -> str:
    """The line of torch's long refusal that names what was refused (GLOBAL io.open)."""
    for line in str(err).splitlines():
        if "GLOBAL" in line:
            return ": " + line.strip().split(" was not")[0].removeprefix("WeightsUnpickler error: ")
    return ""


class RunDir:
    """Paths and checked reads of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict) -> None:
        config = dict(config, format_version=FORMAT_VERSION, pneumoscope_version=__version__)
        atomic_write_json(self / CONFIG, config)

    def read_config(self) -> dict:
        path = self / CONFIG
        if not path.exists():
            raise RunDirError(f"{self.path}: not a pneumoscope run directory (no {CONFIG})")
        config = read_json(path)
        if not isinstance(config, dict):
            raise RunDirError(f"{path}: expected a JSON object, found {type(config).__name__}")
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise RunDirError(
                f"{self.path}: run directory format version {version!r} "
                f"(written by pneumoscope {config.get('pneumoscope_version', '?')}); "
                f"this pneumoscope {__version__} reads version {FORMAT_VERSION}"
            )
        return config

    def read_threshold(self) -> dict:
        path = self / THRESHOLD
        if not path.exists():
            raise RunDirError(f"{self.path}: no {THRESHOLD}; training did not finish")
        return read_json(path)

    def best_model_path(self) -> Path:
        path = self / BEST_MODEL
        if not path.exists():
            raise RunDirError(f"{self.path}: no {BEST_MODEL}; training did not finish an epoch")
        return path

    def append_metrics(self, row: dict) -> None:
        # Rewritten whole (atomically) rather than appended, so a kill mid-write cannot
        # leave a torn last line; the file has one line per epoch, so this stays cheap.
        rows = self.read_metrics()
        rows = [r for r in rows if r.get("epoch") != row.get("epoch")] + [row]
        atomic_write_text(self / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

    def read_metrics(self) -> list[dict]:
        path = self / METRICS
        if not path.exists():
            return []
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise RunDirError(f"{path}: line {number} is not valid JSON ({err})") from err
        return rows

    def remove_stale_temp_files(self) -> list[Path]:
        """Temporary files of atomic writes that a kill interrupted (`.NAME.XXXX.tmp`):
        never read by anything; removed when the run is resumed."""
        stale = sorted(self.path.glob(".*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep the lines of epochs <= last_epoch (on resume, later lines are stale)."""
        rows = [r for r in self.read_metrics() if r["epoch"] <= last_epoch]
        atomic_write_text(self / METRICS, "".join(json.dumps(r) + "\n" for r in rows))

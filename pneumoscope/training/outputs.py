"""What training writes into RUN_DIR and when a folder may be (re)used for a run: the
files of a run, opening a folder for a new, resumed or overwritten run, the checkpoint,
and the selection files (threshold.json, val_predictions.csv) that training and
`pneumoscope ensemble` both end with. The file names themselves are pneumoscope.rundir's.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np

from pneumoscope.data.cache import DecodedSet, decode_version, same_decode
from pneumoscope.fsio import atomic_write_csv, atomic_write_json
from pneumoscope.rundir import (
    BEST_MODEL,
    CONFIG,
    DRIFT,
    EVALUATION,
    EVALUATIONS,
    LAST_CHECKPOINT,
    MANIFEST,
    METRICS,
    MODEL_CARD,
    ONNX_MODEL,
    SUMMARY,
    THRESHOLD,
    VAL_PREDICTIONS,
    RunDir,
    RunDirError,
    load_training_state,
    save_training_state,
)
from pneumoscope.tasks import BINARY, choose_task_thresholds, p_pneumonia, prediction_columns
from pneumoscope.training.config import RESOLVED_KEYS, RESUME_KEYS, TrainConfig

log = logging.getLogger(__name__)

RUN_FILES = (
    CONFIG,
    MANIFEST,
    METRICS,
    LAST_CHECKPOINT,
    BEST_MODEL,
    THRESHOLD,
    VAL_PREDICTIONS,
    SUMMARY,
)
# What the other verbs write into RUN_DIR by default: they describe the model --overwrite replaces.
# (An MLflow store, RUN_DIR/mlruns, stays: it keeps each run apart and the new one is added.)
DERIVED_FILES = (
    EVALUATION,
    "metrics_predictions.csv",
    "metrics_*.json",
    "metrics_*_predictions.csv",
    DRIFT,
    ONNX_MODEL,
    ONNX_MODEL + ".json",
    MODEL_CARD,
    EVALUATIONS,
)
DERIVED_DIRS = ("report", "explain", "tensorboard")
# What a run leaves once an epoch has ended: a folder with any of them holds a run's results.
RESULT_FILES = (METRICS, LAST_CHECKPOINT, BEST_MODEL, THRESHOLD, SUMMARY)


def open_run(run: RunDir, resume: bool, overwrite: bool) -> None:
    """Make RUN_DIR ready for a run: a new one is refused in a folder holding another run's
    results unless --overwrite (which removes that run's files first); nothing is written
    before that check, so a refused call leaves the folder as it was. A run killed before
    its first epoch ended (config and manifest only) is simply started over."""
    if resume and overwrite:
        raise RunDirError(
            f"{run.path}: --resume continues the run and --overwrite replaces it: give one"
        )
    results = [name for name in RESULT_FILES if (run / name).exists()]
    if results and not resume and not overwrite:
        raise RunDirError(
            f"{run.path}: holds a training run ({', '.join(results)}); --resume continues it, "
            "--overwrite replaces it, or choose another --out"
        )
    run.path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
        for pattern in DERIVED_FILES:
            for path in run.path.glob(pattern):
                path.unlink(missing_ok=True)
        for name in DERIVED_DIRS:
            shutil.rmtree(run / name, ignore_errors=True)
    if resume or overwrite:  # even with no checkpoint yet: a kill may have come mid-write
        for stale in run.remove_stale_temp_files():  # half-written by a killed run; never read
            log.info("removed %s (an interrupted write)", stale.name)


def saved_trunk_engine(saved: dict) -> str | None:
    """A saved config's trunk engine; runs from before --trunk-engine ran it in torch."""
    if "trunk_engine" in saved:
        return saved["trunk_engine"]
    return "torch" if saved.get("recipe") == "cpu-fast" else None


def check_resumable(run: RunDir, cfg: TrainConfig, world_size: int = 1) -> dict | None:
    """The saved training state, or None when there is nothing to resume. cfg holds the
    resolved settings (resolve_settings) by now; every RESUME_KEYS and RESOLVED_KEYS
    value must match the saved run's."""
    if not (run / LAST_CHECKPOINT).exists():
        return None
    saved = {"task": BINARY, **run.read_config()}  # runs from before --task are binary
    saved["trunk_engine"] = saved_trunk_engine(saved)
    saved_world = saved.get("distributed", {}).get("world_size", 1)
    if saved_world != world_size:  # the epoch order and the effective batch depend on it
        raise RunDirError(
            f"{run.path}: --resume with {world_size} process(es); the run was "
            f"trained with {saved_world} (start it the same way)"
        )
    now = {**cfg.to_dict(), "decode_version": decode_version()}
    if same_decode(saved.get("decode_version")):  # earlier code that decodes the same
        saved["decode_version"] = now["decode_version"]
    changed = [k for k in dict.fromkeys(RESUME_KEYS + RESOLVED_KEYS) if saved.get(k) != now.get(k)]
    if changed:
        raise RunDirError(
            f"{run.path}: --resume with options that differ from the saved run: "
            + ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        )
    return load_training_state(run / LAST_CHECKPOINT)


def save_checkpoint(run: RunDir, model, optimizer, scheduler, state: dict) -> None:
    save_training_state(
        run / LAST_CHECKPOINT,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
        },
    )


def write_selection(run: RunDir, val: DecodedSet, probs, task: str = BINARY) -> dict:
    """threshold.json (rules chosen on the validation class probabilities (N, C), labels
    val.labels of the task) and val_predictions.csv; training and `pneumoscope ensemble`
    both end here."""
    probs = np.asarray(probs)
    thresholds = choose_task_thresholds(task, val.labels, probs)
    atomic_write_json(run / THRESHOLD, thresholds)
    columns = prediction_columns(task)
    values = (
        p_pneumonia(probs)[:, None]
        if task == BINARY
        else np.column_stack([probs, p_pneumonia(probs)])
    )
    # repr: the shortest text that reads back as the same float64, so a threshold (one film's
    # probability) compares equal to its row; 9 significant digits could read back below it
    atomic_write_csv(
        run / VAL_PREDICTIONS,
        ["path", "label", *columns],
        [
            [str(s.path), s.label, *(repr(float(v)) for v in row)]
            for s, row in zip(val.samples, values)
        ],
    )
    return thresholds

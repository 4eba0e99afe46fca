"""The prediction task: binary (NORMAL / PNEUMONIA) or three-class (NORMAL / BACTERIAL /
VIRAL pneumonia, the second question of Kermany et al. 2018).

One place for what differs between the two: class names, labels from file names,
model probabilities -> columns and labels, thresholds and metrics. Every other module
asks here and stays task-agnostic; binary runs keep every file and number they had.

Three-class decisions are hierarchical, so every binary figure stays comparable:
p(pneumonia) = p(bacterial) + p(viral) against the binary threshold (chosen on
validation as for binary runs) says NORMAL or pneumonia; a pneumonia film is BACTERIAL
when p(bacterial | pneumonia) = p(bacterial) / (p(bacterial) + p(viral)) reaches the
bacterial/viral threshold: Youden's J on the validation pneumonia films (bacterial =
positive), else VIRAL.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from pneumoscope import CLASSES  # the class folders (defined with the version: no import)
from pneumoscope.errors import DataError, OptionError

BINARY, THREE_CLASS = "binary", "three-class"
TASKS = (BINARY, THREE_CLASS)
CLASS_NAMES = {BINARY: CLASSES, THREE_CLASS: ("NORMAL", "BACTERIAL", "VIRAL")}
KEYS = ("normal", "bacterial", "viral")  # metrics.json / CSV names of the three classes
BV_RULE = (
    "youden on p(bacterial | pneumonia) = p_bacterial / (p_bacterial + p_viral), "
    "over the validation pneumonia films (bacterial = positive)"
)

# person123_bacteria_456 / person124_virus_457 (Kermany names); whole words only.
_SEPARATORS = re.compile(r"[_\-. ]+")
_WORDS = {"bacteria": "bacterial", "bacterial": "bacterial", "virus": "viral", "viral": "viral"}


class UnnamedSubtypeError(DataError):
    """PNEUMONIA files whose name says neither bacteria nor virus (three-class only)."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise OptionError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def n_classes(task: str) -> int:
    return len(CLASS_NAMES[check_task(task)])


def task_of(config: dict) -> str:
    """The task of a run's config.json (runs from before --task are binary)."""
    return check_task(config.get("task", BINARY))


def val_auc_name(summary: dict) -> str:
    """What a summary.json's val_roc_auc is: the ROC AUC of p(pneumonia), or for a
    three-class run (or ensemble) the macro one-vs-rest ROC AUC."""
    return "ROC AUC" if task_of(summary) == BINARY else "macro one-vs-rest ROC AUC"


def subtype_of(file_name: str) -> str | None:
    """'bacterial' or 'viral' from a Kermany file name, None when it says neither (or both)."""
    found = {_WORDS[w] for w in _SEPARATORS.split(Path(file_name).stem.lower()) if w in _WORDS}
    return found.pop() if len(found) == 1 else None


def task_labels(samples, task: str) -> np.ndarray:
    """Label of each sample for the task: binary 0/1 as discovered; three-class 0 normal,
    1 bacterial, 2 viral from the file name. A PNEUMONIA file that names neither is never
    guessed: one UnnamedSubtypeError lists every such file."""
    binary = np.array([s.label for s in samples], dtype=np.int64)
    if check_task(task) == BINARY:
        return binary
    labels = binary.copy()
    unnamed = []
    for i, s in enumerate(samples):
        if binary[i] == 1:
            subtype = subtype_of(Path(s.path).name)
            if subtype is None:
                unnamed.append(str(s.path))
            else:
                labels[i] = KEYS.index(subtype)
    if unnamed:  # one line (the CLI's error line), naming up to ten of them
        more = f" and {len(unnamed) - 10} more" if len(unnamed) > 10 else ""
        raise UnnamedSubtypeError(
            f"--task three-class: {len(unnamed)} PNEUMONIA file(s) say neither bacteria nor virus in "
            f"their name, so their class is unknown (rename or remove them): {'; '.join(unnamed[:10])}{more}"
        )
    return labels


def require_every_class(task: str, train, val, source) -> None:
    """Stop right after a three-class split that left a class out of train or validation,
    naming the class and its counts in `source` (the folder split); binary splits are
    checked by split_by_patient itself."""
    if check_task(task) == BINARY:
        return
    everything = list(train) + list(val)
    labels = task_labels(everything, task)
    for role, part in (("validation", val), ("train", train)):
        present = set(task_labels(part, task).tolist()) if part else set()
        for c, name in enumerate(CLASS_NAMES[task]):
            if c not in present:
                patients = {s.patient for s, y in zip(everything, labels) if y == c}
                n_films = int((labels == c).sum())
                raise DataError(
                    f"{role} split has no {name} film ({len(patients)} {KEYS[c]} patients, {n_films} films "
                    f"in {source}); use a larger --val-fraction or more data"
                )


def relabel(samples, task: str) -> list:
    """The samples with their task labels (three-class: 0/1/2)."""
    return [replace(s, label=int(y)) for s, y in zip(samples, task_labels(samples, task))]


# ----------------------------------------------------------------------------- probabilities


def p_pneumonia(probs: np.ndarray) -> np.ndarray:
    """p(pneumonia) from class probabilities (N, C): column 1 for binary (bit for bit what it
    always was), p(bacterial) + p(viral) for three-class."""
    probs = np.asarray(probs)
    return np.ascontiguousarray(probs[:, 1] if probs.shape[1] == 2 else probs[:, 1:].sum(axis=1))


def p_bacterial_given_pneumonia(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs[:, 1] / np.maximum(probs[:, 1] + probs[:, 2], 1e-12)


def predicted_classes(
    probs: np.ndarray, threshold: float, bv_threshold: float | None = None
) -> np.ndarray:
    """Class index per row by the module's hierarchical rule (binary: p >= threshold)."""
    pneumonia = p_pneumonia(probs) >= threshold
    if np.asarray(probs).shape[1] == 2:
        return pneumonia.astype(np.int64)
    viral = p_bacterial_given_pneumonia(probs) < bv_threshold
    return np.where(pneumonia, np.where(viral, 2, 1), 0).astype(np.int64)


def bv_threshold_of(thresholds: dict, task: str = BINARY, source="threshold.json") -> float | None:
    """The bacterial/viral threshold (None for a binary run); a three-class run's
    threshold.json (`source`) without one is refused, never guessed."""
    block = thresholds.get("bacterial_vs_viral")
    if isinstance(block, dict) and "threshold" in block:
        return float(block["threshold"])
    if task == THREE_CLASS:
        from pneumoscope.rundir import RunDirError  # here: rundir imports torch, and audit must not

        raise RunDirError(
            f"{source}: a three-class run's thresholds lack bacterial_vs_viral.threshold "
            "(written by train; restore the file or train again)"
        )
    return None


def prediction_columns(task: str) -> list[str]:
    """The probability columns of predict's CSV (then `label`)."""
    return (
        ["p_pneumonia"]
        if check_task(task) == BINARY
        else [f"p_{k}" for k in KEYS] + ["p_pneumonia"]
    )


def prediction_cells(row: dict, header: list[str]) -> list:
    """A prediction row's CSV cells in the header's order, probabilities with 6 decimals
    (every predictions CSV: predict's streamed one and the notebook's)."""
    return [f"{v:.6f}" if isinstance(v, float) else v for v in (row[k] for k in header)]


def prediction_rows(
    task: str, probs: np.ndarray, threshold: float, bv_threshold: float | None
) -> list[dict]:
    """One dict per image: the task's probability columns (floats) and `label`."""
    names = CLASS_NAMES[task]
    labels = [names[c] for c in predicted_classes(probs, threshold, bv_threshold)]
    pn = p_pneumonia(probs)
    if task == BINARY:
        return [{"p_pneumonia": float(p), "label": lab} for p, lab in zip(pn, labels)]
    return [
        {**{f"p_{k}": float(v) for k, v in zip(KEYS, row)}, "p_pneumonia": float(p), "label": lab}
        for row, p, lab in zip(probs, pn, labels)
    ]


# ----------------------------------------------------------------------------- thresholds


def choose_task_thresholds(task: str, y: np.ndarray, probs: np.ndarray) -> dict:
    """threshold.json: the binary rules on p(pneumonia) (both tasks), plus for three-class
    the bacterial/viral threshold (BV_RULE), all on validation only."""
    from pneumoscope.evaluation.metrics import choose_thresholds, youden_threshold

    y = np.asarray(y)
    thresholds = choose_thresholds((y > 0).astype(int), p_pneumonia(probs))
    if task == THREE_CLASS:
        films = y > 0
        counts = np.bincount(y[films], minlength=3)[1:]
        if counts.min() == 0:  # Youden's J needs both subtypes; one alone gives no threshold
            raise DataError(
                f"the bacterial/viral threshold needs validation films of both subtypes; got "
                f"{counts[0]} bacterial and {counts[1]} viral"
            )
        thresholds["bacterial_vs_viral"] = {
            "threshold": youden_threshold(
                (y[films] == 1).astype(int), p_bacterial_given_pneumonia(probs[films])
            ),
            "rule": BV_RULE,
        }
    return thresholds

"""The patient bootstrap behind every interval, for both tasks: patients are drawn with
replacement, stratified by their class, and bring all of their images (images of one
patient are not independent, so resampling images would make the intervals too narrow).

metrics.bootstrap_ci (binary) and three_class.three_class_ci score each resample with
their own numpy scorer and call patient_bootstrap here; the draws are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def patient_strata(y_true: np.ndarray, patients) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The images grouped by patient: (per stratum the patient numbers, the start of each
    patient's block in `order`, `order`: image indices sorted by patient).

    A patient's stratum is their highest label: "pneumonia" when any of their images is (a
    patient with films of both classes is a pneumonia patient); with three-class labels
    (0 normal, 1 bacterial, 2 viral) each class is a stratum. patients=None: every image is
    its own patient."""
    y_true = np.asarray(y_true).astype(int)
    if patients is None:
        patients = np.arange(len(y_true))
    codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    highest = np.zeros(len(counts), dtype=int)
    np.maximum.at(highest, codes, y_true)
    # binary: normal, then pneumonia
    strata = [np.flatnonzero(highest == c) for c in np.unique(highest)]
    return strata, np.stack([starts, counts]), order


def draw_images(rng: np.random.Generator, strata, blocks, order) -> np.ndarray:
    """Image indices of one resample: as many patients per stratum as it holds, drawn with
    replacement, each bringing all of their images."""
    picked = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
    starts, counts = blocks[0][picked], blocks[1][picked]
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return order[np.repeat(starts, counts) + offsets]


def patient_bootstrap(
    y_true: np.ndarray,
    patients,
    score: Callable[[np.ndarray], dict],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Percentile 95% intervals {key: [low, high]} of score(image indices of a resample)
    -> {key: value} over n_boot patient resamples (NaN values, e.g. a ROC AUC of a
    resample without one class, are left out of the percentiles)."""
    rng = np.random.default_rng(seed)
    strata, blocks, order = patient_strata(y_true, patients)
    draws: dict = {}
    for _ in range(n_boot):
        for key, value in score(draw_images(rng, strata, blocks, order)).items():
            draws.setdefault(key, []).append(value)
    return {
        k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
        for k, v in draws.items()
    }

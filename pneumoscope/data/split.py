"""Seeded, stratified, patient-grouped train/val split of the official train folder."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscope.data.discover import Sample
from pneumoscope.errors import DataError, OptionError


def split_by_patient(
    samples: list[Sample], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split so that no patient is on both sides and class ratios stay close.

    StratifiedGroupKFold with k = round(1/val_fraction) folds; the first fold is val.
    """
    if not 0.0 < val_fraction < 0.5:
        raise OptionError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    n_folds = max(2, round(1.0 / val_fraction))
    labels = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    if len(set(groups)) < n_folds or np.bincount(labels, minlength=2).min() < n_folds:
        raise DataError(
            f"too few patients or images per class ({len(samples)} images) "
            f"for a {val_fraction:.0%} validation split"
        )
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    train_idx, val_idx = next(folds.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]

"""Seeded, stratified, patient-grouped train/val split of the official train folder.

Per stratum (by default the binary label), the stratum's patients are shuffled with the
seed and taken into validation until their images reach val_fraction of the stratum's
images: in a seeded random order, each patient that still fits under the target joins,
so the requested fraction is met to within a film or two per stratum. A patient whose
images fall in several strata belongs to the stratum of most of them (the first on a tie).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from pneumoscope.data.discover import Sample
from pneumoscope.errors import DataError, OptionError


def split_by_patient(
    samples: list[Sample],
    val_fraction: float = 0.15,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, val): no patient on both sides, each stratum's val share close to
    val_fraction. strata: one value per sample (default: the labels), e.g. the three
    classes normal / bacterial / viral."""
    if not 0.0 < val_fraction < 0.5:
        raise OptionError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    strata = np.array([s.label for s in samples]) if strata is None else np.asarray(strata)
    if len(strata) != len(samples):
        raise ValueError(f"strata has {len(strata)} values for {len(samples)} samples")
    val_patients = _val_patients(samples, strata, val_fraction, np.random.default_rng(seed))
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    labels = {s.label for s in samples}
    if (
        not train
        or not val
        or {s.label for s in val} != labels
        or {s.label for s in train} != labels
    ):
        raise DataError(
            f"too few patients or images per class ({len(samples)} images) "
            f"for a {val_fraction:.0%} validation split"
        )
    return train, val


def _val_patients(
    samples: list[Sample], strata: np.ndarray, fraction: float, rng: np.random.Generator
) -> set[str]:
    images = Counter(s.patient for s in samples)
    votes: dict[str, Counter] = defaultdict(Counter)
    for sample, stratum in zip(samples, strata.tolist()):
        votes[sample.patient][stratum] += 1
    by_stratum: dict = defaultdict(list)
    for patient, counts in votes.items():  # dicts keep first-seen order: deterministic
        by_stratum[counts.most_common(1)[0][0]].append(patient)
    chosen: set[str] = set()
    for stratum in sorted(by_stratum, key=str):
        patients = sorted(by_stratum[stratum])
        target = fraction * sum(images[p] for p in patients)
        taken = 0
        # In a random order, each patient that still fits under the target (rounded):
        # in effect a random prefix, then the last gap filled by patients that fit it.
        for i in rng.permutation(len(patients)):
            n = images[patients[i]]
            if taken + n <= target + 0.5:
                chosen.add(patients[i])
                taken += n
    return chosen


def split_fraction(train: list[Sample], val: list[Sample]) -> float:
    """The share of images that went to validation (what config.json records)."""
    return len(val) / max(1, len(train) + len(val))

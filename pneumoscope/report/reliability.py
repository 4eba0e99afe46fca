"""Calibration of p(pneumonia): reliability bins and expected calibration error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Reliability:
    edges: np.ndarray  # (n_bins + 1,) bin edges on [0, 1]
    count: np.ndarray  # images per bin
    confidence: np.ndarray  # mean p(pneumonia) per bin (NaN when empty)
    frequency: np.ndarray  # observed fraction of pneumonia per bin (NaN when empty)
    ece: float  # expected calibration error


def reliability(y_true: np.ndarray, p: np.ndarray, n_bins: int = 10) -> Reliability:
    """Equal-width bins of p(pneumonia). ECE = sum over bins of
    (bin share of images) * |observed pneumonia fraction - mean predicted p|."""
    y_true, p = np.asarray(y_true, dtype=float), np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    if len(y_true) == 0:
        raise ValueError("reliability: no predictions")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin i holds edges[i] <= p < edges[i+1]; p == 1 goes to the last bin.
    index = np.minimum(np.searchsorted(edges, p, side="right") - 1, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / count
        frequency = np.bincount(index, weights=y_true, minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] / len(p) * np.abs(frequency[filled] - confidence[filled])))
    return Reliability(edges, count, confidence, frequency, ece)

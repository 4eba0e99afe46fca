"""Augmentation stays within the ranges it declares, and never mirrors a film (the heart
sits on the left; a flipped chest X-ray is an image no scanner produces)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumoscope.data.augment import PRESETS, AugmentConfig, augment_batch
from pneumoscope.models.classifier import images_to_input

S, N = 128, 64
ONLY = dict(scale=0.0, rotate_deg=0.0, translate=0.0, brightness=0.0, contrast=0.0, gamma=0.0)


def square(half: float = 0.4) -> torch.Tensor:
    """N copies of a bright centred square of half-width `half` (image half-width 1)."""
    u = (torch.arange(S) + 0.5) / S * 2 - 1
    inside = (u.abs()[None, :] <= half) & (u.abs()[:, None] <= half)
    return inside.float().expand(N, 1, S, S).clone()


def extents(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: width and height of the bright part (pixels), and its centroid (x, y)."""
    mask = (x[:, 0] > 0.5).float()
    cols, rows = mask.amax(1), mask.amax(2)
    grid = torch.arange(S).float()
    cx = (mask.sum(1) * grid).sum(1) / mask.sum((1, 2))
    cy = (mask.sum(2) * grid).sum(1) / mask.sum((1, 2))
    return cols.sum(1).numpy(), rows.sum(1).numpy(), cx.numpy(), cy.numpy()


def run(cfg: AugmentConfig, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return augment_batch(x, cfg, torch.Generator().manual_seed(seed))


def assert_spans(values: np.ndarray, low: float, high: float, slack: float) -> None:
    """Within [low, high] (up to pixel rounding) and reaching towards both ends."""
    assert values.min() >= low - slack and values.max() <= high + slack, (
        values.min(),
        values.max(),
    )
    span = high - low
    assert values.min() < low + 0.3 * span and values.max() > high - 0.3 * span, (
        values.min(),
        values.max(),
    )


def test_no_preset_flips():
    assert all(cfg is None or cfg.hflip == 0.0 for cfg in PRESETS.values())


@pytest.mark.parametrize("name", [n for n, cfg in PRESETS.items() if cfg is not None])
def test_left_stays_left(name):
    """A film brighter on its left half is still brighter on its left after any preset."""
    x = torch.zeros(N, 1, S, S)
    x[..., : S // 2] = 0.8
    x[..., S // 2 :] = 0.2
    out = run(PRESETS[name], x)
    left, right = out[..., : S // 3].mean((1, 2, 3)), out[..., -S // 3 :].mean((1, 2, 3))
    assert bool((left > right).all())


def test_zoom_range():
    out = run(AugmentConfig(**{**ONLY, "scale": 0.2}), square(0.4))
    width, height, _, _ = extents(out)
    zoom = width / (0.4 * S)
    assert_spans(zoom, 0.8, 1.2, slack=2.5 / (0.4 * S))
    np.testing.assert_allclose(width, height, atol=2)  # the same zoom both ways


def test_shift_range():
    out = run(AugmentConfig(**{**ONLY, "translate": 0.08}), square(0.3))
    _, _, cx, cy = extents(out)
    centre = (S - 1) / 2
    for shift in (cx - centre, cy - centre):
        assert_spans(shift / S, -0.08, 0.08, slack=1.0 / S)


def test_rotation_range():
    """A horizontal bar turns by at most rotate_deg (its principal axis)."""
    x = torch.zeros(N, 1, S, S)
    x[..., S // 2 - 3 : S // 2 + 3, 16:-16] = 1.0
    out = run(AugmentConfig(**{**ONLY, "rotate_deg": 12.0}), x)
    angles = []
    for img in out[:, 0].numpy():
        ys, xs = np.nonzero(img > 0.5)
        cov = np.cov(np.stack([xs, ys]))
        vals, vecs = np.linalg.eigh(cov)
        vx, vy = vecs[:, np.argmax(vals)]
        angles.append(math.degrees(math.atan(vy / vx)))
    assert_spans(np.abs(angles), 0.0, 12.0, slack=1.0)


def test_aspect_ratio_range():
    out = run(AugmentConfig(**{**ONLY, "aspect": 0.25}), square(0.4))
    width, height, _, _ = extents(out)
    assert_spans(np.log(width / height), -0.25, 0.25, slack=0.04)


def test_intensity_ranges():
    """On a flat grey film contrast has nothing to act on: the output is v**gamma + brightness."""
    v, gamma, brightness = 0.5, 0.35, 0.1
    x = torch.full((N, 1, 16, 16), v)
    out = run(AugmentConfig(**{**ONLY, "gamma": gamma, "brightness": brightness}), x)
    values = out.mean((1, 2, 3)).numpy()
    assert np.ptp(out.numpy(), axis=(1, 2, 3)).max() < 1e-6  # still flat
    assert_spans(
        values, v ** math.exp(gamma) - brightness, v ** math.exp(-gamma) + brightness, slack=1e-5
    )
    # contrast: an image's spread around its mean scales within [1/(1+c), 1+c]
    ramp = images_to_input(np.tile(np.linspace(64, 192, 16).astype(np.uint8), (N, 16, 1)))
    out = run(AugmentConfig(**{**ONLY, "contrast": 0.5}), ramp)
    ratio = (out.std((1, 2, 3)) / ramp.std((1, 2, 3))).numpy()
    assert_spans(ratio, 1 / 1.5, 1.5, slack=1e-4)

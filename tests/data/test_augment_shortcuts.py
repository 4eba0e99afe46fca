"""The shortcut breakers of the `lungs` augmentation, on real sample films of both classes:
markers are pasted near the edges, the border ring is blanked, nothing is ever mirrored,
and the draws are a function of the generator (a resumed run repeats them)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pneumoscope.data.augment import (
    PRESETS,
    SHORTCUT_FIELDS,
    AugmentConfig,
    augment_batch,
    jpeg_roundtrip,
)
from pneumoscope.data.decode import load_image

SIZE = 224
# every geometric and photometric draw off: what changes is the breaker under test alone
STILL = AugmentConfig(scale=0, rotate_deg=0, translate=0, brightness=0, contrast=0, gamma=0)


@pytest.fixture(scope="module")
def films(sample_data) -> torch.Tensor:
    """8 NORMAL + 8 PNEUMONIA real films, float (16,1,S,S) in [0,1]."""
    files = [
        f
        for cls in ("NORMAL", "PNEUMONIA")
        for f in sorted((sample_data / "train" / cls).glob("*.jpeg"))[:8]
    ]
    assert len(files) == 16, "the embedded sample lacks films"
    return (
        torch.from_numpy(np.stack([load_image(f, SIZE) for f in files])).float().div(255)[:, None]
    )


def changed(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    return (a - b).abs()[:, 0] > tol


def test_still_config_changes_nothing(films):
    """The baseline of the tests below: with every draw off the batch comes back as it was."""
    out = augment_batch(films, STILL, torch.Generator().manual_seed(0))
    assert not changed(out, films).any()


def test_markers_are_pasted_near_the_edges_of_both_classes(films):
    out = augment_batch(films, replace(STILL, markers=1.0), torch.Generator().manual_seed(1))
    diff = changed(out, films, tol=0.02)
    margin = int(0.2 * SIZE)
    for i, mask in enumerate(diff):
        rows, cols = np.nonzero(mask.numpy())
        assert len(rows) > 10, f"film {i}: no marker pasted"
        assert (out - films)[i].abs().max() > 0.3, f"film {i}: the marker has no contrast"
        # the marker lies along an edge: its box touches the outer ring
        nearest_edge = min(rows.min(), cols.min(), SIZE - 1 - rows.max(), SIZE - 1 - cols.max())
        assert nearest_edge <= 0.1 * SIZE, f"film {i}: marker {nearest_edge} px from the edges"
    centre = diff[:, margin:-margin, margin:-margin]
    assert centre.float().mean() < 0.02  # the lung fields are left alone (long labels may reach in)


def test_border_ring_is_blanked_to_one_value(films):
    out = augment_batch(films, replace(STILL, border=1.0), torch.Generator().manual_seed(2))
    diff = changed(out, films)
    ring = int(np.ceil(0.12 * SIZE))
    blanked = 0
    for i, mask in enumerate(diff):
        if not mask.any():
            continue  # every side drew "off" (1 in 16)
        blanked += 1
        assert not mask[ring:-ring, ring:-ring].any(), f"film {i}: changed inside the ring"
        values = out[i, 0][mask]
        assert float(values.max() - values.min()) < 1e-6, f"film {i}: the ring is not one value"
    assert blanked >= 12


def test_erasing_sets_one_rectangle(films):
    out = augment_batch(films, replace(STILL, erase=1.0), torch.Generator().manual_seed(3))
    for i, mask in enumerate(changed(out, films)):
        rows, cols = np.nonzero(mask.numpy())
        assert len(rows), f"film {i}: nothing erased"
        box = out[i, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert float(box.max() - box.min()) < 1e-6  # one grey level over the whole box


def test_resampling_and_jpeg_jitter_keep_the_frame(films):
    """Small, spread changes (a filter, a compression), not a moved or mirrored image."""
    for field in ("resample", "jpeg"):
        out = augment_batch(films, replace(STILL, **{field: 1.0}), torch.Generator().manual_seed(4))
        err = (out - films).abs().mean(dim=(1, 2, 3))
        # a JPEG at its own quality may come back as it was
        assert (err > 0).float().mean() >= 0.75, field
        assert (err < 0.05).all(), (field, err.max())


def test_jpeg_roundtrip_is_a_real_codec(films):
    q30 = jpeg_roundtrip(films[0], 30)
    q95 = jpeg_roundtrip(films[0], 95)
    assert (q30 - films[0]).abs().mean() > (q95 - films[0]).abs().mean() > 0


def test_lungs_preset_never_flips(films):
    """A film whose right half is black stays bright on the left through 4 x 16 views."""
    half = films.clone()
    half[..., SIZE // 2 :] = 0
    assert all(p is None or p.hflip == 0 for p in PRESETS.values())
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        out = augment_batch(half, PRESETS["lungs"], gen)
        left, right = (
            out[..., : SIZE // 2].mean(dim=(1, 2, 3)),
            out[..., SIZE // 2 :].mean(dim=(1, 2, 3)),
        )
        assert (left > right).all() and (left - right).mean() > 0.2, (left - right).min()


def test_lungs_views_repeat_for_the_same_seed(films):
    a = augment_batch(films, PRESETS["lungs"], torch.Generator().manual_seed(6))
    b = augment_batch(films, PRESETS["lungs"], torch.Generator().manual_seed(6))
    c = augment_batch(films, PRESETS["lungs"], torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_keys_of_older_presets_are_unchanged():
    """Activation caches are keyed by as_dict(): presets without breakers keep their old keys."""
    for name in ("light", "medium", "strong", "wide", "robust"):
        assert not set(SHORTCUT_FIELDS) & set(PRESETS[name].as_dict())
    assert (
        PRESETS["lungs"].as_dict()["markers"] > 0
        and "shortcut_version" in PRESETS["lungs"].as_dict()
    )

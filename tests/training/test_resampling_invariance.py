"""A model trained with the `lungs` augmentation gives close probabilities for a film and
its resampled or re-compressed copies, each read through the decode contract (what a user
who serves a JPEG at another quality, a down-sampled copy or a full-size original sends).

The tolerance comes from a measurement, and the test shows it can fail: the same
comparison between *different* films of the same folder must exceed it several times.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.inference import Predictor
from pneumoscope.training import TrainConfig, fit

SIZE = 224  # the contract's size: resampling leaves its trace at full resolution
# Measured on this test's run (cpu-fast, lungs, the default top of three trainable
# stages, 40 sample films (a quarter for validation) at 224 px, 3 epochs; 2026-12-03, the
# 2-core AMX VM), mean / max |dp| over the 24 test films: JPEG 30 0.058 / 0.213, down-up
# 0.5 0.055 / 0.164, 4x original 0.019 / 0.055; between a NORMAL and a PNEUMONIA film 0.41.
# (Two trainable stages there: 0.039 / 0.088, 0.065 / 0.235, 0.019 / 0.048; on the AVX2 VM
# of 2026-12-02, JPEG 30 0.038 / 0.130: the maxima move between CPUs.) The tolerances are
# about 1.5x the measured values (another CPU rounds differently; the run is small, so p
# moves more than on the full data).
# mean, max
TOLERANCE = {
    "jpeg30": (0.09, 0.33),
    "down-up0.5": (0.09, 0.26),
    "original4x": (0.03, 0.085),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_data_root) -> Path:
    out = tmp_path_factory.mktemp("invariance") / "run"
    # the default top, which the tolerances were measured with
    cfg = TrainConfig(
        data=str(small_data_root),
        out=str(out),
        recipe="cpu-fast",
        backbone="efficientnet_lite0",
        image_size=SIZE,
        batch_size=8,
        val_fraction=0.25,
        epochs=3,
        views=1,
        augment="lungs",
        trunk_precision="fp32",
        precision="fp32",
        trainable_stages=3,
    )
    fit(cfg, show_progress=False)
    return out


def _jpeg30(img: Image.Image, stem: str) -> Path:
    img.save(path := Path(stem + ".jpeg"), quality=30)
    return path


def _down_up(img: Image.Image, stem: str) -> Path:
    half = img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC)
    half.resize(img.size, Image.Resampling.BILINEAR).save(path := Path(stem + ".png"))
    return path


def _original4x(img: Image.Image, stem: str) -> Path:
    img.resize((img.width * 4, img.height * 4), Image.Resampling.LANCZOS).save(
        path := Path(stem + ".png")
    )
    return path


VARIANTS = {"jpeg30": _jpeg30, "down-up0.5": _down_up, "original4x": _original4x}


@pytest.fixture(scope="module")
def films(small_data_root) -> list[Path]:
    files = sorted((small_data_root / "test").rglob("*.jpeg"))
    assert len(files) == 24, (
        f"expected the 24 test films of the small data root, found {len(files)}"
    )
    return files


def _probs(predictor: Predictor, paths) -> np.ndarray:
    return predictor.predict_images(np.stack([predictor.load(p) for p in paths]))


@pytest.mark.slow  # trains
def test_probabilities_survive_resampling_and_jpeg(run, films, tmp_path):
    predictor = Predictor.from_run(run, device="cpu")
    base = _probs(predictor, films)
    for name, make in VARIANTS.items():
        paths = [
            make(Image.open(film).convert("L"), str(tmp_path / f"{name}_{i}"))
            for i, film in enumerate(films)
        ]
        dp = np.abs(_probs(predictor, paths) - base)
        mean_tol, max_tol = TOLERANCE[name]
        assert dp.mean() < mean_tol and dp.max() < max_tol, (name, dp.mean(), dp.max())
    # the check can fail: different films (each NORMAL against a PNEUMONIA film) move p far more
    normal = [i for i, f in enumerate(films) if f.parent.name == "NORMAL"]
    pneumonia = [i for i, f in enumerate(films) if f.parent.name == "PNEUMONIA"]
    across = np.abs(base[normal] - base[pneumonia[: len(normal)]])
    assert across.mean() > 2 * max(mean for mean, _ in TOLERANCE.values()), across.mean()

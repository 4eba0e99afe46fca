"""Fixtures for the ensemble tests: two small real runs (efficientnet_lite0 with its
ImageNet weights, 64 px, seeds 0 and 1 on one shared patient-grouped split) trained once
per session on the embedded sample, two three-class runs likewise (the shared three_run
and a seed-1 run on its split), and ensembles of them written by the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.data.decode import load_image


def _member(data_root: Path, out: Path, seed: int) -> Path:
    from pneumoscope.training import TrainConfig, fit

    cfg = TrainConfig(
        data=str(data_root),
        out=str(out),
        backbone="efficientnet_lite0",
        image_size=64,
        batch_size=8,
        val_fraction=0.25,
        head_epochs=0,
        epochs=2,
        seed=seed,
        split_seed=0,
    )
    fit(cfg, show_progress=False)
    return out


@pytest.fixture(scope="session")
def members(small_data_root, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    return [_member(small_data_root, root / f"seed{seed}", seed) for seed in (0, 1)]


def _ensemble(members, out: Path, tta: str) -> Path:
    assert main(["-q", "ensemble", *map(str, members), "--out", str(out), "--tta", tta]) == 0
    return out


@pytest.fixture(scope="session")
def ens_dir(members, tmp_path_factory) -> Path:
    """Two members, no test-time views."""
    return _ensemble(members, tmp_path_factory.mktemp("ens") / "ens", "none")


@pytest.fixture(scope="session")
def tta_dir(members, tmp_path_factory) -> Path:
    """Two members x three views (zoom3: identity, zoom 0.9, zoom 1.1)."""
    return _ensemble(members, tmp_path_factory.mktemp("ens_tta") / "ens", "zoom3")


@pytest.fixture(scope="session")
def three_members(three_run, three_run_options, sample_data, tmp_path_factory) -> list[Path]:
    """Two three-class runs on one split: three_run (seed 0) and seed 1 with --split-seed 0."""
    from pneumoscope.api import train

    out = tmp_path_factory.mktemp("three_seed1") / "run"
    options = {**three_run_options, "seed": 1, "split_seed": 0}
    return [three_run, train(sample_data, out, show_progress=False, **options)]


@pytest.fixture(scope="session")
def three_ens_dir(three_members, tmp_path_factory) -> Path:
    """The two three-class members, no test-time views."""
    return _ensemble(three_members, tmp_path_factory.mktemp("ens3") / "ens", "none")


@pytest.fixture(scope="session")
def real_images(small_data_root) -> np.ndarray:
    """The 24 real held-out images of small_data_root/test at 64 px."""
    files = sorted((small_data_root / "test").rglob("*.jpeg"))
    assert len(files) == 24, files
    return np.stack([load_image(f, 64) for f in files])

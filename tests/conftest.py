"""Shared fixtures: small slices of the real shared data, copied into temporary folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PNEUMOSCOPE_DATA", REPO.parent / "shared" / "data" / "chest_xray_224"))
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tests write the decode/activation cache to a temporary folder, not ~/.cache."""
    old = os.environ.get("PNEUMOSCOPE_CACHE")
    os.environ["PNEUMOSCOPE_CACHE"] = str(tmp_path_factory.mktemp("pneumoscope_cache"))
    yield Path(os.environ["PNEUMOSCOPE_CACHE"])
    if old is None:
        os.environ.pop("PNEUMOSCOPE_CACHE", None)
    else:
        os.environ["PNEUMOSCOPE_CACHE"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "train" / "NORMAL").is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set PNEUMOSCOPE_DATA)")
    return SHARED_DATA


def pick_images(shared_data: Path, per_class: int, offset: int = 0) -> dict[str, list[Path]]:
    """Deterministic slice of the real train images, spread over the sorted listing so it
    holds several patients and both file-name styles."""
    picked = {}
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((shared_data / "train" / cls).glob("*.jpeg"))
        step = max(1, len(files) // (per_class + offset))
        picked[cls] = files[offset * step :: step][:per_class]
    return picked


def make_data_root(root: Path, shared_data: Path, per_class: int, offset: int = 0,
                   split: str = "train") -> Path:
    for cls, files in pick_images(shared_data, per_class, offset).items():
        dest = root / split / cls
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / f.name)
    return root


def train_small_run(data_root: Path, out: Path, image_size: int = 64, epochs: int = 2) -> Path:
    """A real run (efficientnet_lite0 with its ImageNet weights) trained on DATA_ROOT's
    train/ at a small size, for the tests that need a trained model."""
    from pneumoscope.training import TrainConfig, train

    cfg = TrainConfig(data=str(data_root), out=str(out), backbone="efficientnet_lite0",
                      image_size=image_size, batch_size=8, val_fraction=0.25, head_epochs=0, epochs=epochs)
    train(cfg, show_progress=False)
    return out


@pytest.fixture(scope="session")
def small_run_trainer():
    """train_small_run, for conftest files below this one (fixtures reach them, imports
    of this module do not under --import-mode=importlib)."""
    return train_small_run


@pytest.fixture(scope="session")
def small_data_root(tmp_path_factory, shared_data) -> Path:
    """DATA_ROOT with train/ of 20 NORMAL + 20 PNEUMONIA real images and a test/ split of
    other real images (12 + 12)."""
    root = tmp_path_factory.mktemp("data")
    make_data_root(root, shared_data, per_class=20)
    make_data_root(root, shared_data, per_class=12, offset=1, split="test")
    return root


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

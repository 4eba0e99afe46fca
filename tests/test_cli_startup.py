"""The command line through a real interpreter: user errors are one line with exit 2,
bugs keep their traceback (exit 1), and the light verbs never import torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscope.data.cache import UnreadableImagesError
from pneumoscope.data.decode import ImageDecodeError
from pneumoscope.data.download import DownloadError
from pneumoscope.errors import DataError, MissingFileError, OptionError, UserError
from pneumoscope.models.weights import WeightsError
from pneumoscope.rundir import RunDirError
from pneumoscope.site.calibrate import SampleTooSmallError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def run_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output ('import time: self | cumulative | name')."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["-q", "audit", "SAMPLE", "--json"]])
def test_light_verbs_do_not_import_torch(argv):
    if not SAMPLE.is_dir():
        pytest.fail(f"embedded sample missing: {SAMPLE}")
    argv = [str(SAMPLE) if a == "SAMPLE" else a for a in argv]
    done = run_python("-X", "importtime", "-m", "pneumoscope", *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = imported_modules(done.stderr)
    assert "argparse" in modules  # the parse of importtime's output works
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
    assert not heavy, f"{' '.join(argv)} imported {heavy[:5]}"


def test_train_help_still_lists_recipe_defaults():
    # train's options read their defaults from the config and recipes (torch is allowed here)
    done = run_python("-m", "pneumoscope", "train", "--help")
    assert done.returncode == 0, done.stderr
    from pneumoscope.training.recipes import RECIPES

    stages = f"(default: cpu-fast {RECIPES['cpu-fast']['trainable_stages']}, full {RECIPES['full']['trainable_stages']})"
    assert "--trainable-stages" in done.stdout and stages in " ".join(done.stdout.split())


def test_user_error_is_one_line_with_exit_2(tmp_path):
    done = run_python("-m", "pneumoscope", "-q", "audit", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.startswith("pneumoscope audit: error: ") and "missing" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


@pytest.mark.slow  # CLI subprocesses
def test_bad_option_value_is_a_user_error(tmp_path):
    # an option argparse cannot check (the run's rules are in its threshold.json)
    done = run_python("-m", "pneumoscope", "-q", "evaluate", str(tmp_path), "--data", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("pneumoscope evaluate: error: ") and str(tmp_path) in done.stderr


def test_internal_error_keeps_its_traceback():
    # A bug inside a verb (here: a ValueError the audit code did not mean to raise) must not
    # be dressed up as a user mistake.
    code = (
        "import sys, pneumoscope.data.audit as audit\n"
        "def broken(*a, **k):\n    raise ValueError('internal bug, not the user')\n"
        "audit.audit_root = broken\n"
        "from pneumoscope.cli import main\n"
        f"raise SystemExit(main(['-q', 'audit', {str(SAMPLE)!r}]))\n"
    )
    done = run_python("-c", code)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: internal bug, not the user" in done.stderr
    assert "error: internal bug" not in done.stderr


@pytest.mark.slow  # CLI subprocesses
def test_argparse_errors_keep_exit_2():
    done = run_python("-m", "pneumoscope", "train", "--data", "x", "--epochs", "many")
    assert done.returncode == 2 and "argument --epochs: invalid int value: 'many'" in done.stderr
    # --out may come from --config, so its absence is checked after the merge: one line, exit 2
    done = run_python("-m", "pneumoscope", "train", "--data", "x")
    assert done.returncode == 2 and done.stderr.strip() == (
        "pneumoscope train: error: train needs --out (given, or in --config)"
    )


@pytest.mark.parametrize(
    "cls",
    [
        RunDirError,
        WeightsError,
        ImageDecodeError,
        UnreadableImagesError,
        DownloadError,
        SampleTooSmallError,
        OptionError,
        DataError,
        MissingFileError,
    ],
)
def test_every_user_facing_error_is_a_user_error(cls):
    assert issubclass(cls, UserError)


def test_user_errors_keep_their_builtin_bases():
    # callers that catch the builtin (ValueError, FileNotFoundError) keep working
    assert issubclass(OptionError, ValueError) and issubclass(DataError, ValueError)
    err = MissingFileError("x.csv: no such file")
    assert isinstance(err, FileNotFoundError) and str(err) == "x.csv: no such file"
    assert not issubclass(UserError, (ValueError, OSError))

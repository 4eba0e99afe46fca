"""Determinism (issue 7, point 5): same seed, same data, CPU -> the same run twice.

Two real training runs (child processes, as a user starts them) with the class-balanced
sampler and augmentation on; every metric of every epoch, every tensor of the selected
model, the thresholds and the validation predictions must be identical, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.rundir import BEST_MODEL, METRICS, THRESHOLD, VAL_PREDICTIONS

pytestmark = pytest.mark.slow  # trains the same run twice in subprocesses

OPTIONS = ["--epochs", "3", "--balance", "sampler", "--augment", "strong", "--seed", "11"]


def without_timings(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if "seconds" not in k and not k.endswith("_per_s")}
        for r in rows
    ]


@pytest.fixture(scope="module")
def two_runs(small_data_root, small_run, cli, tmp_path_factory) -> tuple[Path, Path]:
    """Each run its own empty cache: the second must compute everything itself, not read
    back what the first stored (which would make any two runs agree)."""
    runs = []
    for name in ("first", "second"):
        folder = tmp_path_factory.mktemp("determinism")
        out, cache = folder / name, folder / "cache"
        proc = cli(
            "-q",
            "train",
            "--data",
            small_data_root,
            "--out",
            out,
            *small_run,
            *OPTIONS,
            env={"PNEUMOSCOPE_CACHE": str(cache)},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert list(cache.rglob("*.npy")), "the run wrote nothing to its own cache"
        runs.append(out)
    return runs[0], runs[1]


def test_same_seed_same_metrics(two_runs):
    first, second = two_runs
    rows = without_timings(first)
    assert len(rows) == 3 and len({r["train_loss"] for r in rows}) == 3  # it really trained
    assert rows == without_timings(second)


def test_same_seed_same_model_thresholds_and_predictions(two_runs):
    first, second = two_runs
    a, b = load_file(first / BEST_MODEL), load_file(second / BEST_MODEL)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / THRESHOLD).read_text()) == json.loads(
        (second / THRESHOLD).read_text()
    )
    assert (first / VAL_PREDICTIONS).read_text() == (second / VAL_PREDICTIONS).read_text()

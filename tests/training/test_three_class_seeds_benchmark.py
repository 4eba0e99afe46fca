"""benchmarks/three_class_seeds.py end to end on the sample, at test settings: seeds share one
split, train options after `--` reach every run, the ensemble is scored, a rerun retrains nothing."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains four seeds and their ensemble

REPO = Path(__file__).resolve().parents[2]
TEST_SETTINGS = [
    "--backbone",
    "efficientnet_lite0",
    "--image-size",
    "64",
    "--batch-size",
    "16",
    "--val-fraction",
    "0.25",
    "--head-epochs",
    "0",
    "--epochs",
    "1",
]


def run_bench(data: Path, out: Path) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "three_class_seeds.py"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--seeds",
            "0",
            "1",
            "--",
            *TEST_SETTINGS,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ensemble |" in done.stdout and "| seed 1 |" in done.stdout
    return json.loads((out / "results.json").read_text())


def val_paths(run: Path) -> list[str]:
    return sorted(r["path"] for r in csv.DictReader(open(run / "val_predictions.csv")))


def test_seeds_share_a_split_take_the_options_and_are_ensembled(sample_data, tmp_path):
    out = tmp_path / "bench"
    first = run_bench(sample_data, out)
    results = first["results"]
    assert list(results) == ["seed 0", "seed 1", "ensemble"]
    for seed in (0, 1):
        config = json.loads((out / f"seed{seed}" / "config.json").read_text())
        assert (config["seed"], config["split_seed"], config["task"]) == (seed, 0, "three-class")
        assert (config["image_size"], config["epochs"]) == (64, 1)  # the options after --
    assert val_paths(out / "seed0") == val_paths(out / "seed1") == val_paths(out / "ensemble")
    for r in results.values():
        bv = r["metrics"]["bacterial_vs_viral"]
        assert bv["n"] > 0 and 0 <= bv["roc_auc"] <= 1
        assert r["metrics"]["binary"]["n"] == len(val_paths(out / "seed0"))
    assert first["meta"]["train_options"] == TEST_SETTINGS

    again = run_bench(sample_data, out)["results"]
    assert all("already" in r["note"] for r in again.values())  # nothing retrained or rebuilt
    assert {k: r["metrics"] for k, r in again.items()} == {
        k: r["metrics"] for k, r in results.items()
    }

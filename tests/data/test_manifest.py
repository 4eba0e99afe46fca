"""manifest.csv's sha1 column, and the warning when evaluated images are in the run's
own train or validation part (leakage a user does not notice: a copy under another name)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

from pneumoscope.data.cache import decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.data.manifest import (
    read_manifest,
    sha1_by_path,
    shared_with_manifest,
    write_manifest,
)
from pneumoscope.report.evaluate import evaluate_run


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_training_writes_the_sha1_of_each_file(tiny_run):
    rows = _rows(tiny_run / "manifest.csv")
    assert rows and {r["role"] for r in rows} == {"train", "val"}
    for row in rows:
        assert row["sha1"] == hashlib.sha1(Path(row["path"]).read_bytes()).hexdigest()


def test_evaluate_warns_about_copies_of_training_images(
    tiny_run, small_data_root, tmp_path, caplog
):
    """Three training images copied under new names into a test folder: evaluate names
    them (same bytes, other path) and records the overlap in metrics.json."""
    folder = tmp_path / "test"
    shutil.copytree(small_data_root / "test", folder)
    train_rows = [r for r in _rows(tiny_run / "manifest.csv") if r["role"] == "train"][:3]
    for i, row in enumerate(train_rows):
        cls = "PNEUMONIA" if row["label"] == "1" else "NORMAL"
        shutil.copy(row["path"], folder / cls / f"renamed-{i}.jpeg")
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_run(
            tiny_run, folder, out=tmp_path / "metrics.json", n_boot=20, show_progress=False
        )
    shared = metrics["leakage"]["shared"]
    assert set(shared) == {"train"} and shared["train"]["count"] == 3
    assert sorted(Path(p).name for p in shared["train"]["examples"]) == [
        "renamed-0.jpeg",
        "renamed-1.jpeg",
        "renamed-2.jpeg",
    ]
    assert metrics["leakage"]["compared_by"].startswith("sha1")
    assert "3 of the 27 evaluated images are also in the run's train part" in caplog.text
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["leakage"]["shared"]["train"]["count"]
        == 3
    )


def test_held_out_folder_shares_nothing(tiny_run, small_data_root, tmp_path):
    metrics = evaluate_run(
        tiny_run, small_data_root / "test", out=tmp_path / "m.json", n_boot=20, show_progress=False
    )
    assert metrics["leakage"]["shared"] == {}


def test_old_manifest_without_sha1_loads_and_compares_by_path(small_data_root, tmp_path):
    samples = discover_split(small_data_root / "train", "train")
    old = tmp_path / "manifest.csv"
    with open(
        old, "w", newline="", encoding="utf-8"
    ) as handle:  # the format before the sha1 column
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "split", "role"])
        writer.writerows([[str(s.path), s.label, s.patient, s.split, "train"] for s in samples])
    assert read_manifest(old)["train"] == samples
    data = decode_samples(samples[:4], 32, show_progress=False)
    found = shared_with_manifest(old, data.samples, data.keys)
    assert found["compared_by"].startswith("path") and found["shared"]["train"]["count"] == 4


def test_manifest_round_trip_with_sha1(small_data_root, tmp_path):
    samples = discover_split(small_data_root / "train", "train")[:6]
    data = decode_samples(samples, 32, show_progress=False)
    write_manifest(
        tmp_path / "manifest.csv",
        {"train": samples[:3], "val": samples[3:]},
        sha1=sha1_by_path(data),
    )
    assert read_manifest(tmp_path / "manifest.csv") == {"train": samples[:3], "val": samples[3:]}
    copy = tmp_path / "elsewhere.jpeg"
    shutil.copy(samples[4].path, copy)
    other = decode_samples(
        [samples[0].__class__(copy, samples[4].label, "x")], 32, show_progress=False
    )
    found = shared_with_manifest(
        tmp_path / "manifest.csv", other.samples, other.keys, skip_roles=("train",)
    )
    assert found["shared"] == {"val": {"count": 1, "examples": [str(copy)]}}

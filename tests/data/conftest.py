"""Fixtures of the data tests: a tiny run trained once on real images, and the small data
set renamed so that no file name says its patient (patients then come from a CSV)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run(small_data_root, tmp_path_factory, small_run_trainer) -> Path:
    return small_run_trainer(
        small_data_root, tmp_path_factory.mktemp("tiny_run") / "run", image_size=32, epochs=1
    )


@pytest.fixture(scope="session")
def anonymous_root(small_data_root, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(DATA_ROOT, patients CSV, new file name -> patient): every image of small_data_root
    copied as scan-NNN.jpeg, three consecutive ones per subject-K; the CSV says so (by file
    name for train/, by path relative to the CSV for test/)."""
    root = tmp_path_factory.mktemp("anonymous")
    truth, rows = {}, []
    for i, src in enumerate(sorted(small_data_root.rglob("*.jpeg"))):
        split, cls = src.parts[-3], src.parts[-2]
        name = f"scan-{i:03d}.jpeg"
        dest = root / "data" / split / cls / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        subject = f"subject-{i // 3}"  # three films per subject (sorted: same split and class)
        truth[name] = subject
        rows.append([name if split == "train" else f"data/{split}/{cls}/{name}", subject])
    table = root / "patients.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "patient"]] + rows)
    return root / "data", table, truth

"""manifest.csv: which file went where, so a run can be repeated and audited."""

from __future__ import annotations

import csv
from pathlib import Path

from pneumoscope.data.discover import Sample
from pneumoscope.rundir import atomic_write_csv

HEADER = ["path", "label", "patient", "split", "role"]


def write_manifest(path: str | Path, roles: dict[str, list[Sample]]) -> None:
    """roles: e.g. {"train": [...], "val": [...]} -> one row per image."""
    rows = [
        [str(s.path), s.label, s.patient, s.split, role]
        for role, samples in roles.items()
        for s in samples
    ]
    atomic_write_csv(path, HEADER, rows)


def read_manifest(path: str | Path) -> dict[str, list[Sample]]:
    roles: dict[str, list[Sample]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            sample = Sample(Path(row["path"]), int(row["label"]), row["patient"], row["split"])
            roles.setdefault(row["role"], []).append(sample)
    return roles

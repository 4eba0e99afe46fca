"""manifest.csv: which file went where, so a run can be repeated and audited.

One row per image: path, label, patient, split, role and sha1 (of the file's bytes, the
key the decode cache computed; empty for a file that could not be read). Manifests
written before the sha1 column existed still load (their files are then compared by
path only)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from pneumoscope.data.discover import Sample, real_path
from pneumoscope.fsio import atomic_write_csv

log = logging.getLogger(__name__)

HEADER = ["path", "label", "patient", "split", "role", "sha1"]


def write_manifest(
    path: str | Path, roles: dict[str, list[Sample]], sha1: dict[str, str] | None = None
) -> None:
    """roles: e.g. {"train": [...], "val": [...]} -> one row per image.
    sha1: str(path) -> hex digest of the file's bytes (DecodedSet keys, see sha1_by_path)."""
    sha1 = sha1 or {}
    rows = [
        [str(s.path), s.label, s.patient, s.split, role, sha1.get(str(s.path), "")]
        for role, samples in roles.items()
        for s in samples
    ]
    atomic_write_csv(path, HEADER, rows)


def _rows(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_manifest(path: str | Path) -> dict[str, list[Sample]]:
    roles: dict[str, list[Sample]] = {}
    for row in _rows(path):
        sample = Sample(Path(row["path"]), int(row["label"]), row["patient"], row["split"])
        roles.setdefault(row["role"], []).append(sample)
    return roles


def files_by_role(path: str | Path) -> dict[str, frozenset]:
    """role -> that role's files, by the sha1 of their bytes where the row has it (the same
    images under another mount path still match), else by path: what two runs compare
    to know they share a split."""
    roles: dict[str, set] = {}
    for row in _rows(path):
        roles.setdefault(row["role"], set()).add(row.get("sha1") or row["path"])
    return {role: frozenset(files) for role, files in roles.items()}


def sha1_by_path(*sets) -> dict[str, str]:
    """str(path) -> sha1 of the file's bytes, from decoded sets (cache.DecodedSet): the
    hashes decoding computed anyway, so no file is read twice."""
    return {str(s.path): key for data in sets for s, key in zip(data.samples, data.keys)}


def shared_with_manifest(
    path: str | Path,
    samples: list[Sample],
    keys: list[str],
    skip_roles: tuple[str, ...] = (),
    examples: int = 5,
) -> dict:
    """Which of `samples` (with the sha1 `keys` of their bytes) are also images of the
    manifest's roles: by content (sha1) when the manifest has the column, else by path.
    Returns a JSON-ready dict: how it compared, per role the count and a few files."""
    rows = [r for r in _rows(path) if r["role"] not in skip_roles]
    by_sha1 = dict(zip(keys, (str(s.path) for s in samples)))
    by_path = {real_path(s.path): str(s.path) for s in samples}
    # by content where the row has a sha1; an old manifest (no column) or a file that was
    # unreadable at training time: the same file, by resolved path
    role_of = [
        (r["role"], by_sha1.get(r["sha1"]) if r.get("sha1") else by_path.get(real_path(r["path"])))
        for r in rows
    ]
    by_content = any(r.get("sha1") for r in rows)
    shared: dict[str, set[str]] = {}
    for role, ours_path in role_of:
        if ours_path is not None:
            shared.setdefault(role, set()).add(ours_path)
    return {
        "compared_by": "sha1 of the file bytes"
        if by_content
        else "path (manifest has no sha1 column)",
        "manifest": str(path),
        "shared": {
            role: {"count": len(files), "examples": sorted(files)[:examples]}
            for role, files in sorted(shared.items())
        },
    }

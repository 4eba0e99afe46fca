"""Audit a data folder: counts, imbalance, unreadable files, duplicates, shared patients."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from pneumoscope.data.decode import IMAGE_SUFFIXES, ImageDecodeError, decode_gray, open_problem
from pneumoscope.data.discover import SPLIT_NAMES, PatientMap, _class_dirs, patient_id
from pneumoscope.errors import MissingFileError
from pneumoscope.tasks import CLASSES, subtype_of


def file_sha1(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _walk_all(folder: Path) -> tuple[list[Path], list[Path]]:
    """Every file under a class folder (images or not) and the symlinked folders skipped."""
    files, skipped_links = [], []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for d in sorted(dirs):
            if (Path(root) / d).is_symlink():
                skipped_links.append(Path(root) / d)
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return files, skipped_links


def _check_file(path: Path) -> str | None:
    """The problem with one file, or None when it decodes as an image."""
    if path.is_symlink():
        try:
            path.stat()
        except OSError as err:  # named as decode names it, so every verb says the same
            return open_problem(err, path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (suffix {path.suffix or 'none'!r})"
    try:
        decode_gray(path)
    except ImageDecodeError as err:
        return err.problem
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    return None


# The Kermany release numbers its persons (personN_..., IM-NNNN-...) per split folder:
# person1 of train/ and person1 of test/ are different children. Kaggle's val/ was cut
# from train/ and keeps its numbers. So ids read from file names are compared only among
# splits of one numbering; a film copied across any splits is still found by its content
# (duplicates). A --patients CSV gives ids that hold everywhere: compared across all.
KERMANY_NUMBERING = {"train": "train", "val": "train", "test": "test"}


def numbering_of(split: str, patients: PatientMap | None) -> str:
    """The scope within which the split's patient ids name one person."""
    return "all" if patients else KERMANY_NUMBERING.get(split, split)


def audit_root(
    data_root: str | Path, show_progress: bool = True, patients: PatientMap | None = None
) -> dict:
    """Audit every split under DATA_ROOT; returns a JSON-ready dict. Patient ids from the
    Kermany file names, or from `patients` (a --patients CSV; it must name every image)."""
    data_root = Path(data_root)
    splits = {s: _class_dirs(data_root / s) for s in SPLIT_NAMES}
    splits = {s: dirs for s, dirs in splits.items() if dirs}
    if not splits:
        raise MissingFileError(
            f"{data_root}: no {'/'.join(SPLIT_NAMES)} folders with class folders"
        )
    jobs = []
    skipped = []
    for split, class_dirs in splits.items():
        for label, folder in class_dirs.items():
            files, links = _walk_all(folder)
            skipped += links
            jobs += [(split, label, f) for f in files]

    images = [f for _, _, f in jobs if f.suffix.lower() in IMAGE_SUFFIXES]
    patient_of = dict(zip(images, patients.patients_of(images))) if patients else {}

    counts = {s: {c: 0 for c in CLASSES} for s in splits}
    # PNEUMONIA by file name
    subtypes = {s: {"BACTERIAL": 0, "VIRAL": 0, "UNNAMED": 0} for s in splits}
    unreadable, by_hash = [], defaultdict(list)
    patients_seen = defaultdict(set)  # (numbering, patient) -> splits
    for split, label, path in tqdm(jobs, desc="audit", unit="file", disable=not show_progress):
        problem = _check_file(path)
        rel = str(path.relative_to(data_root))
        if problem:
            unreadable.append({"path": rel, "problem": problem})
            continue
        counts[split][CLASSES[label]] += 1
        if CLASSES[label] == "PNEUMONIA":
            subtypes[split][(subtype_of(path.name) or "unnamed").upper()] += 1
        by_hash[file_sha1(path)].append(rel)
        patient = patient_of.get(path) or patient_id(path.name)
        patients_seen[numbering_of(split, patients), patient].add(split)

    per_split = {}
    for split, by_class in counts.items():
        normal, pneumonia = by_class["NORMAL"], by_class["PNEUMONIA"]
        per_split[split] = {
            "counts": by_class,
            "total": normal + pneumonia,
            "imbalance_pneumonia_per_normal": round(pneumonia / normal, 3) if normal else None,
            # --task three-class: UNNAMED pneumonia files (neither bacteria nor virus) stop it
            "three_class": {"NORMAL": normal, **subtypes[split]},
        }
    duplicates = [sorted(paths) for paths in by_hash.values() if len(paths) > 1]
    shared = {p: sorted(s) for (_, p), s in patients_seen.items() if len(s) > 1}
    return {
        "data_root": str(data_root),
        "patients_from": str(patients.source) if patients else "file names (Kermany)",
        "splits": per_split,
        "unreadable": unreadable,
        "skipped_symlinked_folders": [str(p.relative_to(data_root)) for p in skipped],
        "duplicates": sorted(duplicates),
        "patients_shared_across_splits": dict(sorted(shared.items())),
        "patients_compared": (
            "across all splits (--patients ids)"
            if patients
            else "within train+val and within test (the Kermany release numbers its "
            "persons per split; copies across them are in duplicates)"
        ),
    }


def format_audit(report: dict) -> str:
    """The short console table of an audit."""
    lines = [
        f"{'split':<8}{'NORMAL':>9}{'PNEUMONIA':>11}{'total':>8}{'P/N':>7}{'BACTERIAL':>11}{'VIRAL':>7}"
    ]
    unnamed = 0
    for split, info in report["splits"].items():
        ratio = info["imbalance_pneumonia_per_normal"]
        three = info["three_class"]
        unnamed += three["UNNAMED"]
        lines.append(
            f"{split:<8}{info['counts']['NORMAL']:>9}{info['counts']['PNEUMONIA']:>11}"
            f"{info['total']:>8}{(f'{ratio:.2f}' if ratio else '-'):>7}{three['BACTERIAL']:>11}{three['VIRAL']:>7}"
        )
    if unnamed:
        lines.append(
            f"PNEUMONIA files naming neither bacteria nor virus: {unnamed} (--task three-class refuses them)"
        )
    lines.append(f"unreadable files: {len(report['unreadable'])}")
    lines += [f"  {u['path']}: {u['problem']}" for u in report["unreadable"]]
    lines.append(f"exact duplicate groups: {len(report['duplicates'])}")
    lines += [f"  {' = '.join(group)}" for group in report["duplicates"]]
    shared = report["patients_shared_across_splits"]
    lines.append(
        f"patients shared across splits: {len(shared)} (compared {report['patients_compared']})"
    )
    lines += [f"  {p}: {', '.join(s)}" for p, s in list(shared.items())[:20]]
    if len(shared) > 20:
        lines.append(f"  ... and {len(shared) - 20} more (see --json)")
    if report["skipped_symlinked_folders"]:
        lines.append(f"symlinked folders not followed: {len(report['skipped_symlinked_folders'])}")
    return "\n".join(lines)

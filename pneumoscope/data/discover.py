"""Find images in the Kermany/Kaggle layout and read patient ids from file names."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pneumoscope import CLASSES
from pneumoscope.data.decode import IMAGE_SUFFIXES

SPLIT_NAMES = ("train", "val", "test")

# person123_bacteria_456 / person123_virus_457 -> person123
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
# IM-0115-0001, IM-0115-0001-0002, NORMAL2-IM-0135-0001 -> the [NORMAL2-]IM-NNNN prefix
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASSES: 0 NORMAL, 1 PNEUMONIA
    patient: str
    split: str = ""  # official split folder it came from ("train", "val", "test" or "")


def patient_id(file_name: str) -> str:
    """Patient id carried by a Kermany file name; unknown patterns fall back to the stem,
    so an unrecognised file is its own patient (safe for grouping, never merges two)."""
    stem = Path(file_name).stem
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def _class_dirs(split_dir: Path) -> dict[int, Path]:
    """Class folders of one split, matched case-insensitively (NORMAL/normal)."""
    found = {}
    if not split_dir.is_dir():
        return found
    for entry in sorted(split_dir.iterdir()):
        name = entry.name.upper()
        if entry.is_dir() and name in CLASSES:
            found[CLASSES.index(name)] = entry
    return found


def _image_files(folder: Path) -> list[Path]:
    """Image files below `folder`, sorted; symlinked folders are not followed, so a
    symlink loop cannot make discovery run forever."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                files.append(Path(root) / name)
    return files


def discover_split(split_dir: str | Path, split: str = "") -> list[Sample]:
    """All labelled images of one folder holding NORMAL/ and PNEUMONIA/."""
    split_dir = Path(split_dir)
    class_dirs = _class_dirs(split_dir)
    if not class_dirs:
        raise FileNotFoundError(
            f"{split_dir}: expected class folders {' and '.join(CLASSES)} inside it"
        )
    samples = []
    for label, folder in sorted(class_dirs.items()):
        for path in _image_files(folder):
            samples.append(Sample(path=path, label=label, patient=patient_id(path.name), split=split))
    return samples


def discover_root(data_root: str | Path) -> dict[str, list[Sample]]:
    """Every official split present under DATA_ROOT ({train,val,test}/{NORMAL,PNEUMONIA})."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"{data_root}: no such data folder")
    splits = {}
    for split in SPLIT_NAMES:
        if _class_dirs(data_root / split):
            splits[split] = discover_split(data_root / split, split)
    if not splits:
        raise FileNotFoundError(
            f"{data_root}: expected split folders ({', '.join(SPLIT_NAMES)}) "
            f"each holding {' and '.join(CLASSES)}"
        )
    return splits

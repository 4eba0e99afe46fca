"""Find images in the Kermany/Kaggle layout and read patient ids from file names."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from pneumoscope.data.decode import IMAGE_SUFFIXES
from pneumoscope.errors import DataError, MissingFileError
from pneumoscope.tasks import CLASSES

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


def kermany_named(file_name: str) -> bool:
    """True for a file named the way the Kermany et al. 2018 chest X-ray set names its
    films (personN_bacteria_M, personN_virus_M, IM-NNNN-..., NORMAL2-IM-NNNN-...)."""
    stem = Path(file_name).stem
    return any(pattern.match(stem) for pattern in (_PERSON, _IM))


def real_path(path: str | Path) -> str:
    """The path with symlinks resolved, for telling whether two names are one file; a
    symlink loop or an unreadable link keeps its absolute path (no error here: the decode
    names what is wrong with the file)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return os.path.abspath(path)


PATH_COLUMNS = ("path", "file", "file_name", "filename")
PATIENT_COLUMNS = ("patient", "patient_id")


class PatientMap:
    """Patient ids from a CSV (--patients FILE.csv), for data not named the Kermany way.

    Columns: `path` (or `file`/`file_name`) and `patient` (or `patient_id`). An entry with
    a folder part is a path (relative ones relative to the CSV's folder) and matches that
    file; a bare file name matches every file of that name. Rows naming files that are
    not in the data are ignored (one CSV may cover a larger collection); an image the CSV
    does not name is an error, since guessing would put a patient's films on both sides."""

    def __init__(self, csv_path: str | Path):
        self.source = Path(csv_path)
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, str] = {}
        for line, key, patient in self._rows():
            if "/" in key or os.sep in key:
                self.by_path[real_path(self.source.parent / key)] = patient
            elif self.by_name.setdefault(key, patient) != patient:
                raise DataError(
                    f"{self.source}, line {line}: file name {key!r} is given two patients "
                    f"({self.by_name[key]!r} and {patient!r}); use paths to tell the files apart"
                )

    def _rows(self):
        try:
            with open(self.source, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                columns = {c.strip().lower(): c for c in reader.fieldnames or []}
                path_col = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
                patient_col = next((columns[c] for c in PATIENT_COLUMNS if c in columns), None)
                if path_col is None or patient_col is None:
                    raise DataError(
                        f"{self.source}: needs a column {' or '.join(PATH_COLUMNS)} and a column "
                        f"{' or '.join(PATIENT_COLUMNS)}; found {reader.fieldnames}"
                    )
                for line, row in enumerate(reader, start=2):
                    key, patient = (
                        (row.get(path_col) or "").strip(),
                        (row.get(patient_col) or "").strip(),
                    )
                    if not key or not patient:
                        raise DataError(f"{self.source}, line {line}: empty file or patient")
                    yield line, key, patient
        except OSError as err:
            raise DataError(
                f"{self.source}: cannot read the patients CSV ({err.strerror or err})"
            ) from err

    def get(self, path: Path) -> str | None:
        return self.by_path.get(real_path(path)) or self.by_name.get(Path(path).name)

    def patients_of(self, paths: list[Path]) -> list[str]:
        """The patient of each path; an error naming the files the CSV lacks."""
        found = [self.get(p) for p in paths]
        missing = [str(p) for p, patient in zip(paths, found) if patient is None]
        if missing:
            shown = "\n".join(f"  {m}" for m in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(
                f"{self.source}: no patient for {len(missing)} of {len(paths)} images:\n"
                f"{shown}{more}"
            )
        return found

    def assign(self, samples: list[Sample]) -> list[Sample]:
        """The samples with the CSV's patient ids (an error if the CSV lacks one)."""
        ids = self.patients_of([s.path for s in samples])
        return [replace(s, patient=p) for s, p in zip(samples, ids)]


def load_patients(csv_path: str | Path | None) -> PatientMap | None:
    """The --patients CSV, or None (patient ids from Kermany file names)."""
    return PatientMap(csv_path) if csv_path else None


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


def discover_split(
    split_dir: str | Path, split: str = "", patients: PatientMap | None = None
) -> list[Sample]:
    """All labelled images of one folder holding NORMAL/ and PNEUMONIA/; patient ids from
    the file names, or from `patients` (a --patients CSV) when given."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise MissingFileError(
            f"{split_dir}: {'not a folder' if split_dir.exists() else 'no such folder'}"
        )
    class_dirs = _class_dirs(split_dir)
    if not class_dirs:
        raise MissingFileError(
            f"{split_dir}: expected class folders {' and '.join(CLASSES)} inside it"
        )
    samples = []
    for label, folder in sorted(class_dirs.items()):
        for path in _image_files(folder):
            samples.append(
                Sample(path=path, label=label, patient=patient_id(path.name), split=split)
            )
    return patients.assign(samples) if patients else samples


def discover_root(
    data_root: str | Path, patients: PatientMap | None = None
) -> dict[str, list[Sample]]:
    """Every official split present under DATA_ROOT ({train,val,test}/{NORMAL,PNEUMONIA})."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise MissingFileError(f"{data_root}: no such data folder")
    splits = {}
    for split in SPLIT_NAMES:
        if _class_dirs(data_root / split):
            splits[split] = discover_split(data_root / split, split, patients)
    if not splits:
        raise MissingFileError(
            f"{data_root}: expected split folders ({', '.join(SPLIT_NAMES)}) "
            f"each holding {' and '.join(CLASSES)}"
        )
    return splits

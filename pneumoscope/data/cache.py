"""Decode a list of samples once into one uint8 array (N, S, S), and keep the decoded
images on disk so the next run does not decode them again.

Decoding JPEGs (or full-size DICOMs) is the slow part of reading the data on a CPU.
Each file's bytes are read and hashed (sha1); a decoded image is stored under that hash
and the model size, in memory-mapped uint8 shards of the persistent cache
(pneumoscope.data.diskcache). A file whose content changed has another hash, so it is
decoded again; a shard that is damaged fails its digest and its images are decoded
again. The decode code itself is part of the key (a hash of decode.py, dicom.py and
problems.py: every line a file goes through), so a change of the preprocessing contract
never meets stale images.

Unreadable files are collected, named and left out, never fatal mid-run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pneumoscope.data import decode as _decode
from pneumoscope.data import dicom as _dicom
from pneumoscope.data import problems as _problems
from pneumoscope.data.decode import ImageDecodeError, load_image, read_bytes
from pneumoscope.data.discover import Sample
from pneumoscope.data.diskcache import read_array, read_meta, resolve_cache_dir, write_array
from pneumoscope.errors import UserError

log = logging.getLogger(__name__)


class UnreadableImagesError(UserError, RuntimeError):
    """Raised in --strict mode before any work is done."""


@dataclass
class DecodedSet:
    images: np.ndarray  # uint8 (N, S, S)
    samples: list[Sample]  # the readable samples, aligned with images
    failures: list[tuple[str, str]]  # (path, problem) of the files left out
    keys: list[str] = field(default_factory=list)  # sha1 of each kept file's bytes

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


# The decode code: decode.py, its DICOM path and what both share.
DECODE_MODULES = (_decode, _dicom, _problems)
# Versions of earlier decode code that decodes exactly as this one (a move, not a change):
# --resume accepts a run started under them. 4a59535bfbf2: decode.py of 2026-12-07,
# before the DICOM path moved into dicom.py and the code was formatted by ruff.
SAME_DECODE = ("4a59535bfbf2",)


@lru_cache(maxsize=1)
def decode_version() -> str:
    """A hash of the decode code: images decoded by other code are other entries."""
    return code_version(Path(m.__file__) for m in DECODE_MODULES)


def code_version(paths) -> str:
    """The first 12 hex digits of the sha1 of the files' bytes, in order."""
    digest = hashlib.sha1()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def same_decode(version: str | None) -> bool:
    """Whether images decoded under `version` are what this decode gives."""
    return version == decode_version() or version in SAME_DECODE


class DecodeStore:
    """Decoded images of one size, keyed by the sha1 of the file's bytes, in shards.

    A shard is written once (atomically, with a digest) and never changed; a newer
    shard's entry shadows an older one. Several processes may add shards at once."""

    def __init__(self, root: Path, size: int):
        self.size = size
        self.folder = Path(root) / "decoded" / f"s{size}-{decode_version()}"
        self.index: dict[str, tuple[Path, int]] = {}
        for side in sorted(self.folder.glob("shard-*.json")):  # names sort by creation time
            path = side.with_suffix(".npy")
            meta = read_meta(path)
            if meta and meta.get("size") == size:
                self.index.update(
                    (key, (path, row)) for row, key in enumerate(meta.get("keys", []))
                )
        self._shards: dict[Path, np.ndarray | None] = {}
        self._lock = threading.Lock()  # get() runs in the decode threads

    def get(self, key: str) -> np.ndarray | None:
        """The stored image of key, or None (also when its shard turns out to be broken)."""
        where = self.index.get(key)
        if where is None:
            return None
        path, row = where
        with self._lock:
            if path not in self._shards:  # verified once, on first use
                found = read_array(path)
                self._shards[path] = found[0] if found else None
            shard = self._shards[path]
        if shard is None or row >= len(shard):
            return None
        return np.asarray(shard[row])

    def add(self, keys: list[str], images: np.ndarray) -> None:
        if not keys:
            return
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        write_array(self.folder / name, images, {"keys": keys, "size": self.size})


def open_store(cache_dir, size: int) -> DecodeStore | None:
    """The store, or None when caching is off or the folder cannot be used."""
    root = resolve_cache_dir(cache_dir)
    if root is None:
        return None
    try:
        return DecodeStore(root, size)
    except OSError as err:
        log.warning("decode cache %s unusable (%s); decoding without it", root, err)
        return None


def _read_and_decode(sample: Sample, size: int, store: DecodeStore | None):
    """(key, image, problem) for one file: the stored image when its content is known."""
    try:
        data = read_bytes(sample.path)
        key = hashlib.sha1(data).hexdigest()
        image = store.get(key) if store else None
        if image is not None:
            return key, image, None, True
        return key, load_image(data, size, name=str(sample.path)), None, False
    except ImageDecodeError as err:
        return None, None, err.problem, False
    except OSError as err:
        return None, None, f"cannot read: {err.strerror or err}", False


def decode_samples(
    samples: list[Sample],
    size: int,
    *,
    strict: bool = False,
    desc: str = "decode",
    show_progress: bool = True,
    workers: int = 2,
    report: bool = True,
    cache_dir: str | Path | None | bool = None,
) -> DecodedSet:
    """Every readable sample as uint8 (size, size), through the persistent decode cache.

    report=False: leave the warning (or the --strict stop) to the caller, so a run
    that decodes several sets names all their unreadable files in one warning.
    cache_dir: the cache folder (None: the default one; False: no persistent cache)."""
    store = open_store(cache_dir, size)
    images = np.empty((len(samples), size, size), dtype=np.uint8)
    kept, keys, failures, new_rows = [], [], [], []
    # PIL and hashlib release the GIL, so threads overlap the reading and decoding.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: _read_and_decode(s, size, store), samples)
        for sample, (key, image, problem, hit) in tqdm(
            zip(samples, results),
            total=len(samples),
            desc=desc,
            unit="img",
            disable=not show_progress,
        ):
            if problem is not None:
                failures.append((str(sample.path), problem))
                continue
            if not hit:
                new_rows.append(len(kept))
            images[len(kept)] = image
            kept.append(sample)
            keys.append(key)
    if store is not None and new_rows:
        _store_new(store, [keys[i] for i in new_rows], images[new_rows])
    if report:
        report_failures(failures, strict)
    return DecodedSet(images=images[: len(kept)], samples=kept, failures=failures, keys=keys)


def _store_new(store: DecodeStore, keys: list[str], images: np.ndarray) -> None:
    unique = dict(zip(keys, range(len(keys))))  # one copy of duplicate files
    try:
        store.add(list(unique), images[list(unique.values())])
    except OSError as err:  # a full or read-only disk costs speed, never the run
        log.warning("could not write the decode cache in %s: %s", store.folder, err)


def report_failures(failures: list[tuple[str, str]], strict: bool) -> None:
    """One warning naming every unreadable file (or stop, in strict mode)."""
    if not failures:
        return
    listing = "\n".join(f"  {path}: {problem}" for path, problem in failures)
    if strict:
        raise UnreadableImagesError(f"{len(failures)} unreadable file(s) (--strict):\n{listing}")
    log.warning("skipping %d unreadable file(s):\n%s", len(failures), listing)


def require_both_classes(sets: dict[str, DecodedSet]) -> None:
    """Stop before any epoch when unreadable files took a whole class out of a split:
    without both classes there is no loss balance, ROC AUC or threshold to choose."""
    from pneumoscope.tasks import CLASSES

    for role, data in sets.items():
        counts = np.bincount(data.labels, minlength=len(CLASSES))
        missing = [CLASSES[i] for i, n in enumerate(counts) if n == 0]
        if missing:
            raise UnreadableImagesError(
                f"the {role} split has no readable {' or '.join(missing)} image "
                f"({len(data.failures)} of its files are unreadable); see `pneumoscope audit DATA_ROOT`"
            )

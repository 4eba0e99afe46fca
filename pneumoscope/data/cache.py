"""Decode a list of samples once into one uint8 array (N, S, S).

Decoding JPEGs is the slow part of a CPU epoch; doing it once per run (not once per
epoch) and holding the result as uint8 keeps an epoch's input cost near zero.
Unreadable files are collected, named and left out, never fatal mid-run.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pneumoscope.data.decode import ImageDecodeError, load_image
from pneumoscope.data.discover import Sample

log = logging.getLogger(__name__)


class UnreadableImagesError(RuntimeError):
    """Raised in --strict mode before any work is done."""


@dataclass
class DecodedSet:
    images: np.ndarray  # uint8 (N, S, S)
    samples: list[Sample]  # the readable samples, aligned with images
    failures: list[tuple[str, str]]  # (path, problem) of the files left out

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def _decode_one(sample: Sample, size: int):
    try:
        return load_image(sample.path, size), None
    except ImageDecodeError as err:
        return None, err.problem
    except OSError as err:
        return None, f"cannot read: {err.strerror or err}"


def decode_samples(
    samples: list[Sample], size: int, *, strict: bool = False, desc: str = "decode",
    show_progress: bool = True, workers: int = 2,
) -> DecodedSet:
    images = np.empty((len(samples), size, size), dtype=np.uint8)
    kept, failures = [], []
    # PIL releases the GIL while decoding, so threads overlap the JPEG work.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: _decode_one(s, size), samples)
        for sample, (image, problem) in tqdm(
            zip(samples, results), total=len(samples), desc=desc, unit="img", disable=not show_progress
        ):
            if problem is not None:
                failures.append((str(sample.path), problem))
                continue
            images[len(kept)] = image
            kept.append(sample)
    report_failures(failures, strict)
    return DecodedSet(images=images[: len(kept)], samples=kept, failures=failures)


def report_failures(failures: list[tuple[str, str]], strict: bool) -> None:
    """One warning naming every unreadable file (or stop, in strict mode)."""
    if not failures:
        return
    listing = "\n".join(f"  {path}: {problem}" for path, problem in failures)
    if strict:
        raise UnreadableImagesError(f"{len(failures)} unreadable file(s) (--strict):\n{listing}")
    log.warning("skipping %d unreadable file(s):\n%s", len(failures), listing)

"""Decode batches of files in worker processes while the model scores the previous ones.

``decoded_batches`` yields ``(kept paths, uint8 images (n, S, S), failures)`` batch by
batch, in the order of the paths, with at most a few batches in flight: memory stays
flat however many files there are. The workers are started by a fork server and import
only this module and the decode (no torch, no onnxruntime: forking the scoring process,
its threads mid-flight, is not safe). A file that cannot be read is a failure
``(path, problem)`` of its batch, never the end of the run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pneumoscope.data.decode import ImageDecodeError, load_image

Batch = tuple[list[str], np.ndarray, list[tuple[str, str]]]


def default_workers() -> int:
    """Decode processes: the cores, at most 4 (they wait, not spin, when ahead of the model)."""
    return max(1, min(4, os.cpu_count() or 1))


def decode_batch(paths: list[str], size: int, reduced: bool) -> Batch:
    """One batch through the shared decode; unreadable files are named with their problem."""
    kept, images, failures = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, size, reduced=reduced))
            kept.append(path)
        except (ImageDecodeError, OSError) as err:
            failures.append((path, getattr(err, "problem", None) or str(err)))
    stack = np.stack(images) if images else np.empty((0, size, size), np.uint8)
    return kept, stack, failures


def chunks(paths: list[str], batch_size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), batch_size):
        yield paths[start : start + batch_size]


def decoded_batches(
    paths: list[str], size: int, batch_size: int, workers: int | None = None, reduced: bool = False
) -> Iterator[Batch]:
    """The batches of `paths` decoded, in order. workers 0 (or a single batch): in this
    process; else that many processes (None: default_workers()), 2 batches each in flight."""
    workers = default_workers() if workers is None else workers
    if workers <= 0 or len(paths) <= batch_size:
        for batch in chunks(paths, batch_size):
            yield decode_batch(batch, size, reduced)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending = deque()
        for batch in chunks(paths, batch_size):
            pending.append(pool.submit(decode_batch, batch, size, reduced))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

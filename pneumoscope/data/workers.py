"""Decode batches of files in worker processes while the model scores the previous ones.

``decoded_batches`` yields ``(kept paths, uint8 images (n, S, S), failures)`` batch by
batch, in the order of the paths, with at most a few batches in flight: memory stays
flat however many files there are. The workers are started by a fork server and import
only this module and the decode (no torch, no onnxruntime: forking the scoring process,
its threads mid-flight, is not safe). A file that cannot be read is a failure
``(path, problem)`` of its batch, never the end of the run; nor is a worker that dies (a
decoder crash, the kernel's OOM killer): its batch is decoded again one file per fresh
worker, the file that kills one of them is a failure, and the other batches go on in a
new pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from pneumoscope.data.decode import ImageDecodeError, load_image

Batch = tuple[list[str], np.ndarray, list[tuple[str, str]]]

log = logging.getLogger(__name__)


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
    paths: list[str],
    size: int,
    batch_size: int,
    workers: int | None = None,
    reduced: bool = False,
) -> Iterator[Batch]:
    """The batches of `paths` decoded, in order. workers 0 (or a single batch): in this
    process; else that many processes (None: default_workers()), 2 batches each in flight."""
    workers = default_workers() if workers is None else workers
    if workers <= 0 or len(paths) <= batch_size:
        for batch in chunks(paths, batch_size):
            yield decode_batch(batch, size, reduced)
        return
    decoding = Pipeline(workers, size, reduced)
    try:
        for batch in chunks(paths, batch_size):
            decoding.submit(batch)
            if len(decoding.pending) >= 2 * workers:
                yield decoding.next_result()
        while decoding.pending:
            yield decoding.next_result()
    finally:
        decoding.pool.shutdown(cancel_futures=True)


def new_pool(workers: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=context)


class Pipeline:
    """The batches in flight, in order, on a pool that is replaced when a worker dies (a
    dead worker breaks the whole pool: every unfinished batch is submitted again)."""

    def __init__(self, workers: int, size: int, reduced: bool):
        self.workers, self.size, self.reduced = workers, size, reduced
        self.pool = new_pool(workers)
        self.pending: deque = deque()  # (paths, future)

    def submit(self, batch: list[str]) -> None:
        try:
            future = self.pool.submit(decode_batch, batch, self.size, self.reduced)
        except BrokenProcessPool:
            self.restart()
            future = self.pool.submit(decode_batch, batch, self.size, self.reduced)
        self.pending.append((batch, future))

    def next_result(self) -> Batch:
        """The first batch decoded; if its worker died, decoded again one file per worker."""
        batch, future = self.pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            self.pool.shutdown(cancel_futures=True)
            result = decode_isolated(batch, self.size, self.reduced)
            self.restart()
            return result

    def restart(self) -> None:
        log.warning("a decode worker died; the batches in flight are decoded again in a new pool")
        self.pool.shutdown(cancel_futures=True)
        self.pool = new_pool(self.workers)
        for i, (paths, future) in enumerate(self.pending):
            finished = future.done() and not future.cancelled() and future.exception() is None
            if not finished:
                self.pending[i] = (
                    paths,
                    self.pool.submit(decode_batch, paths, self.size, self.reduced),
                )


def decode_isolated(paths: list[str], size: int, reduced: bool) -> Batch:
    """A batch that killed its worker, each file in a worker of its own: the file whose
    worker dies too is named as a failure, the others decode as usual."""
    kept, images, failures = [], [], []
    for path in paths:
        with new_pool(1) as solo:
            try:
                one_kept, one_image, one_failure = solo.submit(
                    decode_batch, [path], size, reduced
                ).result()
            except BrokenProcessPool:
                one_kept, one_image = [], np.empty((0, size, size), np.uint8)
                one_failure = [
                    (path, "the decoder's process died on this file (crash or out of memory)")
                ]
        kept += one_kept
        images += list(one_image)
        failures += one_failure
    stack = np.stack(images) if images else np.empty((0, size, size), np.uint8)
    return kept, stack, failures

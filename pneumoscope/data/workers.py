"""Decode batches of files in worker processes while the model scores the previous ones.

``decoded_batches`` yields ``(kept paths, uint8 images (n, S, S), failures)`` batch by
batch, in the order of the paths, with at most a few batches in flight: memory stays
flat however many files there are. The workers are started by a fork server and import
only this module and the decode (no torch, no onnxruntime: forking the scoring process,
its threads mid-flight, is not safe). A file that cannot be read is a failure
``(path, problem)`` of its batch, never the end of the run; nor is a worker that dies (a
decoder crash, the kernel's OOM killer): the batches in flight go on in a new pool, a
batch that breaks a second pool is decoded one file per worker, and the file that kills
its own worker is a failure. (A run of one batch or less decodes in this process, with
no worker to lose.)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from pneumoscope.data.decode import ImageDecodeError, load_image

Batch = tuple[list[str], np.ndarray, list[tuple[str, str]]]
# What a process pool raises when a worker died, or a new one could not be started while
# another was dying (decode_batch itself never raises them: it names unreadable files).
POOL_FAILURES = (BrokenProcessPool, EOFError, OSError)

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
    return kept, stacked(images, size), failures


def stacked(images: list[np.ndarray], size: int) -> np.ndarray:
    """A batch's images as uint8 (n, size, size), n possibly 0."""
    return np.stack(images) if images else np.empty((0, size, size), np.uint8)


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
    finally:  # a pool that broke unnoticed (the consumer stopped) must not be waited for
        if decoding.pool._broken:  # noqa: SLF001
            close_broken(decoding.pool)
        else:
            decoding.pool.shutdown(cancel_futures=True)


def new_pool(workers: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=context)


class Pipeline:
    """The batches in flight, in order, on a pool that is replaced when a worker dies (a
    dead worker breaks the whole pool and every unfinished batch with it)."""

    def __init__(self, workers: int, size: int, reduced: bool):
        self.workers, self.size, self.reduced = workers, size, reduced
        self.pool = new_pool(workers)
        self.pending: deque = deque()  # [paths, future, tries]

    def start(self, paths: list[str]) -> Future:
        """The batch's future; a pool already broken gives a future that says so (the
        batch is then handled when its turn comes, never lost here)."""
        try:
            return self.pool.submit(decode_batch, paths, self.size, self.reduced)
        except POOL_FAILURES as err:
            future = Future()
            future.set_exception(err)
            return future

    def submit(self, batch: list[str]) -> None:
        self.pending.append([batch, self.start(batch), 0])

    def next_result(self) -> Batch:
        """The first batch decoded. A batch whose pool broke is tried once more in a new
        pool (the worker that died may have held another batch); if it breaks that one
        too, each of its files is decoded in a worker of its own."""
        while True:
            batch, future, tries = self.pending[0]
            try:
                result = future.result()
            except POOL_FAILURES:
                if tries == 0:
                    self.pending[0][2] = 1
                    self.restart()  # this batch too
                    continue
                self.pending.popleft()
                self.restart()
                return decode_isolated(batch, self.size, self.reduced)
            self.pending.popleft()
            return result

    def restart(self) -> None:
        """A new pool, and every batch not yet decoded (or whose pool broke) started on it."""
        log.warning("a decode worker died; the batches in flight are decoded again in a new pool")
        close_broken(self.pool)
        self.pool = new_pool(self.workers)
        for item in self.pending:
            future = item[1]
            if not (future.done() and not future.cancelled() and future.exception() is None):
                item[1] = self.start(item[0])


def close_broken(pool: ProcessPoolExecutor) -> None:
    """Shut a broken pool down without waiting for it: its manager thread joins every
    worker, and one still starting up may never be joined (the run would hang), so they
    are killed."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001 - no public handle
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            if process.is_alive():  # polls first: a reaped worker's pid may be another's now
                process.kill()
        except (OSError, ValueError, AttributeError, AssertionError):  # gone, or never started
            pass


def decode_isolated(paths: list[str], size: int, reduced: bool) -> Batch:
    """A batch that broke two pools, each file in a worker of its own: the file whose
    worker dies twice is named as a failure, the others decode as usual."""
    kept, images, failures = [], [], []
    for path in paths:
        one = decode_alone(path, size, reduced) or decode_alone(path, size, reduced)
        if one is None:
            one = (
                [],
                stacked([], size),
                [(path, "the decoder's process died on this file (crash or out of memory)")],
            )
        kept += one[0]
        images += list(one[1])
        failures += one[2]
    return kept, stacked(images, size), failures


def decode_alone(path: str, size: int, reduced: bool) -> Batch | None:
    """One file in a pool of one worker; None when that worker died on it. A worker that
    could not be started three times is the machine's problem (no processes, no file handles),
    not the file's: that error goes up instead of naming the film."""
    for attempt in (1, 2, 3):
        solo = new_pool(1)
        try:
            future = solo.submit(decode_batch, [path], size, reduced)
        except (OSError, EOFError):  # the fork server itself may have gone with a killed worker
            close_broken(solo)
            if attempt == 3:
                raise
            time.sleep(0.2 * attempt)  # it is started again on the next try
            continue
        try:
            result = future.result()
        except POOL_FAILURES:
            close_broken(solo)
            return None
        except BaseException:
            close_broken(solo)
            raise
        solo.shutdown()
        return result
    return None

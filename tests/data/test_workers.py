"""Decode workers (pneumoscope/data/workers.py): batches come back in order and equal to
the in-process decode, and a worker process that dies (killed as the kernel's OOM killer
would) loses no film: the pool is replaced and the batches in flight are decoded again.

On real films of the embedded sample; the workers are real processes, killed for real.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np

from pneumoscope.data.workers import decoded_batches

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def sample_films(n: int = 40) -> list[str]:
    files = sorted(str(p) for p in SAMPLE.rglob("*.jpeg"))
    assert len(files) >= n, f"the embedded sample is missing: {SAMPLE}"
    return files[:n]


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def kill_pool_workers() -> int:
    """SIGKILL the decode workers: the children of this process's children (the
    forkserver's forks). Returns how many were killed."""
    killed = 0
    for child in children_of(os.getpid()):
        for worker in children_of(child):
            os.kill(worker, signal.SIGKILL)
            killed += 1
    return killed


def same_batches(got, want) -> None:
    assert [kept for kept, _, _ in got] == [kept for kept, _, _ in want]
    assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(got, want, strict=True))
    assert [f for _, _, f in got] == [f for _, _, f in want] == [[]] * len(want)


def test_workers_give_the_in_process_batches_in_order():
    films = sample_films()
    same_batches(
        list(decoded_batches(films, 48, 6, workers=2)),
        list(decoded_batches(films, 48, 6, workers=0)),
    )


def test_a_killed_worker_loses_no_film(caplog):
    films = sample_films()
    want = list(decoded_batches(films, 48, 5, workers=0))
    batches = decoded_batches(films, 48, 5, workers=2)
    got = [next(batches)]  # the pool is up, more batches in flight
    time.sleep(0.2)
    assert kill_pool_workers() > 0  # real worker processes were there to kill
    with caplog.at_level(logging.WARNING):
        got += list(batches)
    assert "a decode worker died" in caplog.text  # the pool broke and was replaced
    same_batches(got, want)

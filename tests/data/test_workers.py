"""Decode workers (pneumoscope/data/workers.py): batches come back in order and equal to
the in-process decode, and a worker process that dies (killed as the kernel's OOM killer
would) loses no film: the pool is replaced and the batches in flight are decoded again.

On real films of the embedded sample; the workers are real processes, killed for real.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.data.workers import decoded_batches

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def sample_films(n: int = 40) -> list[str]:
    files = sorted(str(p) for p in SAMPLE.rglob("*.jpeg"))
    assert len(files) >= n, f"the embedded sample is missing: {SAMPLE}"
    return files[:n]


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def kill_pool_workers() -> int:
    """SIGKILL the decode workers: the children of this process's children (the
    forkserver's forks). Returns how many were killed."""
    killed = 0
    for child in children_of(os.getpid()):
        for worker in children_of(child):
            try:
                os.kill(worker, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
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


@pytest.mark.slow  # subprocesses whose workers are killed
@pytest.mark.parametrize("batch_size, workers", [(1, 4), (4, 2)])
def test_a_file_that_kills_its_worker_is_a_failure_and_no_film_is_lost(
    tmp_path, batch_size, workers
):
    # every other file kills the worker that decodes it: batches of one on four workers break
    # each new pool while it starts (a stress no archive meets), batches of four break it
    # with good films inside. The run must end, and every file be scored or named.
    films = sample_films(12)
    folder = tmp_path / "films"
    folder.mkdir()
    for i, film in enumerate(films):
        shutil.copy(film, folder / f"{i:02d}a.jpeg")
        shutil.copy(film, folder / f"{i:02d}b_BOOM.jpeg")
    script = Path(__file__).with_name("decode_crash_run.py")
    done = subprocess.run(
        [sys.executable, str(script), str(folder), str(batch_size), str(workers)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    good = sorted(str(p) for p in folder.glob("*a.jpeg"))
    failed = [path for path, _ in result["failures"]]
    assert sorted(result["kept"] + failed) == sorted(str(p) for p in folder.iterdir())  # each once
    assert set(str(p) for p in folder.glob("*BOOM.jpeg")) <= set(failed)
    assert all("process died" in problem for _, problem in result["failures"])
    assert result["kept"] == [p for p in good if p in result["kept"]]  # in order
    if batch_size > 1:  # a pool broken now and then: every good film comes back
        assert result["kept"] == good

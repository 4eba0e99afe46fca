"""Run by tests/data/test_workers.py in a fresh interpreter (its own fork server): decode
files through pneumoscope.data.workers with a decode that kills its worker process on
every file whose name holds "BOOM", as a decoder crash or the OOM killer would.

    python decode_crash_run.py FOLDER BATCH_SIZE WORKERS   ->  JSON {kept, failures}
"""

import json
import os
import signal
import sys
from pathlib import Path

from pneumoscope.data import workers
from pneumoscope.data.workers import decode_batch as real_decode_batch


def decode_or_die(paths, size, reduced):
    """The real decode, but a file named BOOM kills the worker that meets it."""
    if any("BOOM" in Path(p).name for p in paths):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_decode_batch(paths, size, reduced)


if __name__ == "__main__":
    folder, batch_size, n_workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    workers.decode_batch = decode_or_die  # the pool's workers import this script's function
    files = sorted(str(p) for p in folder.iterdir())
    kept, failures = [], []
    for batch_kept, images, batch_failures in workers.decoded_batches(
        files, 32, batch_size, workers=n_workers
    ):
        assert len(images) == len(batch_kept)
        kept += batch_kept
        failures += batch_failures
    print(json.dumps({"kept": kept, "failures": failures}))

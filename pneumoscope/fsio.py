"""Files written whole or not at all, with the mode a plain open() would give them.

Torch-free on purpose: the data download and the disk cache write files before (or
without) torch, and every result of every verb goes through atomic_write_*.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The umask; on Linux read from /proc, which states it without changing it (no window
    in which another thread would create files under a temporary mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """0666 less the umask (0644 under the usual 022): the mode open() gives a new file.
    mkstemp's temporary files are 0600, which a renamed result must not keep."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """0777 less the umask: the mode mkdir() gives a new folder (mkdtemp's is 0700)."""
    return 0o777 & ~current_umask()


def atomic_write_with(path: str | Path, write) -> None:
    """write(handle) into a temporary file beside path, flush, fsync, rename over path
    (with the mode a plain open() would have given it). A kill never leaves a half-written
    file that a later run trusts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_with(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class CsvWriter:
    """csv.writer with lines ending in "\n" that also quotes a field holding "\r": the csv
    module quotes only the characters of its line terminator, so a path with a carriage
    return would split its row for every reader."""

    def __init__(self, handle):
        self.minimal = csv.writer(handle, lineterminator="\n")
        self.quoted = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row) -> None:
        row = list(row)
        carriage = any(isinstance(v, str) and "\r" in v for v in row)
        (self.quoted if carriage else self.minimal).writerow(row)

    def writerows(self, rows) -> None:
        for row in rows:
            self.writerow(row)


def atomic_write_csv(path: str | Path, header: list[str], rows) -> None:
    buffer = io.StringIO()
    writer = CsvWriter(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), read in 1 MiB blocks: what ties a contract, an ensemble
    or an adapted run to the very weights file it names."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

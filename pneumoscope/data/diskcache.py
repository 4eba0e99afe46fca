"""The persistent cache on disk: where it lives, and arrays stored so that a partial or
corrupted file is never trusted.

An entry is two files: ``NAME.npy`` (opened memory-mapped) and ``NAME.json`` (shape,
dtype, a blake2b digest of the array's bytes, and the caller's metadata). Both are
written to a temporary name, fsynced and renamed, the sidecar last, so a reader that
finds the sidecar finds a complete array; the digest catches later damage. A broken
entry is removed and reported as missing, so the caller rebuilds it.

The cache directory is ``--cache-dir``, else ``$PNEUMOSCOPE_CACHE``, else
``$XDG_CACHE_HOME/pneumoscope`` (``~/.cache/pneumoscope``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from pneumoscope.fsio import atomic_write_with

log = logging.getLogger(__name__)

CACHE_ENV = "PNEUMOSCOPE_CACHE"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pneumoscope"


def resolve_cache_dir(cache_dir: str | Path | None | bool) -> Path | None:
    """None/True: the default location; False: no persistent cache; else that folder."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True or cache_dir == "":
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def array_digest(array: np.ndarray) -> str:
    data = np.ascontiguousarray(array)
    return hashlib.blake2b(memoryview(data.reshape(-1).view(np.uint8)), digest_size=16).hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_array(path: str | Path, array: np.ndarray, meta: dict | None = None) -> None:
    """Store array at path (.npy) with its sidecar; both atomic, the sidecar last."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    info = {
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "digest": array_digest(array),
        **(meta or {}),
    }
    atomic_write_with(path, lambda handle: np.save(handle, array, allow_pickle=False))
    atomic_write_with(sidecar(path), lambda handle: handle.write(json.dumps(info).encode()))


def read_meta(path: str | Path) -> dict | None:
    """The sidecar of an entry, or None when absent or unreadable (then it is removed)."""
    side = sidecar(Path(path))
    try:
        return json.loads(side.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        _discard(Path(path), f"unreadable sidecar ({err})")
        return None


def read_array(path: str | Path, *, verify: bool = True) -> tuple[np.ndarray, dict] | None:
    """(memory-mapped array, metadata), or None when the entry is missing or broken."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        _discard(path, f"unreadable array ({err})")
        return None
    if list(array.shape) != meta.get("shape") or array.dtype.str != meta.get("dtype"):
        _discard(path, f"shape/dtype {array.shape} {array.dtype} differ from its sidecar")
        return None
    if verify and array_digest(array) != meta.get("digest"):
        _discard(path, "content does not match its digest")
        return None
    touch(path)
    return array, meta


def touch(path: Path) -> None:
    """Mark an entry as used now (prune() drops the least recently used first)."""
    try:
        os.utime(sidecar(path))
    except OSError:
        pass


def _discard(path: Path, why: str) -> None:
    log.warning("cache entry %s is broken (%s); rebuilding it", path, why)
    for p in (sidecar(path), path):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def prune(folder: str | Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used entries of folder until it holds <= max_bytes."""
    entries = []
    for side in Path(folder).glob("*.json"):
        array = side.with_suffix(".npy")
        try:
            entries.append(
                (side.stat().st_mtime, array.stat().st_size + side.stat().st_size, array)
            )
        except OSError:
            continue
    total, removed = sum(e[1] for e in entries), []
    for _, size, array in sorted(entries):
        if total <= max_bytes:
            break
        for p in (sidecar(array), array):
            p.unlink(missing_ok=True)
        total -= size
        removed.append(array)
    return removed

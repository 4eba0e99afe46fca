"""The process umask, read without torch (data download runs before torch is installed)."""

from __future__ import annotations

import os
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

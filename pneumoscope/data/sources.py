"""Where the images a verb scores come from: paths and folders given on a command line, or
uint8 arrays handed over in Python (through the same decode as a file, as a lossless PNG).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pneumoscope.data.decode import IMAGE_SUFFIXES
from pneumoscope.errors import DataError, NothingScoredError


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            # not is_dir() rather than is_file(): a symlink loop or a FIFO named like an
            # image is named in the unreadable-files warning, not dropped silently.
            files += sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
            )
        else:
            files.append(path)
    return files


def require_image_files(files: list[Path], given: list[str | Path]) -> None:
    """Stop when the paths given hold no image file at all (an empty folder)."""
    if not files:
        raise NothingScoredError(
            f"nothing scored: no image files ({', '.join(IMAGE_SUFFIXES)}) in "
            + ", ".join(str(p) for p in given)
        )


def require_some_readable(n_read: int, failures: list[tuple[str, str]]) -> None:
    """Stop, in one line, when every file was unreadable (a missing path included): with
    or without --strict, nothing scored is an error, not an empty CSV."""
    if n_read == 0 and failures:
        path, problem = failures[0]
        more = f" (and {len(failures) - 1} more unreadable file(s))" if len(failures) > 1 else ""
        raise NothingScoredError(f"nothing scored: {path}: {problem}{more}")


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 (H, W, 3) or gray uint8 (H, W) array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def array_png(image: np.ndarray) -> bytes:
    """A uint8 gray (H, W) or RGB (H, W, 3) array as PNG bytes; anything else is refused."""
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))
    ):
        raise DataError(
            f"expected a uint8 image array (H, W) or (H, W, 3), got {image.dtype} {image.shape}"
        )
    return png_bytes(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)

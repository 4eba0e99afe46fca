"""What makes a file undecodable, shared by the PIL and the DICOM paths of data.decode:
the size limit and the problem a decoder raises (decode_gray words it as an
ImageDecodeError that names the file)."""

from __future__ import annotations

# Largest image we agree to decode (width * height). A 60 MP grayscale image is far
# beyond any chest radiograph (~3000 x 3000 px) yet still bounded in memory
# (~0.5 GB as float64 on the DICOM path).
MAX_PIXELS = 60_000_000


class DecodeProblem(Exception):
    """A problem text, given the file name by decode_gray."""


def short_error(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def too_large(width: int, height: int) -> str:
    return f"image too large: {width}x{height} (more than {MAX_PIXELS:,} pixels)"

"""The one image decode and geometry used by every path.

Training, evaluation, predict, the web app and the ONNX export all go through
:func:`load_image`, so they cannot disagree about how a file becomes the model's
``size x size`` uint8 grayscale input.

Choices that the rest of the code relies on:

* The format is sniffed from the content, never trusted from the suffix (only a DICOM
  file without its 128-byte preamble is recognised by a ``.dcm``/``.dicom`` name).
* 16-bit PNGs are scaled by the bit depth the data actually uses: the PNG's ``sBIT``
  chunk when it has one, else the bit length of the image's largest value (at least 8).
  So 12-bit data in a 16-bit file (max 4095) spans 0..255 instead of arriving almost
  black (x / 257), while full 16-bit data is still ``round(x / 257)``: a radiograph
  stored as 8-bit and as 16-bit (v * 257) decodes the same when its brightest value is
  128 or more (a darker one, without sBIT, is read as fewer bits and stretched).
* Colour images become gray with PIL's ITU-R 601-2 luma (``convert("L")``); images with
  an alpha channel are composited on black (transparent = no signal).
* The EXIF orientation of JPEG/PNG files is applied (the image is decoded the way a
  viewer or browser shows it, so heat maps line up with what the user sees).
* DICOM: see data.dicom (only frontal projection radiographs; DICOM_DECODE_RULE, recorded
  in every run's config.json and every ONNX contract as ``dicom_decode``).
* Geometry: stretch to ``size x size`` (aspect ratio not kept) with PIL's bilinear
  resize, which antialiases when it shrinks.

No global PIL state is changed (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``), so a
truncated file is always an error and other PIL users in the process are unaffected.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from pneumoscope.data.dicom import decode_dicom
from pneumoscope.data.problems import MAX_PIXELS, DecodeProblem, short_error, too_large
from pneumoscope.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MAX_FILE_BYTES",
    "ImageDecodeError",
    "decode_gray",
    "resize_to_model",
    "load_image",
]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")

# Largest file we agree to read into memory.
MAX_FILE_BYTES = 200 * 1024 * 1024

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Formats we recognise only to name them in the refusal.
_OTHER_MAGICS = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
)


class ImageDecodeError(UserError, ValueError):
    """A file that cannot be turned into a grayscale image; names the file and why."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


# --------------------------------------------------------------------------- reading


def _read_source(source: Source, name: str | None) -> tuple[bytes, str]:
    """Return the file's bytes (at most MAX_FILE_BYTES) and the name to report."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name if name is not None else "<bytes>"
        data = bytes(source)
        if len(data) > MAX_FILE_BYTES:
            raise ImageDecodeError(label, _too_big_file(len(data)))
        return data, label
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or bytes, not {type(source).__name__}")
    path = Path(source)
    label = name if name is not None else str(path)
    try:
        # O_NONBLOCK: opening a FIFO named like an image must not wait for a writer
        # (it would hang a night's run); the regular-file check below refuses it.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            _check_regular(st.st_mode, label)
            size = st.st_size
            if size > MAX_FILE_BYTES:  # refuse before reading anything
                raise ImageDecodeError(label, _too_big_file(size))
            # Bounded even if the file grows (or is a pipe) while we read it.
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ImageDecodeError(label, open_problem(e, path)) from e
    if len(data) > MAX_FILE_BYTES:
        raise ImageDecodeError(label, _too_big_file(len(data)))
    return data, label


def open_problem(err: OSError, path: Path) -> str:
    """What an OSError from opening `path` means, in the words every verb uses (audit,
    evaluate, predict and the rest all name a bad link the same way)."""
    if err.errno == errno.ELOOP:
        return "symlink loop (the link leads back to itself)"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return "broken symlink (its target does not exist)"
    return f"cannot read file ({err.strerror or err})"


def _check_regular(mode: int, label: str) -> None:
    """Only regular files are read: a directory, FIFO, socket or device is refused."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise ImageDecodeError(label, "cannot read file (Is a directory)")
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    raise ImageDecodeError(label, f"not a regular file ({kind})")


def _too_big_file(n: int) -> str:
    return f"file too large ({n / 2**20:.0f} MiB > {MAX_FILE_BYTES / 2**20:.0f} MiB)"


# --------------------------------------------------------------------------- sniffing


def _sniff(data: bytes, suffix: str) -> str:
    """Return "jpeg", "png" or "dicom" from the content, else raise a problem text."""
    if not data:
        raise DecodeProblem("empty file")
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _OTHER_MAGICS:
        if data.startswith(magic):
            raise DecodeProblem(f"unsupported format ({fmt}); use JPEG, PNG or DICOM")
    if _looks_like_text(data):
        raise DecodeProblem("not an image (looks like text)")
    if suffix in DICOM_SUFFIXES:
        # DICOM without the preamble: only trusted when the name says so.
        return "dicom-raw"
    if data[:2] == b"BM" and data[6:10] == b"\0\0\0\0":  # BMP: reserved fields are 0
        raise DecodeProblem("unsupported format (BMP); use JPEG, PNG or DICOM")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        raise DecodeProblem("unsupported format (HEIF/AVIF); use JPEG, PNG or DICOM")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise DecodeProblem("unsupported format (WebP); use JPEG, PNG or DICOM")
    if data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        # Group 0002/0008 tag: a DICOM data set written without preamble.
        raise DecodeProblem(
            "unsupported format (looks like DICOM without the 128-byte preamble; "
            "give it a .dcm name)"
        )
    raise DecodeProblem("unsupported format (not JPEG, PNG or DICOM)")


def _looks_like_text(data: bytes) -> bool:
    head = data[:1024]
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a multi-byte char cut at the end
            return False
        text = head[: e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


# --------------------------------------------------------------------------- PIL path


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read straight from the PNG IHDR / JPEG SOF header, or None.

    Checked before PIL sees the file, so a decompression bomb is refused with its size
    whatever PIL's own (global, process-wide) MAX_IMAGE_PIXELS is set to."""
    if fmt == "png":
        if data[12:16] == b"IHDR" and len(data) >= 24:
            return struct.unpack(">II", data[16:24])
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not at a marker: let PIL judge the file
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any SOF
            return None
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length  # skip APPn (incl. EXIF thumbnails), DQT, DHT, ...
    return None


def _png_significant_bits(data: bytes) -> int | None:
    """The bits of a grayscale PNG's sBIT chunk (the depth the data uses), or None."""
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        kind = data[i + 4 : i + 8]
        if kind == b"sBIT" and length >= 1 and i + 9 <= len(data):
            return data[i + 8]
        if kind in (b"IDAT", b"IEND"):  # sBIT comes before the image data
            return None
        i += 12 + length
    return None


def _decode_pil(data: bytes, fmt: str, draft: int | None = None) -> np.ndarray:
    label = fmt.upper()
    size = _header_size(data, fmt)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise DecodeProblem(too_large(*size))
    try:
        # Restrict PIL to the sniffed format: no other plugin gets to parse the bytes.
        im = Image.open(io.BytesIO(data), formats=[label])
    except Image.DecompressionBombError as e:
        # PIL refuses > 2 * its own MAX_IMAGE_PIXELS in open(); say so in our words.
        raise DecodeProblem(f"image too large ({e})") from e
    except Exception as e:  # noqa: BLE001 - any parser failure is a corrupt file
        raise DecodeProblem(f"truncated or corrupt {label} ({short_error(e)})") from e
    with im:
        # open() only read the header: refuse huge images before decoding pixels.
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise DecodeProblem(too_large(width, height))
        if width == 0 or height == 0:
            raise DecodeProblem(f"empty image ({width}x{height})")
        try:
            if (
                draft and fmt == "jpeg"
            ):  # libjpeg's DCT scaling: 1/2, 1/4 or 1/8, never below draft px
                im.draft(im.mode, (draft, draft))
            im.load()  # raises on truncation: LOAD_TRUNCATED_IMAGES stays False
            bits = _png_significant_bits(data) if fmt == "png" else None
            return _pil_to_gray(_exif_upright(im), bits)
        except DecodeProblem:
            raise
        except Exception as e:  # noqa: BLE001
            raise DecodeProblem(f"truncated or corrupt {label} ({short_error(e)})") from e


def _exif_upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored, not fatal."""
    try:
        # in place: an upright image (nearly all) is not copied, a big one twice in memory
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # noqa: BLE001
        pass
    return im


def _pil_to_gray(im: Image.Image, significant_bits: int | None = None) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode.startswith("I;16"):  # 16-bit PNG (I;16, I;16B, ...)
        return _scale_16bit(np.asarray(im), significant_bits)
    if mode == "I":  # 32-bit int: older PIL's 16-bit PNG mode; values 0..65535
        return _scale_16bit(np.clip(np.asarray(im), 0, 65535), significant_bits)
    if mode == "P":
        # Palette with transparency composites like RGBA; without, plain luma.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_black(im)
    if mode in ("1", "RGB", "CMYK", "YCbCr", "RGBX"):
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    raise DecodeProblem(f"unsupported pixel mode {mode!r}")


# Pixels per block of the uint32 arithmetic below: whole-image temporaries of a 60 MP
# image would take 240 MB each (a 117 KB 16-bit PNG then cost ~1 GB to decode).
_BLOCK_PIXELS = 1 << 22


def _row_blocks(height: int, width: int):
    rows = max(1, _BLOCK_PIXELS // max(width, 1))
    return (slice(r, r + rows) for r in range(0, height, rows))


def _used_bits(arr: np.ndarray, significant_bits: int | None) -> int:
    """The bit depth 16-bit data uses: the file's sBIT when given (and not contradicted by a
    larger value), else the bit length of the largest value; 8 to 16."""
    needed = int(arr.max()).bit_length() if arr.size else 8
    bits = significant_bits if significant_bits and significant_bits >= needed else needed
    return min(16, max(8, bits))


def _scale_16bit(arr: np.ndarray, significant_bits: int | None = None) -> np.ndarray:
    """Scale the used bit depth to 0..255: round(x * 255 / (2**bits - 1)); for full 16-bit
    data that is round(x / 257), so v*257 -> v."""
    full = (1 << _used_bits(arr, significant_bits)) - 1
    out = np.empty(arr.shape, dtype=np.uint8)
    for rows in _row_blocks(*arr.shape):
        x = arr[rows].astype(np.uint32)  # x * 255 < 2**24: no overflow
        x *= 255
        x += full // 2
        x //= full
        out[rows] = x
    return out


def _composite_on_black(im: Image.Image) -> np.ndarray:
    """Gray (luma) times alpha: transparent pixels become black (no signal)."""
    la = np.asarray(im.convert("LA"))
    out = np.empty(la.shape[:2], dtype=np.uint8)
    for rows in _row_blocks(*out.shape):
        x = la[rows, :, 0].astype(np.uint32)
        x *= la[rows, :, 1]
        x += 127
        x //= 255
        out[rows] = x
    return out


# --------------------------------------------------------------------------- public API


def decode_gray(source: Source, *, name: str | None = None, draft: int | None = None) -> np.ndarray:
    """Decode a JPEG, PNG or DICOM file (path or bytes) to a uint8 (H, W) gray image.

    ``name`` is used in error messages (and, for bytes, its suffix lets a DICOM file
    without preamble be recognised). Raises :class:`ImageDecodeError` for anything that
    is not a readable image within :data:`MAX_PIXELS` / :data:`MAX_FILE_BYTES`.
    ``draft``: a JPEG may come back reduced (see load_image's ``reduced``), each side
    at least this many pixels.
    """
    data, label = _read_source(source, name)
    suffix = Path(label).suffix.lower()
    try:
        fmt = _sniff(data, suffix)
        if fmt in ("jpeg", "png"):
            gray = _decode_pil(data, fmt, draft)
        else:
            gray = decode_dicom(data, raw=(fmt == "dicom-raw"))
    except DecodeProblem as p:
        raise ImageDecodeError(label, str(p)) from p.__cause__
    return np.ascontiguousarray(gray, dtype=np.uint8)


def resize_to_model(gray: np.ndarray, size: int) -> np.ndarray:
    """Stretch a uint8 (H, W) image to (size, size), aspect ratio not kept.

    PIL's BILINEAR resize widens its filter when shrinking, i.e. it antialiases, and
    with the default ``reducing_gap=None`` it is deterministic."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W) image, got {gray.dtype} {gray.shape}")
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if gray.shape == (size, size):
        return gray.copy()
    im = Image.fromarray(np.ascontiguousarray(gray))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def read_bytes(source: Source, *, name: str | None = None) -> bytes:
    """The bytes load_image would decode, read with the same checks (regular file, size
    bound); for callers that key a cache on a file's content and then decode those bytes."""
    return _read_source(source, name)[0]


# reduced=True decodes a JPEG at 1/2, 1/4 or 1/8 scale while each side stays at least
# this many times the model size: the resize to the model size then still shrinks it.
DRAFT_FACTOR = 2


def load_image(
    source: Source, size: int, *, name: str | None = None, reduced: bool = False
) -> np.ndarray:
    """The model's input image: decode_gray then resize_to_model.

    reduced: a JPEG of more than DRAFT_FACTOR x 2 x size pixels a side is decoded by libjpeg
    at a reduced scale (DCT scaling, Pillow's draft), about twice as fast on 1,000-2,000 px
    originals; the input differs from the full decode by 0.4 gray levels on average at 224
    px (1.1 at 64 px), p(pneumonia) by up to ~0.035 (0.06 for a small 64 px run;
    tests/data/test_decode_reduced.py): an opt-in (`predict --reduced-decode`), not the contract. A
    smaller JPEG, a PNG or a DICOM decodes exactly as without it."""
    return resize_to_model(
        decode_gray(source, name=name, draft=DRAFT_FACTOR * int(size) if reduced else None), size
    )

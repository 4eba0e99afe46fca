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
* DICOM: only projection radiographs (Modality CR, DX or DR; a file without Modality is
  given the benefit of the doubt) in a frontal view (ViewPosition LL, RL or LAT, a
  lateral, is refused: the model has only seen frontal films). Then DICOM_DECODE_RULE
  (recorded in every run's config.json and every ONNX contract as ``dicom_decode``), so
  a DICOM answers like the picture a viewer shows of it: Modality LUT (rescale) -> the
  VOI the file carries (window centre/width of the first view, or the VOI LUT Sequence);
  without a VOI, data of at most 8 stored bits is shown as stored (its full stored range,
  through the rescale, is the window: the 8-bit pixels of a JPEG put in a DICOM decode
  to the very same pixels); only deeper data without a VOI gets a window of our own, the
  0.5th to 99.5th percentile (so a few saturated or dead pixels do not squash the
  image) -> 0..255 -> MONOCHROME1 inverted.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from pneumoscope.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MAX_FILE_BYTES",
    "ImageDecodeError",
    "decode_gray",
    "resize_to_model",
    "load_image",
    "DICOM_DECODE_VERSION",
    "dicom_decode_contract",
]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")

# Largest image we agree to decode (width * height). A 60 MP grayscale image is far
# beyond any chest radiograph (~3000 x 3000 px) yet still bounded in memory
# (~0.5 GB as float64 on the DICOM path).
MAX_PIXELS = 60_000_000
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


def _too_large(width: int, height: int) -> str:
    return f"image too large: {width}x{height} (more than {MAX_PIXELS:,} pixels)"


# --------------------------------------------------------------------------- sniffing


def _sniff(data: bytes, suffix: str) -> str:
    """Return "jpeg", "png" or "dicom" from the content, else raise a problem text."""
    if not data:
        raise _Problem("empty file")
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _OTHER_MAGICS:
        if data.startswith(magic):
            raise _Problem(f"unsupported format ({fmt}); use JPEG, PNG or DICOM")
    if _looks_like_text(data):
        raise _Problem("not an image (looks like text)")
    if suffix in DICOM_SUFFIXES:
        # DICOM without the preamble: only trusted when the name says so.
        return "dicom-raw"
    if data[:2] == b"BM" and data[6:10] == b"\0\0\0\0":  # BMP: reserved fields are 0
        raise _Problem("unsupported format (BMP); use JPEG, PNG or DICOM")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        raise _Problem("unsupported format (HEIF/AVIF); use JPEG, PNG or DICOM")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise _Problem("unsupported format (WebP); use JPEG, PNG or DICOM")
    if data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        # Group 0002/0008 tag: a DICOM data set written without preamble.
        raise _Problem(
            "unsupported format (looks like DICOM without the 128-byte preamble; "
            "give it a .dcm name)"
        )
    raise _Problem("unsupported format (not JPEG, PNG or DICOM)")


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


class _Problem(Exception):
    """Internal: a problem text, given the file name by decode_gray."""


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
        raise _Problem(_too_large(*size))
    try:
        # Restrict PIL to the sniffed format: no other plugin gets to parse the bytes.
        im = Image.open(io.BytesIO(data), formats=[label])
    except Image.DecompressionBombError as e:
        # PIL refuses > 2 * its own MAX_IMAGE_PIXELS in open(); say so in our words.
        raise _Problem(f"image too large ({e})") from e
    except Exception as e:  # noqa: BLE001 - any parser failure is a corrupt file
        raise _Problem(f"truncated or corrupt {label} ({_short(e)})") from e
    with im:
        # open() only read the header: refuse huge images before decoding pixels.
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise _Problem(_too_large(width, height))
        if width == 0 or height == 0:
            raise _Problem(f"empty image ({width}x{height})")
        try:
            if draft and fmt == "jpeg":  # libjpeg's DCT scaling: 1/2, 1/4 or 1/8, never below draft px
                im.draft(im.mode, (draft, draft))
            im.load()  # raises on truncation: LOAD_TRUNCATED_IMAGES stays False
            bits = _png_significant_bits(data) if fmt == "png" else None
            return _pil_to_gray(_exif_upright(im), bits)
        except _Problem:
            raise
        except Exception as e:  # noqa: BLE001
            raise _Problem(f"truncated or corrupt {label} ({_short(e)})") from e


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
    raise _Problem(f"unsupported pixel mode {mode!r}")


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


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- DICOM path


def _decode_dicom(data: bytes, raw: bool) -> np.ndarray:
    ds = _read_dicom(data, raw)
    _check_dicom_is_radiograph(ds)
    _check_dicom_is_frontal_chest_film(ds)
    _ensure_transfer_syntax(ds)
    _check_decodable(ds)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt file
        raise _Problem(f"truncated or corrupt DICOM pixel data ({_short(e)})") from e
    if arr.ndim != 2:
        raise _Problem(f"DICOM pixel data has shape {arr.shape}, expected 2-D grayscale")
    try:
        unit = _dicom_to_unit(arr, ds)
    except _Problem:
        raise
    except Exception as e:  # noqa: BLE001 - malformed LUT / window attributes
        raise _Problem(f"invalid DICOM grey-level attributes ({_short(e)})") from e
    out = np.rint(unit * 255.0).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        # MONOCHROME1: low values are white. Invert after the VOI (as a viewer does),
        # in uint8 so it is exactly 255 - the MONOCHROME2 image.
        out = 255 - out
    return out


def _read_dicom(data: bytes, raw: bool):
    import pydicom

    try:
        # force=True only for preamble-less files that the name says are DICOM.
        return pydicom.dcmread(io.BytesIO(data), force=raw)
    except Exception as e:  # noqa: BLE001 - InvalidDicomError, EOFError, ...
        raise _Problem(f"not a readable DICOM file ({_short(e)})") from e


def _check_dicom_is_radiograph(ds) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise _Problem("DICOM float pixel data is not supported")
        raise _Problem("DICOM file has no pixel data (not an image)")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise _Problem(
            f"colour DICOM (SamplesPerPixel={spp}, PhotometricInterpretation={pi or '?'})"
            " is not a grayscale radiograph"
        )
    ds.PhotometricInterpretation = pi
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise _Problem(f"multi-frame DICOM ({frames} frames) is not supported; "
                       "export a single frame")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise _Problem(f"DICOM image has no size (Rows={rows}, Columns={cols})")
    if rows * cols > MAX_PIXELS:
        raise _Problem(_too_large(cols, rows))


# Projection radiography: computed (CR), digital (DX) and the non-standard "DR" some
# vendors write. CT, MR, US, ... are other kinds of image the model has never seen.
ACCEPTED_MODALITIES = ("CR", "DX", "DR")
LATERAL_VIEWS = ("LL", "RL", "LAT")


def _check_dicom_is_frontal_chest_film(ds) -> None:
    """Refuse what the model was not trained on: other modalities and lateral views."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in ACCEPTED_MODALITIES:
        raise _Problem(f"DICOM Modality {modality} is not a projection radiograph "
                       f"(accepted: {', '.join(ACCEPTED_MODALITIES)}); the model reads chest X-rays only")
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        raise _Problem(f"DICOM ViewPosition {view} is a lateral view; the model was trained on "
                       "frontal (PA/AP) chest films only")


def _ensure_transfer_syntax(ds) -> None:
    """Files without file meta (preamble-less) lack the Transfer Syntax UID that
    pixel decoding needs; the encoding they were read with says which one it is."""
    from pydicom import uid
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = _read_encoding(ds)
    if little is False:
        tsyntax = uid.ExplicitVRBigEndian
    elif implicit is False:
        tsyntax = uid.ExplicitVRLittleEndian
    else:
        tsyntax = uid.ImplicitVRLittleEndian
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = tsyntax


def _read_encoding(ds) -> tuple[bool | None, bool | None]:
    enc = getattr(ds, "original_encoding", None)  # pydicom >= 3
    if enc is not None:
        return enc[0], enc[1]
    return getattr(ds, "is_implicit_VR", None), getattr(ds, "is_little_endian", None)


def _check_decodable(ds) -> None:
    """Refuse compressed pixel data that no installed plugin can decode, naming the
    plugins to install (instead of pydicom's long generic error)."""
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2.x: let pixel_array report it
        return
    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise _Problem(f"unsupported DICOM transfer syntax {_ts_name(tsyntax)}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise _Problem(
            f"compressed DICOM ({_ts_name(tsyntax)}) cannot be decoded without extra "
            f"plugins: {needs}"
        )


def _ts_name(tsyntax) -> str:
    name = getattr(tsyntax, "name", "") or ""
    return f"{name} [{tsyntax}]" if name and name != str(tsyntax) else str(tsyntax)


# The DICOM grey-level rule (see the module docstring). Its version goes into config.json
# and the ONNX contract beside the rule, so a run or an export says which one it expects;
# version 1 (runs before it) windowed 8-bit data without a VOI by the percentiles too.
DICOM_DECODE_VERSION = 2
DICOM_DECODE_RULE = (
    "rescale (Modality LUT), then the VOI the file carries (VOI LUT Sequence, else the first "
    "WindowCenter/WindowWidth with its VOILUTFunction); without a VOI: BitsStored <= 8 shown as "
    "stored (the full stored range through the rescale is the window), deeper data windowed "
    "from its 0.5th to 99.5th percentile; to 0..255, MONOCHROME1 inverted"
)


def dicom_decode_contract() -> dict:
    """The DICOM decode rule as config.json and the ONNX contract record it."""
    return {"version": DICOM_DECODE_VERSION, "rule": DICOM_DECODE_RULE}


def _dicom_to_unit(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> display values in [0, 1] (before MONOCHROME1 inversion)."""
    apply_modality_lut, apply_voi = _pydicom_luts()
    values = apply_modality_lut(arr, ds)
    if _has_voi_lut_sequence(ds):
        return _apply_voi_lut_sequence(values, ds, apply_voi)
    window = _window(ds)
    if window is not None:
        center, width, function = window
        return _apply_window(values.astype(np.float64), center, width, function)
    if _bits_stored(ds, arr) <= 8:
        return _stored_range_window(values, ds, apply_modality_lut)
    return _robust_window(values)


def _bits_stored(ds, arr: np.ndarray) -> int:
    """BitsStored, else BitsAllocated, else the pixel array's own width."""
    bits = ds.get("BitsStored") or ds.get("BitsAllocated")
    return int(bits) if bits else arr.dtype.itemsize * 8


def _stored_range_window(values: np.ndarray, ds, apply_modality_lut) -> np.ndarray:
    """Shallow data without a VOI, shown as stored: the whole stored range (0..255 for
    unsigned 8-bit), through the rescale, maps onto [0, 1], its lowest output black (so a
    negative slope inverts, as the photometric interpretation reads the output values)."""
    bits = int(ds.get("BitsStored") or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ends = apply_modality_lut(np.array([lo, hi], dtype=np.int16 if signed else np.uint16), ds)
    black, white = sorted(float(v) for v in ends)
    if black == white:  # a degenerate rescale: nothing to show
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values.astype(np.float64) - black) / (white - black), 0.0, 1.0)


def _pydicom_luts():
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi  # pydicom >= 3
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi
    return apply_modality_lut, apply_voi


def _has_voi_lut_sequence(ds) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _apply_voi_lut_sequence(values: np.ndarray, ds, apply_voi) -> np.ndarray:
    """First VOI LUT, scaled by the table's own output range: vendors often declare
    16 bits per entry for a 12-bit table, so the declared depth is not trusted."""
    n, first, _bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    n = n or 2**16
    # pydicom's VOI LUT indexes with integers; the modality output may be float.
    out = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
    table = apply_voi(np.arange(first, first + n, dtype=np.int64), ds)
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _window(ds) -> tuple[float, float, str] | None:
    """The first window (centre, width, function), or None when absent."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = ds.WindowCenter, ds.WindowWidth
    if center is None or width is None:
        return None
    # Multi-valued (several views): the first one, as pydicom's index=0.
    center, width = _first(center), _first(width)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    return float(center), float(width), function


def _first(value):
    """First value of a multi-valued element (pydicom MultiValue/list), else itself."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return value[0]
    return value


def _apply_window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2/3 windowing straight to [0, 1].

    Done here rather than with pydicom's apply_windowing because that maps to an
    output range derived from BitsStored and the rescale (which flips for a negative
    slope), so its output would still need a version-dependent rescale to 0..1."""
    if function == "LINEAR":
        if w < 1:
            raise _Problem(f"invalid DICOM window width {w} (< 1 for LINEAR)")
        if w == 1:  # degenerate window: a threshold
            return (x > c - 0.5).astype(np.float64)
        return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    if w <= 0:
        raise _Problem(f"invalid DICOM window width {w} (<= 0 for {function})")
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    raise _Problem(f"unsupported DICOM VOI LUT Function {function!r}")


# The window of a DICOM without one: these percentiles, so that a few saturated or dead
# pixels (a burnt-in marker, a collimator edge) do not squash the anatomy into a few greys.
ROBUST_PERCENTILES = (0.5, 99.5)


def _robust_window(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    lo, hi = (float(x) for x in np.percentile(v, ROBUST_PERCENTILES))
    if hi <= lo:  # nearly constant: fall back to the full range
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:  # constant image: all black rather than a division by zero
        return np.zeros(v.shape, dtype=np.float64)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


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
            gray = _decode_dicom(data, raw=(fmt == "dicom-raw"))
    except _Problem as p:
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


def load_image(source: Source, size: int, *, name: str | None = None, reduced: bool = False) -> np.ndarray:
    """The model's input image: decode_gray then resize_to_model.

    reduced: a JPEG of more than DRAFT_FACTOR x 2 x size pixels a side is decoded by libjpeg
    at a reduced scale (DCT scaling, Pillow's draft), about twice as fast on 1,000-2,000 px
    originals; the input differs from the full decode by 0.4 gray levels on average at 224
    px (1.1 at 64 px), p(pneumonia) by up to ~0.035 (0.06 for a small 64 px run;
    tests/data/test_decode_reduced.py): an opt-in (`predict --reduced-decode`), not the contract. A
    smaller JPEG, a PNG or a DICOM decodes exactly as without it."""
    return resize_to_model(decode_gray(source, name=name, draft=DRAFT_FACTOR * int(size) if reduced else None), size)

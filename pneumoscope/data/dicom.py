"""The DICOM path of the one decode (data.decode.decode_gray calls decode_dicom).

Only projection radiographs (Modality CR, DX or DR; a file without Modality is given the
benefit of the doubt) in a frontal view (ViewPosition LL, RL or LAT, a lateral, is
refused: the model has only seen frontal films). Then DICOM_DECODE_RULE (recorded in
every run's config.json and every ONNX contract as ``dicom_decode``), so a DICOM answers
like the picture a viewer shows of it: Modality LUT (rescale) -> the VOI the file carries
(window centre/width of the first view, or the VOI LUT Sequence); without a VOI, data of
at most 8 stored bits is shown as stored (its full stored range, through the rescale, is
the window); only deeper data without a VOI gets a window of our own, the 0.5th to 99.5th
percentile -> 0..255 -> MONOCHROME1 inverted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from pneumoscope.data.problems import MAX_PIXELS, DecodeProblem, short_error, too_large


def decode_dicom(data: bytes, raw: bool) -> np.ndarray:
    ds = _read_dicom(data, raw)
    _check_dicom_is_radiograph(ds)
    _check_dicom_is_frontal_chest_film(ds)
    _ensure_transfer_syntax(ds)
    _check_decodable(ds)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt file
        raise DecodeProblem(f"truncated or corrupt DICOM pixel data ({short_error(e)})") from e
    if arr.ndim != 2:
        raise DecodeProblem(f"DICOM pixel data has shape {arr.shape}, expected 2-D grayscale")
    try:
        unit = _dicom_to_unit(arr, ds)
    except DecodeProblem:
        raise
    except Exception as e:  # noqa: BLE001 - malformed LUT / window attributes
        raise DecodeProblem(f"invalid DICOM grey-level attributes ({short_error(e)})") from e
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
        raise DecodeProblem(f"not a readable DICOM file ({short_error(e)})") from e


def _check_dicom_is_radiograph(ds) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DecodeProblem("DICOM float pixel data is not supported")
        raise DecodeProblem("DICOM file has no pixel data (not an image)")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeProblem(
            f"colour DICOM (SamplesPerPixel={spp}, PhotometricInterpretation={pi or '?'})"
            " is not a grayscale radiograph"
        )
    ds.PhotometricInterpretation = pi
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DecodeProblem(
            f"multi-frame DICOM ({frames} frames) is not supported; export a single frame"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DecodeProblem(f"DICOM image has no size (Rows={rows}, Columns={cols})")
    if rows * cols > MAX_PIXELS:
        raise DecodeProblem(too_large(cols, rows))


# Projection radiography: computed (CR), digital (DX) and the non-standard "DR" some
# vendors write. CT, MR, US, ... are other kinds of image the model has never seen.
ACCEPTED_MODALITIES = ("CR", "DX", "DR")
LATERAL_VIEWS = ("LL", "RL", "LAT")


def _check_dicom_is_frontal_chest_film(ds) -> None:
    """Refuse what the model was not trained on: other modalities and lateral views."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality and modality not in ACCEPTED_MODALITIES:
        raise DecodeProblem(
            f"DICOM Modality {modality} is not a projection radiograph "
            f"(accepted: {', '.join(ACCEPTED_MODALITIES)}); the model reads chest X-rays only"
        )
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        raise DecodeProblem(
            f"DICOM ViewPosition {view} is a lateral view; the model was trained on "
            "frontal (PA/AP) chest films only"
        )


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
        raise DecodeProblem(f"unsupported DICOM transfer syntax {_ts_name(tsyntax)}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise DecodeProblem(
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
            raise DecodeProblem(f"invalid DICOM window width {w} (< 1 for LINEAR)")
        if w == 1:  # degenerate window: a threshold
            return (x > c - 0.5).astype(np.float64)
        return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    if w <= 0:
        raise DecodeProblem(f"invalid DICOM window width {w} (<= 0 for {function})")
    if function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    raise DecodeProblem(f"unsupported DICOM VOI LUT Function {function!r}")


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

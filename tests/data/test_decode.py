"""Tests for pneumoscope.data.decode: the one decode + geometry of every path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from pneumoscope.data import decode
from pneumoscope.data.decode import (
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    MAX_PIXELS,
    ImageDecodeError,
    decode_gray,
    load_image,
    resize_to_model,
)


@pytest.fixture(scope="module")
def real_jpeg(shared_data) -> Path:
    """The first real NORMAL image of the shared data (found relative to the repository
    by conftest's shared_data; missing data fails the tests, it does not skip them)."""
    files = sorted((shared_data / "train" / "NORMAL").glob("*.jpeg"))
    assert files, f"no JPEG in {shared_data / 'train' / 'NORMAL'}"
    return files[0]


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Records any call of PIL's or pydicom's decoder (and stops it); after the test it
    must be empty: a refusal by size must come from the header alone."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("the decoder was called")

    monkeypatch.setattr(decode.Image, "open", refuse)
    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    yield calls
    assert not calls, "the decoder was called"


@pytest.fixture(scope="module")
def gray(real_jpeg) -> np.ndarray:
    """The reference 224x224 image as PIL decodes it."""
    with Image.open(real_jpeg) as im:
        return np.asarray(im.convert("L")).copy()


def _save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def _expect_error(source, name_in_msg: str, *words: str, name=None) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_gray(source, name=name)
    err = info.value
    assert name_in_msg in str(err) and err.problem in str(err)
    assert str(err) == f"{err.name}: {err.problem}"
    for w in words:
        assert w in err.problem, (w, err.problem)
    return err


# --------------------------------------------------------------------------- constants


def test_constants():
    assert IMAGE_SUFFIXES == (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
    assert 10_000_000 <= MAX_PIXELS <= 200_000_000
    assert MAX_FILE_BYTES == 200 * 1024 * 1024
    assert issubclass(ImageDecodeError, ValueError)
    e = ImageDecodeError("a.png", "empty file")
    assert (e.name, e.problem, str(e)) == ("a.png", "empty file", "a.png: empty file")


# --------------------------------------------------------------------------- real data


def test_real_jpeg_matches_pil(real_jpeg, gray):
    out = decode_gray(real_jpeg)
    assert out.dtype == np.uint8 and out.shape == (224, 224)
    np.testing.assert_array_equal(out, gray)
    small = load_image(real_jpeg, 64)
    assert small.dtype == np.uint8 and small.shape == (64, 64)
    np.testing.assert_array_equal(load_image(str(real_jpeg), 224), gray)


def test_bytes_same_as_path(real_jpeg, tmp_path, gray):
    data = real_jpeg.read_bytes()
    np.testing.assert_array_equal(decode_gray(data), decode_gray(real_jpeg))
    np.testing.assert_array_equal(decode_gray(bytearray(data)), gray)
    np.testing.assert_array_equal(load_image(data, 96, name="x.jpeg"), load_image(real_jpeg, 96))
    png = _save(tmp_path, "a.png", Image.fromarray(gray))
    np.testing.assert_array_equal(decode_gray(png.read_bytes()), decode_gray(png))


# --------------------------------------------------------------------------- PIL variants


def _palette(a: np.ndarray) -> Image.Image:
    p = Image.frombytes("P", a.shape[::-1], a.tobytes())
    p.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tobytes())
    return p


def _with_alpha(a: np.ndarray, mode: str) -> Image.Image:
    opaque = Image.new("L", a.shape[::-1], 255)
    bands = [Image.fromarray(a)] * (3 if mode == "RGBA" else 1)
    return Image.merge(mode, bands + [opaque])


# Lossless containers of the same pixels must decode exactly to the same array:
# file name -> (builder, the mode PIL opens it in).
_EXACT_VARIANTS = {
    "png8.png": (lambda a: Image.fromarray(a), "L"),
    "png16.png": (lambda a: Image.fromarray(a.astype(np.uint16) * 257), "I;16"),
    "rgb.png": (lambda a: Image.fromarray(np.stack([a] * 3, -1)), "RGB"),
    "rgba_opaque.png": (lambda a: _with_alpha(a, "RGBA"), "RGBA"),
    "la_opaque.png": (lambda a: _with_alpha(a, "LA"), "LA"),
    "palette.png": (_palette, "P"),
}


@pytest.mark.parametrize("fname", sorted(_EXACT_VARIANTS))
def test_lossless_variants_exact(tmp_path, gray, fname):
    build, mode = _EXACT_VARIANTS[fname]
    path = _save(tmp_path, fname, build(gray))
    with Image.open(path) as check:  # the file really is in the intended mode
        assert check.mode == mode
    np.testing.assert_array_equal(decode_gray(path), gray)


# JPEG re-encodes: lossy, so compare by mean absolute difference (0..255 scale).
@pytest.mark.parametrize(
    "mode",
    ["L", "RGB", "CMYK"],
)
def test_jpeg_reencodes_close(tmp_path, gray, mode):
    im = Image.fromarray(gray).convert(mode)
    path = _save(tmp_path, f"re_{mode}.jpg", im, quality=95)
    with Image.open(path) as check:
        assert check.mode == mode
    out = decode_gray(path)
    assert out.shape == gray.shape and out.dtype == np.uint8
    assert _mad(out, gray) < 0.5  # measured ~0.05-0.1 at quality 95


def test_16bit_scaled_by_bit_depth_not_range(tmp_path):
    # Data using all 16 bits: round(x / 257), v*257 -> v exactly, 128 -> 0, 129 -> 1,
    # 65535 -> 255; the image's own range (min 0) is not stretched.
    values = np.array([[0, 128, 129, 257 * 7, 1000, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "ramp16.png", Image.fromarray(values))
    np.testing.assert_array_equal(decode_gray(path), [[0, 0, 1, 7, 4, 255]])


def _with_sbit(png: bytes, bits: int) -> bytes:
    """The PNG with an sBIT chunk (significant bits of a grayscale image) after IHDR."""
    body = bytes([bits])
    chunk = struct.pack(">I", 1) + b"sBIT" + body + struct.pack(">I", zlib.crc32(b"sBIT" + body))
    return png[:33] + chunk + png[33:]  # signature (8) + IHDR chunk (25)


def test_12bit_data_in_16bit_png_uses_its_bit_depth(tmp_path, gray):
    """12-bit data in a 16-bit PNG (the usual export of a 12-bit detector) spans 0..4095:
    divided by 257 it would arrive almost black (max 16); scaled by the 12 bits it uses it
    is the image."""
    stored = gray.astype(np.uint16) * 16  # 0..4080: 12 bits
    path = _save(tmp_path, "twelve.png", Image.fromarray(stored))
    out = decode_gray(path)
    assert out.max() > 240
    _close(out, np.rint(stored.astype(float) * 255 / 4095).astype(np.uint8))
    # The sBIT chunk says the depth when the image does not reach its top bit: 12-bit data
    # that is dark (max 1020) stays dark, it is not stretched like 10-bit data.
    dark = gray.astype(np.uint16) * 4
    png = _save(tmp_path, "dark.png", Image.fromarray(dark)).read_bytes()
    (tmp_path / "dark_sbit.png").write_bytes(_with_sbit(png, 12))
    _close(
        decode_gray(tmp_path / "dark_sbit.png"),
        np.rint(dark.astype(float) * 255 / 4095).astype(np.uint8),
    )
    _close(
        decode_gray(tmp_path / "dark.png"),
        np.rint(dark.astype(float) * 255 / 1023).astype(np.uint8),
    )


def test_alpha_composited_on_black(tmp_path, gray):
    alpha = np.zeros_like(gray)
    alpha[:, 112:] = 255
    alpha[:50, :] = 128
    rgba = np.dstack([gray, gray, gray, alpha])
    path = _save(tmp_path, "rgba.png", Image.fromarray(rgba))
    expected = (gray.astype(np.uint32) * alpha + 127) // 255
    np.testing.assert_array_equal(decode_gray(path), expected.astype(np.uint8))
    # A palette with a transparent entry behaves like RGBA.
    p = _palette(gray)
    p.info["transparency"] = int(gray[0, 0])
    path = _save(tmp_path, "ptrans.png", p, transparency=int(gray[0, 0]))
    out = decode_gray(path)
    assert out[0, 0] == 0
    keep = gray != gray[0, 0]
    np.testing.assert_array_equal(out[keep], gray[keep])


def test_one_bit_png(tmp_path, gray):
    path = _save(tmp_path, "bw.png", Image.fromarray(gray).convert("1", dither=Image.Dither.NONE))
    out = decode_gray(path)
    assert set(np.unique(out)) <= {0, 255}
    np.testing.assert_array_equal(out == 255, gray >= 128)


def test_exif_orientation_applied(tmp_path, gray):
    a = np.ascontiguousarray(gray[:, :160])  # non-square so the rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, "rot.png", Image.fromarray(a), exif=exif)
    out = decode_gray(path)
    assert out.shape == (160, 224)
    np.testing.assert_array_equal(out, np.rot90(a, k=-1))
    # JPEG: the EXIF (APP1) segment comes before the frame header that the size
    # check reads; it must be skipped, not mistaken for the image.
    path = _save(tmp_path, "rot.jpg", Image.fromarray(a), exif=exif, quality=95)
    assert decode._header_size(path.read_bytes(), "jpeg") == (160, 224)
    out = decode_gray(path)
    assert out.shape == (160, 224)
    assert _mad(out, np.rot90(a, k=-1)) < 0.5


# --------------------------------------------------------------------------- geometry


def _pattern(width: int, height: int) -> np.ndarray:
    """A smooth known pattern over the unit square, sampled at the pixel centres of a
    width x height image: the same picture at any size, made without any resize."""
    u = (np.arange(width) + 0.5) / width
    v = (np.arange(height) + 0.5) / height
    img = (
        128 + 90 * np.sin(2 * np.pi * u)[None, :] * np.cos(3 * np.pi * v)[:, None] + 30 * v[:, None]
    )
    return np.rint(np.clip(img, 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_full_size_file_gives_its_own_224_version(tmp_path, fmt):
    """A full-size film (1500 x 1100, not square) decodes to the model input that the same
    pattern made directly at 224 x 224 is: the whole image stretched, not cropped or padded."""
    big = Image.fromarray(_pattern(1500, 1100))
    path = _save(tmp_path, f"orig.{fmt}", big, **({"quality": 95} if fmt == "jpeg" else {}))
    out = load_image(path, 224)
    assert out.shape == (224, 224)
    assert _mad(out, _pattern(224, 224)) < 1.0
    # a centre crop or a letterbox of the same file would be far off
    square = np.asarray(
        big.crop((200, 0, 1300, 1100)).resize((224, 224), Image.Resampling.BILINEAR)
    )
    assert _mad(square, _pattern(224, 224)) > 10


def test_resize_to_model_stretches(gray):
    tall = np.ascontiguousarray(gray[:, :100])
    out = resize_to_model(tall, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, resize_to_model(tall, 64))  # deterministic
    expected = np.asarray(Image.fromarray(tall).resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)
    same = resize_to_model(gray, 224)
    np.testing.assert_array_equal(same, gray)
    assert same is not gray
    const = np.full((300, 500), 77, np.uint8)
    assert (resize_to_model(const, 32) == 77).all()


def test_resize_to_model_rejects_bad_input(gray):
    with pytest.raises(ValueError):
        resize_to_model(gray.astype(np.float32), 64)
    with pytest.raises(ValueError):
        resize_to_model(np.dstack([gray] * 3), 64)
    with pytest.raises(ValueError):
        resize_to_model(gray, 0)


# --------------------------------------------------------------------------- bad files


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpeg"
    path.write_bytes(b"")
    _expect_error(path, "empty.jpeg", "empty file")


def test_text_named_jpeg(tmp_path):
    path = tmp_path / "notes.jpeg"
    path.write_text("patient 12: follow-up in two weeks\nno image here\n")
    _expect_error(path, "notes.jpeg", "not an image", "text")
    html = tmp_path / "page.jpg"
    html.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    _expect_error(html, "page.jpg", "text")


def test_random_bytes(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path = tmp_path / "noise.png"
    path.write_bytes(noise)
    _expect_error(path, "noise.png", "unsupported format")
    # Named .dcm it goes to pydicom (preamble-less DICOM is allowed by name): still an
    # ImageDecodeError naming the file.
    path = tmp_path / "noise.dcm"
    path.write_bytes(noise)
    _expect_error(path, "noise.dcm")
    path = tmp_path / "notes.dcm"
    path.write_text("not a dicom file\n")
    _expect_error(path, "notes.dcm", "looks like text")


def test_other_format_named(tmp_path, gray):
    path = _save(tmp_path, "x.png", Image.fromarray(gray), format="GIF")
    _expect_error(path, "x.png", "unsupported format", "GIF")


def test_truncated_jpeg(tmp_path, real_jpeg):
    data = real_jpeg.read_bytes()
    path = tmp_path / "half.jpeg"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "half.jpeg", "truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path, gray):
    full = _save(tmp_path, "full.png", Image.fromarray(gray)).read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(full[: len(full) // 2])
    _expect_error(path, "half.png", "truncated or corrupt")


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR (correct CRC) + tiny IDAT/IEND, no real pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [30000, 9000])  # 9000^2: over ours, under PIL's limit
def test_png_bomb_refused_before_decoding(tmp_path, side, no_pixel_decoding):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    _expect_error(path, "bomb.png", "too large", f"{side}x{side}")


def test_jpeg_bomb_refused_before_decoding(real_jpeg, tmp_path, no_pixel_decoding):
    data = bytearray(real_jpeg.read_bytes())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # walk to the SOF segment
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", 30000, 30000)
    _expect_error(bytes(data), "huge.jpg", "too large", "30000x30000", name="huge.jpg")


def test_pil_globals_untouched(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))
    with pytest.raises(ImageDecodeError):
        decode_gray(path)
    assert Image.MAX_IMAGE_PIXELS == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.png", "nope.png", "cannot read file")
    _expect_error(tmp_path, str(tmp_path), "cannot read file")


def test_file_too_big(tmp_path, gray, monkeypatch):
    path = _save(tmp_path, "a.png", Image.fromarray(gray))
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100)
    _expect_error(path, "a.png", "file too large")
    _expect_error(path.read_bytes(), "up.png", "file too large", name="up.png")


def test_bytes_errors_use_given_name():
    err = _expect_error(b"", "upload.png", "empty file", name="upload.png")
    assert err.name == "upload.png"
    assert _expect_error(b"", "<bytes>").name == "<bytes>"
    with pytest.raises(TypeError):
        decode_gray(12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DICOM


def _dicom(
    pixels: np.ndarray,
    *,
    preamble: bool = True,
    tsyntax=ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    **attrs,
) -> bytes:
    """A DX DICOM file (bytes) holding `pixels`; attrs override the image module."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    buf = io.BytesIO()
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = tsyntax
        ds.file_meta = meta
        try:  # pydicom >= 3
            ds.save_as(buf, enforce_file_format=True)
        except TypeError:  # pydicom 2.x
            ds.is_little_endian, ds.is_implicit_VR = True, False
            ds.save_as(buf, write_like_original=False)
    else:  # bare data set, implicit VR: no preamble, no "DICM", no file meta
        try:
            pydicom.dcmwrite(
                buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False
            )
        except TypeError:
            ds.is_little_endian, ds.is_implicit_VR = True, True
            pydicom.dcmwrite(buf, ds, write_like_original=True)
    return buf.getvalue()


def _robust_u8(a: np.ndarray) -> np.ndarray:
    """The window of a DICOM without one: 0.5th to 99.5th percentile -> 0..255, clipped
    (percentiles commute with the positive affine maps the tests store images with)."""
    a = a.astype(np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.rint(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _close(out: np.ndarray, expected: np.ndarray, atol: int = 1) -> None:
    """Equal up to float rounding (at most 1 grey level off, and rarely)."""
    assert out.shape == expected.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int32) - expected.astype(np.int32))
    assert diff.max() <= atol and diff.mean() < 0.01


def test_dicom_16bit_without_window(gray):
    stored = gray.astype(np.uint16) * 257
    out = decode_gray(_dicom(stored))
    _close(out, _robust_u8(gray))


def test_dicom_8bit_without_window_is_shown_as_stored(gray):
    """No VOI and at most 8 bits stored: the stored range is the window, so the pixels come
    back as they are (a percentile window would stretch them), whatever the rescale."""
    stored = gray.astype(np.uint8)
    attrs = dict(BitsAllocated=8, BitsStored=8, HighBit=7)
    np.testing.assert_array_equal(decode_gray(_dicom(stored, **attrs)), gray)
    np.testing.assert_array_equal(
        decode_gray(_dicom(stored, RescaleSlope=2, RescaleIntercept=-50, **attrs)), gray
    )
    # a negative slope turns the values over, so the picture is inverted
    inverted = decode_gray(_dicom(stored, RescaleSlope=-1, RescaleIntercept=255, **attrs))
    np.testing.assert_array_equal(inverted, 255 - gray)


def test_dicom_signed_8bit_without_window_is_shown_as_stored(gray):
    stored = (gray.astype(np.int16) - 128).astype(np.int8)
    out = decode_gray(
        _dicom(stored, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=1)
    )
    np.testing.assert_array_equal(out, gray)


def test_dicom_12bit_rescale_without_window(gray):
    stored = gray.astype(np.uint16) * 16
    data = _dicom(stored, BitsStored=12, HighBit=11, RescaleSlope=0.5, RescaleIntercept=-100)
    _close(decode_gray(data), _robust_u8(gray))


def test_dicom_without_window_clips_outliers(gray):
    """A burnt-in marker at full white (0.1% of the pixels) must not squash the anatomy:
    min-max over the image would map the anatomy (500..2540 of 0..4095) to 0..145."""
    stored = gray.astype(np.uint16) * 8 + 500
    marker = np.zeros(gray.shape, bool)
    marker[:5, :10] = True
    stored[marker] = 4095
    out = decode_gray(_dicom(stored, BitsStored=12, HighBit=11))
    assert (out[marker] == 255).all()
    body = out[~marker]
    assert body.max() == 255 and body.min() == 0
    _close(out, _robust_u8(stored))


@pytest.mark.parametrize("modality", ["CT", "MR", "US"])
def test_dicom_other_modality_refused(gray, modality):
    _expect_error(
        _dicom(gray.astype(np.uint16), Modality=modality),
        "ct.dcm",
        f"Modality {modality}",
        "CR, DX, DR",
        name="ct.dcm",
    )


@pytest.mark.parametrize("view", ["LL", "RL", "LAT"])
def test_dicom_lateral_view_refused(gray, view):
    _expect_error(
        _dicom(gray.astype(np.uint16), ViewPosition=view),
        "lat.dcm",
        f"ViewPosition {view}",
        "lateral",
        name="lat.dcm",
    )


@pytest.mark.parametrize(
    "attrs",
    [
        dict(Modality="CR", ViewPosition="PA"),
        dict(Modality="DR", ViewPosition="AP"),
        dict(ViewPosition=""),
    ],
)
def test_dicom_frontal_radiographs_accepted(gray, attrs):
    stored = gray.astype(np.uint16) * 257
    _close(decode_gray(_dicom(stored, **attrs)), _robust_u8(gray))


def test_dicom_12bit_window_recovers_image(gray):
    # Modality values x = 8*a - 100 (a: 0..255); the LINEAR window with
    # c - 0.5 -+ (w - 1)/2 = -100 / 1940 maps them straight back to a.
    stored = gray.astype(np.uint16) * 16
    data = _dicom(
        stored,
        BitsStored=12,
        HighBit=11,
        RescaleSlope=0.5,
        RescaleIntercept=-100,
        WindowCenter=920.5,
        WindowWidth=2041,
    )
    _close(decode_gray(data), gray)


def test_dicom_window_clips_and_matches_pydicom(gray):
    from pydicom.pixels import apply_modality_lut, apply_windowing

    stored = gray.astype(np.uint16) * 16
    # first view
    attrs = dict(
        BitsStored=12,
        HighBit=11,
        RescaleSlope=0.5,
        RescaleIntercept=-100,
        WindowCenter=[8 * 128 - 100, 5],
        WindowWidth=[8 * 64, 7],
    )
    out = decode_gray(_dicom(stored, **attrs))
    assert (out[gray <= 96] == 0).all() and (out[gray >= 161] == 255).all()
    # Same as pydicom's windowing, rescaled from its output range to 0..255.
    ds = pydicom.dcmread(io.BytesIO(_dicom(stored, **attrs)))
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    y_min, y_max = -100.0, 4095 * 0.5 - 100
    _close(out, np.rint((ref - y_min) / (y_max - y_min) * 255).astype(np.uint8))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_dicom_voi_functions(gray, function):
    stored = gray.astype(np.uint16)
    out = decode_gray(
        _dicom(
            stored,
            BitsStored=8,
            HighBit=7,
            BitsAllocated=16,
            WindowCenter=128,
            WindowWidth=64,
            VOILUTFunction=function,
        )
    )
    x = gray.astype(np.float64)
    if function == "LINEAR_EXACT":
        expected = np.clip((x - 128) / 64 + 0.5, 0, 1)
    else:
        expected = 1 / (1 + np.exp(-4 * (x - 128) / 64))
    _close(out, np.rint(expected * 255).astype(np.uint8))


def test_dicom_signed_pixels(gray):
    stored = (gray.astype(np.int16) * 100 - 12000).astype(np.int16)
    out = decode_gray(_dicom(stored, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=0))
    _close(out, _robust_u8(gray))


def test_dicom_voi_lut_sequence(gray):
    # An inverting 12-bit table declared as 16 bits per entry (a common vendor habit):
    # scaled by the table's own range, not by the declared depth.
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", (4095 - np.arange(4096)).astype("<u2").tobytes())
    stored = gray.astype(np.uint16) * 16
    out = decode_gray(_dicom(stored, BitsStored=12, HighBit=11, VOILUTSequence=Sequence([item])))
    expected = np.rint((4095 - stored.astype(np.float64)) / 4095 * 255).astype(np.uint8)
    _close(out, expected)


@pytest.mark.parametrize("window", [None, (2040.5, 4081)])
def test_dicom_monochrome1_is_inverted(gray, window):
    stored = gray.astype(np.uint16) * 16
    attrs = dict(BitsStored=12, HighBit=11)
    if window:
        attrs.update(WindowCenter=window[0], WindowWidth=window[1])
    mono2 = decode_gray(_dicom(stored, **attrs))
    mono1 = decode_gray(_dicom(stored, PhotometricInterpretation="MONOCHROME1", **attrs))
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_through_load_image_and_path(gray, tmp_path):
    path = tmp_path / "img.dcm"
    path.write_bytes(_dicom(gray.astype(np.uint16) * 257))
    out = load_image(path, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    np.testing.assert_array_equal(decode_gray(path), decode_gray(path.read_bytes()))


def test_dicom_without_preamble(gray, tmp_path):
    stored = gray.astype(np.uint16) * 16
    with_preamble = decode_gray(_dicom(stored, BitsStored=12, HighBit=11))
    raw = _dicom(stored, BitsStored=12, HighBit=11, preamble=False)
    assert raw[128:132] != b"DICM"
    for suffix in (".dcm", ".DICOM"):
        path = tmp_path / f"raw{suffix}"
        path.write_bytes(raw)
        np.testing.assert_array_equal(decode_gray(path), with_preamble)
    np.testing.assert_array_equal(decode_gray(raw, name="up.dcm"), with_preamble)
    # Without a DICOM name it is not trusted, and the message says what to do.
    path = tmp_path / "raw.jpeg"
    path.write_bytes(raw)
    _expect_error(path, "raw.jpeg", "DICOM without the 128-byte preamble", ".dcm")
    _expect_error(raw, "<bytes>", "preamble")


def test_dicom_colour_refused(gray):
    rgb = np.dstack([gray] * 3)
    data = _dicom(
        rgb,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    _expect_error(data, "c.dcm", "colour", "SamplesPerPixel=3", name="c.dcm")


def test_dicom_multiframe_refused(gray):
    frames = np.stack([gray] * 3).astype(np.uint16)
    _expect_error(
        _dicom(frames, NumberOfFrames=3), "m.dcm", "multi-frame", "3 frames", name="m.dcm"
    )


def test_dicom_without_pixel_data_refused():
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    _expect_error(buf.getvalue(), "sr.dcm", "no pixel data", name="sr.dcm")


def test_dicom_compressed_without_plugin_refused(gray):
    from pydicom.encaps import encapsulate

    data = _dicom(gray, tsyntax=JPEGLosslessSV1, pixel_data=encapsulate([b"\xff\xd8\xff\xd9"]))
    err = _expect_error(data, "jl.dcm", name="jl.dcm")
    try:
        from pydicom.pixels import get_decoder

        available = get_decoder(JPEGLosslessSV1).is_available
    except ImportError:
        available = True
    if available:  # a plugin is installed: our fake frame is then corrupt data
        assert "corrupt" in err.problem or "compressed" in err.problem
    else:
        assert "compressed DICOM" in err.problem and "JPEG Lossless" in err.problem
        assert "pylibjpeg" in err.problem or "gdcm" in err.problem


def test_dicom_huge_refused_before_decoding(no_pixel_decoding):
    tiny = np.zeros((2, 2), np.uint16)
    data = _dicom(tiny, Rows=30000, Columns=30000)
    _expect_error(data, "big.dcm", "too large", "30000x30000", name="big.dcm")


def test_dicom_garbage_after_magic():
    data = b"\x00" * 128 + b"DICM" + b"\x13\x37" * 50
    _expect_error(data, "bad.dcm", "DICOM", name="bad.dcm")

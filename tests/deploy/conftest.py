"""Fixtures for the deploy tests (mixed formats, ONNX export, web app).

One small run, trained once per session on real shared images stored as JPEG, 16-bit
PNG and DICOM (MONOCHROME2 16-bit, MONOCHROME1 12-bit with rescale), and one uvicorn
server on a free loopback port serving it.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscope.cli import main
from pneumoscope.data.discover import patient_id

# Small enough for an oversize upload to be cheap, large enough for a 224x224 DICOM.
TEST_MAX_UPLOAD = 256 * 1024
FORMATS = ("jpeg", "png16", "dcm_mono2_16", "dcm_mono1_12")


# ----------------------------------------------------------------------------- files


def dicom_bytes(stored: np.ndarray, **attrs) -> bytes:
    """A Digital X-Ray DICOM file (with preamble and file meta) holding `stored`: uint8
    as 8 bits allocated and stored, anything else as uint16."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = 8 if stored.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="u1" if bits == 8 else "<u2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    try:  # pydicom >= 3
        ds.save_as(buf, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def encode_as(gray: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """(file bytes, suffix) of a uint8 image in `fmt`, built so that the shared decode
    gives back exactly `gray` (the windows below undo the scaling)."""
    g = gray.astype(np.uint16)
    if fmt == "png16":
        buf = io.BytesIO()
        Image.fromarray(g * 257).save(buf, format="PNG")  # PIL writes I;16 as a 16-bit PNG
        return buf.getvalue(), ".png"
    if fmt == "dcm_mono2_16":
        # window (c - 0.5, w - 1) = (32767, 65535) maps g*257 back to g
        return dicom_bytes(g * 257, WindowCenter=32767.5, WindowWidth=65536), ".dcm"
    if fmt == "dcm_mono1_12":
        # MONOCHROME1 (white = low), 12 bits stored, rescale 0.5x - 100, then a window
        # that maps the rescaled range [-96, 1944] onto 0..255 before the inversion.
        stored = (255 - g) * 16 + 8
        return dicom_bytes(
            stored,
            PhotometricInterpretation="MONOCHROME1",
            BitsStored=12,
            HighBit=11,
            RescaleSlope=0.5,
            RescaleIntercept=-100,
            WindowCenter=924.5,
            WindowWidth=2041,
        ), ".dcm"
    raise ValueError(fmt)


def shared_jpegs(
    shared_data: Path,
    cls: str,
    n: int,
    offset: int = 0,
    exclude_patients: frozenset[str] = frozenset(),
) -> list[Path]:
    files = sorted(
        f
        for f in (shared_data / "train" / cls).glob("*.jpeg")
        if patient_id(f.name) not in exclude_patients
    )
    step = max(1, len(files) // (n + offset + 1))
    return files[(offset + 1) * step :: step][:n]


def write_mixed_split(
    dest: Path,
    mirror: Path | None,
    shared_data: Path,
    n: int,
    offset: int,
    exclude_patients: frozenset[str] = frozenset(),
) -> None:
    """dest/{NORMAL,PNEUMONIA}: real images cycling through FORMATS (patient names kept),
    none of `exclude_patients`; mirror/: the same images as the original JPEGs."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (dest / cls).mkdir(parents=True)
        if mirror is not None:
            (mirror / cls).mkdir(parents=True)
        for i, src in enumerate(shared_jpegs(shared_data, cls, n, offset, exclude_patients)):
            fmt = FORMATS[i % len(FORMATS)]
            if mirror is not None:
                shutil.copy2(src, mirror / cls / src.name)
            if fmt == "jpeg":
                shutil.copy2(src, dest / cls / src.name)
                continue
            gray = np.asarray(Image.open(src).convert("L"))
            data, suffix = encode_as(gray, fmt)
            (dest / cls / (src.stem + suffix)).write_bytes(data)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mixed_root(tmp_path_factory, shared_data) -> Path:
    """DATA_ROOT: train/ (12 + 12) and test/ (8 + 8) mixing JPEG, 16-bit PNG and DICOM;
    test_jpeg/ holds test/'s images as their original JPEGs."""
    root = tmp_path_factory.mktemp("mixed")
    write_mixed_split(root / "train", None, shared_data, n=12, offset=0)
    train_patients = frozenset(patient_id(f.name) for f in (root / "train").rglob("*.*"))
    write_mixed_split(
        root / "test",
        root / "test_jpeg",
        shared_data,
        n=8,
        offset=2,
        exclude_patients=train_patients,
    )
    assert not train_patients & {patient_id(f.name) for f in (root / "test").rglob("*.*")}
    return root


@pytest.fixture(scope="session")
def deploy_run(mixed_root, tmp_path_factory) -> Path:
    """A small trained run (efficientnet_lite0, 64 px, 2 epochs) on the mixed-format data."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(mixed_root),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--image-size",
            "64",
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--head-epochs",
            "0",
            "--val-fraction",
            "0.25",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def onnx_model(deploy_run) -> Path:
    """The run exported through the CLI (model.onnx + model.onnx.json in the run)."""
    assert main(["-q", "export", str(deploy_run), "--format", "onnx"]) == 0
    path = deploy_run / "model.onnx"
    assert path.is_file() and (deploy_run / "model.onnx.json").is_file()
    return path


@pytest.fixture(scope="session")
def live_server(deploy_run):
    """The torch-backed app with a small upload limit (TEST_MAX_UPLOAD)."""
    from pneumoscope.serve import create_app
    from pneumoscope.serve.background import BackgroundServer

    with BackgroundServer(
        create_app(deploy_run, max_upload_bytes=TEST_MAX_UPLOAD, device="cpu")
    ) as server:
        yield server


@pytest.fixture(scope="session")
def run_threshold(deploy_run) -> float:
    return json.loads((deploy_run / "threshold.json").read_text())["threshold"]


@pytest.fixture(scope="session")
def server_for():
    """Context manager factory: `with server_for(app) as server: server.url`."""
    from pneumoscope.serve.background import BackgroundServer

    return BackgroundServer


@pytest.fixture(scope="session")
def encode():
    """encode_as(gray, fmt) -> (bytes, suffix): fmt in png16, dcm_mono2_16, dcm_mono1_12."""
    return encode_as


@pytest.fixture(scope="session")
def make_dicom():
    """dicom_bytes(stored, **attrs) -> bytes of a DX DICOM holding `stored` (uint8: 8-bit)."""
    return dicom_bytes


@pytest.fixture(scope="session")
def max_upload() -> int:
    """The upload limit of live_server, in bytes."""
    return TEST_MAX_UPLOAD

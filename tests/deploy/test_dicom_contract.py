"""A DICOM answers like its picture: the DICOM decode rule (pneumoscope.data.decode,
recorded as `dicom_decode` in config.json and the ONNX contract) on films built from the
embedded sample's real JPEGs, scored by the small deploy run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pneumoscope.data.decode import decode_gray
from pneumoscope.data.dicom import dicom_decode_contract
from pneumoscope.inference import Predictor

# A 12-bit film with a VOI window (centre, width) against its 8-bit JPEG:
# * "export": the window an 8-bit export of the film applies (x / 16, rounded): the DICOM
#   decodes to the JPEG's very grey levels, so p(pneumonia) matches to 1e-6;
# * "full range": the window a modality writes for the whole 12-bit range; it differs from
#   the export by at most one grey level (x * 255 / 4095 against x / 16). Measured on the
#   deploy run (efficientnet_lite0, 64 px) over the 8 films below: largest |p(DICOM) -
#   p(JPEG)| 0.036; stated tolerance 0.05.
TWELVE_BIT_WINDOWS = {"export": ((2048, 4081), 0, 1e-6), "full range": ((2048, 4096), 1, 0.05)}
# What a hospital's file carries beside the pixels: none of it may change the answer.
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042", "InstitutionName": "Example General"}


def sample_films(shared_data, n_per_class: int = 4):
    """Real films of the embedded sample's val/ part, both classes."""
    return [
        f
        for cls in ("NORMAL", "PNEUMONIA")
        for f in sorted((shared_data / "val" / cls).glob("*.jpeg"))[:n_per_class]
    ]


@pytest.fixture(scope="module")
def predictor(deploy_run):
    return Predictor.from_run(deploy_run, device="cpu")


def p_of(predictor, data: bytes, name: str) -> float:
    return float(predictor.predict_images(predictor.load(data, name=name)[None])[0])


def twelve_bit(gray: np.ndarray, seed: int) -> np.ndarray:
    """A 12-bit version of an 8-bit film: each grey level g spread over 16g .. 16g+15 (the
    detail an 8-bit export rounds away, drawn at random)."""
    rng = np.random.default_rng(seed)
    return gray.astype(np.uint16) * 16 + rng.integers(0, 16, gray.shape, dtype=np.uint16)


def test_a_dicom_of_a_jpegs_pixels_predicts_as_the_jpeg(predictor, shared_data, make_dicom):
    """8-bit pixels, no VOI window: shown as stored, so the film is the JPEG's, to the bit
    (the percentile window applied before moved the grey levels by ~21 of 255)."""
    for jpeg in sample_films(shared_data):
        gray = decode_gray(jpeg)
        dicom = make_dicom(gray, **PATIENT)
        np.testing.assert_array_equal(decode_gray(dicom, name="film.dcm"), gray)
        assert p_of(predictor, dicom, "film.dcm") == pytest.approx(
            p_of(predictor, jpeg.read_bytes(), jpeg.name), abs=1e-6
        ), jpeg.name


def test_an_8bit_monochrome1_dicom_is_the_inverted_picture(shared_data, make_dicom):
    gray = decode_gray(sample_films(shared_data, 1)[0])
    stored = 255 - gray  # MONOCHROME1: white is low
    out = decode_gray(make_dicom(stored, PhotometricInterpretation="MONOCHROME1"), name="m1.dcm")
    np.testing.assert_array_equal(out, gray)


@pytest.mark.parametrize("window", list(TWELVE_BIT_WINDOWS))
def test_a_12bit_dicom_with_its_voi_window_matches_the_jpeg(
    window, predictor, shared_data, make_dicom
):
    """12 bits stored and a VOI window: the window the file carries decides the picture,
    within TWELVE_BIT_WINDOWS' grey levels and p(pneumonia) tolerance of the JPEG."""
    (center, width), max_levels, tolerance = TWELVE_BIT_WINDOWS[window]
    diffs = []
    for i, jpeg in enumerate(sample_films(shared_data)):
        gray = decode_gray(jpeg)
        dicom = make_dicom(
            twelve_bit(gray, seed=i),
            BitsStored=12,
            HighBit=11,
            WindowCenter=center,
            WindowWidth=width,
            **PATIENT,
        )
        levels = decode_gray(dicom, name="film.dcm").astype(int) - gray
        assert np.abs(levels).max() <= max_levels, jpeg.name
        diffs.append(
            abs(p_of(predictor, dicom, "film.dcm") - p_of(predictor, jpeg.read_bytes(), jpeg.name))
        )
    print(f"12-bit DICOM ({window} window) vs JPEG: largest |dp| {max(diffs):.6f}")
    assert max(diffs) <= tolerance


@pytest.mark.slow  # an ONNX export
def test_the_run_and_its_onnx_contract_record_the_dicom_rule(deploy_run, onnx_model):
    config = json.loads((deploy_run / "config.json").read_text())
    assert config["preprocessing"]["dicom_decode"] == dicom_decode_contract()
    contract = json.loads((onnx_model.parent / (onnx_model.name + ".json")).read_text())
    assert contract["preprocessing"]["dicom_decode"] == dicom_decode_contract()
    assert (
        dicom_decode_contract()["version"] == 2
        and "BitsStored <= 8" in dicom_decode_contract()["rule"]
    )


def test_a_run_from_before_the_rule_still_loads(deploy_run, tmp_path, shared_data):
    """A run directory written before `dicom_decode` was recorded loads and predicts as before."""
    old = tmp_path / "old_run"
    shutil.copytree(deploy_run, old, ignore=shutil.ignore_patterns("model.onnx*"))
    config = json.loads((old / "config.json").read_text())
    del config["preprocessing"]["dicom_decode"]
    (old / "config.json").write_text(json.dumps(config))
    film = sample_films(shared_data, 1)[0]
    now, before = (Predictor.from_run(run, device="cpu") for run in (deploy_run, old))
    assert p_of(before, film.read_bytes(), film.name) == p_of(now, film.read_bytes(), film.name)

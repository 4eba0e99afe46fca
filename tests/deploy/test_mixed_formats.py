"""JPEG, 16-bit PNG and DICOM (MONOCHROME1/2, 12/16-bit) side by side in class folders
go through discovery, train, evaluate and predict alike."""

import csv
import json
from pathlib import Path

import pytest

from pneumoscope.cli import main
from pneumoscope.data.discover import discover_split

SUFFIXES = {".jpeg", ".png", ".dcm"}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_discovery_finds_every_format(mixed_root):
    samples = discover_split(mixed_root / "train")
    assert len(samples) == 24
    assert {s.path.suffix for s in samples} == SUFFIXES
    # patient ids come from the stem, whatever the suffix
    assert all(not s.patient.endswith((".dcm", ".png")) for s in samples)


def test_train_used_every_file(deploy_run, mixed_root):
    summary = json.loads((deploy_run / "summary.json").read_text())
    assert summary["unreadable"] == []
    manifest = read_csv(deploy_run / "manifest.csv")
    assert len(manifest) == len(discover_split(mixed_root / "train"))
    assert {Path(r["path"]).suffix for r in manifest} == SUFFIXES


def test_evaluate_mixed_folder_matches_jpeg_originals(deploy_run, mixed_root, tmp_path):
    mixed, original = tmp_path / "mixed.json", tmp_path / "jpeg.json"
    for data, out in ((mixed_root / "test", mixed), (mixed_root / "test_jpeg", original)):
        assert (
            main(
                [
                    "-q",
                    "evaluate",
                    str(deploy_run),
                    "--data",
                    str(data),
                    "--out",
                    str(out),
                    "--bootstrap",
                    "50",
                    "--strict",
                ]
            )
            == 0
        )
    m, o = json.loads(mixed.read_text()), json.loads(original.read_text())
    assert m["n"] == o["n"] == 16 and m["unreadable"] == []
    # each PNG/DICOM decodes to its JPEG's gray levels, so the model sees the same image
    p_mixed = {
        Path(r["path"]).stem: float(r["p_pneumonia"])
        for r in read_csv(tmp_path / "mixed_predictions.csv")
    }
    p_jpeg = {
        Path(r["path"]).stem: float(r["p_pneumonia"])
        for r in read_csv(tmp_path / "jpeg_predictions.csv")
    }
    assert p_mixed.keys() == p_jpeg.keys()
    for stem in p_mixed:
        assert p_mixed[stem] == pytest.approx(p_jpeg[stem], abs=1e-4), stem
    assert m["confusion"] == o["confusion"]


def test_predict_mixed_folder(deploy_run, mixed_root, tmp_path, run_threshold):
    out = tmp_path / "pred.csv"
    assert (
        main(
            [
                "-q",
                "predict",
                str(deploy_run),
                str(mixed_root / "test"),
                "--out",
                str(out),
                "--strict",
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert len(rows) == 16
    assert {Path(r["path"]).suffix for r in rows} == SUFFIXES
    for r in rows:
        p = float(r["p_pneumonia"])
        assert 0.0 <= p <= 1.0 and r["label"] == ("PNEUMONIA" if p >= run_threshold else "NORMAL")

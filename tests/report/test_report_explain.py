"""`pneumoscope explain`: one overlay PNG per image and the probability, as predict gives it."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.commands import predict_paths


def test_explain_writes_overlays_and_prints_probabilities(
    report_run, report_split, tmp_path, capsys, caplog
):
    images = (
        sorted((report_split / "PNEUMONIA").glob("*.jpeg"))[:2]
        + sorted((report_split / "NORMAL").glob("*.jpeg"))[:1]
    )
    # Same file name in another folder: must not overwrite the first overlay.
    twin = tmp_path / "elsewhere" / images[0].name
    twin.parent.mkdir()
    shutil.copy2(images[0], twin)
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "explain"
    assert (
        main(
            [
                "explain",
                str(report_run),
                *map(str, images),
                str(twin),
                str(broken),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == "path,p_pneumonia,label,overlay" and len(lines) == 1 + len(images) + 1
    assert f"{broken}: truncated or corrupt" in caplog.text  # named with its problem, and left out
    expected = {
        r["path"]: r for r in predict_paths(report_run, [*images, twin], show_progress=False)
    }
    overlays = set()
    for line in lines[1:]:
        path, p, label, overlay = line.split(",")
        assert (
            abs(float(p) - expected[path]["p_pneumonia"]) < 1e-5
            and label == expected[path]["label"]
        )
        with Image.open(overlay) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            assert np.asarray(im).std() > 0
        overlays.add(overlay)
    assert len(overlays) == len(images) + 1


def test_explain_strict_stops_on_unreadable(report_run, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert (
        main(["-q", "explain", str(report_run), str(bad), "--strict", "--out", str(tmp_path / "o")])
        == 2
    )
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

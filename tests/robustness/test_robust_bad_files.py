"""Bad files in a data folder (issue 7, point 1).

A real data folder (real shared JPEGs) is salted with the files a hospital export
really holds: zero-byte files, a truncated JPEG, text named .jpeg, a PNG bomb, CMYK,
palette and 16-bit images, a non-image in a class folder, symlink loops, a FIFO.
`audit` must name every unreadable one with its problem (and decode the odd-but-valid
ones), `train`/`evaluate`/`predict` must skip them with ONE warning that names them or
stop with `--strict` before any work, and decoding a bomb must stay small in memory.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.data.decode import MAX_PIXELS, decode_gray

PER_CLASS = 12  # real images per class: enough for a patient-grouped split at size 64


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO named .jpeg used to block open() forever; should that come back, dump every
    thread's stack and stop the run after 4 minutes instead of hanging CI silently."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A well-formed PNG whose IHDR declares width x height, with a small real IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1_000_000, 9))
        + png_chunk(b"IEND", b"")
    )


def ztxt_bomb(gray: np.ndarray) -> bytes:
    """A valid small PNG carrying a zTXt chunk that inflates to 256 MiB."""
    import io

    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    png = buf.getvalue()
    comp = zlib.compressobj(9)
    block = b"\x00" * (1 << 20)
    payload = b"".join(comp.compress(block) for _ in range(256)) + comp.flush()
    chunk = png_chunk(b"zTXt", b"Comment\x00\x00" + payload)
    return png[:33] + chunk + png[33:]  # right after the 8-byte signature + 25-byte IHDR


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF header is patched to declare width x height."""
    data = bytearray(jpeg)
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def dicom_declaring(rows: int, cols: int) -> bytes:
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\x00\x00" * 64
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.save_as(buf, write_like_original=False)  # pydicom 2.x
    return buf.getvalue()


# The planted files: relative path -> words its problem must contain (None: readable).
BAD = {
    "train/NORMAL/zero.jpeg": "empty file",
    "train/NORMAL/notes.jpeg": "not an image",
    "train/NORMAL/loop_a.jpeg": "symlink loop",
    "train/NORMAL/loop_b.jpeg": "symlink loop",
    "train/NORMAL/export.jpeg": "not a regular file",  # a FIFO: opening it must not hang
    "train/PNEUMONIA/person9001_bacteria_1.jpeg": "truncated or corrupt JPEG",
    "train/PNEUMONIA/bomb.png": "too large",
    "train/PNEUMONIA/readme.txt": "not an image file",
}
ODD_BUT_READABLE = [
    "train/NORMAL/cmyk.jpeg",
    "train/NORMAL/palette.png",
    "train/PNEUMONIA/sixteen.png",
]
# What discovery sees (image suffixes) and must skip: all of BAD but the .txt.
SKIPPED = sorted(p for p in BAD if not p.endswith(".txt"))


@pytest.fixture(scope="module")
def hostile_root(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((shared_data / "train" / cls).glob("*.jpeg"))
        dest = root / "train" / cls
        dest.mkdir(parents=True)
        for f in files[:: max(1, len(files) // PER_CLASS)][:PER_CLASS]:
            shutil.copy2(f, dest / f.name)
    normal, pneu = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    real = reference_image(root, shared_data)
    gray = np.asarray(Image.open(real).convert("L"))
    (normal / "zero.jpeg").write_bytes(b"")
    (normal / "notes.jpeg").write_text("exported by PACS on 2024-01-01\nno image here\n")
    os.symlink("loop_b.jpeg", normal / "loop_a.jpeg")
    os.symlink("loop_a.jpeg", normal / "loop_b.jpeg")
    os.mkfifo(normal / "export.jpeg")
    os.symlink("..", pneu / "parent_loop")  # a folder loop: walking must not follow it
    data = real.read_bytes()
    (pneu / "person9001_bacteria_1.jpeg").write_bytes(data[: len(data) // 2])
    (pneu / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (pneu / "readme.txt").write_text("class folder notes\n")
    Image.fromarray(gray).convert("CMYK").save(normal / "cmyk.jpeg", quality=95)
    Image.fromarray(gray).convert("RGB").quantize(colors=64).save(normal / "palette.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(pneu / "sixteen.png")
    return root


def reference_image(root: Path, shared_data: Path) -> Path:
    """The real shared image the odd formats and the truncated JPEG were made from."""
    return next(
        p
        for p in sorted((root / "train" / "NORMAL").glob("*.jpeg"))
        if (shared_data / "train" / "NORMAL" / p.name).is_file()
    )


def test_odd_formats_decode_like_the_original(hostile_root, shared_data):
    reference = np.asarray(Image.open(reference_image(hostile_root, shared_data)).convert("L"))
    assert Image.open(hostile_root / "train/NORMAL/cmyk.jpeg").mode == "CMYK"
    assert Image.open(hostile_root / "train/NORMAL/palette.png").mode == "P"
    assert Image.open(hostile_root / "train/PNEUMONIA/sixteen.png").mode.startswith("I;16")
    for rel in ODD_BUT_READABLE:
        out = decode_gray(hostile_root / rel).astype(np.int32)
        assert out.shape == reference.shape, rel
        assert np.abs(out - reference).mean() < 3.0, rel


def test_audit_names_every_bad_file_and_nothing_else(hostile_root, capsys):
    assert main(["-q", "audit", str(hostile_root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    problems = {u["path"]: u["problem"] for u in report["unreadable"]}
    assert sorted(problems) == sorted(BAD)
    for rel, words in BAD.items():
        assert words in problems[rel], (rel, problems[rel])
    for rel in ODD_BUT_READABLE:
        assert rel not in problems
    assert report["splits"]["train"]["counts"] == {
        "NORMAL": PER_CLASS + 2,
        "PNEUMONIA": PER_CLASS + 1,
    }
    assert report["skipped_symlinked_folders"] == ["train/PNEUMONIA/parent_loop"]
    assert main(["-q", "audit", str(hostile_root)]) == 0
    table = capsys.readouterr().out
    assert f"unreadable files: {len(BAD)}" in table
    for rel in BAD:
        assert rel in table


@pytest.fixture(scope="module")
def trained(hostile_root, tmp_path_factory, cli, small_run):
    """A real two-epoch training run (child process) on the salted folder."""
    out = tmp_path_factory.mktemp("runs") / "run"
    proc = cli("train", "--data", hostile_root, "--out", out, *small_run, "--epochs", "2")
    return out, proc


def unreadable_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "unreadable file" in line]


@pytest.mark.slow  # trains
def test_train_skips_bad_files_with_one_warning(trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = unreadable_warnings(proc.stderr)
    assert len(warnings) == 1 and f"skipping {len(SKIPPED)} unreadable" in warnings[0], warnings
    for rel in SKIPPED:
        assert rel in proc.stderr, rel
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    skipped = {
        Path(p).relative_to(hostile_root_of(out)).as_posix() for p, _ in summary["unreadable"]
    }
    assert skipped == set(SKIPPED)
    assert summary["n_train"] + summary["n_val"] == 2 * PER_CLASS + len(ODD_BUT_READABLE)


def hostile_root_of(run: Path) -> Path:
    return Path(json.loads((run / "config.json").read_text())["data"])


@pytest.mark.slow  # trains
def test_train_strict_stops_before_any_epoch(hostile_root, tmp_path, cli, small_run):
    out = tmp_path / "strict"
    proc = cli(
        "-q", "train", "--data", hostile_root, "--out", out, *small_run, "--epochs", "2", "--strict"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "--strict" in proc.stderr
    for rel in SKIPPED:
        assert rel in proc.stderr, rel
    for name in ("metrics.jsonl", "checkpoint_last.pt", "model_best.safetensors"):
        assert not (out / name).exists(), name


@pytest.mark.slow  # its run trains in a subprocess
def test_evaluate_skips_bad_files_or_stops_with_strict(
    trained, hostile_root, tmp_path, caplog, capsys
):
    run, proc = trained
    assert proc.returncode == 0
    out = tmp_path / "metrics.json"
    args = ["-q", "evaluate", str(run), "--data", str(hostile_root / "train"), "--bootstrap", "50"]
    with caplog.at_level(logging.WARNING):
        assert main(args + ["--out", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    for rel in SKIPPED:
        assert rel in warnings[0], rel
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 2 * PER_CLASS + len(ODD_BUT_READABLE)
    assert len(metrics["unreadable"]) == len(SKIPPED)

    strict_out = tmp_path / "strict.json"
    capsys.readouterr()
    assert main(args + ["--out", str(strict_out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert all(rel in err for rel in SKIPPED) and "Traceback" not in err
    assert not strict_out.exists()


@pytest.mark.slow  # its run trains in a subprocess
def test_predict_skips_bad_files_or_stops_with_strict(
    trained, hostile_root, tmp_path, caplog, capsys
):
    run, proc = trained
    assert proc.returncode == 0
    out = tmp_path / "pred.csv"
    folder = hostile_root / "train"
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "predict", str(run), str(folder), "--out", str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    for rel in SKIPPED:
        assert rel in warnings[0], rel
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 2 * PER_CLASS + len(ODD_BUT_READABLE)
    for rel in ODD_BUT_READABLE:
        assert any(line.startswith(str(hostile_root / rel) + ",") for line in lines), rel

    strict_out = tmp_path / "strict.csv"
    capsys.readouterr()
    assert main(["-q", "predict", str(run), str(folder), "--out", str(strict_out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert all(rel in err for rel in SKIPPED) and "Traceback" not in err
    assert not strict_out.exists()


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import pydicom  # imported before the baseline: the DICOM bomb goes through it
    from pneumoscope.data.decode import ImageDecodeError, decode_gray

    decode_gray(sys.argv[1])  # warm: PIL plugins loaded, one real image decoded
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    for path in sys.argv[2:]:
        try:
            decode_gray(path)
            results[path] = "DECODED"
        except ImageDecodeError as err:
            results[path] = err.problem
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kib": base, "peak_kib": peak, "results": results}))
""")


def test_decoding_bombs_stays_small_in_memory(hostile_root, shared_data, tmp_path):
    """Peak RSS of a child that decodes every bomb grows by far less than one decoded bomb."""
    real = reference_image(hostile_root, shared_data)
    gray = np.asarray(Image.open(real).convert("L"))
    bombs = {
        "png_100k.png": png_declaring(100_000, 100_000),
        "png16_rgba.png": png_declaring(50_000, 50_000, bit_depth=16, colour=6),
        "png_just_over.png": png_declaring(MAX_PIXELS // 7_000 + 1, 7_000),
        "jpeg_65k.jpeg": jpeg_declaring(real.read_bytes(), 65_000, 65_000),
        "ztxt.png": ztxt_bomb(gray),
        "huge.dcm": dicom_declaring(60_000, 60_000),
    }
    paths = []
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(real), *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, result in probe["results"].items():
        assert result != "DECODED", path
        assert "too large" in result or "corrupt" in result, (path, result)
    grown_mib = (probe["peak_kib"] - probe["base_kib"]) / 1024
    # Decoding the smallest of these bombs whole would take > 60 MB (MAX_PIXELS bytes).
    assert grown_mib < 32, probe


def test_a_class_lost_to_unreadable_files_stops_before_training(
    shared_data, tmp_path, capsys, small_run
):
    """Every NORMAL file unreadable: no epoch can choose a model or a threshold, so train
    stops before the first epoch with a message saying so (not a crash at the end)."""
    root = tmp_path / "data"
    (root / "train" / "NORMAL").mkdir(parents=True)
    (root / "train" / "PNEUMONIA").mkdir(parents=True)
    for i in range(PER_CLASS):
        (root / "train" / "NORMAL" / f"IM-{9000 + i}-0001.jpeg").write_bytes(b"")
    for f in sorted((shared_data / "train" / "PNEUMONIA").glob("*.jpeg"))[:PER_CLASS]:
        shutil.copy2(f, root / "train" / "PNEUMONIA" / f.name)
    out = tmp_path / "run"
    assert (
        main(["-q", "train", "--data", str(root), "--out", str(out), *small_run, "--epochs", "1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "no readable NORMAL image" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint_last.pt").exists()

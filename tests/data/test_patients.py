"""--patients FILE.csv: patient ids for data not named the Kermany way, so train keeps a
patient on one side, audit finds patients shared across splits and evaluate resamples them."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pneumoscope.cli import main
from pneumoscope.data.audit import audit_root
from pneumoscope.data.discover import PatientMap, discover_root, discover_split
from pneumoscope.data.manifest import read_manifest


def _write(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def test_csv_gives_the_patients_by_name_and_by_path(anonymous_root):
    data, table, truth = anonymous_root
    splits = discover_root(data, PatientMap(table))
    for samples in splits.values():
        assert {s.path.name: s.patient for s in samples} == {
            s.path.name: truth[s.path.name] for s in samples
        }
    # without the CSV every anonymous file is its own patient
    plain = discover_split(data / "train", "train")
    assert len({s.patient for s in plain}) == len(plain) > len({truth[s.path.name] for s in plain})


def test_image_missing_from_the_csv_is_a_clear_error(anonymous_root, tmp_path):
    data, table, _ = anonymous_root
    rows = list(csv.reader(open(table, encoding="utf-8")))
    short = _write(tmp_path / "short.csv", rows[:-1] + [["not-in-the-data.jpeg", "someone"]])
    with pytest.raises(ValueError) as info:
        discover_root(data, PatientMap(short))
    message = str(info.value)
    assert (
        "short.csv" in message
        and "no patient for 1 of" in message
        and Path(rows[-1][0]).name in message
    )


@pytest.mark.parametrize(
    "rows, words",
    [
        ([["file", "who"], ["a.jpeg", "x"]], "needs a column"),
        ([["path", "patient"], ["a.jpeg", "x"], ["a.jpeg", "y"]], "two patients"),
        ([["path", "patient"], ["a.jpeg", ""]], "line 2: empty"),
    ],
)
def test_bad_csv_is_refused_with_the_reason(tmp_path, rows, words):
    with pytest.raises(ValueError, match=words):
        PatientMap(_write(tmp_path / "p.csv", rows))


def test_train_with_patients_keeps_each_patient_on_one_side(anonymous_root, tmp_path):
    data, table, truth = anonymous_root
    run = tmp_path / "run"
    assert (
        main(
            [
                "-q",
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--patients",
                str(table),
                "--backbone",
                "efficientnet_lite0",
                "--image-size",
                "32",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--head-epochs",
                "0",
            ]
        )
        == 0
    )
    roles = read_manifest(run / "manifest.csv")
    sides = {role: {s.patient for s in samples} for role, samples in roles.items()}
    assert sides["train"] and sides["val"] and not sides["train"] & sides["val"]
    for samples in roles.values():
        assert all(s.patient == truth[s.path.name] for s in samples)
    assert json.loads((run / "config.json").read_text())["patients"] == str(table)
    # evaluate resamples the CSV's patients
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(run),
                "--data",
                str(data / "test"),
                "--out",
                str(out),
                "--bootstrap",
                "20",
                "--patients",
                str(table),
            ]
        )
        == 0
    )
    test_names = [p.name for p in (data / "test").rglob("*.jpeg")]
    assert (
        json.loads(out.read_text())["n_patients"]
        == len({truth[n] for n in test_names})
        < len(test_names)
    )


def test_audit_with_patients_finds_a_patient_in_two_splits(anonymous_root, tmp_path, capsys):
    data, table, _ = anonymous_root
    root = tmp_path / "data"
    shutil.copytree(data, root)
    rows = list(csv.reader(open(table, encoding="utf-8")))
    train_name, subject = next(r for r in rows[1:] if "/" not in r[0])  # a train/ film
    extra = root / "test" / "NORMAL" / "scan-extra.jpeg"
    # same patient as a train film
    shutil.copy2(next((root / "test" / "NORMAL").glob("*.jpeg")), extra)
    patients = _write(tmp_path / "p.csv", rows + [["scan-extra.jpeg", subject]])
    report = audit_root(root, show_progress=False, patients=PatientMap(patients))
    assert report["patients_shared_across_splits"] == {subject: ["test", "train"]}
    assert main(["-q", "audit", str(root), "--json", "--patients", str(patients)]) == 0
    assert json.loads(capsys.readouterr().out)["patients_from"] == str(patients)
    # an image the CSV lacks stops the audit before any decoding, naming it
    lacks = _write(tmp_path / "lacks.csv", rows)
    assert main(["-q", "audit", str(root), "--patients", str(lacks)]) == 2
    assert "no patient for 1 of" in (err := capsys.readouterr().err) and "scan-extra.jpeg" in err

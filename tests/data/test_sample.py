"""The embedded sample (data/sample/) is what its manifest and its rule say."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

from pneumoscope.data.discover import discover_root

REPO = Path(__file__).resolve().parents[2]


def _make_sample():
    spec = importlib.util.spec_from_file_location(
        "make_sample", REPO / "scripts" / "make_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_files_are_the_manifest_bytes_and_fit_in_git(sample_data):
    rows = list(csv.DictReader((sample_data / "MANIFEST.csv").open()))
    on_disk = sorted(p.relative_to(sample_data).as_posix() for p in sample_data.glob("*/*/*.jpeg"))
    assert sorted(r["path"] for r in rows) == on_disk
    for r in rows:
        data = (sample_data / r["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"], r["path"]
        assert data[:2] == b"\xff\xd8"  # real JPEG bytes
    folder_bytes = sum(p.stat().st_size for p in sample_data.rglob("*") if p.is_file())
    assert folder_bytes < _make_sample().MAX_BYTES  # images, manifest and licence files together
    assert (sample_data / "LICENSE").is_file() and "CC BY 4.0" in (
        sample_data / "ATTRIBUTION.md"
    ).read_text()


def test_sample_has_every_kind_and_no_patient_in_both_splits(sample_data):
    splits = discover_root(sample_data)
    train, val = splits["train"], splits["val"]
    assert len(val) == 16 and {s.label for s in val} == {0, 1}
    assert not {s.patient for s in train} & {s.patient for s in val}
    names = [s.path.name for s in train]
    for kind in ("IM-", "NORMAL2-IM-"):
        assert any(n.startswith(kind) for n in names), kind
    for kind in ("_bacteria_", "_virus_"):
        assert any(kind in n for n in names), kind
    assert 150 <= sum(s.label == 0 for s in train) <= sum(s.label == 1 for s in train) <= 300


def test_selection_rule_takes_whole_patients_by_seed(tmp_path):
    """On a folder the test makes: every patient is taken whole or not at all, and the
    same seed gives the same files."""
    make_sample = _make_sample()
    for i in range(30):
        for cls, names in (
            ("NORMAL", [f"IM-{i:04d}-0001", f"IM-{i:04d}-0002"]),
            ("PNEUMONIA", [f"person{i}_bacteria_{2 * i}", f"person{i}_virus_{2 * i + 1}"]),
        ):
            for n in names:
                (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
                (tmp_path / "train" / cls / f"{n}.jpeg").write_bytes(b"x")
    targets = {"NORMAL/IM": 9, "PNEUMONIA/both": 5}
    a = make_sample.select_train(tmp_path, seed=1, targets=targets)
    assert a == make_sample.select_train(tmp_path, seed=1, targets=targets)
    assert a != make_sample.select_train(tmp_path, seed=2, targets=targets)
    assert (
        sum(p.parent.name == "NORMAL" for p in a) == 10
        and sum(p.parent.name == "PNEUMONIA" for p in a) == 6
    )
    stems = {p.name for p in a}
    for p in a:
        i = p.stem.split("-")[1] if p.stem.startswith("IM-") else p.stem.split("_")[0][6:]
        pair = (
            [f"IM-{i}-0001.jpeg", f"IM-{i}-0002.jpeg"]
            if p.stem.startswith("IM-")
            else [f"person{i}_bacteria_{2 * int(i)}.jpeg", f"person{i}_virus_{2 * int(i) + 1}.jpeg"]
        )
        assert set(pair) <= stems

from pathlib import Path

import pytest

from pneumoscope.data.discover import discover_root, discover_split, patient_id


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person123_bacteria_456.jpeg", "person123"),
        ("person123_virus_457.jpeg", "person123"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0553-0001-0002.jpeg", "IM-0553"),
        ("NORMAL2-IM-0135-0001.jpeg", "NORMAL2-IM-0135"),
        ("NORMAL2-IM-1345-0001-0002.jpeg", "NORMAL2-IM-1345"),
        ("scan_from_elsewhere.png", "scan_from_elsewhere"),
    ],
)
def test_patient_id_rules(name, patient):
    assert patient_id(name) == patient


def test_patient_ids_on_real_file_names(shared_data):
    """Every real file name yields a patient id by the documented rules, none by fallback."""
    samples = discover_split(shared_data / "train", "train")
    assert len(samples) > 100
    for s in samples:
        assert s.patient != s.path.stem, f"no patient rule matched {s.path.name}"
        assert s.path.name.startswith(s.patient)
    # several images per patient exist in the real data (bacteria + virus, -0001/-0002)
    assert len({s.patient for s in samples}) < len(samples)


def test_discover_root_finds_splits_and_labels(shared_data):
    splits = discover_root(shared_data)
    assert {"train", "val"} <= set(splits)
    labels = {s.label for s in splits["train"]}
    assert labels == {0, 1}
    normal = [s for s in splits["train"] if s.label == 0]
    assert all(s.path.parent.name == "NORMAL" for s in normal)


def test_discover_missing_class_folders_is_a_clear_error(tmp_path: Path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="expected split folders"):
        discover_root(tmp_path)

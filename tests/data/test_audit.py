import json
import shutil

from pneumoscope.cli import main
from pneumoscope.data.audit import audit_root


def test_audit_finds_planted_duplicate_and_unreadable(small_data_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(small_data_root, root)
    normal = sorted((root / "train" / "NORMAL").glob("*.jpeg"))
    # a duplicate under another name, in the other split
    shutil.copy2(normal[0], root / "test" / "NORMAL" / "copy_of_first.jpeg")
    # an unreadable file: half a JPEG
    data = normal[1].read_bytes()
    (root / "train" / "PNEUMONIA" / "person9999_bacteria_1.jpeg").write_bytes(
        data[: len(data) // 2]
    )

    report = audit_root(root, show_progress=False)
    unreadable = {u["path"]: u["problem"] for u in report["unreadable"]}
    assert "train/PNEUMONIA/person9999_bacteria_1.jpeg" in unreadable
    dup = [g for g in report["duplicates"] if "test/NORMAL/copy_of_first.jpeg" in g]
    assert dup and f"train/NORMAL/{normal[0].name}" in dup[0]
    assert report["splits"]["train"]["counts"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert report["splits"]["train"]["imbalance_pneumonia_per_normal"] == 1.0

    assert main(["audit", str(root), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["unreadable"] == report["unreadable"]
    assert main(["-q", "audit", str(root)]) == 0
    table = capsys.readouterr().out
    assert "unreadable files: 1" in table and "person9999_bacteria_1.jpeg" in table


def _another_film_of(root, patient: str, split: str):
    """A different image (not a duplicate) named as `patient`'s, planted in `split`."""
    target = root / split / "PNEUMONIA" / f"{patient}_virus_99999.jpeg"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sorted((root / "train" / "NORMAL").glob("*.jpeg"))[3], target)
    return target


def test_audit_reports_a_patient_in_train_and_val(small_data_root, tmp_path):
    # val/ of the Kermany release keeps train/'s person numbers: the same id is one child
    root = tmp_path / "copy"
    shutil.copytree(small_data_root, root)
    patient = sorted((root / "train" / "PNEUMONIA").glob("person*.jpeg"))[0].name.split("_")[0]
    _another_film_of(root, patient, "val")
    (root / "val" / "NORMAL").mkdir()
    report = audit_root(root, show_progress=False)
    assert report["patients_shared_across_splits"][patient] == ["train", "val"]


def test_audit_does_not_match_kermany_persons_of_train_and_test(small_data_root, tmp_path, capsys):
    """The release numbers persons per split (person1 of train/ and of test/ are two
    children): the same id in train/ and test/ is no shared patient; a copied film is
    still found, by its content."""
    root = tmp_path / "copy"
    shutil.copytree(small_data_root, root)
    patient = sorted((root / "train" / "PNEUMONIA").glob("person*.jpeg"))[0].name.split("_")[0]
    _another_film_of(root, patient, "test")
    copied = sorted((root / "train" / "NORMAL").glob("*.jpeg"))[0]
    shutil.copy2(copied, root / "test" / "NORMAL" / copied.name)
    report = audit_root(root, show_progress=False)
    assert report["patients_shared_across_splits"] == {}
    assert [f"test/NORMAL/{copied.name}", f"train/NORMAL/{copied.name}"] in report["duplicates"]
    assert "within train+val and within test" in report["patients_compared"]
    assert main(["-q", "audit", str(root)]) == 0
    assert "patients shared across splits: 0 (compared within train+val" in capsys.readouterr().out

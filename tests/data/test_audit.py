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
    (root / "train" / "PNEUMONIA" / "person9999_bacteria_1.jpeg").write_bytes(data[: len(data) // 2])

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


def test_audit_reports_patients_shared_across_splits(small_data_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(small_data_root, root)
    first = sorted((root / "train" / "PNEUMONIA").glob("person*.jpeg"))[0]
    patient = first.name.split("_")[0]
    target = root / "test" / "PNEUMONIA" / f"{patient}_virus_99999.jpeg"
    # a different image (not a duplicate) of the same patient in test
    other = sorted((root / "train" / "NORMAL").glob("*.jpeg"))[3]
    shutil.copy2(other, target)
    report = audit_root(root, show_progress=False)
    assert report["patients_shared_across_splits"][patient] == ["test", "train"]

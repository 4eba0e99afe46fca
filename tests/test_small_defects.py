"""Small defects found with hostile and clinical inputs (issue 28, item 5), each through
the verb a user runs."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pneumoscope.cli import main
from pneumoscope.data.audit import audit_root
from pneumoscope.deploy.onnx_contract import CONTRACT_FORMAT, CONTRACT_VERSION, write_contract
from pneumoscope.evaluation.threshold_rules import DEFAULT_THRESHOLD_RULE
from pneumoscope.rundir import BEST_MODEL, MANIFEST, save_model_weights

REPO = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_garbage_onnx_with_a_matching_contract_is_one_line(
    small_run_dir, tmp_path, shared_data, capsys
):
    """A file onnxruntime cannot parse, whose contract was made to match it: one line
    naming the file, exit 2 (was onnxruntime's traceback, exit 1)."""
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x08\x07" + bytes(range(256)) * 40)
    write_contract(
        garbage,
        {
            "format": CONTRACT_FORMAT,
            "format_version": CONTRACT_VERSION,
            "model_sha256": sha256(garbage),
            "source": {"weights_sha256": sha256(small_run_dir / BEST_MODEL)},
            "preprocessing": {"image_size": 64},
            "thresholds": json.loads((small_run_dir / "threshold.json").read_text()),
        },
    )
    film = sorted((shared_data / "val" / "NORMAL").glob("*.jpeg"))[0]
    assert main(["-q", "predict", str(small_run_dir), str(film), "--onnx", str(garbage)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscope predict: error: ") and str(garbage) in err
    assert (
        "onnxruntime cannot load this model" in err and "\n" not in err and "Traceback" not in err
    )


SAVE_IN_A_PROCESS = """
import sys, torch
from pneumoscope.rundir import save_model_weights
state = {"head.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.zeros(2)}
save_model_weights(sys.argv[1], state, {"backbone": "efficientnet_lite0", "epoch": 3, "kind": "x", "tta": "none"})
"""


@pytest.mark.slow  # trains twice
def test_the_same_weights_are_the_same_bytes(tmp_path):
    """safetensors writes its metadata in a hash map's order, new in every process: a
    resumed run's model_best.safetensors differed in bytes from the uninterrupted one's."""
    state = {"head.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.zeros(2)}
    meta = {"backbone": "efficientnet_lite0", "epoch": 3, "kind": "x", "tta": "none"}
    for i in range(8):  # in one process: each save builds a new map
        save_model_weights(tmp_path / f"in_{i}.safetensors", state, meta)
    for i in range(3):  # and in fresh processes, as a resumed run is
        subprocess.run(
            [sys.executable, "-c", SAVE_IN_A_PROCESS, str(tmp_path / f"proc_{i}.safetensors")],
            check=True,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
    assert len({p.read_bytes() for p in tmp_path.glob("*.safetensors")}) == 1


def test_a_symlink_loop_is_named_one_way_by_audit_evaluate_and_predict(
    small_run_dir, small_data_root, tmp_path, caplog, capsys
):
    root = tmp_path / "data"
    shutil.copytree(small_data_root, root)
    loop = root / "test" / "NORMAL" / "loop.jpeg"
    loop.symlink_to(loop.name)  # points at itself
    problem = "symlink loop (the link leads back to itself)"

    assert {
        u["path"]: u["problem"] for u in audit_root(root, show_progress=False)["unreadable"]
    } == {"test/NORMAL/loop.jpeg": problem}
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                [
                    "-q",
                    "evaluate",
                    str(small_run_dir),
                    "--data",
                    str(root / "test"),
                    "--bootstrap",
                    "10",
                    "--out",
                    str(tmp_path / "m.json"),
                ]
            )
            == 0
        )
    assert json.loads((tmp_path / "m.json").read_text())["unreadable"] == [
        {"path": str(loop), "problem": problem}
    ]
    capsys.readouterr()
    assert main(["-q", "predict", str(small_run_dir), str(loop)]) == 2  # nothing else to score
    assert f"{loop}: {problem}" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        assert (
            main(
                [
                    "-q",
                    "predict",
                    str(small_run_dir),
                    str(root / "test" / "NORMAL"),
                    "--out",
                    str(tmp_path / "p.csv"),
                ]
            )
            == 0
        )
    assert any(f"{loop}: {problem}" in r.getMessage() for r in caplog.records)


def test_explain_help_names_the_real_default_rule(capsys):
    with pytest.raises(SystemExit) as done:
        main(["explain", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"else {DEFAULT_THRESHOLD_RULE} for a run trained by this version" in text
    assert "else youden" not in text


def test_a_train_refused_for_its_weights_leaves_no_manifest(small_data_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(small_data_root),
            "--out",
            str(out),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            str(tmp_path / "no_such_weights.safetensors"),
            "--epochs",
            "1",
        ]
    )
    assert code == 2 and "no_such_weights.safetensors" in capsys.readouterr().err
    assert not (out / MANIFEST).exists()
    assert not out.exists() or list(out.iterdir()) == []


def test_evaluate_on_a_missing_folder_says_so(small_run_dir, tmp_path, capsys):
    missing = tmp_path / "MISSING_DIR"
    assert main(["-q", "evaluate", str(small_run_dir), "--data", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pneumoscope evaluate: error: {missing}: no such folder"

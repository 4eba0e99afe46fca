"""End to end through the CLI on a few dozen real shared images at a small size."""

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.cli import main
from pneumoscope.data.cache import decode_version
from pneumoscope.evaluation.metrics import DEFAULT_THRESHOLD_RULE, SENSITIVITY_RULES
from pneumoscope.fsio import atomic_write_json
from pneumoscope.inference import Predictor
from pneumoscope.rundir import BEST_MODEL, LAST_CHECKPOINT, MANIFEST, METRICS, THRESHOLD
from pneumoscope.training import TrainConfig, fit

FAST = ["--image-size", "64", "--batch-size", "8", "--val-fraction", "0.25", "--head-epochs", "0"]


def train_args(data, out, *extra):
    return [
        "-q",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--backbone",
        "efficientnet_lite0",
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="session")
def one_epoch_run(small_run_dir, small_data_root):
    """The session's small run (tests/conftest.py), trained through the CLI with the options of
    train_args(..., "--epochs", "2"), which tests resume and compare with. Read-only: copy it."""
    config = json.loads((small_run_dir / "config.json").read_text())
    assert config["data"] == str(small_data_root)
    assert {
        k: config[k]
        for k in ("backbone", "image_size", "batch_size", "val_fraction", "head_epochs", "epochs")
    } == {
        "backbone": "efficientnet_lite0",
        "image_size": 64,
        "batch_size": 8,
        "val_fraction": 0.25,
        "head_epochs": 0,
        "epochs": 2,
    }
    return small_run_dir


def read_metrics(run):
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def test_train_writes_run_directory(one_epoch_run):
    run = one_epoch_run
    for name in (
        "config.json",
        MANIFEST,
        METRICS,
        LAST_CHECKPOINT,
        BEST_MODEL,
        THRESHOLD,
        "summary.json",
    ):
        assert (run / name).exists(), name
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"train_loss", "val_roc_auc", "val_loss", "lr"} <= set(rows[0])
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == "efficientnet_lite0" and config["image_size"] == 64
    assert config["preprocessing"]["geometry"] == "stretch"
    with open(run / MANIFEST) as f:
        manifest = list(csv.DictReader(f))
    assert len(manifest) == 40
    roles = {r["role"] for r in manifest}
    assert roles == {"train", "val"}
    train_p = {r["patient"] for r in manifest if r["role"] == "train"}
    val_p = {r["patient"] for r in manifest if r["role"] == "val"}
    assert not train_p & val_p
    thresholds = json.loads((run / THRESHOLD).read_text())
    assert thresholds["default"] == DEFAULT_THRESHOLD_RULE and set(thresholds["rules"]) == {
        "youden",
        *SENSITIVITY_RULES,
    }
    assert thresholds["threshold"] == thresholds["rules"][DEFAULT_THRESHOLD_RULE]
    # what every verb uses
    assert Predictor.from_run(run, device="cpu").threshold == thresholds["threshold"]


def test_resume_starts_from_next_epoch(one_epoch_run, tmp_path, small_data_root):
    run = tmp_path / "run"
    # the same run, interrupted after its first epoch
    args = train_args(small_data_root, run, "--epochs", "2")
    cfg = TrainConfig(
        data=str(small_data_root),
        out=str(run),
        backbone="efficientnet_lite0",
        image_size=64,
        batch_size=8,
        val_fraction=0.25,
        head_epochs=0,
        epochs=2,
    )
    assert fit(cfg, show_progress=False, stop_after_epochs=1) is None
    assert not (run / THRESHOLD).exists()
    before = read_metrics(run)
    assert [r["epoch"] for r in before] == [0]
    assert main(args + ["--resume"]) == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0] == before[0]  # epoch 0 was not run again
    # the resumed epoch repeats the uninterrupted run's epoch exactly (same seed, CPU)
    full = read_metrics(one_epoch_run)
    for key in ("train_loss", "val_roc_auc", "val_loss"):
        assert rows[1][key] == pytest.approx(full[1][key], rel=1e-6), key
    assert_same_weights(run, one_epoch_run)


def assert_same_weights(run, reference):
    """The selected model and the last checkpoint's model: every tensor equal."""
    got, want = load_file(run / BEST_MODEL), load_file(reference / BEST_MODEL)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    got, want = (
        torch.load(r / LAST_CHECKPOINT, map_location="cpu", weights_only=True)["model"]
        for r in (run, reference)
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_with_changed_options_is_refused(one_epoch_run, tmp_path, small_data_root, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    assert main(train_args(small_data_root, run, "--epochs", "2", "--seed", "5", "--resume")) == 2
    assert "seed 0 -> 5" in capsys.readouterr().err


def snapshot(run):
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()
    }


def test_train_into_an_existing_run_is_refused_and_leaves_it_untouched(
    one_epoch_run, tmp_path, small_data_root, capsys
):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    before = snapshot(run)
    assert main(train_args(small_data_root, run, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(run) in err
    assert snapshot(run) == before
    assert main(train_args(small_data_root, run, "--epochs", "1", "--resume", "--overwrite")) == 2
    assert snapshot(run) == before


def test_overwrite_replaces_the_run(one_epoch_run, tmp_path, small_data_root):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    (run / ".config.json.x.tmp").write_text("half-written")  # left by a kill: removed too
    # what other verbs wrote from the old model
    derived = [
        "metrics.json",
        "metrics_predictions.csv",
        "metrics_test.json",
        "metrics_test_predictions.csv",
        "drift.json",
        "model.onnx",
        "model.onnx.json",
        "report/index.html",
        "explain/a_gradcam.png",
        "tensorboard/events.out.tfevents.1",
    ]
    for name in derived + ["notes.txt"]:
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("from the replaced run")
    assert main(train_args(small_data_root, run, "--epochs", "1", "--overwrite")) == 0
    assert [name for name in derived if (run / name).exists()] == []
    assert (run / "notes.txt").exists()  # a file of the user's own stays
    assert [r["epoch"] for r in read_metrics(run)] == [0]  # not the old run's lines + the new one
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 1
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert not list(run.glob(".*.tmp"))


def test_a_run_killed_before_its_first_epoch_ended_starts_over(
    one_epoch_run, tmp_path, small_data_root
):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", MANIFEST):  # what a kill before the first epoch's end leaves
        shutil.copy2(one_epoch_run / name, run / name)
    assert main(train_args(small_data_root, run, "--epochs", "1")) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [0]


def test_run_files_get_the_usual_mode(one_epoch_run, tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644  # mkstemp's was 0600
    finally:
        os.umask(old)
    expected = 0o666 & ~old
    for path in one_epoch_run.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def test_config_records_what_ran_and_resume_refuses_a_change(
    one_epoch_run, tmp_path, small_data_root, capsys
):
    config = json.loads((one_epoch_run / "config.json").read_text())
    assert config["recipe"] == "cpu-fast" and config["backbone"] == "efficientnet_lite0"
    assert config["precision"] in ("fp32", "bf16")
    # --trunk-precision/--trunk-engine auto on a CPU with onnxruntime (a dependency): its fp32 pass
    assert (config["trunk_precision"], config["trunk_engine"]) == ("fp32", "onnxruntime")
    assert (
        config["requested"]["trunk_precision"] == "auto"
        and config["requested"]["trunk_engine"] == "auto"
    )
    assert config["device"] == "cpu" and config["decode_version"] == decode_version()
    assert config["requested"]["precision"] == "auto"
    # the "requested" block's keys in the order config.json has always written them
    assert list(config["requested"]) == [
        "backbone",
        "precision",
        "trunk_precision",
        "trunk_engine",
        "device",
    ]
    assert 0.2 <= config["val_fraction_actual"] <= 0.3
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    other = "bf16" if config["precision"] == "fp32" else "fp32"
    assert (
        main(train_args(small_data_root, run, "--epochs", "2", "--precision", other, "--resume"))
        == 2
    )
    assert f"precision {config['precision']!r} -> {other!r}" in capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())
    saved["decode_version"] = "0ld"  # a run decoded by other code
    (run / "config.json").write_text(json.dumps(saved))
    assert main(train_args(small_data_root, run, "--epochs", "2", "--resume")) == 2
    assert "decode_version '0ld'" in capsys.readouterr().err
    # the decode of 2026-12-07 before its DICOM path moved to dicom.py: the same decode
    saved["decode_version"] = "4a59535bfbf2"
    (run / "config.json").write_text(json.dumps(saved))
    assert main(train_args(small_data_root, run, "--epochs", "2", "--resume")) == 0


def test_decode_version_covers_every_file_of_the_decode(tmp_path):
    from pneumoscope.data.cache import DECODE_MODULES, code_version

    names = {Path(m.__file__).name for m in DECODE_MODULES}
    assert names == {"decode.py", "dicom.py", "problems.py"}
    copies = []
    for module in DECODE_MODULES:
        copy = tmp_path / Path(module.__file__).name
        shutil.copy(module.__file__, copy)
        copies.append(copy)
    assert code_version(copies) == decode_version()
    dicom = tmp_path / "dicom.py"
    dicom.write_text(
        dicom.read_text().replace(
            "ROBUST_PERCENTILES = (0.5, 99.5)", "ROBUST_PERCENTILES = (1, 99)"
        )
    )
    assert code_version(copies) != decode_version()  # a change of the DICOM rule is a new decode


def test_evaluate_writes_metrics_json(
    one_epoch_run, small_run_copy, small_data_root, tmp_path, capsys
):
    out = tmp_path / "metrics.json"  # evaluate writes into the run (MODEL_CARD.md): a copy
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(small_run_copy),
                "--data",
                str(small_data_root / "test"),
                "--out",
                str(out),
                "--bootstrap",
                "100",
            ]
        )
        == 0
    )
    m = json.loads(out.read_text())
    for key in (
        "n",
        "threshold",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "roc_auc",
        "pr_auc",
        "confusion",
        "ci95",
    ):
        assert key in m
    assert m["n"] == 24
    assert set(m["confusion"]) == {"tp", "fp", "tn", "fn"} and sum(m["confusion"].values()) == 24
    assert {"accuracy", "sensitivity", "specificity", "roc_auc"} <= set(m["ci95"])
    threshold = json.loads((one_epoch_run / THRESHOLD).read_text())["threshold"]
    assert m["threshold"] == pytest.approx(threshold)
    assert "roc_auc" in capsys.readouterr().out


def test_predict_writes_one_row_per_image(one_epoch_run, small_data_root, tmp_path):
    out = tmp_path / "pred.csv"
    folder = small_data_root / "test" / "NORMAL"
    single = next((small_data_root / "test" / "PNEUMONIA").glob("*.jpeg"))
    assert (
        main(["-q", "predict", str(one_epoch_run), str(folder), str(single), "--out", str(out)])
        == 0
    )
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(folder.glob("*.jpeg"))) + 1
    assert list(rows[0]) == ["path", "p_pneumonia", "label"]
    threshold = json.loads((one_epoch_run / THRESHOLD).read_text())["threshold"]
    for r in rows:
        p = float(r["p_pneumonia"])
        assert 0.0 <= p <= 1.0
        assert r["label"] == ("PNEUMONIA" if p >= threshold else "NORMAL")


def test_weights_imagenet_offline_is_a_clear_error(small_data_root, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setenv("PNEUMOSCOPE_NO_DOWNLOAD", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(small_data_root),
            "--out",
            str(tmp_path / "r"),
            "--backbone",
            "resnet50",
            "--weights",
            "imagenet",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet50-11ad3fa6.pth" in err and "--weights" in err
    assert "Traceback" not in err

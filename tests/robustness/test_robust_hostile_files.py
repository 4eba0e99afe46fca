"""Hostile files (issue 7, point 3), and files a kill could have left (point 2).

A checkpoint or weights file crafted with a pickle payload is refused without running
it; weights that do not fit name the keys; a run directory of a newer format is refused
by evaluate, predict, serve and train --resume with its version; a truncated checkpoint,
model or JSON file is refused naming it (atomic writes never leave one, so it can only
have been put there); a stray temporary file of an interrupted write is never read and
is removed by --resume.
Everything goes through the real CLI (exit code 2, one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pneumoscope.cli import main
from pneumoscope.models import get_spec
from pneumoscope.rundir import (
    BEST_MODEL,
    CONFIG,
    FORMAT_VERSION,
    LAST_CHECKPOINT,
    METRICS,
    THRESHOLD,
)


class Payload:
    """Unpickling this would create MARKER: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(finished_run, dest)
    return dest


def resume_args(run: Path) -> list[str]:
    config = json.loads((run / CONFIG).read_text())
    return [
        "-q",
        "train",
        "--data",
        config["data"],
        "--out",
        str(run),
        "--backbone",
        config["backbone"],
        "--image-size",
        str(config["image_size"]),
        "--batch-size",
        str(config["batch_size"]),
        "--val-fraction",
        str(config["val_fraction"]),
        "--epochs",
        str(config["epochs"]),
        "--resume",
    ]


# ----------------------------------------------------------------------------- pickles


@pytest.mark.slow  # trains
def test_pickle_checkpoint_for_resume_is_refused_unrun(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"model": Payload(marker), "epoch": 0}, run_copy / LAST_CHECKPOINT)
    assert main(resume_args(run_copy)) == 2
    err = one_line_error(capsys)
    assert LAST_CHECKPOINT in err and "refused" in err
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickle_weights_file_is_refused_unrun(small_data_root, tmp_path, capsys, suffix):
    marker = tmp_path / "PWNED"
    weights = tmp_path / f"evil{suffix}"
    torch.save({"conv_stem.weight": torch.zeros(1), "extra": Payload(marker)}, weights)
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(small_data_root),
            "--out",
            str(tmp_path / "r"),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            str(weights),
            "--image-size",
            "64",
        ]
    )
    assert code == 2
    err = one_line_error(capsys)
    assert str(weights) in err and "refused" in err
    assert not marker.exists()
    assert not (tmp_path / "r" / METRICS).exists()


def test_model_best_is_safetensors_and_a_pickle_there_is_refused(run_copy, tmp_path, capsys):
    head = (run_copy / BEST_MODEL).read_bytes()[:8]
    header_len = int.from_bytes(head, "little")
    assert (run_copy / BEST_MODEL).read_bytes()[8:9] == b"{" and header_len > 0  # safetensors
    assert load_file(run_copy / BEST_MODEL)  # loads without any pickle
    marker = tmp_path / "PWNED"
    torch.save({"stem.weight": Payload(marker)}, run_copy / BEST_MODEL)
    for argv in (
        ["-q", "evaluate", str(run_copy), "--data", str(tmp_path), "--bootstrap", "10"],
        ["-q", "predict", str(run_copy), str(tmp_path)],
    ):
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert BEST_MODEL in err
    assert not marker.exists()


# ----------------------------------------------------------------------------- wrong keys


@pytest.fixture(scope="module")
def lite0_state() -> dict:
    """The raw timm efficientnet_lite0 state_dict: the key names --weights PATH expects."""
    return get_spec("efficientnet_lite0").builder().state_dict()


def test_weights_with_wrong_keys_and_shapes_name_them(
    small_data_root, tmp_path, capsys, lite0_state
):
    state = dict(lite0_state)
    state["conv_stem.renamed"] = state.pop("conv_stem.weight")
    state["bn1.weight"] = torch.zeros(7)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(small_data_root),
            "--out",
            str(tmp_path / "r"),
            "--backbone",
            "efficientnet_lite0",
            "--weights",
            str(path),
            "--image-size",
            "64",
        ]
    )
    assert code == 2
    err = one_line_error(capsys)
    for word in (str(path), "conv_stem.weight", "conv_stem.renamed", "bn1.weight", "(7,)"):
        assert word in err, (word, err)
    assert not (tmp_path / "r" / METRICS).exists()


# ----------------------------------------------------------------------------- versions


@pytest.mark.slow  # trains
def test_newer_run_directory_is_refused_with_its_version(run_copy, small_data_root, capsys, cli):
    config = json.loads((run_copy / CONFIG).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    config["pneumoscope_version"] = "99.0.0"
    (run_copy / CONFIG).write_text(json.dumps(config))
    for argv in (
        ["-q", "evaluate", str(run_copy), "--data", str(small_data_root / "test")],
        ["-q", "predict", str(run_copy), str(small_data_root / "test")],
        resume_args(run_copy),
    ):
        assert main(argv) == 2, argv
        err = one_line_error(capsys)
        assert f"format version {FORMAT_VERSION + 1}" in err and "99.0.0" in err, err
    # serve in a child with a timeout: were the run accepted, it would start serving
    proc = cli("serve", run_copy, "--host", "127.0.0.1", "--port", "9", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"format version {FORMAT_VERSION + 1}" in proc.stderr and "99.0.0" in proc.stderr


# ----------------------------------------------------------------------------- kill leftovers


def test_truncated_checkpoint_is_refused_with_a_clear_message(run_copy, capsys):
    data = (run_copy / LAST_CHECKPOINT).read_bytes()
    (run_copy / LAST_CHECKPOINT).write_bytes(data[: len(data) // 2])
    before = (run_copy / METRICS).read_text()
    assert main(resume_args(run_copy)) == 2
    err = one_line_error(capsys)
    assert LAST_CHECKPOINT in err and "delete it" in err
    assert (run_copy / METRICS).read_text() == before  # nothing trusted, nothing rewritten


def test_checkpoint_without_training_state_is_refused(run_copy, capsys):
    torch.save({"model": {"w": torch.zeros(1)}}, run_copy / LAST_CHECKPOINT)
    assert main(resume_args(run_copy)) == 2
    err = one_line_error(capsys)
    assert LAST_CHECKPOINT in err and "optimizer" in err


def test_truncated_model_and_json_files_are_refused(run_copy, small_data_root, capsys):
    best = (run_copy / BEST_MODEL).read_bytes()
    (run_copy / BEST_MODEL).write_bytes(best[: len(best) // 2])
    argv = ["-q", "predict", str(run_copy), str(small_data_root / "test")]
    assert main(argv) == 2
    assert BEST_MODEL in one_line_error(capsys)
    (run_copy / BEST_MODEL).write_bytes(best)
    text = (run_copy / THRESHOLD).read_text()
    (run_copy / THRESHOLD).write_text(text[: len(text) // 2])
    assert main(argv) == 2
    assert THRESHOLD in one_line_error(capsys)


def test_model_of_other_shapes_and_non_object_config_are_refused(run_copy, small_data_root, capsys):
    from safetensors.torch import save_file

    weights = load_file(run_copy / BEST_MODEL)
    weights["head.weight"] = torch.zeros(3, weights["head.weight"].shape[1])  # a 3-class head
    save_file(weights, run_copy / BEST_MODEL)
    argv = ["-q", "predict", str(run_copy), str(small_data_root / "test")]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert BEST_MODEL in err and "head.weight" in err
    (run_copy / CONFIG).write_text("[1, 2, 3]\n")
    assert main(argv) == 2
    assert CONFIG in one_line_error(capsys)


@pytest.mark.slow  # trains and resumes
def test_stray_temp_file_is_ignored_and_removed_on_resume(run_copy, cli):
    """A kill during an atomic write leaves `.NAME.XXXX.tmp` beside NAME: never read, and
    cleared when the run is resumed. (The CLI runs in a child like the one that trained
    the run: the same torch thread count, so the same numbers to the last bit.)"""
    good = (run_copy / LAST_CHECKPOINT).read_bytes()
    stray = run_copy / f".{LAST_CHECKPOINT}.k1ll3d.tmp"
    stray.write_bytes(good[: len(good) // 3])
    threshold = (run_copy / THRESHOLD).read_text()
    proc = cli(*resume_args(run_copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stray.exists()
    assert (run_copy / THRESHOLD).read_text() == threshold

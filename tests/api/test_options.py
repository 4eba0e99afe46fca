"""train --config, command-line overrides, grouped --help, --log checks, cheap import,
the API's option checks, arrays and the model card's source: no training here (tests/api/test_api_runs.py trains)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pneumoscope
from pneumoscope.cli import build_parser, main
from pneumoscope.errors import OptionError
from pneumoscope.report.trackers import MissingExtraError, open_trackers, parse_log
from pneumoscope.rundir import RunDirError
from pneumoscope.training.config import TrainConfig
from pneumoscope.training.options import config_file_options, given_options, merge_options

REPO = Path(__file__).resolve().parents[2]


def parse_train(*argv):
    args = build_parser().parse_args(["train", *argv])
    return merge_options(args.config if hasattr(args, "config") else None, given_options(args))


def test_command_line_overrides_yaml_config(tmp_path):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("data: /d\nout: /o\nepochs: 3\ncompile: true\naugment: wide\nlr: 0.002\n")
    options = parse_train("--config", str(cfg), "--epochs", "5", "--no-compile", "--out", "/new")
    assert options == {
        "data": "/d",
        "out": "/new",
        "epochs": 5,
        "compile": False,
        "augment": "wide",
        "lr": 0.002,
    }
    # nothing given and nothing in the file: TrainConfig's defaults and the recipe fill in
    resolved = TrainConfig(**options)
    assert resolved.epochs == 5 and resolved.compile is False and resolved.seed == 0


def test_a_runs_config_json_is_accepted_whole(tmp_path):
    record = {
        **TrainConfig(data="/d", out="/o", device="cpu").to_dict(),
        "format_version": 1,
        "pneumoscope_version": "0.1.0",
        "preprocessing": {"geometry": "stretch"},
        "distributed": {"world_size": 1},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    options = config_file_options(path)
    assert (
        TrainConfig(**options).to_dict() == TrainConfig(data="/d", out="/o", device="cpu").to_dict()
    )


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": "/d", "epoch": 3, "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"c\.json: unknown option\(s\) epoch, learning_rate"):
        config_file_options(path)


def test_bad_values_in_the_file_name_the_file_and_option(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("augment: sideways\n")
    assert main(["train", "--config", str(path), "--data", "x", "--out", "y"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "c.yaml" in err and "--augment" in err and "sideways" in err
    )


def test_config_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        config_file_options(path)


def test_data_and_out_are_required_somewhere(capsys):
    assert main(["train", "--data", "x"]) == 2
    assert "--out" in capsys.readouterr().err


def test_help_groups_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for group in ("data:", "model:", "recipe:", "optimisation:", "run:"):
        assert f"\n{group}\n" in out, group
    assert "--compile, --no-compile" in out and "--config FILE" in out and "--log TRACKERS" in out
    # every TrainConfig option can be set from the command line
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert set(TrainConfig.__dataclass_fields__) <= flags


def test_log_names_are_checked():
    assert parse_log("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert parse_log("") == []
    with pytest.raises(ValueError, match="unknown tracker.*wandb"):
        parse_log("wandb")


def test_missing_tracker_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    cfg = TrainConfig(data="d", out=str(tmp_path), device="cpu", log="mlflow")
    with pytest.raises(MissingExtraError, match=r"mlflow-skinny.*pneumoscope\[track\]"):
        open_trackers(cfg)
    assert open_trackers(cfg, enabled=False).trackers == []  # ranks other than 0 open nothing


def test_import_is_cheap():
    # pneumoscope.load is resolved lazily: looking it up imports the API (and torch), so
    # the check reads sys.modules before touching it
    code = (
        "import sys, pneumoscope, pneumoscope.training.options; "
        "print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert out.stdout.strip() == "[]"
    lazy = subprocess.run(
        [sys.executable, "-c", "import pneumoscope; print(pneumoscope.load.__module__)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO)},
        check=True,
    )
    assert lazy.stdout.strip() == "pneumoscope.api"


def test_missing_tensorboard_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path),
                "--out",
                str(tmp_path / "run"),
                "--log",
                "tensorboard",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensorboard" in err and "pneumoscope[track]" in err
    assert not (tmp_path / "run").exists()  # failed before any work


def test_python_options_get_the_command_lines_checks(tmp_path):
    with pytest.raises(OptionError, match="--epochs.*'two'"):
        pneumoscope.train(data=tmp_path, out=tmp_path / "run", epochs="two")
    with pytest.raises(OptionError, match="--compile"):
        # a string is not a switch
        pneumoscope.train(data=tmp_path, out=tmp_path / "run", compile="false")
    with pytest.raises(OptionError, match="--augment.*'huge'"):
        pneumoscope.train(data=tmp_path, out=tmp_path / "run", augment="huge")
    assert not (tmp_path / "run").exists()


def test_a_refused_train_with_trackers_leaves_the_folder_as_it_was(
    sample_data, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store is RUN_DIR/mlruns
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # a finished run's file
    with pytest.raises(RunDirError, match="--overwrite"):
        pneumoscope.train(data=sample_data, out=run, log="tensorboard,mlflow", show_progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]  # no tensorboard/, no mlruns/


def test_one_array_is_one_image_whatever_its_channels():
    from pneumoscope.api import _sources

    for shape in [(50, 40), (50, 40, 1), (50, 40, 3), (50, 40, 4), (50, 40, 2)]:
        assert len(_sources(np.zeros(shape, np.uint8))) == 1, shape  # never split into rows
    assert len(_sources(np.zeros((5, 50, 40, 3), np.uint8))) == 5  # a batch


def test_model_card_claims_the_kermany_source_only_for_its_files():
    from pneumoscope.data.discover import Sample
    from pneumoscope.report.model_card import _source_lines

    config = {"data": "/data/site"}
    kermany = {
        "train": [
            Sample(Path("person1_bacteria_1.jpeg"), 1, "person1", "train"),
            Sample(Path("IM-0001-0001.jpeg"), 0, "IM-0001", "train"),
        ]
    }
    other = {"train": [*kermany["train"], Sample(Path("scan_0042.png"), 0, "p42", "train")]}
    assert "Guangzhou" in " ".join(_source_lines(kermany, config))
    lines = " ".join(_source_lines(other, config))
    assert "Guangzhou" not in lines and "CC BY" not in lines and "/data/site" in lines

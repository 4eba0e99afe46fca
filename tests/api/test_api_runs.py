"""The Python API against the CLI, replay from config.json, TensorBoard and MLflow read
back from their real files, the model card, and CSV quoting: on real sample images at
64 px (efficientnet_lite0 with its ImageNet weights, the cpu-fast recipe)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pneumoscope
from pneumoscope.cli import main


@pytest.fixture(scope="session")
def cli_run(small_run_dir) -> Path:
    """The session's small run, trained through the CLI (tests/conftest.py; read-only)."""
    return small_run_dir


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    store = tmp_path_factory.mktemp("mlflow") / "mlruns"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    os.environ.update(MLFLOW_TRACKING_URI=store.as_uri(), MLFLOW_EXPERIMENT_NAME="api-test")
    yield store.as_uri()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def api_run(small_data_root, small_run_options, tmp_path_factory, mlflow_uri) -> Path:
    """The same run through the API, with both trackers on (they change no number)."""
    out = tmp_path_factory.mktemp("api") / "run"
    run = pneumoscope.train(
        data=small_data_root,
        out=out,
        show_progress=False,
        log="tensorboard,mlflow",
        **small_run_options,
    )
    assert run == out
    return run


def read_csv(path_or_text) -> list[dict]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow  # trains twice
def test_api_train_gives_the_cli_numbers(cli_run, api_run):
    for name in ("val_predictions.csv",):
        ours, theirs = read_csv(api_run / name), read_csv(cli_run / name)
        assert [r["path"] for r in ours] == [r["path"] for r in theirs]
        np.testing.assert_allclose(
            [float(r["p_pneumonia"]) for r in ours],
            [float(r["p_pneumonia"]) for r in theirs],
            atol=1e-5,
        )
    t_api, t_cli = (json.loads((r / "threshold.json").read_text()) for r in (api_run, cli_run))
    for rule, value in t_cli["rules"].items():
        assert t_api["rules"][rule] == pytest.approx(value, abs=1e-5)
    c_api, c_cli = (json.loads((r / "config.json").read_text()) for r in (api_run, cli_run))
    # the time budget's record holds this CPU's probe timings, which differ run to run; what it chose must not
    assert {k for k in c_cli if c_cli[k] != c_api[k]} - {"budget"} == {"out", "log"}
    assert c_cli["budget"]["chosen"] == c_api["budget"]["chosen"]


def test_load_predict_matches_cli_predict(cli_run, small_data_root, capsys):
    folder = small_data_root / "test"
    assert main(["-q", "predict", str(cli_run), str(folder)]) == 0
    cli_rows = read_csv(capsys.readouterr().out)
    model = pneumoscope.load(cli_run)
    rows = model.predict([folder])
    assert [r["path"] for r in rows] == [r["path"] for r in cli_rows] and len(rows) == 24
    np.testing.assert_allclose(
        [r["p_pneumonia"] for r in rows], [float(r["p_pneumonia"]) for r in cli_rows], atol=1e-5
    )
    assert [r["label"] for r in rows] == [r["label"] for r in cli_rows]
    # uint8 arrays go through the same decode as the files they came from
    files = [Path(r["path"]) for r in rows[:3]]
    arrays = [np.asarray(Image.open(f).convert("L")) for f in files]
    from_arrays = model.predict(arrays + [np.stack([arrays[0]] * 3, axis=2)])
    assert [r["path"] for r in from_arrays] == [None] * 4
    np.testing.assert_allclose(
        [r["p_pneumonia"] for r in from_arrays],
        [r["p_pneumonia"] for r in rows[:3]] + [rows[0]["p_pneumonia"]],
        atol=1e-5,
    )
    assert model.predict(files[0])[0]["p_pneumonia"] == pytest.approx(
        rows[0]["p_pneumonia"], abs=1e-6
    )
    with pytest.raises(ValueError, match="uint8"):
        model.predict([arrays[0].astype(np.float32)])


def test_explain_returns_the_cli_overlay(cli_run, small_data_root, tmp_path, capsys):
    image = next((small_data_root / "test" / "PNEUMONIA").glob("*.jpeg"))
    assert main(["-q", "explain", str(cli_run), str(image), "--out", str(tmp_path)]) == 0
    rows = read_csv(capsys.readouterr().out)
    written = np.asarray(Image.open(rows[0]["overlay"]).convert("RGB"))
    overlay = pneumoscope.load(cli_run).explain(image)
    assert overlay.dtype == np.uint8 and overlay.shape == (64, 64, 3)
    np.testing.assert_array_equal(overlay, written)


def test_a_comma_in_a_path_stays_one_field(cli_run, small_data_root, tmp_path, capsys):
    odd = tmp_path / 'chest, "left".jpeg'
    shutil.copy(next((small_data_root / "test" / "NORMAL").glob("*.jpeg")), odd)
    out = tmp_path / "pred.csv"
    assert main(["-q", "predict", str(cli_run), str(odd), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "predict", str(cli_run), str(odd)]) == 0
    printed = capsys.readouterr().out
    assert main(["-q", "explain", str(cli_run), str(odd), "--out", str(tmp_path / "x")]) == 0
    explained = capsys.readouterr().out
    for rows in (read_csv(out), read_csv(printed), read_csv(explained)):
        assert (
            len(rows) == 1
            and rows[0]["path"] == str(odd)
            and rows[0]["label"] in ("NORMAL", "PNEUMONIA")
        )
    assert Path(read_csv(explained)[0]["overlay"]).is_file()


def test_replay_from_config_json(cli_run, small_data_root, tmp_path):
    new = tmp_path / "replay"
    assert (
        main(
            [
                "-q",
                "train",
                "--config",
                str(cli_run / "config.json"),
                "--out",
                str(new),
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    old_cfg, new_cfg = (json.loads((r / "config.json").read_text()) for r in (cli_run, new))
    # a replay gives every option the first run resolved, so the time budget has nothing to cut: no record
    assert "budget" in old_cfg and "budget" not in new_cfg
    assert set(old_cfg) - {"budget"} == set(new_cfg)
    assert {k for k in new_cfg if old_cfg[k] != new_cfg[k]} == {"out", "epochs"}
    assert new_cfg["epochs"] == 1 and len((new / "metrics.jsonl").read_text().splitlines()) == 1


def test_tensorboard_events(api_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(api_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/train", "loss/val", "val/roc_auc", "lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    rows = [json.loads(line) for line in (api_run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("val/roc_auc")] == pytest.approx(
        [r["val_roc_auc"] for r in rows]
    )
    assert "val/roc_curve" in tags["images"]
    gradcams = [t for t in tags["images"] if t.startswith("gradcam/")]
    assert len(gradcams) == 4
    image = acc.Images(gradcams[0])[0]
    assert (image.width, image.height) == (64, 64)


def test_mlflow_store(api_run, mlflow_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("api-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["image_size"] == "64"
    assert (
        run.data.params["backbone"] == "efficientnet_lite0"
        and run.data.params["recipe"] == "cpu-fast"
    )
    history = client.get_metric_history(run.info.run_id, "val_roc_auc")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_best.safetensors", "threshold.json", "config.json", "MODEL_CARD.md"} <= artifacts


def test_model_card_written_and_updated_by_evaluate(
    cli_run, small_run_copy, small_data_root, tmp_path
):
    card = (cli_run / "MODEL_CARD.md").read_text()
    for heading in (
        "## Intended use",
        "## Data",
        "## Model and recipe",
        "## Validation metrics",
        "## Evaluated folders",
        "## Known limitations",
        "## How to reproduce",
    ):
        assert heading in card, heading
    assert "not for diagnosis" in card and "CC BY 4.0" in card and "benchmarks/RESULTS.md" in card
    assert "Pediatric" in card and "efficientnet_lite0" in card and "None yet" in card
    manifest = read_csv(cli_run / "manifest.csv")
    n_val = sum(r["role"] == "val" for r in manifest)
    assert "| val | " in card and f"{n_val} images of" in card
    assert f"pneumoscope train --config {cli_run / 'config.json'}" in card
    test_dir, run = small_data_root / "test", small_run_copy  # evaluate writes into the run: a copy
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(run),
                "--data",
                str(test_dir),
                "--out",
                str(tmp_path / "m.json"),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    card = (run / "MODEL_CARD.md").read_text()
    assert "None yet" not in card and f"`{test_dir.resolve()}` | 24 |" in card
    assert f"{metrics['roc_auc']:.3f} [" in card
    # evaluating the same folder again replaces its line
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(run),
                "--data",
                str(test_dir),
                "--out",
                str(tmp_path / "m.json"),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    assert (run / "MODEL_CARD.md").read_text().count(f"`{test_dir.resolve()}`") == 1


def test_cli_train_goes_through_the_api(monkeypatch, tmp_path):
    import pneumoscope.api
    from pneumoscope.errors import UserError

    calls = []

    def recorded(**options):
        calls.append(options)
        raise UserError("recorded")  # stop before the CLI reads the (absent) run

    monkeypatch.setattr(pneumoscope.api, "train", recorded)
    assert main(["-q", "train", "--data", "D", "--out", str(tmp_path / "r"), "--epochs", "3"]) == 2
    assert calls and calls[0]["data"] == "D" and calls[0]["epochs"] == 3


@pytest.mark.slow  # an ONNX export
def test_load_with_onnx_predicts_like_the_torch_model(cli_run, small_data_root, tmp_path):
    onnx = tmp_path / "model.onnx"
    assert main(["-q", "export", str(cli_run), "--out", str(onnx)]) == 0
    files = sorted((small_data_root / "test").rglob("*.jpeg"))[:6]
    by_torch = pneumoscope.load(cli_run).predict(files)
    model = pneumoscope.load(cli_run, onnx=onnx)
    by_onnx = model.predict(files)
    assert [r["path"] for r in by_onnx] == [r["path"] for r in by_torch]
    assert np.allclose(
        [r["p_pneumonia"] for r in by_onnx], [r["p_pneumonia"] for r in by_torch], atol=1e-4
    )
    assert [r["label"] for r in by_onnx] == [r["label"] for r in by_torch]
    assert model.explain(files[0]).shape[2] == 3  # Grad-CAM from the torch model beside the export

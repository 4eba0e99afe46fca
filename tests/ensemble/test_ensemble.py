"""An ensemble (and TTA) directory is one model to every verb: its probability is the mean
of its members' over its views, and evaluate, predict, report, serve and the ONNX export
read it from the directory as they read a trained run."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pneumoscope.cli import main
from pneumoscope.data.manifest import read_manifest
from pneumoscope.deploy.onnx_predictor import OnnxPredictor
from pneumoscope.inference import Predictor, predict_probs
from pneumoscope.models.classifier import images_to_input
from pneumoscope.models.ensemble import TTA_PRESETS
from pneumoscope.serve import create_app
from pneumoscope.serve.background import BackgroundServer

pytestmark = pytest.mark.slow  # trains the members, exports and reports ensembles


def _zoomed(images: np.ndarray, zoom: float) -> torch.Tensor:
    """A centred zoom of the model input, computed here independently of models.ensemble."""
    x = images_to_input(images)
    theta = torch.tensor([[1.0 / zoom, 0.0, 0.0], [0.0, 1.0 / zoom, 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def _member_p(member: Predictor, x: torch.Tensor) -> np.ndarray:
    return torch.softmax(member.model(x), dim=1)[:, 1].numpy()


def test_probability_is_the_mean_of_the_members(members, ens_dir, real_images):
    singles = [Predictor.from_run(m, device="cpu").predict_images(real_images) for m in members]
    ens = Predictor.from_run(ens_dir, device="cpu").predict_images(real_images)
    assert np.max(np.abs(ens - np.mean(singles, axis=0))) < 1e-5
    assert np.max(np.abs(singles[0] - singles[1])) > 1e-3  # two different members, not one twice


def test_tta_averages_members_over_the_recorded_views(members, tta_dir, real_images):
    config = json.loads((tta_dir / "config.json").read_text())
    assert config["tta"] == {"preset": "zoom3", "views": TTA_PRESETS["zoom3"]}
    zooms = [v["zoom"] for v in config["tta"]["views"]]
    predictors = [Predictor.from_run(m, device="cpu") for m in members]
    expected = np.mean(
        [_member_p(p, _zoomed(real_images, z)) for p in predictors for z in zooms], axis=0
    )
    got = Predictor.from_run(tta_dir, device="cpu").predict_images(real_images)
    assert np.max(np.abs(got - expected)) < 1e-5
    plain = np.mean([p.predict_images(real_images) for p in predictors], axis=0)
    assert np.max(np.abs(got - plain)) > 1e-4  # the views change the answer


def test_directory_records_members_split_and_thresholds(members, ens_dir):
    config = json.loads((ens_dir / "config.json").read_text())
    assert config["kind"] == "ensemble" and config["image_size"] == 64
    for record, member in zip(config["members"], members):
        assert record["run_dir"] == str(member.resolve())
        weights = (member / "model_best.safetensors").read_bytes()
        assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert "probabilit" in config["combine"]
    assert (ens_dir / "manifest.csv").read_bytes() == (members[0] / "manifest.csv").read_bytes()
    thresholds = json.loads((ens_dir / "threshold.json").read_text())
    # the same rules as training writes
    member = json.loads((members[0] / "threshold.json").read_text())
    assert (
        set(thresholds["rules"]) == set(member["rules"])
        and thresholds["default"] == member["default"]
    )
    with open(ens_dir / "val_predictions.csv") as f:
        val = list(csv.DictReader(f))
    val_files = read_manifest(ens_dir / "manifest.csv")["val"]
    assert [r["path"] for r in val] == [str(s.path) for s in val_files]
    # the thresholds were chosen on the ensemble's own validation probabilities
    p = Predictor.from_run(ens_dir, device="cpu")
    from pneumoscope.data.cache import decode_samples

    probs = p.predict_images(decode_samples(val_files, 64, show_progress=False).images)
    assert np.allclose([float(r["p_pneumonia"]) for r in val], probs, atol=1e-5)


def test_members_with_another_split_are_refused(members, tmp_path, capsys):
    other = tmp_path / "other_split"
    shutil.copytree(members[1], other)
    lines = (other / "manifest.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    role = header.split(",").index("role")
    first = rows[0].split(",")
    first[role] = "val" if first[role] == "train" else "train"  # one file changes sides
    (other / "manifest.csv").write_text("\n".join([header, ",".join(first), *rows[1:]]) + "\n")
    out = tmp_path / "ens"
    code = main(["-q", "ensemble", str(members[0]), str(other), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and str(other) in err and "split" in err and "Traceback" not in err
    assert not out.exists()


def test_an_ensemble_is_not_a_member(members, ens_dir, tmp_path, capsys):
    code = main(["-q", "ensemble", str(members[0]), str(ens_dir), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and str(ens_dir) in err and "ensemble itself" in err


def test_evaluate_and_predict_read_the_ensemble(tta_dir, small_data_root, real_images, tmp_path):
    test_dir = small_data_root / "test"
    metrics_path = tmp_path / "metrics.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(tta_dir),
                "--data",
                str(test_dir),
                "--out",
                str(metrics_path),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n"] == 24 and 0.0 <= metrics["roc_auc"] <= 1.0
    assert metrics["threshold"] == json.loads((tta_dir / "threshold.json").read_text())["threshold"]
    out = tmp_path / "pred.csv"
    assert main(["-q", "predict", str(tta_dir), str(test_dir), "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # same sorted files
    expected = Predictor.from_run(tta_dir, device="cpu").predict_images(real_images)
    assert np.allclose([float(r["p_pneumonia"]) for r in rows], expected, atol=1e-5)


def test_onnx_export_is_one_graph_with_the_ensemble_probability(tta_dir, real_images, tmp_path):
    onnx_path = tmp_path / "ens.onnx"
    assert main(["-q", "export", str(tta_dir), "--out", str(onnx_path)]) == 0
    contract = json.loads((tmp_path / "ens.onnx.json").read_text())
    assert (
        contract["backbone"].startswith("ensemble(")
        and contract["export_check"]["max_abs_diff_p"] < 1e-4
    )
    torch_p = Predictor.from_run(tta_dir, device="cpu").predict_images(real_images)
    onnx_p = OnnxPredictor.from_file(onnx_path, run_dir=tta_dir).predict_images(
        real_images, batch_size=7
    )
    assert onnx_p.shape == (24,) and np.max(np.abs(onnx_p - torch_p)) < 1e-4
    assert np.ptp(torch_p) > 1e-3


def test_serve_answers_with_the_ensemble(tta_dir, small_data_root):
    xray = sorted((small_data_root / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    predictor = Predictor.from_run(tta_dir, device="cpu")
    expected = float(predictor.predict_images(predictor.load(xray)[None])[0])
    with (
        BackgroundServer(create_app(tta_dir, device="cpu")) as server,
        httpx.Client(base_url=server.url, timeout=300) as client,
    ):
        health = client.get("/healthz").json()
        r = client.post(
            "/v1/predict",
            files={"file": (xray.name, xray.read_bytes())},
            params={"heatmap": "true"},
        )
    assert health["model"]["backbone"].startswith("ensemble(")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["p_pneumonia"] == pytest.approx(expected, abs=1e-5)
    assert body["threshold"] == predictor.threshold and body["heatmap_png"]


def test_report_reads_the_ensemble(tta_dir, small_data_root, tmp_path):
    out = tmp_path / "report"
    assert (
        main(
            [
                "-q",
                "report",
                str(tta_dir),
                "--data",
                str(small_data_root / "test"),
                "--out",
                str(out),
                "--bootstrap",
                "50",
                "--perplexity",
                "5",
            ]
        )
        == 0
    )
    html = (out / "index.html").read_text()
    assert "ensemble(" in html
    assert json.loads((out / "metrics.json").read_text())["n"] == 24


def test_gradcam_of_an_ensemble_averages_its_members(members, ens_dir, real_images):
    from pneumoscope.models.ensemble import IDENTITY, Ensemble
    from pneumoscope.report.gradcam import gradcam_heatmaps

    pneumonia = real_images[-4:]  # sorted files: the last 12 are PNEUMONIA
    member = Predictor.from_run(members[0], device="cpu").model
    # one member, one view: exactly the member's own map (log-softmax keeps the log-odds)
    alone = gradcam_heatmaps(Ensemble([member], [IDENTITY], 64), pneumonia)
    assert np.allclose(alone, gradcam_heatmaps(member, pneumonia), atol=1e-5)
    ens = Predictor.from_run(ens_dir, device="cpu").model
    heat = gradcam_heatmaps(ens, pneumonia)
    assert heat.shape == (4, 64, 64) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0
    # the ensemble's probabilities are untouched by the Grad-CAM pass (hooks removed)
    before = predict_probs(ens, real_images)
    gradcam_heatmaps(ens, pneumonia[:1])
    assert np.array_equal(before, predict_probs(ens, real_images))
    assert math.isfinite(float(ens(images_to_input(real_images[:2])).detach().sum()))

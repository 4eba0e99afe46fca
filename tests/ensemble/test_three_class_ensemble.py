"""A three-class ensemble (issue 13) is a three-class run to every verb: its class
probabilities are the mean of its members', its thresholds (the binary rules on
p(pneumonia) and the bacterial/viral one) are chosen on its own validation probabilities
as train chooses them, and evaluate, predict, report, serve, calibrate, drift, Grad-CAM and
the ONNX export read it as a three-class run. Members of two tasks, or of two class counts, are refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscope.cli import main
from pneumoscope.data.cache import decode_samples
from pneumoscope.data.manifest import read_manifest
from pneumoscope.inference import Predictor
from pneumoscope.tasks import (
    CLASS_NAMES,
    KEYS,
    THREE_CLASS,
    choose_task_thresholds,
    predicted_classes,
    task_labels,
    task_of,
)

pytestmark = pytest.mark.slow  # trains three-class members, exports and reports their ensemble

PROBS = [f"p_{k}" for k in KEYS]  # p_normal, p_bacterial, p_viral


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _val_images(ens_dir):
    val = read_manifest(ens_dir / "manifest.csv")["val"]
    return val, decode_samples(val, 64, show_progress=False).images


def test_three_class_ensemble_averages_its_members_and_chooses_its_own_thresholds(
    three_members, three_ens_dir
):
    config = json.loads((three_ens_dir / "config.json").read_text())
    assert (
        config["kind"] == "ensemble"
        and config["task"] == THREE_CLASS
        and task_of(config) == THREE_CLASS
    )
    assert [m["run_dir"] for m in config["members"]] == [str(m.resolve()) for m in three_members]
    val, images = _val_images(three_ens_dir)
    rows = _rows(three_ens_dir / "val_predictions.csv")
    # what a three-class train writes
    assert list(rows[0]) == [
        "path",
        "label",
        *PROBS,
        "p_pneumonia",
    ]
    assert [r["path"] for r in rows] == [str(s.path) for s in val]
    labels = np.array([int(r["label"]) for r in rows])
    assert labels.tolist() == task_labels(val, THREE_CLASS).tolist() and set(labels) == {0, 1, 2}
    # the mean of the members' class probabilities, each from the member's own predictor
    singles = [
        Predictor.from_run(m, device="cpu").predict_class_probs(images) for m in three_members
    ]
    assert singles[0].shape == (len(val), 3) and np.abs(singles[0] - singles[1]).max() > 1e-3
    probs = np.array([[float(r[c]) for c in PROBS] for r in rows])
    assert np.abs(probs - np.mean(singles, axis=0)).max() < 1e-5
    assert np.allclose(
        [float(r["p_pneumonia"]) for r in rows], probs[:, 1] + probs[:, 2], atol=1e-6
    )
    # threshold.json: chosen on these probabilities by train's rules, bacterial_vs_viral included
    thresholds = json.loads((three_ens_dir / "threshold.json").read_text())
    want = choose_task_thresholds(THREE_CLASS, labels, probs.astype(np.float32))
    assert (
        thresholds["rules"] == pytest.approx(want["rules"])
        and thresholds["default"] == want["default"]
    )
    assert thresholds["bacterial_vs_viral"]["threshold"] == pytest.approx(
        want["bacterial_vs_viral"]["threshold"]
    )
    member = json.loads((three_members[0] / "threshold.json").read_text())
    assert thresholds["bacterial_vs_viral"]["rule"] == member["bacterial_vs_viral"]["rule"]
    # summary.json as train's three-class summary: the task and the macro one-vs-rest ROC AUC
    summary = json.loads((three_ens_dir / "summary.json").read_text())
    assert summary["task"] == THREE_CLASS and summary["n_val"] == len(val)
    assert summary["val_roc_auc"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-6
    )


def test_evaluate_and_predict_read_a_three_class_ensemble(three_ens_dir, sample_data, tmp_path):
    thresholds = json.loads((three_ens_dir / "threshold.json").read_text())
    metrics_path = tmp_path / "metrics.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(three_ens_dir),
                "--data",
                str(sample_data / "train"),
                "--out",
                str(metrics_path),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_path.read_text())
    assert (
        metrics["task"] == THREE_CLASS
        and metrics["n"] == 433
        and set(metrics["per_class"]) == set(KEYS)
    )
    assert (
        np.sum(metrics["confusion"]["matrix"]) == 433 and metrics["bacterial_vs_viral"]["n"] == 231
    )
    assert metrics["threshold"] == thresholds["threshold"]
    assert metrics["bacterial_vs_viral_threshold"] == thresholds["bacterial_vs_viral"]["threshold"]
    scored = _rows(tmp_path / "metrics_predictions.csv")
    y, probs = (
        np.array([int(r["label"]) for r in scored]),
        np.array([[float(r[c]) for c in PROBS] for r in scored]),
    )
    assert metrics["macro_roc_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6
    )

    out = tmp_path / "pred.csv"
    assert (
        main(["-q", "predict", str(three_ens_dir), str(sample_data / "val"), "--out", str(out)])
        == 0
    )
    rows = _rows(out)
    assert list(rows[0]) == ["path", *PROBS, "p_pneumonia", "label"] and len(rows) == 16
    predictor = Predictor.from_run(three_ens_dir, device="cpu")
    want = predictor.predict_class_probs(np.stack([predictor.load(r["path"]) for r in rows]))
    assert np.abs(np.array([[float(r[c]) for c in PROBS] for r in rows]) - want).max() < 1e-5
    names = CLASS_NAMES[THREE_CLASS]
    labels = predicted_classes(
        want, thresholds["threshold"], thresholds["bacterial_vs_viral"]["threshold"]
    )
    assert [r["label"] for r in rows] == [names[c] for c in labels]


def test_onnx_export_of_a_three_class_ensemble(three_ens_dir, real_images, tmp_path):
    from pneumoscope.commands import export_run
    from pneumoscope.deploy.onnx_predictor import OnnxPredictor

    onnx = export_run(three_ens_dir, out=tmp_path / "ens.onnx")
    contract = json.loads((tmp_path / "ens.onnx.json").read_text())
    assert contract["task"] == THREE_CLASS and set(contract["outputs"]) == {
        "logits",
        "probabilities",
        "p_pneumonia",
    }
    assert (
        contract["backbone"].startswith("ensemble(")
        and contract["export_check"]["max_abs_diff_p"] < 1e-4
    )
    torch_side, onnx_side = (
        Predictor.from_run(three_ens_dir, device="cpu"),
        OnnxPredictor.from_file(onnx, three_ens_dir),
    )
    want, got = (
        torch_side.predict_class_probs(real_images),
        onnx_side.predict_class_probs(real_images),
    )
    assert got.shape == (24, 3) and np.abs(want - got).max() < 1e-4
    assert (
        np.abs(torch_side.predict_images(real_images) - onnx_side.predict_images(real_images)).max()
        < 1e-4
    )
    assert np.ptp(want, axis=0).min() > 1e-3  # the images move every class's probability


def test_binary_and_three_class_members_are_refused(members, three_run, tmp_path, capsys):
    out = tmp_path / "ens"
    for first, other, task, first_task in (
        (members[0], three_run, THREE_CLASS, "binary"),
        (three_run, members[0], "binary", THREE_CLASS),
    ):
        assert main(["-q", "ensemble", str(first), str(other), "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"pneumoscope ensemble: error: {other}: is a {task} run, {first} a {first_task} run; "
            "members share one task (--task)"
        )
        assert not out.exists()


def test_an_ensemble_refuses_members_of_other_class_counts():
    from pneumoscope.models import build_model
    from pneumoscope.models.ensemble import IDENTITY, Ensemble

    binary, three = (build_model("efficientnet_lite0", weights="none", n_classes=n) for n in (2, 3))
    assert Ensemble([three, three], [IDENTITY], 64).n_classes == 3
    with pytest.raises(ValueError, match=r"output \[2, 3\] classes"):
        Ensemble([binary, three], [IDENTITY], 64)


def test_report_of_a_three_class_ensemble(three_ens_dir, site_folder, tmp_path):
    from pneumoscope.report.build import build_report

    index = build_report(
        three_ens_dir,
        split="val",
        out=tmp_path / "report",
        n_boot=20,
        per_group=2,
        show_progress=False,
        drift=site_folder,
    )
    page = index.read_text()
    assert 'id="three-class"' in page and "Grad-CAM per class" in page and "ensemble(" in page
    summary = json.loads((three_ens_dir / "summary.json").read_text())
    # an ensemble has no epoch: its row names the members and views and the macro AUC it was chosen by
    assert "Selected epoch" not in page
    assert (
        f"2 members x 1 views (validation macro one-vs-rest ROC AUC {summary['val_roc_auc']:.4f}"
        in page
    )
    for name in (
        "confusion_3class",
        "roc_ovr",
        "tsne_3class",
        "umap_3class",
        "gradcam_classes",
        "drift",
    ):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000, name
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    val, images = _val_images(three_ens_dir)
    assert metrics["task"] == THREE_CLASS and metrics["n"] == len(val)
    probs = Predictor.from_run(three_ens_dir, device="cpu").predict_class_probs(images)
    labels = task_labels(val, THREE_CLASS)
    assert metrics["macro_roc_auc"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-4
    )


def test_serve_answers_with_a_three_class_ensemble(three_ens_dir, sample_data):
    import httpx

    from pneumoscope.serve import create_app
    from pneumoscope.serve.background import BackgroundServer

    xray = sorted((sample_data / "train" / "PNEUMONIA").glob("*_virus_*.jpeg"))[0]
    predictor = Predictor.from_run(three_ens_dir, device="cpu")
    want = predictor.predict_class_probs(predictor.load(xray)[None])[0]
    thresholds = json.loads((three_ens_dir / "threshold.json").read_text())
    with (
        BackgroundServer(create_app(three_ens_dir, device="cpu")) as server,
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
    assert [body["probabilities"][k] for k in KEYS] == pytest.approx(want.tolist(), abs=1e-5)
    assert body["p_pneumonia"] == pytest.approx(float(want[1] + want[2]), abs=1e-5)
    label = predicted_classes(
        want[None], thresholds["threshold"], thresholds["bacterial_vs_viral"]["threshold"]
    )[0]
    assert body["label"] == CLASS_NAMES[THREE_CLASS][label] and body["heatmap_png"]
    assert body["bacterial_vs_viral_threshold"] == pytest.approx(
        thresholds["bacterial_vs_viral"]["threshold"]
    )


def test_calibrate_and_drift_read_a_three_class_ensemble(
    three_ens_dir, site_folder, tmp_path, capsys
):
    import shutil

    from pneumoscope.data.discover import discover_split
    from pneumoscope.site.calibrate import site_threshold
    from pneumoscope.tasks import p_pneumonia

    # calibrate rewrites threshold.json
    ens = Path(shutil.copytree(three_ens_dir, tmp_path / "ens"))
    before = json.loads((ens / "threshold.json").read_text())
    assert main(["-q", "calibrate", str(ens), "--data", str(site_folder), "--bootstrap", "50"]) == 0
    assert "site rule:" in capsys.readouterr().out
    after = json.loads((ens / "threshold.json").read_text())
    predictor = Predictor.from_run(ens, device="cpu")
    site = decode_samples(discover_split(site_folder), 64, show_progress=False)
    want = site_threshold(
        site.labels, p_pneumonia(predictor.predict_class_probs(site.images)), 0.97
    )
    assert after["default"] == "site" and after["threshold"] == pytest.approx(want, abs=1e-6)
    assert after["bacterial_vs_viral"] == before["bacterial_vs_viral"]

    out = tmp_path / "drift.json"
    assert (
        main(["-q", "drift", str(three_ens_dir), "--data", str(site_folder), "--out", str(out)])
        == 0
    )
    drift = json.loads(out.read_text())
    assert drift["scores"]["folder"]["n"] == 40 and 0.0 <= drift["domain_auc"] <= 1.0
    assert drift["threshold"] == pytest.approx(before["threshold"])


def test_gradcam_of_a_three_class_ensemble_maps_each_class(
    three_members, three_ens_dir, real_images
):
    from pneumoscope.models.ensemble import IDENTITY, Ensemble
    from pneumoscope.report.gradcam import gradcam_heatmaps

    # sorted files: the first 12 are NORMAL, the last 12 PNEUMONIA
    films = {None: real_images[-3:], 0: real_images[:3], 1: real_images[-3:], 2: real_images[-3:]}
    member = Predictor.from_run(three_members[0], device="cpu").model
    ens = Predictor.from_run(three_ens_dir, device="cpu").model
    maps = {}
    for (
        target,
        x,
    ) in films.items():  # p(pneumonia)'s log-odds, then each class's (the report's per-class maps)
        alone = gradcam_heatmaps(Ensemble([member], [IDENTITY], 64), x, target_class=target)
        assert np.allclose(alone, gradcam_heatmaps(member, x, target_class=target), atol=1e-5), (
            target
        )
        heat = gradcam_heatmaps(ens, x, target_class=target)
        # a class's map of films of another class may be all zero (Grad-CAM's ReLU), not of all three here
        assert (
            heat.shape == (3, 64, 64) and 0.0 <= heat.min() and heat.max() <= 1.0 and heat.max() > 0
        ), target
        maps[target] = heat
    assert np.abs(maps[1] - maps[2]).max() > 1e-3  # the classes' maps differ

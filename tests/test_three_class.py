"""--task three-class (issue 13): labels from file names, the stratified split, metrics
against scikit-learn, and a real three-class run through train, evaluate, predict, the
ONNX export, the API and the report, on the embedded sample (real Kermany films)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from pneumoscope.data.discover import discover_split
from pneumoscope.data.split import split_by_patient
from pneumoscope.errors import DataError
from pneumoscope.evaluation.metrics import bootstrap_ci as evaluation_ci
from pneumoscope.evaluation.three_class import BV_CI_METHOD, evaluate_three_class, three_class_ci
from pneumoscope.tasks import (
    KEYS,
    THREE_CLASS,
    UnnamedSubtypeError,
    bv_threshold_of,
    choose_task_thresholds,
    p_bacterial_given_pneumonia,
    p_pneumonia,
    predicted_classes,
    subtype_of,
    task_labels,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_train():
    if not any((SAMPLE / "train" / "PNEUMONIA").glob("*virus*.jpeg")):
        pytest.fail(f"embedded sample missing viral films in {SAMPLE / 'train' / 'PNEUMONIA'}")
    return discover_split(SAMPLE / "train", "train")


# ----------------------------------------------------------------------------- labels


def test_subtype_from_kermany_names():
    assert subtype_of("person123_bacteria_456.jpeg") == "bacterial"
    assert subtype_of("person124_virus_457.jpeg") == "viral"
    assert subtype_of("PERSON1_VIRUS_2.JPEG") == "viral"
    assert subtype_of("person5_pneumonia_7.jpeg") is None
    assert subtype_of("IM-0115-0001.jpeg") is None
    assert subtype_of("person1_bacteria_virus_3.jpeg") is None  # both: not guessed either


def test_labels_of_the_real_sample():
    samples = sample_train()
    y = task_labels(samples, THREE_CLASS)
    for s, label in zip(samples, y):
        expected = 0 if s.label == 0 else (1 if "_bacteria_" in s.path.name else 2)
        assert label == expected, s.path
    assert np.bincount(y).tolist() == [202, 152, 79]  # the sample's README counts
    assert task_labels(samples, "binary").tolist() == [s.label for s in samples]


def test_a_pneumonia_file_naming_neither_is_one_clear_error(tmp_path):
    real = sorted((SAMPLE / "train" / "PNEUMONIA").glob("*.jpeg"))[:3]
    folder = tmp_path / "train" / "PNEUMONIA"
    folder.mkdir(parents=True)
    for f in real:
        shutil.copy2(f, folder / f.name)
    shutil.copy2(real[0], folder / "person9001_pneumonia_1.jpeg")
    shutil.copy2(real[1], folder / "scan_0042.jpeg")
    (tmp_path / "train" / "NORMAL").mkdir()
    shutil.copy2(
        sorted((SAMPLE / "train" / "NORMAL").glob("*.jpeg"))[0], tmp_path / "train" / "NORMAL"
    )
    samples = discover_split(tmp_path / "train", "train")
    with pytest.raises(UnnamedSubtypeError) as err:
        task_labels(samples, THREE_CLASS)
    message = str(err.value)
    assert "2 PNEUMONIA file(s)" in message and "person9001_pneumonia_1.jpeg" in message
    assert "scan_0042.jpeg" in message and real[0].name not in message
    # binary runs do not care what the name says
    assert task_labels(samples, "binary").sum() == 5


def test_train_refuses_unnamed_pneumonia_before_any_work(tmp_path, capsys, monkeypatch):
    import pneumoscope.training.loop as loop
    from pneumoscope.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the labels were checked")

    monkeypatch.setattr(loop, "build_model", no_model)

    data = tmp_path / "data"
    shutil.copytree(SAMPLE / "train", data / "train")
    shutil.copy2(
        sorted((data / "train" / "PNEUMONIA").glob("*.jpeg"))[0],
        data / "train" / "PNEUMONIA" / "xray_unknown.jpeg",
    )
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--task",
            "three-class",
            "--backbone",
            "efficientnet_lite0",
            "--image-size",
            "64",
            "--epochs",
            "1",
        ]
    )
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("pneumoscope train: error: ") and "neither bacteria nor virus" in line
    assert (
        str(data / "train" / "PNEUMONIA" / "xray_unknown.jpeg") in line
        and "1 PNEUMONIA file(s)" in line
    )
    # stopped after listing the files: no config, no manifest, no model
    assert not [p.name for p in (tmp_path / "run").iterdir()]


def test_a_class_missing_from_validation_stops_after_the_split(tmp_path, capsys, monkeypatch):
    from pneumoscope.cli import main
    from pneumoscope.data.discover import patient_id

    pneumonia = sorted((SAMPLE / "train" / "PNEUMONIA").glob("*.jpeg"))
    viral = list({patient_id(f.name): f for f in pneumonia if "_virus_" in f.name}.values())[:3]
    picks = {
        "NORMAL": sorted((SAMPLE / "train" / "NORMAL").glob("*.jpeg"))[:20],
        "PNEUMONIA": [f for f in pneumonia if "_bacteria_" in f.name][:20] + viral,
    }
    for cls, files in picks.items():
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp_path / "data" / "train" / cls / f.name)
    import pneumoscope.training.loop as loop

    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: built.append(a))
    # 3 one-film viral patients: 10% of them is 0.3 of a patient, so validation gets none
    code = main(
        [
            "-q",
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--task",
            "three-class",
            "--val-fraction",
            "0.1",
            "--backbone",
            "efficientnet_lite0",
            "--image-size",
            "64",
            "--epochs",
            "1",
        ]
    )
    assert code == 2 and len(viral) == 3 and not built
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"pneumoscope train: error: validation split has no VIRAL film (3 viral patients, 3 films in "
        f"{tmp_path / 'data' / 'train'}); use a larger --val-fraction or more data"
    )
    assert (
        not (tmp_path / "run" / "manifest.csv").exists()
        and not (tmp_path / "run" / "config.json").exists()
    )


def test_train_splits_on_the_three_class_labels(tmp_path, monkeypatch):
    import pneumoscope.training.loop as loop
    from pneumoscope.rundir import RunDir
    from pneumoscope.training.config import TrainConfig

    seen = {}

    def recording(samples, val_fraction, seed, strata=None):
        seen.update(samples=samples, strata=strata)
        return split_by_patient(samples, val_fraction, seed, strata=strata)

    monkeypatch.setattr(loop, "split_by_patient", recording)
    cfg = TrainConfig(data=str(SAMPLE), out=str(tmp_path), task=THREE_CLASS, val_fraction=0.25)
    train, val = loop.prepare_split(cfg, RunDir(tmp_path), resume=False)
    assert np.asarray(seen["strata"]).tolist() == task_labels(seen["samples"], THREE_CLASS).tolist()
    assert set(np.asarray(seen["strata"]).tolist()) == {0, 1, 2}
    assert len(train) + len(val) == 433


def test_a_single_subtype_has_no_bacterial_viral_threshold():
    y, probs, _ = hand_made_case()
    keep = y != 2  # normal and bacterial validation films only
    with pytest.raises(DataError, match="both subtypes; got 4 bacterial and 0 viral"):
        choose_task_thresholds(THREE_CLASS, y[keep], probs[keep])


def test_a_three_class_threshold_file_needs_the_subtype_threshold(tmp_path):
    from pneumoscope.rundir import RunDirError

    path = tmp_path / "threshold.json"
    assert bv_threshold_of({"threshold": 0.5}, "binary", path) is None
    assert bv_threshold_of({"bacterial_vs_viral": {"threshold": 0.25}}, THREE_CLASS, path) == 0.25
    with pytest.raises(
        RunDirError, match=f"^{path}: a three-class run's thresholds lack bacterial_vs_viral"
    ):
        bv_threshold_of({"threshold": 0.5, "rules": {}}, THREE_CLASS, path)


# ----------------------------------------------------------------------------- split


def test_split_is_stratified_on_three_classes_and_grouped_by_patient():
    samples = sample_train()
    y = task_labels(samples, THREE_CLASS)
    train, val = split_by_patient(samples, 0.25, seed=0, strata=y)
    assert not {s.patient for s in train} & {s.patient for s in val}
    val_y = task_labels(val, THREE_CLASS)
    share, val_share = np.bincount(y) / len(y), np.bincount(val_y, minlength=3) / len(val_y)
    assert np.abs(share - val_share).max() < 0.05, (share, val_share)
    assert len(train) + len(val) == len(samples)


# ----------------------------------------------------------------------------- metrics


def hand_made_case():
    """12 films of 8 patients: 0 normal, 1 bacterial, 2 viral, probabilities summing to 1."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.4, 0.2, 0.4],
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.5, 0.3],
            [0.5, 0.3, 0.2],
            [0.05, 0.6, 0.35],
            [0.1, 0.2, 0.7],
            [0.2, 0.45, 0.35],
            [0.3, 0.3, 0.4],
            [0.15, 0.25, 0.6],
        ]
    )
    patients = ["a", "a", "b", "c", "d", "d", "e", "f", "g", "g", "h", "h"]
    return y, probs, patients


def test_three_class_metrics_equal_scikit_learn():
    y, probs, patients = hand_made_case()
    threshold, bv = 0.45, 0.5
    m = evaluate_three_class(y, probs, threshold, bv, n_boot=200, patients=patients)
    pred = predicted_classes(probs, threshold, bv)
    # the hierarchical rule by hand: pneumonia if p_b + p_v >= 0.45, then bacterial if p_b/(p_b+p_v) >= 0.5
    assert pred.tolist() == [0, 0, 2, 0, 1, 1, 1, 1, 2, 1, 2, 2]
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_roc_auc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    assert m["confusion"]["matrix"] == confusion_matrix(y, pred).tolist()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, labels=[0, 1, 2], zero_division=0
    )
    for c, key in enumerate(KEYS):
        pc = m["per_class"][key]
        assert pc["sensitivity"] == pytest.approx(recall[c])
        assert pc["precision"] == pytest.approx(precision[c])
        assert pc["f1"] == pytest.approx(f1[c])
        assert pc["specificity"] == pytest.approx(recall_of_rest(y, pred, c))
        assert pc["roc_auc"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    binary = m["binary"]
    assert binary["roc_auc"] == pytest.approx(roc_auc_score(y > 0, probs[:, 1] + probs[:, 2]))
    assert binary["sensitivity"] == pytest.approx(1.0) and binary["specificity"] == pytest.approx(
        3 / 4
    )
    bvm = m["bacterial_vs_viral"]
    films = y > 0
    p_b = probs[films, 1] / (probs[films, 1] + probs[films, 2])
    assert bvm["n"] == 8 and bvm["roc_auc"] == pytest.approx(roc_auc_score(y[films] == 1, p_b))
    assert bvm["accuracy"] == pytest.approx(accuracy_score(y[films] == 1, p_b >= bv))
    assert bvm["sensitivity"] == pytest.approx(recall_score(y[films] == 1, p_b >= bv))
    assert bvm["specificity"] == pytest.approx(
        recall_score(y[films] == 1, p_b >= bv, pos_label=False)
    )
    # patient-level intervals: 8 patients in all, 8 in the binary block, 5 with pneumonia films
    assert m["n_patients"] == 8 and binary["n_patients"] == 8 and bvm["n_patients"] == 5
    assert "normal, bacterial or viral" in m["ci_method"] and "200 resamples" in m["ci_method"]
    assert (
        "over the pneumonia patients" in bvm["ci_method"]
        and "bacterial / viral" in bvm["ci_method"]
    )
    by_patient = three_class_ci(y, probs, threshold, bv, np.asarray(patients), n_boot=200)
    by_image = three_class_ci(y, probs, threshold, bv, None, n_boot=200)
    # the patients were resampled, not the films
    assert m["ci95"] == by_patient and by_patient != by_image
    assert binary["ci95"] == evaluation_ci(
        (y > 0).astype(int), p_pneumonia(probs), threshold, n_boot=200, patients=patients
    )
    assert binary["ci95"] != evaluation_ci(
        (y > 0).astype(int), p_pneumonia(probs), threshold, n_boot=200
    )
    assert (
        bvm["ci95"]["roc_auc"]
        == evaluation_ci(
            (y[films] == 1).astype(int), p_b, bv, n_boot=200, patients=np.asarray(patients)[films]
        )["roc_auc"]
    )
    lo, hi = m["ci95"]["accuracy"]
    assert lo <= m["accuracy"] <= hi
    assert set(m["ci95"]["per_class"]["viral"]) == {
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "roc_auc",
    }
    assert set(bvm["ci95"]) == {"roc_auc", "accuracy", "sensitivity", "specificity"}


def test_numpy_bootstrap_equals_the_scikit_learn_path():
    # the former path: every resample scored by point_metrics (scikit-learn), same patient draws
    from pneumoscope.evaluation.bootstrap import draw_images, patient_strata
    from pneumoscope.evaluation.three_class import _flat, point_metrics

    rng = np.random.default_rng(7)
    y = np.repeat([0, 1, 2, 1, 0, 2], 15)
    # informative, with overlap
    probs = rng.dirichlet([1, 1, 1], size=len(y)) * 0.5 + np.eye(3)[y] * 0.5
    probs[::9] = probs[::9].round(1)  # ties, as real scores have
    patients = np.array([f"p{i // 3}" for i in range(len(y))])
    got = three_class_ci(y, probs, 0.5, 0.55, patients, n_boot=100, seed=3)
    strata, blocks, order = patient_strata(y, patients)
    assert len(strata) == 3  # stratified on the three classes
    draw = np.random.default_rng(3)
    draws = {}
    for _ in range(100):
        idx = draw_images(draw, strata, blocks, order)
        for key, value in _flat(point_metrics(y[idx], probs[idx], 0.5, 0.55)).items():
            draws.setdefault(key, []).append(value)
    span = {
        k: pytest.approx([np.nanpercentile(v, 2.5), np.nanpercentile(v, 97.5)], abs=1e-12)
        for k, v in draws.items()
    }
    assert got["accuracy"] == span["accuracy"] and got["macro_roc_auc"] == span["macro_roc_auc"]
    for key in KEYS:
        for name, value in got["per_class"][key].items():
            assert value == span[(key, name)], (key, name)


def recall_of_rest(y, pred, c):
    rest = y != c
    return float(np.mean(pred[rest] != c))


def test_thresholds_binary_on_p_pneumonia_and_youden_for_subtype():
    y, probs, _ = hand_made_case()
    t = choose_task_thresholds(THREE_CLASS, y, probs)
    assert {"youden", "sensitivity95"} <= set(t["rules"])
    binary = choose_task_thresholds(
        "binary", (y > 0).astype(int), np.column_stack([1 - p_pneumonia(probs), p_pneumonia(probs)])
    )
    assert t["rules"] == pytest.approx(binary["rules"]) and t["default"] == binary["default"]
    assert (
        0.0 < t["bacterial_vs_viral"]["threshold"] <= 1.0
        and "youden" in t["bacterial_vs_viral"]["rule"]
    )


# ----------------------------------------------------------------------------- a real run


def class_probs_of(run, folder):
    """(files, binary labels, class probabilities) of a labelled folder, by the run's own Predictor."""
    from pneumoscope.data.cache import decode_samples
    from pneumoscope.inference import Predictor

    predictor = Predictor.from_run(run, device="cpu")
    data = decode_samples(discover_split(folder), predictor.image_size, show_progress=False)
    return data.samples, data.labels, predictor.predict_class_probs(data.images)


def test_model_card_of_a_three_class_run(three_run):
    card = (three_run / "MODEL_CARD.md").read_text()
    assert "three-class run" in card and "Bacterial vs viral, on the" in card
    assert "| roc_auc |" in card  # the pneumonia-vs-normal table on p(pneumonia)
    # the bacterial-vs-viral line: 1000 resamples of the pneumonia patients, stratified by subtype
    assert BV_CI_METHOD + "; 1000 resamples" in card


def test_run_files(three_run):
    config = json.loads((three_run / "config.json").read_text())
    assert config["task"] == THREE_CLASS
    thresholds = json.loads((three_run / "threshold.json").read_text())
    assert "bacterial_vs_viral" in thresholds and "youden" in thresholds["rules"]
    with open(three_run / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "p_normal", "p_bacterial", "p_viral", "p_pneumonia"]
    # the stratified split's validation holds all three
    assert {int(r["label"]) for r in rows} == {
        0,
        1,
        2,
    }


def test_evaluate_writes_three_class_metrics(three_run, tmp_path):
    from pneumoscope.report.evaluate import evaluate_run

    m = evaluate_run(
        three_run, SAMPLE / "train", out=tmp_path / "metrics.json", n_boot=50, show_progress=False
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["task"] == THREE_CLASS and saved["n"] == 433
    for key in (
        "accuracy",
        "macro_roc_auc",
        "per_class",
        "confusion",
        "binary",
        "bacterial_vs_viral",
        "ci95",
    ):
        assert key in saved
    assert set(saved["per_class"]) == set(KEYS)
    assert np.sum(saved["confusion"]["matrix"]) == 433
    binary_keys = {
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
        "n_patients",
        "ci95",
        "ci_method",
        "threshold_rule",
        "data",
        "unreadable",
        "leakage",
    }
    assert binary_keys <= set(saved["binary"])
    assert saved["bacterial_vs_viral"]["n"] == 231
    assert m["binary"]["leakage"]["shared"]  # the run trained on these very films: flagged
    with open(tmp_path / "metrics_predictions.csv") as f:
        assert next(csv.reader(f)) == [
            "path",
            "label",
            "p_normal",
            "p_bacterial",
            "p_viral",
            "p_pneumonia",
        ]
    # the model card's evaluated folders hold the pneumonia-vs-normal figures of the binary block
    (entry,) = [
        e
        for e in json.loads((three_run / "evaluations.json").read_text())
        if e["metrics_file"] == str(tmp_path / "metrics.json")
    ]
    assert (
        entry["roc_auc"] == saved["binary"]["roc_auc"]
        and entry["sensitivity"] == saved["binary"]["sensitivity"]
    )
    assert entry["shared_with_run"]["train"] > 0


def test_predict_columns(three_run, tmp_path):
    from pneumoscope.commands import predict_paths

    out = tmp_path / "predictions.csv"
    rows = predict_paths(three_run, [SAMPLE / "val"], out=out, show_progress=False)
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "p_normal", "p_bacterial", "p_viral", "p_pneumonia", "label"]
    assert len(table) == len(rows) == 16
    for r in table:
        p = [float(r[f"p_{k}"]) for k in KEYS]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert float(r["p_pneumonia"]) == pytest.approx(p[1] + p[2], abs=2e-6)
        assert r["label"] in ("NORMAL", "BACTERIAL", "VIRAL")


def test_the_three_class_csv_header_stands_without_rows():
    """The columns are the task's even with no row (predict itself stops with exit 2 when
    nothing could be scored: tests/test_nothing_scored.py)."""
    import io

    from pneumoscope.commands import predictions_csv

    out = io.StringIO()
    predictions_csv([], out, task=THREE_CLASS)
    assert out.getvalue() == "path,p_normal,p_bacterial,p_viral,p_pneumonia,label\n"


def test_a_run_without_the_subtype_threshold_is_refused_on_load(three_run, tmp_path):
    from pneumoscope.inference import Predictor
    from pneumoscope.rundir import RunDirError

    run = tmp_path / "run"
    shutil.copytree(three_run, run)
    thresholds = json.loads((run / "threshold.json").read_text())
    del thresholds["bacterial_vs_viral"]
    (run / "threshold.json").write_text(json.dumps(thresholds))
    with pytest.raises(
        RunDirError, match=f"^{run / 'threshold.json'}: a three-class run's thresholds lack"
    ):
        Predictor.from_run(run, device="cpu")


@pytest.mark.slow  # an ONNX export
def test_onnx_export_parity(three_run, tmp_path):
    from pneumoscope.commands import export_run
    from pneumoscope.deploy.onnx_predictor import OnnxPredictor
    from pneumoscope.inference import Predictor

    onnx = export_run(three_run, out=tmp_path / "model.onnx")
    contract = json.loads((tmp_path / "model.onnx.json").read_text())
    assert contract["task"] == THREE_CLASS and set(contract["outputs"]) == {
        "logits",
        "probabilities",
        "p_pneumonia",
    }
    torch_side, onnx_side = (
        Predictor.from_run(three_run, device="cpu"),
        OnnxPredictor.from_file(onnx, three_run),
    )
    files = (
        sorted((SAMPLE / "train" / "PNEUMONIA").glob("*virus*.jpeg"))[:6]
        + sorted((SAMPLE / "val").rglob("*.jpeg"))[:6]
    )
    images = np.stack([torch_side.load(f) for f in files])
    want, got = torch_side.predict_class_probs(images), onnx_side.predict_class_probs(images)
    assert got.shape == (12, 3) and np.abs(want - got).max() < 1e-4
    assert np.abs(torch_side.predict_images(images) - onnx_side.predict_images(images)).max() < 1e-4


def test_api_shows_three_probabilities_and_label(three_run):
    from pneumoscope.serve import create_app
    from pneumoscope.serve.background import BackgroundServer

    xray = sorted((SAMPLE / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    with BackgroundServer(create_app(three_run, device="cpu")) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            r = client.post("/v1/predict", files={"file": (xray.name, xray.read_bytes())})
    assert r.status_code == 200
    body = r.json()
    assert set(body["probabilities"]) == set(KEYS)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["p_pneumonia"] == pytest.approx(
        body["probabilities"]["bacterial"] + body["probabilities"]["viral"], abs=2e-6
    )
    assert (
        body["label"] in ("NORMAL", "BACTERIAL", "VIRAL") and "bacterial_vs_viral_threshold" in body
    )


@pytest.mark.browser
def test_web_page_shows_the_three_probabilities(three_run, guarded_page, artifacts_dir):
    """The upload page in a real Chromium: the three-class table shows what the API answers."""
    from pneumoscope.serve import create_app
    from pneumoscope.serve.background import BackgroundServer

    xray = sorted((SAMPLE / "val" / "PNEUMONIA").glob("*.jpeg"))[0]
    with BackgroundServer(create_app(three_run, device="cpu")) as server:
        api = httpx.post(
            server.url + "/v1/predict", files={"file": (xray.name, xray.read_bytes())}, timeout=120
        ).json()
        page = guarded_page(server.url)
        page.goto(server.url + "/")
        # its own attribute, not #result's
        hidden_before = page.eval_on_selector("#classes", "el => el.hidden")
        page.set_input_files("#file", str(xray))
        page.wait_for_selector("#result", state="visible", timeout=120_000)
        page.wait_for_function(
            "() => { const im = document.getElementById('heatmap-img');"
            " return im.complete && im.naturalWidth > 0; }",
            timeout=60_000,
        )
        shown = {k: page.inner_text(f"#p-{k}") for k in KEYS}
        row_names = {
            k: page.eval_on_selector(
                f"#p-{k}", "el => el.parentElement.querySelector('th').innerText"
            )
            for k in KEYS
        }
        label, line = page.inner_text("#label"), page.inner_text("#threshold-line")
        label_class, shown_pneumonia = (
            page.eval_on_selector("#label", "el => el.className"),
            page.inner_text("#prob"),
        )
        table_visible = page.is_visible("#classes")
        page.screenshot(path=str(artifacts_dir / "webapp_three_class.png"), full_page=True)
    assert hidden_before and table_visible
    assert shown == {k: f"{100 * api['probabilities'][k]:.1f}%" for k in KEYS}
    assert len(set(shown.values())) == 3  # distinct, so swapped cells would show
    assert row_names == {
        "normal": "Normal",
        "bacterial": "Bacterial pneumonia",
        "viral": "Viral pneumonia",
    }
    assert shown_pneumonia == f"{100 * api['p_pneumonia']:.1f}%"
    assert label == api["label"] and label in ("NORMAL", "BACTERIAL", "VIRAL")
    assert label_class == "label " + label.lower()
    assert (
        f"{api['bacterial_vs_viral_threshold']:.3f}" in line and f"{api['threshold']:.3f}" in line
    )
    assert "BACTERIAL when p(bacterial) / p(pneumonia)" in line
    assert page.outside == [] and page.console_errors == []


def test_audit_counts_three_classes():
    from pneumoscope.data.audit import audit_root

    report = audit_root(SAMPLE, show_progress=False)
    assert report["splits"]["train"]["three_class"] == {
        "NORMAL": 202,
        "BACTERIAL": 152,
        "VIRAL": 79,
        "UNNAMED": 0,
    }
    assert report["splits"]["val"]["three_class"] == {
        "NORMAL": 8,
        "BACTERIAL": 8,
        "VIRAL": 0,
        "UNNAMED": 0,
    }


@pytest.mark.slow  # builds a report
def test_report_has_the_three_class_section(three_run, site_folder, tmp_path):
    from pneumoscope.report.build import build_report

    index = build_report(
        three_run,
        split="val",
        out=tmp_path / "report",
        n_boot=20,
        per_group=2,
        show_progress=False,
        drift=site_folder,
    )
    page = index.read_text()
    assert 'id="three-class"' in page and "Grad-CAM per class" in page
    for name in (
        "confusion_3class",
        "roc_ovr",
        "tsne_3class",
        "umap_3class",
        "gradcam_classes",
        "confusion",
        "drift",
    ):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000, name
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["task"] == THREE_CLASS and metrics["binary"]["leakage"] is not None
    # the 3x3 confusion is the hierarchical labels of the report's own predictions
    with open(tmp_path / "report" / "metrics_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{k}"]) for k in KEYS] for r in rows])
    t, bv = metrics["threshold"], metrics["bacterial_vs_viral_threshold"]
    got = np.array(metrics["confusion"]["matrix"])
    want = confusion_matrix(y, predicted_classes(probs, t, bv), labels=[0, 1, 2])
    # the CSV keeps 9 significant digits and the validation thresholds are films' own scores: a film
    # at a threshold may fall either side after rounding, no other film may
    near = np.sum(
        (np.abs(p_pneumonia(probs) - t) < 1e-5)
        | (np.abs(p_bacterial_given_pneumonia(probs) - bv) < 1e-5)
    )
    assert got.sum(axis=1).tolist() == np.bincount(y, minlength=3).tolist()
    assert np.abs(got - want).sum() <= 2 * near, (got, want)
    assert set(y) == {0, 1, 2} and f"{metrics['accuracy']:.4f}" in page
    drift = json.loads((tmp_path / "report" / "drift.json").read_text())
    assert drift["scores"]["folder"]["n"] == 40 and drift["threshold"] == pytest.approx(
        metrics["threshold"]
    )


# ----------------------------------------------------------------------------- calibrate, drift


def test_calibrate_rechooses_the_binary_threshold_on_p_pneumonia(
    three_run, site_folder, tmp_path, capsys
):
    from pneumoscope.cli import main
    from pneumoscope.commands import predict_paths
    from pneumoscope.site.calibrate import site_threshold

    run = tmp_path / "run"
    shutil.copytree(three_run, run)  # calibrate rewrites threshold.json
    before = json.loads((run / "threshold.json").read_text())
    assert main(["-q", "calibrate", str(run), "--data", str(site_folder), "--bootstrap", "50"]) == 0
    assert "site rule:" in capsys.readouterr().out
    after = json.loads((run / "threshold.json").read_text())
    _, labels, probs = class_probs_of(run, site_folder)
    assert labels.tolist() == [0] * 20 + [1] * 20  # calibrate's labels are the binary folders
    want = site_threshold(labels, p_pneumonia(probs), 0.97)
    assert after["default"] == "site" and after["threshold"] == pytest.approx(want, abs=1e-6)
    assert after["rules"]["site"] == after["threshold"]
    # the second question is untouched
    assert after["bacterial_vs_viral"] == before["bacterial_vs_viral"]
    assert after["site"]["sample"]["n"] == {"NORMAL": 20, "PNEUMONIA": 20}
    assert after["site"]["metrics"]["sensitivity"] >= 0.97
    # predict labels by the site threshold and the validation bacterial/viral one
    files = sorted(site_folder.rglob("*.jpeg"))
    rows = predict_paths(run, files, out=tmp_path / "p.csv", show_progress=False)
    names = ("NORMAL", "BACTERIAL", "VIRAL")
    expected = [
        names[c] for c in predicted_classes(probs, want, before["bacterial_vs_viral"]["threshold"])
    ]
    by_name = {Path(r["path"]).name: r["label"] for r in rows}
    assert [
        by_name[f.name]
        for f in sorted(site_folder.rglob("*.jpeg"), key=lambda f: (f.parent.name, f.name))
    ] == expected
    assert "## Site calibration" in (run / "MODEL_CARD.md").read_text()


def test_drift_scores_p_pneumonia_of_a_three_class_run(three_run, site_folder, tmp_path, capsys):
    from pneumoscope.cli import main

    out = tmp_path / "drift.json"
    assert main(["-q", "drift", str(three_run), "--data", str(site_folder), "--out", str(out)]) == 0
    assert "verdict:" in capsys.readouterr().out
    d = json.loads(out.read_text())
    thresholds = json.loads((three_run / "threshold.json").read_text())
    assert d["threshold"] == pytest.approx(thresholds["threshold"])
    _, _, probs = class_probs_of(three_run, site_folder)
    p = p_pneumonia(probs)
    folder = d["scores"]["folder"]
    assert folder["n"] == 40 and folder["quantiles"]["q50"] == pytest.approx(
        float(np.median(p)), abs=1e-5
    )
    assert folder["share_positive"] == pytest.approx(float(np.mean(p >= d["threshold"])))
    with open(three_run / "manifest.csv") as f:
        n_val = sum(r["role"] == "val" for r in csv.DictReader(f))
    assert d["scores"]["validation"]["n"] == n_val
    assert 0.0 <= d["domain_auc"] <= 1.0

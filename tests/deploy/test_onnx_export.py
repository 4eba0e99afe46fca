"""ONNX export: the contract beside it, a dynamic batch axis, parity with torch on real
shared images, and `predict --onnx` giving the torch labels."""

import csv
import json
import shutil

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file, save_file

from pneumoscope.cli import main
from pneumoscope.data.decode import load_image
from pneumoscope.deploy.onnx_predictor import OnnxPredictor
from pneumoscope.evaluation.metrics import DEFAULT_THRESHOLD_RULE
from pneumoscope.inference import Predictor
from pneumoscope.models import PNEUMONIA_INDEX
from pneumoscope.models.onnx_session import open_session

pytestmark = pytest.mark.slow  # an ONNX export (the export's parity is also checked by others)


@pytest.fixture(scope="module")
def predictor(deploy_run):
    return Predictor.from_run(deploy_run, device="cpu")


@pytest.fixture(scope="module")
def real_images(shared_data, predictor):
    """20 real shared X-rays (both classes, train and val) at the run's input size."""
    files = []
    for split, n in (("train", 6), ("val", 4)):
        for cls in ("NORMAL", "PNEUMONIA"):
            found = sorted((shared_data / split / cls).glob("*.jpeg"))
            files += found[:: max(1, len(found) // n)][:n]
    return np.stack([load_image(f, predictor.image_size) for f in files])


def test_contract_beside_the_model(onnx_model, deploy_run):
    contract = json.loads((deploy_run / "model.onnx.json").read_text())
    config = json.loads((deploy_run / "config.json").read_text())
    thresholds = json.loads((deploy_run / "threshold.json").read_text())
    assert contract["model_file"] == "model.onnx"
    assert contract["preprocessing"]["image_size"] == config["image_size"] == 64
    assert contract["preprocessing"]["geometry"] == "stretch"
    assert contract["input"]["shape"] == ["batch", 1, 64, 64]
    assert (
        contract["thresholds"] == thresholds
        and contract["thresholds"]["default"] == DEFAULT_THRESHOLD_RULE
    )
    assert contract["backbone"] == "efficientnet_lite0"
    assert set(contract["outputs"]) == {"logits", "p_pneumonia"}
    assert contract["pneumoscope_version"]
    assert contract["export_check"]["max_abs_diff_p"] < 1e-4
    assert len(contract["model_sha256"]) == 64


def test_graph_has_a_dynamic_batch_axis(onnx_model):
    model = onnx.load(str(onnx_model))
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image"
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic: any batch size
    assert [d.dim_value for d in dims[1:]] == [1, 64, 64]
    assert [o.name for o in model.graph.output] == ["logits", "p_pneumonia"]


@pytest.mark.parametrize("batch", [1, 7, 20])
def test_onnxruntime_matches_torch_on_real_images(onnx_model, predictor, real_images, batch):
    torch_p = predictor.predict_images(real_images)
    onnx_p = OnnxPredictor.from_file(onnx_model).predict_images(real_images, batch_size=batch)
    assert onnx_p.shape == torch_p.shape == (20,)
    assert np.max(np.abs(onnx_p - torch_p)) < 1e-4
    assert np.ptp(torch_p) > 1e-3  # the images are told apart: parity is not of a constant


def test_logits_output_is_consistent(onnx_model, real_images):
    session = open_session(onnx_model)
    x = real_images[:5, None].astype(np.float32) / 255.0
    logits, p = session.run(None, {"image": x})
    assert logits.shape == (5, 2) and p.shape == (5,)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(e[:, PNEUMONIA_INDEX] / e.sum(axis=1), p, atol=1e-6)


def read_rows(path):
    with open(path) as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_predict_onnx_gives_the_torch_labels(onnx_model, deploy_run, mixed_root, tmp_path):
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    data = str(mixed_root / "test")
    assert main(["-q", "predict", str(deploy_run), data, "--out", str(torch_csv)]) == 0
    assert (
        main(
            [
                "-q",
                "predict",
                str(deploy_run),
                data,
                "--onnx",
                str(onnx_model),
                "--out",
                str(onnx_csv),
            ]
        )
        == 0
    )
    t, o = read_rows(torch_csv), read_rows(onnx_csv)
    assert t.keys() == o.keys() and len(t) == 16
    for path in t:
        assert o[path]["label"] == t[path]["label"], path
        assert float(o[path]["p_pneumonia"]) == pytest.approx(
            float(t[path]["p_pneumonia"]), abs=1e-4
        )


def test_stale_export_is_refused(onnx_model, deploy_run, tmp_path, mixed_root, capsys):
    """An export no longer matching the run's weights (retrained run) is an error."""
    run = tmp_path / "run"
    shutil.copytree(deploy_run, run)
    weights = load_file(run / "model_best.safetensors")
    weights["head.bias"] = weights["head.bias"] + 1.0
    save_file(weights, run / "model_best.safetensors")
    code = main(
        ["-q", "predict", str(run), str(mixed_root / "test"), "--onnx", str(run / "model.onnx")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "exported from other weights" in err and "pneumoscope export" in err


def test_model_not_matching_its_contract_is_refused(
    onnx_model, deploy_run, tmp_path, mixed_root, capsys
):
    """A model.onnx swapped after export (here: another export's contract beside it)."""
    other = tmp_path / "other.onnx"
    shutil.copy(onnx_model, other)
    contract = json.loads((deploy_run / "model.onnx.json").read_text())
    contract["model_sha256"] = "0" * 64
    (tmp_path / "other.onnx.json").write_text(json.dumps(contract))
    code = main(["-q", "predict", str(deploy_run), str(mixed_root / "test"), "--onnx", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "does not match its contract" in err


def test_missing_contract_is_a_clear_error(onnx_model, deploy_run, tmp_path, mixed_root, capsys):
    lone = tmp_path / "lone.onnx"
    shutil.copy(onnx_model, lone)
    code = main(["-q", "predict", str(deploy_run), str(mixed_root / "test"), "--onnx", str(lone)])
    err = capsys.readouterr().err
    assert code == 2 and "lone.onnx.json" in err and "Traceback" not in err

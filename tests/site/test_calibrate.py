"""pneumoscope calibrate: the site rule, what threshold.json records, and that every
consumer (evaluate, predict, serve, ONNX) takes it as the default."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.evaluation.metrics import DEFAULT_THRESHOLD_RULE, SENSITIVITY_RULES
from pneumoscope.site.calibrate import MIN_PER_CLASS, SITE_RULE, site_threshold


def _thresholds(run: Path) -> dict:
    return json.loads((run / "threshold.json").read_text())


def _sensitivity(y, p, t) -> float:
    return float(np.mean(np.asarray(p)[np.asarray(y) == 1] >= t))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.9, 0.95, 0.97, 1.0])
def test_site_threshold_is_the_highest_reaching_the_target(seed, target):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(40, int), np.ones(37, int)]
    p = np.round(np.r_[rng.beta(2, 5, 40), rng.beta(5, 2, 37)], 2)  # rounding makes ties
    t = site_threshold(y, p, target)
    assert _sensitivity(y, p, t) >= target
    higher = np.unique(p[p > t])
    assert all(_sensitivity(y, p, h) < target for h in higher)


def test_calibrate_adds_site_rule_and_records_the_sample(fresh_run, site_sample):
    before = _thresholds(fresh_run)
    assert (
        main(["-q", "calibrate", str(fresh_run), "--data", str(site_sample), "--bootstrap", "200"])
        == 0
    )
    after = _thresholds(fresh_run)
    for rule, value in before["rules"].items():  # the validation rules stay
        assert after["rules"][rule] == value
    assert after["default"] == SITE_RULE and after["threshold"] == after["rules"][SITE_RULE]
    site = after["site"]
    assert site["target_sensitivity"] == 0.97 and site["threshold"] == after["threshold"]
    assert site["sample"]["n"] == {"NORMAL": 24, "PNEUMONIA": 24}
    files = site["sample"]["files"]
    assert len(files) == 48
    for row in files[:5] + files[-5:]:
        assert row["sha1"] == hashlib.sha1(Path(row["path"]).read_bytes()).hexdigest()
        assert Path(row["path"]).parent.name == row["label"]
    m = site["metrics"]
    assert m["n"] == 48 and m["threshold"] == site["threshold"]
    assert m["sensitivity"] >= 0.97
    lo, hi = m["ci95"]["specificity"]
    assert lo <= m["specificity"] <= hi
    assert site["previous_default"]["rule"] == DEFAULT_THRESHOLD_RULE
    assert site["previous_default"]["threshold"] == before["rules"][DEFAULT_THRESHOLD_RULE]
    assert "optimistic" in site["note"]
    assert site["sample"]["patients_seen_by_run"] == 0  # tests/site/conftest: other patients
    assert not list(fresh_run.glob(".*.tmp"))  # written atomically, nothing left behind
    card = (fresh_run / "MODEL_CARD.md").read_text()  # calibrate (re)writes the model card
    assert "## Site calibration" in card and f"threshold {site['threshold']:.4f}" in card
    assert f"{site['sample']['data']}" in card and "24 NORMAL, 24 PNEUMONIA" in card
    # validation figures stay at the validation rule
    assert f"rule `{DEFAULT_THRESHOLD_RULE}`" in card


def test_site_threshold_matches_the_sample_predictions(fresh_run, site_sample, tmp_path):
    """evaluate on the sample at the site default: sensitivity reaches the target, and
    the next higher sample score would not."""
    assert (
        main(
            [
                "-q",
                "calibrate",
                str(fresh_run),
                "--data",
                str(site_sample),
                "--target-sensitivity",
                "0.9",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(fresh_run),
                "--data",
                str(site_sample),
                "--out",
                str(out),
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    t = _thresholds(fresh_run)["rules"][SITE_RULE]
    assert metrics["threshold_rule"] == SITE_RULE and metrics["threshold"] == t
    assert metrics["sensitivity"] >= 0.9
    with open(tmp_path / "m_predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["p_pneumonia"]) for r in rows])  # written by repr: reads back exactly
    higher = np.unique(p[p > t])
    assert all(_sensitivity(y, p, h) < 0.9 for h in higher)


def test_recalibrate_replaces_the_site_rule(fresh_run, site_sample):
    assert (
        main(
            [
                "-q",
                "calibrate",
                str(fresh_run),
                "--data",
                str(site_sample),
                "--target-sensitivity",
                "1.0",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    first = _thresholds(fresh_run)
    assert (
        main(
            [
                "-q",
                "calibrate",
                str(fresh_run),
                "--data",
                str(site_sample),
                "--target-sensitivity",
                "0.8",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    second = _thresholds(fresh_run)
    assert second["rules"][SITE_RULE] >= first["rules"][SITE_RULE]
    assert (
        second["site"]["target_sensitivity"] == 0.8
        and second["threshold"] == second["rules"][SITE_RULE]
    )
    # not the first site rule
    assert second["site"]["previous_default"]["rule"] == DEFAULT_THRESHOLD_RULE
    assert set(second["rules"]) == {"youden", *SENSITIVITY_RULES, SITE_RULE}


def test_too_small_sample_is_refused(fresh_run, site_sample, tmp_path, capsys):
    small = tmp_path / "small"
    shutil.copytree(site_sample, small)
    for path in sorted((small / "NORMAL").iterdir())[MIN_PER_CLASS - 1 :]:
        path.unlink()  # NORMAL: 19 images
    before = (fresh_run / "threshold.json").read_bytes()
    assert main(["-q", "calibrate", str(fresh_run), "--data", str(small)]) == 2
    err = capsys.readouterr().err
    assert (
        "too small a site sample" in err
        and "NORMAL 19" in err
        and f"at least {MIN_PER_CLASS}" in err
    )
    assert (fresh_run / "threshold.json").read_bytes() == before


def test_threshold_rule_choices_come_from_the_run(fresh_run, site_sample, capsys):
    image = str(sorted((site_sample / "PNEUMONIA").iterdir())[0])
    assert main(["-q", "predict", str(fresh_run), image, "--threshold-rule", "site"]) == 2
    err = capsys.readouterr().err
    assert (
        "'site' is not in this run's threshold.json" in err
        and ", ".join(sorted({"youden", *SENSITIVITY_RULES})) in err
    )
    assert "calibrate" in err
    assert main(["-q", "predict", str(fresh_run), image, "--threshold-rule", "nonsense"]) == 2
    assert "'nonsense'" in capsys.readouterr().err


def test_consumers_use_the_site_rule_and_youden_still_picks_the_old_one(fresh_run, site_sample):
    from pneumoscope.commands import predict_paths
    from pneumoscope.serve.engine import InferenceEngine

    assert (
        main(
            [
                "-q",
                "calibrate",
                str(fresh_run),
                "--data",
                str(site_sample),
                "--target-sensitivity",
                "1.0",
                "--bootstrap",
                "0",
            ]
        )
        == 0
    )
    t = _thresholds(fresh_run)
    site, youden = t["rules"][SITE_RULE], t["rules"]["youden"]
    assert site != youden
    engine = InferenceEngine(fresh_run, device="cpu")
    assert engine.threshold == site and engine.threshold_rule == SITE_RULE
    assert InferenceEngine(fresh_run, threshold_rule="youden", device="cpu").threshold == youden
    rows = predict_paths(fresh_run, [site_sample], show_progress=False)
    for rule, threshold in ((None, site), ("youden", youden)):
        labelled = predict_paths(fresh_run, [site_sample], threshold_rule=rule, show_progress=False)
        assert [r["label"] for r in labelled] == [
            "PNEUMONIA" if r["p_pneumonia"] >= threshold else "NORMAL" for r in rows
        ]


@pytest.mark.slow  # an ONNX export
def test_onnx_exported_before_calibration_gets_the_site_thresholds(
    fresh_run, site_sample, tmp_path, caplog
):
    from pneumoscope.deploy.onnx_contract import read_contract
    from pneumoscope.deploy.onnx_predictor import OnnxPredictor

    assert main(["-q", "export", str(fresh_run)]) == 0  # inside the run: refreshed by calibrate
    # what `export --out` there writes: the same two files
    outside = tmp_path / "elsewhere" / "model.onnx"
    outside.parent.mkdir()
    for name in ("model.onnx", "model.onnx.json"):
        shutil.copy2(fresh_run / name, outside.parent / name)
    assert (
        main(["-q", "calibrate", str(fresh_run), "--data", str(site_sample), "--bootstrap", "0"])
        == 0
    )
    thresholds = _thresholds(fresh_run)
    inside = read_contract(fresh_run / "model.onnx")
    assert inside["thresholds"] == thresholds and "thresholds_updated_at" in inside
    # unchanged model still accepted
    OnnxPredictor.from_file(fresh_run / "model.onnx", run_dir=fresh_run)
    assert read_contract(outside)["thresholds"]["default"] == DEFAULT_THRESHOLD_RULE  # stale copy
    with caplog.at_level(logging.WARNING):
        predictor = OnnxPredictor.from_file(outside, run_dir=fresh_run)
    assert "thresholds differ" in caplog.text
    assert predictor.threshold_for(None) == thresholds["rules"][SITE_RULE]
    assert predictor.threshold_for("youden") == thresholds["rules"]["youden"]
    assert (
        OnnxPredictor.from_file(outside).threshold_for(None)
        == thresholds["rules"][DEFAULT_THRESHOLD_RULE]
    )

"""pneumoscope drift: an untouched folder of other real images looks like validation, a
shifted copy of it (zoom, gamma, markers) does not; the JSON, the table, the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.evaluation.metrics import DEFAULT_THRESHOLD_RULE
from pneumoscope.site.drift import MIN_IMAGES, nearest_distances, verdict_for


@pytest.fixture(scope="session")
def drift_results(base_run, untouched_folder, shifted_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("drift")
    results = {}
    for name, folder in (("untouched", untouched_folder), ("shifted", shifted_folder)):
        assert (
            main(
                [
                    "-q",
                    "drift",
                    str(base_run),
                    "--data",
                    str(folder),
                    "--out",
                    str(out / f"{name}.json"),
                ]
            )
            == 0
        )
        results[name] = json.loads((out / f"{name}.json").read_text())
    return results


def test_domain_auc_separates_shifted_from_untouched(drift_results):
    untouched, shifted = (
        drift_results["untouched"]["domain_auc"],
        drift_results["shifted"]["domain_auc"],
    )
    assert untouched < 0.7, untouched  # near 0.5: same kind of films as validation
    assert shifted > 0.85, shifted
    assert shifted - untouched > 0.2
    assert drift_results["untouched"]["verdict"] == verdict_for(untouched)
    assert drift_results["shifted"]["verdict"].startswith("strong shift")


def test_drift_json_holds_scores_and_outside_shares(drift_results, base_run):
    d = drift_results["shifted"]
    thresholds = json.loads((Path(base_run) / "threshold.json").read_text())
    assert (
        d["threshold"] == thresholds["threshold"] and d["threshold_rule"] == DEFAULT_THRESHOLD_RULE
    )
    val, folder = d["scores"]["validation"], d["scores"]["folder"]
    assert folder["n"] == 40 and val["n"] >= MIN_IMAGES  # one flat folder (shifted)
    # class folders read as one set
    assert drift_results["untouched"]["scores"]["folder"]["n"] == 40
    for s in (val, folder):
        q = list(s["quantiles"].values())
        assert q == sorted(q) and 0.0 <= q[0] and q[-1] <= 1.0
        assert sum(s["histogram"]["counts"]) == s["n"]
        assert 0.0 <= s["share_positive"] <= 1.0
    o = d["outside"]
    assert 0.0 <= o["embedding"] <= 1.0 and 0.0 <= o["score"] <= 1.0
    assert (
        o["score_range"][0] == val["quantiles"]["q00"]
        and o["score_range"][1] == val["quantiles"]["q100"]
    )


def test_nearest_distances_skip_the_same_patient():
    ref = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])  # cosine: angles count, not lengths
    near, far = 1 - 1 / np.sqrt(1.01), 1 - 0.1 / np.sqrt(1.01)  # (1,0)-(1,0.1); (1,0.1)-(0,1)
    assert np.allclose(nearest_distances(ref, None, ["a", "a", "b"]), [1.0, far, far])
    assert np.allclose(nearest_distances(ref, None, ["a", "b", "c"]), [near, near, far])
    assert np.allclose(nearest_distances(ref, np.array([[0.0, 5.0]])), [0.0])


def test_drift_console_table_and_too_few_images(base_run, untouched_folder, tmp_path, capsys):
    assert (
        main(
            [
                "-q",
                "drift",
                str(base_run),
                "--data",
                str(untouched_folder),
                "--out",
                str(tmp_path / "d.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "domain AUC (validation vs folder)" in out
        and "verdict:" in out
        and "predicted positive" in out
    )
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(untouched_folder.rglob("*.jpeg"))[: MIN_IMAGES - 1]:
        (few / path.name).write_bytes(path.read_bytes())
    assert main(["-q", "drift", str(base_run), "--data", str(few)]) == 2
    assert f"drift needs at least {MIN_IMAGES}" in capsys.readouterr().err


def test_report_shows_the_drift_section(base_run, site_sample, shifted_folder, tmp_path):
    out = tmp_path / "report"
    assert (
        main(
            [
                "-q",
                "report",
                str(base_run),
                "--data",
                str(site_sample),
                "--out",
                str(out),
                "--bootstrap",
                "50",
                "--gradcam-per-group",
                "1",
                "--perplexity",
                "5",
                "--drift",
                str(shifted_folder),
            ]
        )
        == 0
    )
    page = (out / "index.html").read_text()
    drift = json.loads((out / "drift.json").read_text())
    assert '<section id="drift">' in page and f"Domain AUC {drift['domain_auc']:.3f}" in page
    assert (out / "drift.png").is_file()

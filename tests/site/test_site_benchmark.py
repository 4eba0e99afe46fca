"""benchmarks/site.py: a run scored on a labelled site folder, every validation rule
re-derived from the run's val_predictions.csv, the site's pick and the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoscope.evaluation.metrics import SENSITIVITY_RULES, choose_thresholds, threshold_metrics
from pneumoscope.report.evaluate import evaluate_run
from pneumoscope.report.model_card import read_val_predictions


def test_site_pick_is_the_most_specific_rule_that_keeps_the_target(site_bench):
    bench = site_bench
    rows = {
        "a": {"sensitivity": 1.0, "specificity": 0.70},
        "b": {"sensitivity": 0.97, "specificity": 0.85},
        "c": {"sensitivity": 0.95, "specificity": 0.95},
    }
    assert bench.site_pick(rows, 0.97) == "b"
    assert bench.site_pick(rows, 0.99) == "a"
    assert bench.site_pick({"c": rows["c"]}, 0.97) is None


def test_site_benchmark_scores_a_run_like_evaluate(base_run, site_root, tmp_path, site_bench):
    bench = site_bench
    out = tmp_path / "site.jsonl"
    assert (
        bench.main(
            [
                str(base_run),
                "--data",
                str(site_root / "site"),
                "--bootstrap",
                "50",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = json.loads(out.read_text().splitlines()[0])
    assert row["n"] == 48 and row["label"].startswith("site sample (selection, n=48)")
    # the same ROC AUC and default-rule figures as `evaluate` on the folder
    evaluated = evaluate_run(
        base_run, site_root / "site", out=tmp_path / "m.json", n_boot=0, show_progress=False
    )
    assert row["roc_auc"] == round(evaluated["roc_auc"], 4)
    assert row["at_default"]["accuracy"] == round(evaluated["accuracy"], 4)
    # every rule, the new lower targets included, chosen on the run's validation predictions
    _, labels, p_val = read_val_predictions(base_run)
    rules = choose_thresholds(labels, p_val)["rules"]
    assert set(row["rules"]) >= {"youden", *SENSITIVITY_RULES}
    for name, threshold in rules.items():
        assert row["rules"][name]["threshold"] == pytest.approx(threshold)
    # the pick reaches the target on the site folder; no rule with a higher specificity does
    pick = row["site_pick"]
    if pick is not None:
        assert row["rules"][pick]["sensitivity"] >= row["site_target"]
        better = [
            r
            for r in row["rules"].values()
            if r["specificity"] > row["rules"][pick]["specificity"]
            and r["sensitivity"] >= row["site_target"]
        ]
        assert not better
    assert 0.0 <= row["oracle_on_sample"]["best_accuracy"] <= 1.0
    assert row["oracle_on_sample"]["best_accuracy"] >= max(
        r["accuracy"] for r in row["rules"].values()
    )
    table = bench.table([row])
    assert Path(base_run).name in table and f"{row['roc_auc']:.4f}" in table


def test_oracle_is_the_best_threshold_of_the_ranking(site_bench):
    bench = site_bench
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.9, 0.7, 0.3])
    best = max(threshold_metrics(y, p, t)["accuracy"] for t in p)
    got = bench.oracle(y, p, 0.75)
    assert got["best_accuracy"] == round(best, 4) == 0.75
    assert threshold_metrics(y, p, got["threshold_at_target"])["sensitivity"] >= 0.75


def test_the_runs_latest_shift_suite_row_is_its_guard(base_run, tmp_path, site_bench):
    def row(auc_marker, auc_zoom):
        shift = {"rules": {}, "mean_abs_dp": 0.01}
        return {
            "run": str(base_run),
            "clean": {"auc": 0.99, "rules": {}},
            "shifts": {
                "marker": {**shift, "suite": "shortcut", "auc": auc_marker},
                "ring": {**shift, "suite": "shortcut", "auc": 0.97},
                "zoom": {**shift, "suite": "stress", "auc": auc_zoom},
            },
        }

    results = tmp_path / "shift.jsonl"
    other = {**row(0.5, 0.5), "run": str(tmp_path / "another_run")}
    results.write_text(
        "\n".join(json.dumps(r) for r in (row(0.90, 0.80), row(0.99, 0.95), other)) + "\n"
    )
    guard = site_bench.shift_guard(base_run, results)
    assert guard == {
        "shortcut": {"auc": 0.98, "auc_min": 0.97},
        "stress": {"auc": 0.95, "auc_min": 0.95},
    }
    assert site_bench.shift_guard(base_run, tmp_path / "none.jsonl") is None
    assert site_bench.shift_guard(tmp_path / "never_shifted", results) is None

"""Score runs on the labelled site sample, next to their validation figures.

The site sample (../shared/data/site_sample: 120 films of the official test split, a
shifted site, whole patients) is SELECTION data: recipes and rules are chosen on it, so
every figure here is optimistic for that site and never a test result. Intervals are 95%
percentile intervals over resamples of the sample's patients.

For each run, one JSON row (appended to --out) and one line per threshold rule:

* ROC AUC on the site sample, with its interval; the run's validation ROC AUC beside it;
* at each threshold rule of the run's threshold.json (chosen on validation; their values
  travel to other sites): site accuracy, sensitivity, specificity, and the interval of
  each at the run's default rule;
* the rule the site would pick (``--site-target``, default 0.97): among the run's
  validation rules, the one with the highest site specificity whose site sensitivity
  reaches the target; and, for reference, the best that this ranking allows at all
  (the site's own threshold, chosen on the sample: "oracle");
* three-class runs: bacterial vs viral on the sample's pneumonia films (ROC AUC,
  accuracy, intervals);
* train wall seconds and the CPU they ran on, from summary.json where train recorded it;
* the shift suites (benchmarks/shift_suite.py: validation films under synthetic marker,
  stress and resampling shifts), each suite's mean and worst ROC AUC, where that script
  has a row for the run in --shift-results: the guards beside the target.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/site.py RUN [RUN ...] \
        [--data ../shared/data/site_sample] [--out benchmarks/site_results.jsonl]
    .venv/bin/python benchmarks/site.py --table-only benchmarks/site_results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pneumoscope.data.cache import decode_samples  # noqa: E402
from pneumoscope.data.discover import discover_split  # noqa: E402
from pneumoscope.evaluation.metrics import (  # noqa: E402
    choose_thresholds,
    sensitivity_threshold,
    threshold_metrics,
)
from pneumoscope.inference import Predictor  # noqa: E402
from pneumoscope.report.evaluate import score_predictions  # noqa: E402
from pneumoscope.report.model_card import read_val_predictions  # noqa: E402
from pneumoscope.rundir import read_json  # noqa: E402
from pneumoscope.tasks import BINARY, p_pneumonia  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "site_sample"
SHIFT_RESULTS = REPO / "benchmarks" / "shift_results.jsonl"  # benchmarks/shift_suite.py's rows
LABEL = "site sample (selection, n={n}): optimistic"


def rule_rows(y: np.ndarray, p: np.ndarray, rules: dict) -> dict:
    """Site accuracy / sensitivity / specificity at each validation rule's threshold."""
    rows = {}
    for name, threshold in rules.items():
        m = threshold_metrics(y, p, float(threshold))
        rows[name] = {
            "threshold": float(threshold),
            **{k: round(float(m[k]), 4) for k in ("accuracy", "sensitivity", "specificity")},
        }
    return rows


def validation_rules(run_dir: Path, recorded: dict) -> dict:
    """Every rule of evaluation.metrics.choose_thresholds, chosen on the run's validation
    predictions (so runs from before a rule existed are scored on it too), and the run's
    recorded ones (a `site` rule of calibrate, say) beside them."""
    _, labels, p_val = read_val_predictions(run_dir)
    return {**recorded, **choose_thresholds((labels > 0).astype(int), p_val)["rules"]}


def shift_guard(run_dir: Path, results: Path) -> dict | None:
    """The run's latest row of benchmarks/shift_suite.py (the guards on validation films
    under synthetic shifts), as suite -> mean and worst ROC AUC; None where it was not run."""
    if not results.exists():
        return None
    from shift_suite import summarise

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    # shift_suite.py records the run as given; relative paths are the repository's (its README commands)
    mine = [r for r in rows if (REPO / r["run"]).resolve() == Path(run_dir).resolve()]
    if not mine:
        return None
    return {
        suite: {"auc": round(v["auc"], 4), "auc_min": round(v["auc_min"], 4)}
        for suite, v in summarise(mine[-1]).items()
    }


def site_pick(rows: dict, target: float) -> str | None:
    """The validation rule with the highest site specificity among those whose site
    sensitivity reaches `target` (ties: the higher sensitivity)."""
    ok = [
        (r["specificity"], r["sensitivity"], name)
        for name, r in rows.items()
        if r["sensitivity"] >= target
    ]
    return max(ok)[2] if ok else None


def oracle(y: np.ndarray, p: np.ndarray, target: float) -> dict:
    """What this ranking allows on the sample itself: the site's own threshold at the
    target sensitivity, and the best accuracy of any threshold (both chosen on the sample)."""
    t = sensitivity_threshold(y, p, target)
    at_target = threshold_metrics(y, p, t)
    best = max(threshold_metrics(y, p, float(c))["accuracy"] for c in np.unique(p))
    return {
        "threshold_at_target": t,
        "specificity_at_target": round(float(at_target["specificity"]), 4),
        "accuracy_at_target": round(float(at_target["accuracy"]), 4),
        "best_accuracy": round(float(best), 4),
    }


def score_run(
    run_dir: Path, data_dir: Path, n_boot: int, target: float, shift_results: Path = SHIFT_RESULTS
) -> dict:
    started = time.perf_counter()
    predictor = Predictor.from_run(run_dir)
    data = decode_samples(
        discover_split(data_dir), predictor.image_size, desc="decode site", show_progress=False
    )
    probs = predictor.predict_class_probs(data.images)
    metrics = score_predictions(predictor, data, probs, None, str(data_dir), n_boot)
    binary = metrics if predictor.task == BINARY else metrics["binary"]
    p = p_pneumonia(probs)
    rows = rule_rows(data.labels, p, validation_rules(run_dir, predictor.thresholds["rules"]))
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else {}
    row = {
        "run": str(run_dir),
        "data": str(data_dir),
        "label": LABEL.format(n=binary["n"]),
        "task": predictor.task,
        "n": binary["n"],
        "n_patients": binary.get("n_patients"),
        "default_rule": predictor.thresholds["default"],
        "roc_auc": round(binary["roc_auc"], 4),
        "roc_auc_ci95": binary["ci95"].get("roc_auc"),
        "at_default": {k: round(binary[k], 4) for k in ("accuracy", "sensitivity", "specificity")},
        "at_default_ci95": {
            k: binary["ci95"].get(k) for k in ("accuracy", "sensitivity", "specificity")
        },
        "rules": rows,
        "site_target": target,
        "site_pick": site_pick(rows, target),
        "oracle_on_sample": oracle(data.labels, p, target),
        "val_roc_auc": summary.get("val_roc_auc"),
        "train_wall_seconds": summary.get("train_wall_seconds"),
        "train_cpu": summary.get("cpu"),
        "scored_seconds": round(time.perf_counter() - started, 1),
        "shift_suites": shift_guard(run_dir, shift_results),
    }
    if predictor.task != BINARY:
        bv = metrics["bacterial_vs_viral"]
        row["bacterial_vs_viral"] = {
            "n": bv["n"],
            "roc_auc": round(bv["roc_auc"], 4),
            "accuracy": round(bv["accuracy"], 4),
            "ci95": bv.get("ci95", {}),
        }
    return row


def _ci(span) -> str:
    return f"[{span[0]:.3f}, {span[1]:.3f}]" if span else ""


def table(rows: list[dict]) -> str:
    """Markdown: one line per run (default rule and the site's pick)."""
    out = [
        "| run | val ROC AUC | site ROC AUC | default rule: acc / sens / spec | site pick (sens >= target): "
        "rule, acc / sens / spec | oracle acc | bv AUC / acc | shift suites: mean (worst) AUC | train wall |",
        "|---|---:|---:|---|---|---:|---|---|---:|",
    ]
    for r in rows:
        d, pick = r["at_default"], r.get("site_pick")
        p = r["rules"].get(pick) if pick else None
        pick_text = (
            f"{pick}: {p['accuracy']:.3f} / {p['sensitivity']:.3f} / {p['specificity']:.3f}"
            if p
            else "none"
        )
        bv = r.get("bacterial_vs_viral")
        bv_text = (
            f"{bv['roc_auc']:.3f} {_ci(bv['ci95'].get('roc_auc'))} / {bv['accuracy']:.3f}"
            if bv
            else ""
        )
        wall = f"{r['train_wall_seconds']:.0f} s" if r.get("train_wall_seconds") else ""
        val = f"{r['val_roc_auc']:.4f}" if r.get("val_roc_auc") is not None else ""
        shifts = "; ".join(
            f"{k} {v['auc']:.4f} ({v['auc_min']:.4f})"
            for k, v in (r.get("shift_suites") or {}).items()
        )
        out.append(
            f"| {Path(r['run']).name} | {val} | {r['roc_auc']:.4f} {_ci(r['roc_auc_ci95'])} | "
            f"{r['default_rule']}: {d['accuracy']:.3f} / {d['sensitivity']:.3f} / {d['specificity']:.3f} | "
            f"{pick_text} | {r['oracle_on_sample']['best_accuracy']:.3f} | {bv_text} | {shifts} | {wall} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run directories (or ensembles) to score")
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="the labelled site sample (Kermany layout)"
    )
    ap.add_argument(
        "--bootstrap", type=int, default=1000, help="patient resamples for the intervals"
    )
    ap.add_argument(
        "--site-target", type=float, default=0.97, help="site sensitivity a rule must keep"
    )
    ap.add_argument("--out", type=Path, help="JSON lines file to append one row per run to")
    ap.add_argument(
        "--shift-results",
        type=Path,
        default=SHIFT_RESULTS,
        help="benchmarks/shift_suite.py's JSON lines: each run's latest row goes into the table",
    )
    ap.add_argument(
        "--table-only",
        type=Path,
        metavar="JSONL",
        help="print the table of a results file and exit",
    )
    args = ap.parse_args(argv)
    if args.table_only:
        rows = [
            json.loads(line) for line in args.table_only.read_text().splitlines() if line.strip()
        ]
        print(table(rows))
        return 0
    if not args.runs:
        ap.error("give run directories, or --table-only FILE")
    if not args.data.is_dir():
        ap.error(f"{args.data}: no such folder (the site sample: NORMAL/ and PNEUMONIA/)")
    rows = []
    for run in args.runs:
        row = score_run(run, args.data, args.bootstrap, args.site_target, args.shift_results)
        rows.append(row)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(f"{rows[0]['label']}; rules chosen on validation, intervals resample patients")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

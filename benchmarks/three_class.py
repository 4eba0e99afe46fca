"""Three-class vs binary on the shared train split: cost and validation figures (issue 13).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/three_class.py \
        --data /work/wt/shared/data/chest_xray_224 --out /tmp/three_class_bench

Trains the default recipe once per task (`pneumoscope train --task T`, each with an empty
cache of its own, so the wall time is a cold start to a finished model), then scores each
run's validation part from its own files (val_predictions.csv, threshold.json, patients
from the file names) with the metrics `evaluate` writes.

--binary-same-split: the binary run instead takes the three-class run's split (its
manifest.csv) and cache, in this process: both models are then scored on the same
validation films, and the binary run reuses the cached trunk activations (the frozen
ImageNet trunk is the same for both tasks), so its wall time is a warm-cache one. Validation figures are
optimistic: the thresholds were chosen on the same films. Prints a markdown table and
writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pneumoscope.data.discover import patient_id
from pneumoscope.evaluation.metrics import evaluate_predictions
from pneumoscope.evaluation.three_class import evaluate_three_class
from pneumoscope.tasks import BINARY, THREE_CLASS, bv_threshold_of


def timed(cmd: list[str]) -> dict:
    """Run one command; its wall time, and the largest child's peak RSS so far (an upper bound)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB -> MiB
    return {
        "command": " ".join(cmd[1:]),
        "wall_s": round(seconds, 1),
        "peak_rss_mib_upto": round(peak),
        "load_after": os.getloadavg(),
    }


def train(data: str, out: Path, task: str) -> dict:
    run = out / task
    cmd = [
        sys.executable,
        "-m",
        "pneumoscope",
        "-q",
        "train",
        "--data",
        data,
        "--out",
        str(run),
        "--task",
        task,
        "--cache-dir",
        str(out / f"cache_{task}"),
    ]
    return {"run": str(run), **timed(cmd)}


def train_on_split_of(data: str, out: Path, other: Path) -> dict:
    """The default-recipe binary run on `other`'s manifest split, with `other`'s cache."""
    from pneumoscope.data.manifest import read_manifest, write_manifest
    from pneumoscope.rundir import MANIFEST
    from pneumoscope.training import TrainConfig, loop

    def same_split(cfg, run, resume):
        roles = read_manifest(other / MANIFEST)
        write_manifest(run / MANIFEST, {"train": roles["train"], "val": roles["val"]})
        return roles["train"], roles["val"]

    run = out / BINARY
    cfg = TrainConfig(
        data=data, out=str(run), task=BINARY, cache_dir=str(out / f"cache_{THREE_CLASS}")
    )
    loop.prepare_split = same_split  # benchmark only: the split of the three-class run
    start = time.perf_counter()
    loop.fit(cfg, show_progress=False)
    return {
        "run": str(run),
        "wall_s": round(time.perf_counter() - start, 1),
        "note": f"split and warm cache of {other}",
    }


def existing(out: Path, task: str) -> dict:
    run = out / task
    seconds = (run / "summary.json").stat().st_mtime - (run / "config.json").stat().st_mtime
    return {
        "run": str(run),
        "wall_s": round(seconds, 1),
        "wall_s_from": "config.json to summary.json mtimes",
    }


def score(run: Path, task: str) -> dict:
    rows = list(csv.DictReader(open(run / "val_predictions.csv")))
    thresholds = json.loads((run / "threshold.json").read_text())
    y = np.array([int(r["label"]) for r in rows])
    patients = [patient_id(Path(r["path"]).name) for r in rows]
    if task == BINARY:
        return evaluate_predictions(
            y,
            np.array([float(r["p_pneumonia"]) for r in rows]),
            thresholds["threshold"],
            patients=patients,
        )
    probs = np.array([[float(r[k]) for k in ("p_normal", "p_bacterial", "p_viral")] for r in rows])
    return evaluate_three_class(
        y, probs, thresholds["threshold"], bv_threshold_of(thresholds), patients=patients
    )


def ci(m: dict, key: str) -> str:
    lo, hi = m["ci95"][key]
    return f"{m[key]:.4f} [{lo:.3f}, {hi:.3f}]"


def table(results: dict) -> str:
    lines = [
        "| | wall time (cold cache unless noted) | n val (patients) | pneumonia vs normal ROC AUC | sensitivity | "
        "specificity | bacterial vs viral ROC AUC | bacterial vs viral accuracy | 3-class accuracy | "
        "macro ROC AUC |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in results.items():
        m = r["metrics"]
        b = m if task == BINARY else m["binary"]
        wall = f"{r['wall_s']:.0f} s" + (" (warm cache, same split)" if "note" in r else "")
        row = [
            task,
            wall,
            f"{b['n']} ({b['n_patients']})",
            ci(b, "roc_auc"),
            ci(b, "sensitivity"),
            ci(b, "specificity"),
        ]
        if task == THREE_CLASS:
            bv = m["bacterial_vs_viral"]
            row += [
                ci(bv, "roc_auc"),
                ci(bv, "accuracy"),
                ci(m, "accuracy"),
                ci(m, "macro_roc_auc"),
            ]
        else:
            row += ["-"] * 4
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", nargs="+", default=[THREE_CLASS, BINARY])
    parser.add_argument(
        "--binary-same-split",
        action="store_true",
        help="train the binary run on the three-class run's split and cache (in-process)",
    )
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="score the runs already in OUT (wall time: config.json to summary.json, "
        "which leaves out the seconds before config.json is written)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in args.tasks:
        if args.score_only:
            results[task] = existing(out, task)
        elif task == BINARY and args.binary_same_split:
            if not (out / THREE_CLASS / "manifest.csv").exists():
                parser.error(
                    f"--binary-same-split: no {out / THREE_CLASS / 'manifest.csv'}; train the "
                    f"three-class run first (--tasks {THREE_CLASS} {BINARY})"
                )
            results[task] = train_on_split_of(args.data, out, out / THREE_CLASS)
        else:
            results[task] = train(args.data, out, task)
        results[task]["metrics"] = score(Path(results[task]["run"]), task)
        results[task]["load_after"] = os.getloadavg()
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))
    print(table(results))


if __name__ == "__main__":
    main()

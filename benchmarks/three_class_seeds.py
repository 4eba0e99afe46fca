"""Bacterial vs viral over seeds, and the ensemble of those seeds (issue 13).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. .venv/bin/python benchmarks/three_class_seeds.py \
        --data ../shared/data/chest_xray_224 --out /tmp/three_class_seeds --seeds 0 1 2 3

Trains `pneumoscope train --task three-class --seed S --split-seed 0` once per seed (one
patient-grouped split for all, so the runs can be ensembled; one cache, so the first run
is cold and the others reuse its trunk activations), then `pneumoscope ensemble` of all
seeds, and scores every run and the ensemble on the shared validation part with the
metrics `evaluate` writes (benchmarks/three_class.py `score`). A seed whose run already
finished (summary.json) is scored, not retrained; so is a finished ensemble (delete
OUT/ensemble after adding seeds). Extra `train` options go after `--`
(e.g. `-- --trainable-stages 5`). Validation figures are optimistic: the thresholds were
chosen on the same films. Prints a markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from three_class import ci, score, timed  # noqa: E402  (the sibling benchmark's scoring and timing)

from pneumoscope.tasks import THREE_CLASS  # noqa: E402


def run_unless_finished(run: Path, cmd: list[str]) -> dict:
    """A run with a summary.json is kept as it is (scored, not redone or timed)."""
    if (run / "summary.json").exists():
        return {"run": str(run), "note": "already finished; not timed"}
    return {"run": str(run), **timed(cmd)}


def train_seed(data: str, out: Path, seed: int, extra: list[str]) -> dict:
    run = out / f"seed{seed}"
    return run_unless_finished(
        run,
        [
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
            THREE_CLASS,
            "--seed",
            str(seed),
            "--split-seed",
            "0",
            "--cache-dir",
            str(out / "cache"),
            *extra,
        ],
    )


def ensemble(out: Path, runs: list[str]) -> dict:
    run = out / "ensemble"
    return run_unless_finished(
        run, [sys.executable, "-m", "pneumoscope", "-q", "ensemble", *runs, "--out", str(run)]
    )


def best_epoch(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    return str(summary.get("best_epoch", "-"))


def table(results: dict) -> str:
    lines = [
        "| run | wall time | best epoch | bacterial vs viral ROC AUC | bacterial vs viral accuracy | "
        "3-class accuracy | macro ROC AUC | pneumonia vs normal ROC AUC | specificity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        m = r["metrics"]
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
        epoch = best_epoch(Path(r["run"])) if name != "ensemble" else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    wall,
                    epoch,
                    ci(m["bacterial_vs_viral"], "roc_auc"),
                    ci(m["bacterial_vs_viral"], "accuracy"),
                    ci(m, "accuracy"),
                    ci(m, "macro_roc_auc"),
                    ci(m["binary"], "roc_auc"),
                    ci(m["binary"], "specificity"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument(
        "train_options", nargs="*", help="extra `pneumoscope train` options, after --"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {f"seed {s}": train_seed(args.data, out, s, args.train_options) for s in args.seeds}
    if len(args.seeds) > 1:
        results["ensemble"] = ensemble(out, [r["run"] for r in results.values()])
    for r in results.values():
        r["metrics"] = score(Path(r["run"]), THREE_CLASS)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "train_options": args.train_options,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))
    print(table(results))


if __name__ == "__main__":
    main()

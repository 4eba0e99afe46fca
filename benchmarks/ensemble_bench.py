"""Single model vs ensembles vs test-time augmentation: clean validation, the stress
suite, and the inference cost (issue 11, item 2).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ensemble_bench.py \
        --runs runs/full/lite0-s0,runs/full/lite0-s1,runs/full/lite1-s0 --tta-runs runs/full/lite0-s0 \
        --views mixed5 --out runs/ensbench

Every run must share one patient-grouped split (`--split-seed`); all figures are on its
validation part only, the optimistic in-distribution number, and on fixed shifted copies
of it (the stress suite of benchmarks/recipe_sweep.py: gamma, contrast, zoom, rotation,
resolution, aspect ratio; `--shifts hard`: its 11 harshest). An ensemble's probability
is the mean of its members' over its views (models/ensemble.py), so each (run, view,
shift) is predicted once (through recipe_sweep's cached trunk: bf16 where native, else fp32 in onnxruntime), stored in
OUT/probs.npz, and every candidate is combined from those; `--cost ENS_DIR` compares the
combination with the ensemble directory's own fp32 validation predictions.
Thresholds: each candidate's own threshold of the default rule
(evaluation.threshold_rules.DEFAULT_THRESHOLD_RULE) on clean validation, as `ensemble` and `train` choose
it; stressed sensitivity/specificity are read at that threshold (results.json records the
rule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_sweep import HARD, STRESS, stressed_probs  # noqa: E402

from pneumoscope.data.cache import decode_samples  # noqa: E402
from pneumoscope.data.manifest import read_manifest  # noqa: E402
from pneumoscope.evaluation.metrics import (  # noqa: E402
    DEFAULT_THRESHOLD_RULE,
    choose_thresholds,
    ranking_metrics,
    threshold_metrics,
)
from pneumoscope.inference import Predictor  # noqa: E402
from pneumoscope.models.ensemble import IDENTITY, TTA_PRESETS, View  # noqa: E402


def view_key(view: dict) -> str:
    return ",".join(f"{k}{view[k]:g}" for k in sorted(view)) if view != IDENTITY else "identity"


def member_probs(run: Path, views: list[dict], data, shifts: list[str], cache: dict, save) -> None:
    """p(pneumonia) of one run for every view x shift, into cache[run|view|shift].

    As recipe_sweep scores runs: the frozen trunk's part of each (shift, view) copy is
    computed once (bf16 where native, else fp32) and cached, keyed by the trunk's weights, so runs that share a
    trunk (two Lite0 seeds: the cpu-fast recipe freezes stem..blocks5) share that work;
    the run's own top does the rest. The view is applied after the shift, to the model
    input, as the Ensemble does (here re-quantised to uint8 between the two)."""
    predictor = Predictor.from_run(run, device="cpu")
    model, size = predictor.model, predictor.image_size
    k = model.n_stages - int(predictor.config["trainable_stages"])
    stressed_views(model, k, size, views, data, shifts, run.name, cache, save)


def warm_trunk(backbone: str, views: list[dict], data, shifts: list[str]) -> None:
    """Fill the activation cache for every run of `backbone` under the cpu-fast recipe
    (frozen ImageNet stem..blocks5): the members' scoring then reads it back. With more
    than one view, the identity view is left to another `--views none` process."""
    from pneumoscope.models import build_model
    from pneumoscope.training.config import TrainConfig

    model = build_model(backbone, weights="imagenet").eval()
    k = model.n_stages - int(TrainConfig(data="", out="", recipe="cpu-fast").trainable_stages)
    views = [v for v in views if v != IDENTITY] or views
    stressed_views(
        model, k, data.images.shape[-1], views, data, shifts, "warm:" + backbone, {}, lambda: None
    )


def stressed_views(
    model, k: int, size: int, views, data, shifts, name: str, cache: dict, save
) -> None:
    for view in views:
        look = View(view, size)
        for shift_name in ["clean", *shifts]:
            key = f"{name}|{view_key(view)}|{shift_name}"
            if key in cache:
                continue
            shift = STRESS.get(shift_name, lambda x: x)
            started = time.perf_counter()
            cache[key] = stressed_probs(
                model,
                k,
                data,
                f"{shift_name}|{view_key(view)}",
                lambda x, shift=shift, look=look: look(shift(x)),
            )
            print(f"{key}: {time.perf_counter() - started:.0f} s", flush=True)
            save()


def score(labels: np.ndarray, probs: dict[str, np.ndarray], shifts: list[str]) -> dict:
    """Clean validation metrics at the candidate's own default-rule threshold and the
    stress metrics at that same threshold."""
    t = choose_thresholds(labels, probs["clean"])["threshold"]
    clean = {
        **ranking_metrics(labels, probs["clean"]),
        **threshold_metrics(labels, probs["clean"], t),
    }
    per = {}
    for name in shifts:
        m = {**ranking_metrics(labels, probs[name]), **threshold_metrics(labels, probs[name], t)}
        per[name] = {"auc": m["roc_auc"], "sens": m["sensitivity"], "spec": m["specificity"]}
    mean = {
        f"stress_{m}_mean": float(np.mean([v[m] for v in per.values()]))
        for m in ("auc", "sens", "spec")
    }
    return {
        "threshold": t,
        "val_auc": clean["roc_auc"],
        "val_sens": clean["sensitivity"],
        "val_spec": clean["specificity"],
        **mean,
        "stress_auc_min": float(np.min([v["auc"] for v in per.values()])),
        "stress": per,
    }


def candidates(
    runs: list[Path], tta_runs: list[Path], views: list[dict], tta: str
) -> dict[str, list[tuple]]:
    """name -> [(run name, view key)]: singles, every ensemble of 2+ runs, TTA of the
    tta runs alone and together."""
    ident = view_key(IDENTITY)
    out = {r.name: [(r.name, ident)] for r in runs}
    for k in range(2, len(runs) + 1):
        for combo in combinations(runs, k):
            out["+".join(r.name for r in combo)] = [(r.name, ident) for r in combo]
    for k in range(1, len(tta_runs) + 1):
        for combo in combinations(tta_runs, k):
            for preset, preset_views in TTA_PRESETS.items():
                if preset != "none" and all(
                    view_key(v) in map(view_key, views) for v in preset_views
                ):
                    out["+".join(r.name for r in combo) + f" tta {preset}"] = [
                        (r.name, view_key(v)) for r in combo for v in preset_views
                    ]
    return out


def check_against(ens_dir: Path, config: dict, cache: dict, names: dict[str, str]) -> float:
    """Max |p| difference between an ensemble directory's own validation predictions and
    the mean this script combines from its members' stored probabilities (names: a
    member's recorded run_dir, resolved, -> the name its probabilities are stored under)."""
    import csv

    with open(ens_dir / "val_predictions.csv") as f:
        written = np.array([float(r["p_pneumonia"]) for r in csv.DictReader(f)])
    parts = [
        f"{names[str(Path(m['run_dir']).resolve())]}|{view_key(v)}|clean"
        for m in config["members"]
        for v in config["tta"]["views"]
    ]
    diff = float(np.max(np.abs(written - np.mean([cache[k] for k in parts], axis=0))))
    print(f"{ens_dir}: written vs combined validation p, max |dp| = {diff:.2e}", flush=True)
    return diff


def cost(predictor: Predictor, images: np.ndarray, repeats: int = 3) -> float:
    """Best-of-`repeats` images/s of predict_images (fp32, batch 64) on decoded images."""
    predictor.predict_images(images[:8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict_images(images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--runs", required=True, help="comma-separated run directories sharing one split"
    )
    ap.add_argument("--tta-runs", default="", help="runs whose test-time views are measured too")
    ap.add_argument(
        "--views",
        default="zoom3",
        choices=list(TTA_PRESETS),
        help="the views measured for --tta-runs",
    )
    ap.add_argument("--out", required=True, help="folder for probs.npz and results.json")
    ap.add_argument(
        "--cost", default="", help="comma-separated run or ensemble directories to time"
    )
    ap.add_argument("--cost-images", type=int, default=128)
    ap.add_argument(
        "--shifts",
        default="hard",
        help="the stress suite: hard (recipe_sweep's 11 HARD shifts), all (its 19), or names",
    )
    ap.add_argument(
        "--warm",
        metavar="BACKBONE",
        default="",
        help="only compute and cache the frozen trunk's part of every (shift, view) for the "
        "ImageNet BACKBONE (what every cpu-fast run of it shares); needs --runs for the split",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in args.runs.split(",")]
    tta_runs = [Path(r) for r in args.tta_runs.split(",") if r]
    views = TTA_PRESETS[args.views]
    shifts = (
        list(HARD)
        if args.shifts == "hard"
        else list(STRESS)
        if args.shifts == "all"
        else args.shifts.split(",")
    )

    val = read_manifest(runs[0] / "manifest.csv")["val"]
    size = int(json.loads((runs[0] / "config.json").read_text())["image_size"])
    data = decode_samples(val, size, show_progress=False)
    npz = out / "probs.npz"
    cache = dict(np.load(npz)) if npz.exists() else {}

    def save():
        np.savez(npz, **cache)

    if args.warm:
        warm_trunk(args.warm, views, data, shifts)
        return 0
    for run in runs:
        member_probs(run, views if run in tta_runs else [IDENTITY], data, shifts, cache, save)

    results = {}
    for name, parts in candidates(runs, tta_runs, views, args.views).items():
        probs = {
            s: np.mean([cache[f"{r}|{v}|{s}"] for r, v in parts], axis=0)
            for s in ["clean", *shifts]
        }
        results[name] = {"forward_passes": len(parts), **score(data.labels, probs, shifts)}
        r = results[name]
        print(
            f"{name:40s} passes {len(parts)}  val AUC {r['val_auc']:.4f}  stress AUC {r['stress_auc_mean']:.4f} "
            f"(min {r['stress_auc_min']:.4f})  stress sens/spec {r['stress_sens_mean']:.3f}/"
            f"{r['stress_spec_mean']:.3f}",
            flush=True,
        )
    timing, checks = {}, {}
    for path in [Path(p) for p in args.cost.split(",") if p]:
        predictor = Predictor.from_run(path, device="cpu")
        timing[str(path)] = cost(predictor, data.images[: args.cost_images])
        print(f"cost {path}: {timing[str(path)]:.1f} images/s", flush=True)
        if predictor.config.get("kind") == "ensemble":
            checks[str(path)] = check_against(
                path, predictor.config, cache, {str(r.resolve()): r.name for r in runs}
            )
    (out / "results.json").write_text(
        json.dumps(
            {
                "n_val": len(data.samples),
                "views": args.views,
                "shifts": shifts,
                "threshold_rule": DEFAULT_THRESHOLD_RULE,
                "torch_threads": torch.get_num_threads(),
                "candidates": results,
                "images_per_s": timing,
                "ensemble_dir_vs_combined_max_abs_dp": checks,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

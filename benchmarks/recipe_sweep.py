"""Recipe experiments for the CPU recipe: train named variants on the shared train split
and score each on the patient-grouped validation split, clean and under fixed shifts.

The held-out test split is shifted from train (models at 0.99+ validation ROC AUC score
about 0.96 there, with low specificity), and it is not here. So besides the clean
validation metrics each run is scored on "stressed" copies of the validation images:
fixed, deterministic changes of exposure (gamma), contrast, framing (zoom in and out),
a small rotation and a loss of resolution. Every number comes from validation images
only; the threshold is the run's own (Youden's J on clean validation).

    .venv/bin/python benchmarks/recipe_sweep.py --data ../shared/data/chest_xray_224 \
        --out runs/sweep --exp base,views2 [--results benchmarks/sweep_results.jsonl]

Each experiment is one `train()` call (wall time measured); the trunk activations are
cached, so variants that share a trunk and its views reuse them (their wall time then
leaves out the trunk pass: the "trunk_cached" column says so).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumoscope.data.cache import decode_samples  # noqa: E402
from pneumoscope.data.manifest import read_manifest  # noqa: E402
from pneumoscope.evaluation.metrics import ranking_metrics, threshold_metrics  # noqa: E402
from pneumoscope.inference import Predictor
from pneumoscope.models import PNEUMONIA_INDEX  # noqa: E402
from pneumoscope.models.classifier import images_to_input
from pneumoscope.models.precision import resolve_precision  # noqa: E402
from pneumoscope.training import TrainConfig, fit  # noqa: E402
from pneumoscope.training.trunk import (  # noqa: E402
    ActivationStore,
    FrozenTrunk,
    activations_to_input,
    keys_digest,
    trunk_activations,
    trunk_digest,
)
from pneumoscope.training.trunk_engine import build_engine, resolve_trunk_engine  # noqa: E402

EXPERIMENTS: dict[str, dict] = {
    # name -> TrainConfig options over the cpu-fast recipe's defaults
    "clean-fp32": {"views": 0, "trunk_precision": "fp32", "augment": "none"},
    "clean-bf16": {"views": 0, "trunk_precision": "bf16", "augment": "none"},
    "medium2": {"views": 2, "augment": "medium"},
    "strong2": {"views": 2, "augment": "strong"},
    "strong3": {"views": 3, "augment": "strong"},
    "wide3": {"views": 3, "augment": "wide"},
    "wide3-k7": {"views": 3, "augment": "wide", "trainable_stages": 2},
    "robust3-k7": {"views": 3, "augment": "robust", "trainable_stages": 2},
    "robust3": {"views": 3, "augment": "robust"},
    "robust3-k7-fp32top": {
        "views": 3,
        "augment": "robust",
        "trainable_stages": 2,
        "precision": "fp32",
    },
    "robust3-k7-e12": {"views": 3, "augment": "robust", "trainable_stages": 2, "epochs": 12},
    "robust2-k7": {"views": 2, "augment": "robust", "trainable_stages": 2},
    "robust3-k7-blr0.3": {
        "views": 3,
        "augment": "robust",
        "trainable_stages": 2,
        "backbone_lr_scale": 0.3,
    },
    "robust3-k7-ls0.1": {
        "views": 3,
        "augment": "robust",
        "trainable_stages": 2,
        "label_smoothing": 0.1,
    },
}


# ----------------------------------------------------------------------------- stress


def _affine(
    x: torch.Tensor, zoom: float = 1.0, degrees: float = 0.0, aspect: float = 1.0
) -> torch.Tensor:
    """aspect > 1 stretches the width (as a wider original squeezed to a square would be)."""
    a = math.radians(degrees)
    zx, zy = zoom * math.sqrt(aspect), zoom / math.sqrt(aspect)
    theta = torch.tensor(
        [[math.cos(a) / zx, -math.sin(a) / zx, 0.0], [math.sin(a) / zy, math.cos(a) / zy, 0.0]],
        dtype=x.dtype,
    )
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def _lowres(x: torch.Tensor, factor: int) -> torch.Tensor:
    small = F.interpolate(x, scale_factor=1 / factor, mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


STRESS = {
    "gamma0.6": lambda x: x.clamp(0, 1) ** 0.6,
    "gamma1.6": lambda x: x.clamp(0, 1) ** 1.6,
    "contrast0.6": lambda x: _contrast(x, 0.6),
    "contrast1.5": lambda x: _contrast(x, 1.5),
    "zoom0.8": lambda x: _affine(x, zoom=0.8),
    "zoom1.2": lambda x: _affine(x, zoom=1.2),
    "rotate10": lambda x: _affine(x, degrees=10.0),
    "lowres2": lambda x: _lowres(x, 2),
    # harder ones, where the milder shifts no longer tell augmented variants apart
    "zoom0.7": lambda x: _affine(x, zoom=0.7),
    "zoom1.3": lambda x: _affine(x, zoom=1.3),
    "gamma0.5": lambda x: x.clamp(0, 1) ** 0.5,
    "gamma2.0": lambda x: x.clamp(0, 1) ** 2.0,
    "contrast0.5": lambda x: _contrast(x, 0.5),
    "contrast2.0": lambda x: _contrast(x, 2.0),
    "rotate15": lambda x: _affine(x, degrees=15.0),
    "lowres3": lambda x: _lowres(x, 3),
    "combo": lambda x: _contrast(_affine(x, zoom=0.8), 1.3).clamp(0, 1) ** 1.4,
    # the originals were stretched to a square: another aspect ratio of the original film
    "aspect0.8": lambda x: _affine(x, aspect=0.8),
    "aspect1.25": lambda x: _affine(x, aspect=1.25),
}
HARD = (
    "zoom0.7",
    "zoom1.3",
    "gamma0.5",
    "gamma2.0",
    "contrast0.5",
    "contrast2.0",
    "rotate15",
    "lowres3",
    "combo",
    "aspect0.8",
    "aspect1.25",
)


def shifted_uint8(images: np.ndarray, shift) -> np.ndarray:
    x = shift(images_to_input(images))
    return (x * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()


def stressed_probs(model, k: int, data, name: str, shift) -> np.ndarray:
    """p(pneumonia) on shifted copies of the validation images: the frozen trunk's part is
    computed once per shift (and cached), the run's own top does the rest."""
    return cached_trunk_probs(
        model,
        k,
        data,
        {"sweep_stress": name},
        lambda: shifted_uint8(data.images, shift),
        show_progress=False,
    )


@torch.no_grad()
def cached_trunk_probs(
    model,
    k: int,
    data,
    key: dict,
    make_images,
    precision: str = "auto",
    desc: str = "trunk",
    show_progress: bool = True,
) -> np.ndarray:
    """p(pneumonia) of the model on images made by make_images() from data's: the frozen
    trunk's part is computed once (the activation cache, keyed by `key`, the trunk and the
    images; the trunk pass as training's default: fp32 in onnxruntime on a CPU without
    native bf16), the model's own top does the rest. Not necessarily the engine the run
    trained with: the two agree to about 5e-4 of the largest activation, below float16
    storage (benchmarks/trunk_engine.py). Before 2026-12-02 the stress pass was always
    bf16 (emulated where not native); those RESULTS.md rows say so."""
    precision = resolve_precision(precision, "cpu")
    engine = resolve_trunk_engine("auto", torch.device("cpu"), precision)
    fields = {
        **key,
        "trunk": trunk_digest(model, k),
        "k": k,
        "images": keys_digest(data),
        "precision": precision,
    }
    if engine != "torch":
        fields["engine"] = engine

    def compute():
        trunk = FrozenTrunk(model, k)
        return trunk_activations(
            trunk,
            make_images(),
            augment=None,
            gen=None,
            precision=precision,
            device=torch.device("cpu"),
            desc=desc,
            show_progress=show_progress,
            engine=build_engine(trunk, engine),
        )

    acts = ActivationStore(None).get(fields, compute)
    model.eval()
    out = [
        torch.softmax(model.forward_from(k, activations_to_input(acts[i : i + 256], "cpu")), dim=1)[
            :, PNEUMONIA_INDEX
        ]
        for i in range(0, len(acts), 256)
    ]
    return torch.cat(out).numpy()


def score_run(run: Path, stress: bool) -> dict:
    """Clean validation metrics (from the run's own files) and, optionally, stressed ones."""
    with open(run / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["p_pneumonia"]) for r in rows])
    predictor = Predictor.from_run(run, device="cpu")
    t = predictor.threshold
    clean = {**ranking_metrics(y, p), **threshold_metrics(y, p, t)}
    out = {
        "val_auc": clean["roc_auc"],
        "val_sens": clean["sensitivity"],
        "val_spec": clean["specificity"],
        "threshold": t,
    }
    if not stress:
        return out
    val = read_manifest(run / "manifest.csv")["val"]
    data = decode_samples(val, predictor.image_size, show_progress=False)
    per = {}
    k = predictor.model.n_stages - int(predictor.config["trainable_stages"])
    for name, shift in STRESS.items():
        q = stressed_probs(predictor.model, k, data, name, shift)
        m = {**ranking_metrics(data.labels, q), **threshold_metrics(data.labels, q, t)}
        per[name] = {"auc": m["roc_auc"], "sens": m["sensitivity"], "spec": m["specificity"]}
    return {**out, **_summarise(per)}


def score_ensemble(runs: list[Path]) -> dict:
    """The stress scores of the runs' mean probability (what an ensemble of them would do)."""
    from pneumoscope.evaluation.metrics import choose_thresholds

    predictors = [Predictor.from_run(run, device="cpu") for run in runs]
    val = read_manifest(runs[0] / "manifest.csv")["val"]
    data = decode_samples(val, predictors[0].image_size, show_progress=False)

    def mean_probs(name, shift):
        return np.mean(
            [
                stressed_probs(
                    p.model, p.model.n_stages - int(p.config["trainable_stages"]), data, name, shift
                )
                for p in predictors
            ],
            axis=0,
        )

    clean = mean_probs("identity", lambda x: x)
    t = choose_thresholds(data.labels, clean)["threshold"]
    m = {**ranking_metrics(data.labels, clean), **threshold_metrics(data.labels, clean, t)}
    out = {
        "val_auc": m["roc_auc"],
        "val_sens": m["sensitivity"],
        "val_spec": m["specificity"],
        "threshold": t,
    }
    per = {}
    for name, shift in STRESS.items():
        q = mean_probs(name, shift)
        s = {**ranking_metrics(data.labels, q), **threshold_metrics(data.labels, q, t)}
        per[name] = {"auc": s["roc_auc"], "sens": s["sensitivity"], "spec": s["specificity"]}
    return {**out, **_summarise(per)}


def _summarise(per: dict) -> dict:
    hard = [per[n] for n in HARD]
    return {
        "stress": per,
        "stress_auc_mean": float(np.mean([v["auc"] for v in per.values()])),
        "stress_auc_min": float(np.min([v["auc"] for v in per.values()])),
        "stress_spec_mean": float(np.mean([v["spec"] for v in per.values()])),
        "stress_sens_mean": float(np.mean([v["sens"] for v in per.values()])),
        "hard_auc_mean": float(np.mean([v["auc"] for v in hard])),
        "hard_spec_mean": float(np.mean([v["spec"] for v in hard])),
        "hard_sens_mean": float(np.mean([v["sens"] for v in hard])),
    }


def markdown_table(results: Path, runs: Path) -> str:
    """One row per experiment (a rescore updates the stress columns of its run); the
    resolved recipe of each run comes from its config.json."""
    rows: dict[str, dict] = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        rows[r["name"]] = {**rows.get(r["name"], {}), **r}
    head = (
        "| experiment | trainable stages | views + clean | augment | epochs | trunk / top precision | val AUC "
        "| val sens / spec | stress AUC mean (min) | stress spec / sens | hard spec / sens | aspect0.8 spec "
        "| aspect1.25 sens | zoom1.3 spec | train wall s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        st = r.get("stress", {})

        def get(stress, key, st=st):
            return f"{st[stress][key]:.3f}" if stress in st else "–"

        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "–"
        config = runs / name / "config.json"
        if config.exists():
            c = json.loads(config.read_text())
            top = r.get("top_precision") or (c["precision"] if c["precision"] != "auto" else "bf16")
            recipe = (
                f"{c['trainable_stages']} | {c['views']} | {c['augment']} | {c['epochs']} "
                f"| {c['trunk_precision'].replace('auto', 'bf16')} / {top}"
            )
        else:
            recipe = "mean of " + name.split(":", 1)[-1] + " | | | | "
        lines.append(
            f"| {name} | {recipe} | {r['val_auc']:.4f} | {r['val_sens']:.3f} / {r['val_spec']:.3f} "
            f"| {r['stress_auc_mean']:.4f} ({r['stress_auc_min']:.3f}) "
            f"| {r['stress_spec_mean']:.3f} / {r['stress_sens_mean']:.3f} "
            f"| {r.get('hard_spec_mean', float('nan')):.3f} / {r.get('hard_sens_mean', float('nan')):.3f} "
            f"| {get('aspect0.8', 'spec')} | {get('aspect1.25', 'sens')} | {get('zoom1.3', 'spec')} | {wall} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run_experiment(name: str, options: dict, args) -> dict:
    out = Path(args.out) / name
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(data=args.data, out=str(out), **{"recipe": "cpu-fast", **options})
    start = time.perf_counter()
    summary = fit(cfg, show_progress=False)
    wall = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "name": name,
        "options": options,
        "wall_s": round(wall, 1),
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "n_train": summary["n_train"],
        "n_val": summary["n_val"],
        "epoch_s": round(float(np.mean([m["seconds"] for m in metrics])), 2),
        **score_run(out, stress=not args.no_stress),
    }
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument(
        "--exp",
        required=True,
        help="comma-separated experiment names, or a JSON object {name: options}",
    )
    ap.add_argument("--results", default="benchmarks/sweep_results.jsonl")
    ap.add_argument("--no-stress", action="store_true")
    ap.add_argument("--rescore", action="store_true", help="score the existing runs of --exp again")
    ap.add_argument(
        "--table", action="store_true", help="print the Markdown table of --results and exit"
    )
    ap.add_argument(
        "--ensemble",
        action="store_true",
        help="score the mean probability of the existing runs of --exp (threshold: Youden on it)",
    )
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(Path(args.results), Path(args.out)))
        return 0
    if args.ensemble:
        result = {
            "name": "ensemble:" + args.exp,
            **score_ensemble([Path(args.out) / n for n in args.exp.split(",")]),
        }
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "stress"}), flush=True)
        return 0
    if args.rescore:
        for name in args.exp.split(","):
            result = {
                "name": name,
                "rescored": True,
                **score_run(Path(args.out) / name, stress=True),
            }
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "stress"}), flush=True)
        return 0
    torch.set_num_threads(torch.get_num_threads())
    experiments = (
        json.loads(args.exp)
        if args.exp.lstrip().startswith("{")
        else {n: EXPERIMENTS[n] for n in args.exp.split(",")}
    )
    for name, options in experiments.items():
        result = run_experiment(name, options, args)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "stress"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Shift suites for trained runs: how far p, the AUC, sensitivity and specificity move
when the validation films change in ways that carry no diagnosis.

* **shortcut**: synthetic film markers (R, L, text labels; several sizes, contrasts and
  places near the corners and edges) pasted onto the validation films of *both* classes,
  and the border ring blanked (black, white) or cropped away. A model that reads the
  lungs does not move; one that reads the film does.
* **stress**: three of the "hard" photometric/geometric shifts of benchmarks/recipe_sweep.py
  (zoom out 0.7, gamma 2.0, width:height 1.25).
* **resampling**: JPEG re-compression, down-up sampling with several filters, and a
  4x "original" brought back to the model's size by pneumoscope's own decode contract.

Every threshold rule of evaluation.metrics.choose_thresholds is chosen on the clean validation
probabilities (computed the same way as the shifted ones), and the suites report, per
rule, how far sensitivity and specificity move from their clean values at that fixed
threshold. Validation images only (the run's manifest, role val); nothing here looks at
the official test split.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/shift_suite.py runs/base runs/lungs \
        [--suites shortcut,stress,resampling] [--out benchmarks/shift_results.jsonl] [--table | --summary]

The frozen trunk's part of each shifted copy is computed once and cached in the
activation cache (it depends on the trunk, not on the run), so runs that share a trunk
(every cpu-fast run of one backbone and --trainable-stages) share it; the run's own top
does the rest.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_sweep import STRESS, cached_trunk_probs  # noqa: E402

from pneumoscope.data.augment import paste_marker  # noqa: E402
from pneumoscope.data.cache import DecodedSet, decode_samples  # noqa: E402
from pneumoscope.data.decode import resize_to_model  # noqa: E402
from pneumoscope.data.manifest import read_manifest  # noqa: E402
from pneumoscope.evaluation.metrics import choose_thresholds, ranking_metrics, threshold_metrics  # noqa: E402
from pneumoscope.inference import load_trained_model
from pneumoscope.models.classifier import images_to_input
from pneumoscope.models.precision import resolve_precision  # noqa: E402
from pneumoscope.rundir import RunDir  # noqa: E402

SUITE_VERSION = 1  # part of the activation cache key: bump when a shift's definition changes

# ----------------------------------------------------------------------------- the shifts (uint8 (N,S,S) -> same)


def _per_image(fn):
    return lambda images: np.stack([fn(img) for img in images])


def _markers(*marks):
    """marks: (text, height as a fraction of the side, value, top, left[, plate])."""

    def apply(images):
        x = images_to_input(images)
        size = x.shape[-1]
        for img in x:
            for text, height, value, top, left, *plate in marks:
                paste_marker(
                    img,
                    text,
                    round(height * size),
                    value,
                    top,
                    left,
                    plate=plate[0] if plate else None,
                )
        return (x * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()

    return apply


def _ring(width: float, value: int):
    def apply(images):
        out = images.copy()
        w = round(width * images.shape[-1])
        out[:, :w], out[:, -w:], out[:, :, :w], out[:, :, -w:] = value, value, value, value
        return out

    return apply


def _crop_ring(width: float):
    """Crop the border ring away and stretch what is left back to the square."""

    def one(img):
        w = round(width * img.shape[-1])
        return resize_to_model(img[w:-w, w:-w], img.shape[-1])

    return _per_image(one)


SHORTCUT = {
    "marker-R-corner": _markers(("R", 0.10, 1.0, 0.02, 0.02)),
    "marker-L-corner": _markers(("L", 0.10, 1.0, 0.02, 0.98)),
    "marker-R-large-plate": _markers(("R", 0.16, 0.0, 0.03, 0.03, 1.0)),
    "labels-R-AP-SUPINE": _markers(
        ("R", 0.09, 0.95, 0.05, 0.03), ("AP SUPINE", 0.05, 0.9, 0.97, 0.5)
    ),
    "blank-ring8-black": _ring(0.08, 0),
    "crop-ring8": _crop_ring(0.08),
}


def _pil_roundtrip(fn):
    return _per_image(lambda img: np.asarray(fn(Image.fromarray(img)).convert("L"), dtype=np.uint8))


def _jpeg(quality: int):
    def one(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue()))

    return _pil_roundtrip(one)


def _down_up(factor: float, down: int, up: int = Image.Resampling.BILINEAR):
    def one(im: Image.Image) -> Image.Image:
        small = im.resize((round(im.width * factor), round(im.height * factor)), down)
        return small.resize(im.size, up)

    return _pil_roundtrip(one)


def _original(factor: int):
    """A full-size "original" (upsampled with Lanczos), then the decode contract's resize."""
    return _per_image(
        lambda img: resize_to_model(
            np.asarray(
                Image.fromarray(img).resize(
                    (img.shape[1] * factor, img.shape[0] * factor), Image.Resampling.LANCZOS
                )
            ),
            img.shape[-1],
        )
    )


R = Image.Resampling
RESAMPLING = {
    "jpeg30": _jpeg(30),
    "down0.5-nearest": _down_up(0.5, R.NEAREST),
    "original4x-contract": _original(4),
}


def _stress(name):
    shift = STRESS[name]
    return lambda images: (
        (shift(images_to_input(images)) * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    )


STRESS_NAMES = ("zoom0.7", "gamma2.0", "aspect1.25")  # of recipe_sweep's HARD
SUITES = {
    "shortcut": SHORTCUT,
    "stress": {n: _stress(n) for n in STRESS_NAMES},
    "resampling": RESAMPLING,
}

# ----------------------------------------------------------------------------- scoring


def suite_probs(model, k: int, data, name: str, shift, precision: str) -> np.ndarray:
    """p(pneumonia) of the run's model on shifted copies of the images (trunk part cached)."""
    return cached_trunk_probs(
        model,
        k,
        data,
        {"shift_suite": name, "version": SUITE_VERSION},
        lambda: shift(data.images),
        precision=precision,
        desc=name,
    )


def _at(y, p, t) -> dict:
    m = threshold_metrics(y, p, t)
    return {"sens": m["sensitivity"], "spec": m["specificity"]}


def suite_images(manifest: Path, size: int, max_images: int, seed: int = 0):
    """The run's validation images; with max_images, a seeded subsample of at most half
    normal films (all of them when fewer) and pneumonia films for the rest."""
    data = decode_samples(read_manifest(manifest)["val"], size, show_progress=False)
    if not max_images or max_images >= len(data.samples):
        return data
    rng = np.random.default_rng(seed)
    y = data.labels
    normal = np.flatnonzero(y == 0)
    normal = rng.choice(normal, min(len(normal), max_images // 2), replace=False)
    pneumonia = rng.choice(np.flatnonzero(y == 1), max_images - len(normal), replace=False)
    keep = np.sort(np.concatenate([normal, pneumonia]))
    return DecodedSet(
        data.images[keep], [data.samples[i] for i in keep], [], [data.keys[i] for i in keep]
    )


def all_probs(model, k: int, data, suites: list[str], precision: str) -> dict[str, np.ndarray]:
    probs = {"clean": suite_probs(model, k, data, "clean", lambda images: images, precision)}
    for suite in suites:
        for name, shift in SUITES[suite].items():
            probs[name] = suite_probs(model, k, data, name, shift, precision)
    return probs


def score_run(run: Path, suites: list[str], max_images: int) -> dict:
    # the model alone (not Predictor): the suite chooses its own thresholds on the clean pass
    rundir = RunDir(run)
    config = rundir.read_config()
    model = load_trained_model(rundir, config).eval()
    k = model.n_stages - int(config["trainable_stages"])
    precision = resolve_precision(config.get("trunk_precision", "auto"), "cpu")
    data = suite_images(run / "manifest.csv", int(config["image_size"]), max_images)
    y = np.asarray(data.labels)
    probs = all_probs(model, k, data, suites, precision)
    clean = probs.pop("clean")
    rules = choose_thresholds(y, clean)["rules"]
    out = {
        "run": str(run),
        "n_val": int(len(y)),
        "n_normal": int((y == 0).sum()),
        "precision": precision,
        "clean": {
            "auc": ranking_metrics(y, clean)["roc_auc"],
            "rules": {r: {"threshold": t, **_at(y, clean, t)} for r, t in rules.items()},
        },
        "shifts": {},
    }
    for name, q in probs.items():
        suite = next(s for s in suites if name in SUITES[s])
        out["shifts"][name] = {
            "suite": suite,
            "auc": ranking_metrics(y, q)["roc_auc"],
            "mean_abs_dp": float(np.abs(q - clean).mean()),
            "max_abs_dp": float(np.abs(q - clean).max()),
            "rules": {r: _at(y, q, t) for r, t in rules.items()},
        }
    return out


def warm(
    manifest: Path, backbone: str, trainable_stages: int, size: int, suites, max_images: int
) -> None:
    """Compute the trunk part of every shift before any run is trained: it depends on the
    ImageNet trunk and the validation images only (the runs' frozen stages are those weights)."""
    from pneumoscope.models import build_model

    model = build_model(backbone, "imagenet").eval()
    data = suite_images(manifest, size, max_images)
    all_probs(
        model, model.n_stages - trainable_stages, data, suites, resolve_precision("auto", "cpu")
    )


def summarise(result: dict) -> dict:
    """Per suite: mean AUC and |dp|; per rule, mean sens/spec and mean |move| from clean."""
    out = {}
    shifts = result["shifts"]
    for suite in sorted({s["suite"] for s in shifts.values()}):
        members = [s for s in shifts.values() if s["suite"] == suite]
        row = {
            "auc": float(np.mean([s["auc"] for s in members])),
            "auc_min": float(np.min([s["auc"] for s in members])),
            "mean_abs_dp": float(np.mean([s["mean_abs_dp"] for s in members])),
            "rules": {},
        }
        for rule, clean in result["clean"]["rules"].items():
            sens = [s["rules"][rule]["sens"] for s in members]
            spec = [s["rules"][rule]["spec"] for s in members]
            row["rules"][rule] = {
                "sens": float(np.mean(sens)),
                "spec": float(np.mean(spec)),
                "sens_min": float(np.min(sens)),
                "spec_min": float(np.min(spec)),
                "move_sens": float(np.mean(np.abs(np.array(sens) - clean["sens"]))),
                "move_spec": float(np.mean(np.abs(np.array(spec) - clean["spec"]))),
            }
        out[suite] = row
    return out


MIN_SENSITIVITY = (
    0.97  # issue 11's sensitivity target: a default rule must keep it under the shifts
)


def rule_movement(result: dict) -> dict:
    """Per rule, over every shift of every suite: mean shifted sensitivity, and the mean
    |sensitivity - clean| + |specificity - clean| (how far the operating point travels)."""
    out = {}
    for rule, clean in result["clean"]["rules"].items():
        sens = np.array([s["rules"][rule]["sens"] for s in result["shifts"].values()])
        spec = np.array([s["rules"][rule]["spec"] for s in result["shifts"].values()])
        out[rule] = {
            "sens": float(sens.mean()),
            "spec": float(spec.mean()),
            "move": float(
                np.abs(sens - clean["sens"]).mean() + np.abs(spec - clean["spec"]).mean()
            ),
        }
    return out


def robust_rule(result: dict) -> str:
    """The rule that moves least among those whose mean shifted sensitivity stays at
    MIN_SENSITIVITY (none does: the one with the highest sensitivity)."""
    moves = rule_movement(result)
    keep = {r: m for r, m in moves.items() if m["sens"] >= MIN_SENSITIVITY}
    if not keep:
        return max(moves, key=lambda r: moves[r]["sens"])
    return min(keep, key=lambda r: (keep[r]["move"], -keep[r]["sens"]))


def markdown(results: list[dict]) -> str:
    lines = [
        "| run | suite | AUC mean (min) | mean \\|Δp\\| | rule | clean sens / spec | shifted sens / spec "
        "(min) | mean \\|Δsens\\| / \\|Δspec\\| |",
        "|" + "---|" * 8,
    ]
    for r in results:
        name = Path(r["run"]).name
        for suite, row in summarise(r).items():
            for rule, m in row["rules"].items():
                c = r["clean"]["rules"][rule]
                lines.append(
                    f"| {name} | {suite} | {row['auc']:.4f} ({row['auc_min']:.4f}) | {row['mean_abs_dp']:.4f} "
                    f"| {rule} | {c['sens']:.3f} / {c['spec']:.3f} | {m['sens']:.3f} / {m['spec']:.3f} "
                    f"({m['sens_min']:.3f} / {m['spec_min']:.3f}) | {m['move_sens']:.3f} / {m['move_spec']:.3f} |"
                )
    lines += [
        "",
        "| run | rule | all shifts: sens / spec | mean \\|Δsens\\| + \\|Δspec\\| |",
        "|---|---|---|---|",
    ]
    for r in results:
        for rule, m in rule_movement(r).items():
            lines.append(
                f"| {Path(r['run']).name} | {rule} | {m['sens']:.3f} / {m['spec']:.3f} | {m['move']:.3f} |"
            )
        lines.append(f"| {Path(r['run']).name} | **robust rule: {robust_rule(r)}** | | |")
    lines += [
        "",
        "| run | shift | suite | AUC | mean \\|Δp\\| | max \\|Δp\\| |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, sh in r["shifts"].items():
            lines.append(
                f"| {Path(r['run']).name} | {name} | {sh['suite']} | {sh['auc']:.4f} | {sh['mean_abs_dp']:.4f} "
                f"| {sh['max_abs_dp']:.3f} |"
            )
    return "\n".join(lines)


def summary_table(results: list[dict], rule: str = "sensitivity99") -> str:
    """One row per run: clean AUC, each suite's AUC mean (min) and mean |Δp|, and at `rule`
    (each run's own threshold) the sensitivity / specificity over every shift and the move."""
    suites = sorted({s["suite"] for r in results for s in r["shifts"].values()})
    lines = [
        "| run | clean AUC | "
        + " | ".join(f"{s} AUC mean (min) / mean \\|Δp\\|" for s in suites)
        + f" | all shifts at {rule}: sens / spec, move |",
        "|" + "---|" * (len(suites) + 3),
    ]
    for r in results:
        rows, move = summarise(r), rule_movement(r)[rule]
        cells = [
            f"{rows[s]['auc']:.4f} ({rows[s]['auc_min']:.4f}) / {rows[s]['mean_abs_dp']:.3f}"
            for s in suites
        ]
        lines.append(
            f"| {Path(r['run']).name} | {r['clean']['auc']:.4f} | "
            + " | ".join(cells)
            + f" | {move['sens']:.3f} / {move['spec']:.3f}, {move['move']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--suites", default="shortcut,stress,resampling")
    ap.add_argument(
        "--out", default="benchmarks/shift_results.jsonl", help="one JSON line per run is appended"
    )
    ap.add_argument(
        "--table", action="store_true", help="print the Markdown table of --out's runs and exit"
    )
    ap.add_argument(
        "--summary", action="store_true", help="print one row per run of --out's runs and exit"
    )
    ap.add_argument(
        "--max-images",
        type=int,
        default=400,
        help="a seeded subsample of the validation part (half normal at most; 0: all of it)",
    )
    ap.add_argument(
        "--warm",
        action="store_true",
        help="RUNS are manifest.csv files: only fill the activation "
        "cache for an ImageNet efficientnet_lite0 trunk (--trainable-stages 2, 224 px)",
    )
    args = ap.parse_args(argv)
    if args.warm:
        for manifest in args.runs:
            warm(manifest, "efficientnet_lite0", 2, 224, args.suites.split(","), args.max_images)
        return 0
    if args.table or args.summary:
        rows = {}
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            rows[r["run"]] = r
        wanted = {str(p) for p in args.runs}
        picked = [r for k, r in rows.items() if k in wanted or "all" in wanted]
        print(summary_table(picked) if args.summary else markdown(picked))
        return 0
    for run in args.runs:
        result = score_run(run, args.suites.split(","), args.max_images)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(markdown([result]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

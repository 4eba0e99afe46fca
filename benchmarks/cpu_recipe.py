"""CPU benchmark (issue 3): the notebook baseline against pneumoscope's CPU recipe, and
ResNet50 inference settings, on the same data and machine, in one run.

1. recipe   — `pneumoscope train --data DATA --out RUN` with the default recipe (cpu-fast
              on a CPU), start to finished model, in a fresh process with an empty cache
              ("cold": decode, trunk pass, top training, thresholds, all files), then once
              more with the cache it left ("warm").
2. baseline — the usual notebook: torchvision ImageFolder + PIL transforms decoded and
              augmented every epoch by a DataLoader, a torchvision ResNet50 fine-tuned
              whole (Adam, fp32), on the recipe's own train part of the split; a fixed
              number of steps gives its rate; its validation ROC AUC after those steps
              is measured on the recipe's validation part.
3. inference — ResNet50 images/s on 224x224 inputs for precision x memory format x batch,
              and the probability differences of each setting to fp32; plus the
              validation ROC AUC of the recipe's trained model through predict_probs in
              fp32 and in bf16.

Each part runs in its own process (own peak RSS, own cold start). Writes the tables
between markers in benchmarks/RESULTS.md.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cpu_recipe.py --data ../shared/data/chest_xray_224
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get(
    "PNEUMOSCOPE_DATA", str(REPO.parent / "shared" / "data" / "chest_xray_224")
)
RESULTS = REPO / "benchmarks" / "RESULTS.md"
START, END = "<!-- cpu_recipe:start -->", "<!-- cpu_recipe:end -->"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- parts


def part_recipe(args) -> dict:
    from pneumoscope.cli import main

    start = time.perf_counter()
    code = main(
        [
            "-q",
            "train",
            "--data",
            args.data,
            "--out",
            args.out,
            "--overwrite",
            "--cache-dir",
            args.cache_dir,
            *args.extra,
        ]
    )
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"train failed with exit code {code}")
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    config = json.loads((Path(args.out) / "config.json").read_text())
    return {
        "train_wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "summary": summary,
        "recipe": config["recipe"],
        "backbone": config["backbone"],
        "epochs": config["epochs"],
        "views": config["views"],
        "image_size": config["image_size"],
    }


def _val_auc_of(run: Path, probs_of) -> float:
    from pneumoscope.data.manifest import read_manifest
    from pneumoscope.evaluation.metrics import ranking_metrics

    val = read_manifest(run / "manifest.csv")["val"]
    labels = [s.label for s in val]
    return ranking_metrics(labels, probs_of(val))["roc_auc"]


def part_baseline(args) -> dict:
    """The notebook way, as written in countless tutorials."""
    import torch
    import torch.nn as nn
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms as T

    from pneumoscope.data.manifest import read_manifest
    from pneumoscope.models import PNEUMONIA_INDEX
    from pneumoscope.models.registry import imagenet_weights_available

    run = Path(args.run)
    roles = read_manifest(run / "manifest.csv")
    train_paths = {str(s.path) for s in roles["train"]}
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = T.Compose(
        [
            T.Resize((224, 224)),
            T.RandomRotation(10),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.1, contrast=0.1),
            T.ToTensor(),
            norm,
        ]
    )
    eval_tf = T.Compose([T.Resize((224, 224)), T.ToTensor(), norm])
    full = torchvision.datasets.ImageFolder(str(Path(args.data) / "train"), transform=train_tf)
    idx = [i for i, (path, _) in enumerate(full.samples) if path in train_paths]
    loader = DataLoader(
        Subset(full, idx),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=2,
        generator=torch.Generator().manual_seed(0),
    )
    pretrained = imagenet_weights_available("resnet50")
    model = torchvision.models.resnet50(weights="IMAGENET1K_V2" if pretrained else None)
    model.fc = nn.Linear(model.fc.in_features, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    seen, timed_from = 0, None
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == args.warmup:  # the first steps start the workers and warm the allocator
            timed_from, seen = time.perf_counter(), 0
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
        if step + 1 >= args.warmup + args.steps:
            break
    rate = seen / (time.perf_counter() - timed_from)
    train_wall = time.perf_counter() - start

    # its validation ROC AUC after those steps (the notebook's eval transform, the recipe's
    # validation part: the official 16-image val is too small to tell anything)
    def probs_of(samples):
        from PIL import Image

        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(samples), 32):
                batch = torch.stack(
                    [eval_tf(Image.open(s.path).convert("RGB")) for s in samples[i : i + 32]]
                )
                out.append(torch.softmax(model(batch), 1)[:, PNEUMONIA_INDEX])
        return torch.cat(out).numpy()

    t = time.perf_counter()
    auc = _val_auc_of(run, probs_of)
    return {
        "images_per_s": rate,
        "timed_steps": args.steps,
        "batch_size": args.batch_size,
        "train_wall_s": train_wall,
        "val_wall_s": time.perf_counter() - t,
        "val_auc": float(auc),
        "imagenet_weights": pretrained,
        "n_train": len(idx),
        "peak_rss_mb": peak_rss_mb(),
    }


def part_inference(args) -> dict:
    import numpy as np
    import torch

    from pneumoscope.inference import Predictor, predict_probs
    from pneumoscope.models import PNEUMONIA_INDEX, build_model

    torch.manual_seed(0)
    model = build_model("resnet50", weights="none").eval()
    # a head with spread-out logits, so probability differences are visible (weights none)
    x = torch.rand(64, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        ref = model(x[:16]).float()
        model.head.weight.mul_(4.0 / ref.std())  # logits of a few units, as a trained model has
        ref = torch.softmax(model(x[:16]).float(), 1)[:, PNEUMONIA_INDEX]
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            for batch in (1, 8, 32) if (precision, channels_last) == ("bf16", True) else (32,):
                rate, p = _infer_rate(model, x, precision, channels_last, batch, args.repeat)
                rows.append(
                    {
                        "precision": precision,
                        "channels_last": channels_last,
                        "batch": batch,
                        "images_per_s": rate,
                        "max_abs_dp": float((p[:16] - ref).abs().max()),
                    }
                )
    # what Predictor does (channels_last model, predict_probs), by default and with bf16
    images = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    model.to(memory_format=torch.channels_last)
    predictor_rate = {}
    for precision in ("fp32", "bf16"):
        predict_probs(model, images[:8], precision=precision)
        t = time.perf_counter()
        for _ in range(args.repeat):
            predict_probs(model, images, precision=precision)
        predictor_rate[precision] = args.repeat * len(images) / (time.perf_counter() - t)

    accuracy = {}
    if args.run:
        run = Path(args.run)
        pred = Predictor.from_run(run, device="cpu")
        from pneumoscope.data.cache import decode_samples

        def probs_with(precision):
            def probs_of(samples):
                data = decode_samples(samples, pred.image_size, show_progress=False)
                return predict_probs(pred.model, data.images, precision=precision)

            return probs_of

        for precision in ("fp32", "bf16"):
            accuracy[precision] = _val_auc_of(run, probs_with(precision))
        from pneumoscope.data.manifest import read_manifest

        val = read_manifest(run / "manifest.csv")["val"]
        data = decode_samples(val, pred.image_size, show_progress=False)
        a = predict_probs(pred.model, data.images, precision="fp32")
        b = predict_probs(pred.model, data.images, precision="bf16")
        accuracy["max_abs_dp"] = float(np.max(np.abs(a - b)))
        accuracy["backbone"] = pred.config["backbone"]
    return {
        "rows": rows,
        "predictor_images_per_s": predictor_rate,
        "accuracy": accuracy,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    }


def _infer_rate(model, x, precision: str, channels_last: bool, batch: int, repeat: int):
    import torch

    from pneumoscope.models import PNEUMONIA_INDEX

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    out = []
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"),
    ):
        model(x[:batch].contiguous(memory_format=fmt))  # warm-up (primitive creation)
        t = time.perf_counter()
        for _ in range(repeat):
            out = [
                torch.softmax(model(x[i : i + batch].contiguous(memory_format=fmt)).float(), 1)[
                    :, PNEUMONIA_INDEX
                ]
                for i in range(0, len(x), batch)
            ]
        rate = repeat * len(x) / (time.perf_counter() - t)
    model.to(memory_format=torch.contiguous_format)
    return rate, torch.cat(out)


# ----------------------------------------------------------------------------- driver


def run_part(name: str, argv: list[str]) -> dict:
    """One part in a fresh interpreter; returns its JSON and the wall time of the process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--part", name, *argv], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"part {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    print(f"{name}: {json.dumps(result)[:400]}", file=sys.stderr, flush=True)
    return result


def machine() -> str:
    import torch

    cpu = "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )


def render(cold: dict, warm: dict, base: dict, inf: dict, args) -> str:
    s = cold["summary"]
    passes = s["epochs_run"] * s["n_train"]
    rate = passes / cold["process_wall_s"]
    baseline_time = passes / base["images_per_s"]
    lines = [
        START,
        "",
        "## CPU recipe vs the notebook baseline (issue 3)",
        "",
        f"Command: `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} .venv/bin/python "
        f"benchmarks/cpu_recipe.py --data {args.data} --baseline-steps {args.baseline_steps}`",
        "",
        f"Data: `{args.data}/train`, {s['n_train']} train + {s['n_val']} validation images "
        f"(patient-grouped split of the recipe run, used by both). Machine: {machine()}.",
        "",
        "| | images/s (training) | wall time | peak RSS | validation ROC AUC |",
        "|---|---:|---:|---:|---:|",
        f"| notebook baseline: ImageFolder + PIL every epoch, ResNet50 full fine-tune, batch "
        f"{base['batch_size']} ({'ImageNet' if base['imagenet_weights'] else 'random init: no ImageNet weights here'}) "
        f"| {base['images_per_s']:.2f} | {base['timed_steps']} steps: {base['train_wall_s']:.0f} s; the same "
        f"{s['epochs_run']} epochs would take {baseline_time / 60:.0f} min | {base['peak_rss_mb']:.0f} MB "
        f"| {base['val_auc']:.4f} (after {base['timed_steps'] + args.warmup} steps only) |",
        f"| pneumoscope `train` (recipe {cold['recipe']}, {cold['backbone']}, {cold['image_size']} px, "
        f"{cold['views']} views + clean, {s['epochs_run']} epochs), cold cache, start to finished model "
        f"| {rate:.1f} | {cold['process_wall_s']:.0f} s | {cold['peak_rss_mb']:.0f} MB | {s['val_roc_auc']:.4f} |",
        f"| the same, warm cache (decoded images and trunk activations reused) "
        f"| {passes / warm['process_wall_s']:.1f} | {warm['process_wall_s']:.0f} s | {warm['peak_rss_mb']:.0f} MB "
        f"| {warm['summary']['val_roc_auc']:.4f} |",
        "",
        f"Speed ratio (the baseline's time for the same {passes} training image-passes ÷ the recipe's "
        f"cold wall time): **{baseline_time / cold['process_wall_s']:.0f}×**.",
        "",
        "### ResNet50 inference, 224×224, 64 images (weights none: the rate does not depend on them)",
        "",
        "| precision | channels_last | batch | images/s | max abs Δp vs fp32 NCHW |",
        "|---|---|---:|---:|---:|",
    ]
    for r in inf["rows"]:
        lines.append(
            f"| {r['precision']} | {r['channels_last']} | {r['batch']} | {r['images_per_s']:.1f} "
            f"| {r['max_abs_dp']:.1e} |"
        )
    acc = inf["accuracy"]
    rates = inf["predictor_images_per_s"]
    lines += [
        "",
        f"Predictor (`predict_probs`, channels_last model, batch 64, inference_mode), ResNet50: "
        f"**{rates['fp32']:.1f} images/s** by default (fp32), **{rates['bf16']:.1f} images/s** with "
        f"`PNEUMOSCOPE_PRECISION=bf16`.",
    ]
    if acc:
        lines += [
            f"Accuracy of the precision on the recipe's trained model ({acc['backbone']}), validation "
            f"ROC AUC: fp32 {acc['fp32']:.4f}, bf16 {acc['bf16']:.4f}; largest |Δp| {acc['max_abs_dp']:.1e}."
        ]
    lines += ["", END]
    return "\n".join(lines)


def write_results(text: str, path: Path) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in old and END in old:
        new = old[: old.index(START)] + text + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--baseline-steps", type=int, default=12, help="timed baseline steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed baseline steps first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="inference passes per setting")
    p.add_argument(
        "--record", default=str(RESULTS), help="Markdown file for the tables ('' : print only)"
    )
    p.add_argument("--part", choices=["recipe", "baseline", "inference"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args, extra = p.parse_known_args(argv)
    args.extra = extra  # more `pneumoscope train` options for the recipe part
    if args.part:
        fn = {"recipe": part_recipe, "baseline": part_baseline, "inference": part_inference}[
            args.part
        ]
        print(json.dumps(fn(args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="cpu_recipe_"))
    try:
        cache = work / "cache"
        common = ["--data", args.data]
        cold = run_part(
            "recipe", [*common, "--out", str(work / "cold"), "--cache-dir", str(cache), *extra]
        )
        warm = run_part(
            "recipe", [*common, "--out", str(work / "warm"), "--cache-dir", str(cache), *extra]
        )
        base = run_part(
            "baseline",
            [
                *common,
                "--run",
                str(work / "cold"),
                "--steps",
                str(args.baseline_steps),
                "--warmup",
                str(args.warmup),
                "--batch-size",
                str(args.batch_size),
            ],
        )
        inf = run_part(
            "inference", [*common, "--run", str(work / "cold"), "--repeat", str(args.repeat)]
        )
        text = render(cold, warm, base, inf, args)
        print(text)
        if args.record:
            write_results(text, Path(args.record))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

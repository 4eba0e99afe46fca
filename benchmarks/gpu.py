"""Device benchmark: ResNet50 training rate on one GPU, model step alone vs end to end.

1. model step: synthetic (B,1,S,S) tensors already on the GPU through pneumoscope's own
   training step (train_step: bf16 autocast, channels_last, AdamW), nothing else;
2. end to end: real shared images, decoded once to the uint8 cache, fed, augmented on the
   GPU and trained by the training loop itself (loop.train_one_epoch), epoch after epoch.

It prints both rates and their ratio (how close the data pipeline keeps the model to its
ceiling) and appends them, with the card, to benchmarks/RESULTS.md.

    python benchmarks/gpu.py                       # on a CUDA machine: the real figures
    python benchmarks/gpu.py --compile             # the same with torch.compile
    python benchmarks/gpu.py --smoke               # tiny settings, any device (CI/CPU)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pneumoscope.data.cache import decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.models import build_model
from pneumoscope.models.precision import PRECISIONS
from pneumoscope.training.config import TrainConfig
from pneumoscope.training.distributed import DistEnv, Replicas
from pneumoscope.training.loop import (
    Optimization,
    class_weights,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from pneumoscope.training.step import BatchFeed, prepare_model, step_precision, train_step

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get(
    "PNEUMOSCOPE_DATA", str(REPO.parent / "shared" / "data" / "chest_xray_224")
)
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SMOKE = {"image_size": 32, "batch_size": 4, "steps": 2, "warmup": 1, "epochs": 2, "limit": 16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="DATA_ROOT holding train/{NORMAL,PNEUMONIA} ($PNEUMOSCOPE_DATA)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed model steps")
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed model steps first (cuDNN autotune, compile)"
    )
    p.add_argument("--epochs", type=int, default=3, help="end-to-end epochs; the first is warm-up")
    p.add_argument("--limit", type=int, default=0, help="use the first N train images (0: all)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny settings that run anywhere in seconds: {SMOKE}; records nothing unless --record",
    )
    p.add_argument(
        "--record",
        help=f"append the figures to this Markdown file (default without --smoke: {RESULTS})",
    )
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    elif args.record is None:
        args.record = str(RESULTS)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is warm-up)")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_training(args, device: torch.device, steps_per_epoch: int):
    """One ResNet50 (weights none: the rate does not depend on them), optimizer, scheduler."""
    cfg = TrainConfig(
        data=args.data,
        out="",
        recipe="full",
        backbone=args.backbone,
        weights="none",
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        balance="loss",
        head_epochs=0,
    )
    torch.manual_seed(0)
    model = prepare_model(build_model(cfg.backbone, weights="none", dropout=cfg.dropout), device)
    net = Replicas(model, DistEnv(device=device), compile_model=cfg.compile).current()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    return cfg, net, optimizer, scheduler


def model_step_rate(args, cfg, net, optimizer, scheduler, device, precision: str) -> float:
    """Images/s of the training step alone, on tensors that already sit on the device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch_size,), generator=gen).to(device)
    net.train()
    for _ in range(args.warmup):
        train_step(net, optimizer, scheduler, x, y, precision=precision)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(net, optimizer, scheduler, x, y, precision=precision)
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def end_to_end_rates(
    args, cfg, net, optimizer, scheduler, data, device, precision: str
) -> list[float]:
    """Images/s of each epoch of the training loop on the real decoded images."""
    feed = BatchFeed(data.images, data.labels, device)
    loss_weights = class_weights(data.labels).to(device)
    env = DistEnv(device=device)
    rates = []
    for epoch in range(args.epochs):
        row = train_one_epoch(
            net,
            Optimization(optimizer, scheduler, loss_weights),
            data,
            cfg,
            epoch,
            env,
            feed=feed,
            precision=precision,
            show_progress=False,
        )
        rates.append(row["train_images_per_s"])
        print(
            f"  epoch {epoch + 1}: {row['train_images_per_s']:.0f} images/s (loss {row['train_loss']:.4f})"
        )
    return rates


def load_images(args):
    samples = discover_split(Path(args.data) / "train", "train")
    if args.limit:
        rng = np.random.default_rng(0)  # both classes, not the first folder only
        samples = [
            samples[i]
            for i in sorted(rng.choice(len(samples), min(args.limit, len(samples)), replace=False))
        ]
    start = time.perf_counter()
    data = decode_samples(
        samples, args.image_size, desc="decode", workers=max(2, os.cpu_count() or 2)
    )
    return data, len(data.samples) / (time.perf_counter() - start)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def record(path: str, lines: list[str]) -> None:
    target = Path(path)
    if not target.exists():
        target.write_text("# Benchmark results\n")
    with open(target, "a", encoding="utf-8") as handle:
        handle.write("\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    precision = step_precision(args.precision, device)
    data, decode_rate = load_images(args)
    steps_per_epoch = max(1, len(data.samples) // args.batch_size)
    cfg, net, optimizer, scheduler = make_training(args, device, steps_per_epoch)
    print(
        f"{args.backbone} at {args.image_size}px, batch {args.batch_size}, {precision}, "
        f"compile={args.compile}, on {device_name(device)}; {len(data.samples)} images "
        f"decoded at {decode_rate:.0f} images/s"
    )

    step = model_step_rate(args, cfg, net, optimizer, scheduler, device, precision)
    print(f"model step (synthetic, on device): {step:.0f} images/s")
    rates = end_to_end_rates(args, cfg, net, optimizer, scheduler, data, device, precision)
    e2e = float(np.mean(rates[1:]))  # the first epoch warms up (cuDNN autotune, allocator)
    ratio = e2e / step
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    print(f"end to end (real images, training loop): {e2e:.0f} images/s")
    print(f"ratio end-to-end / model step: {ratio:.1%}")

    if args.record:
        command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
        record(
            args.record,
            [
                f"### GPU benchmark, {dt.date.today().isoformat()}{' (smoke settings, not a result)' if args.smoke else ''}",
                "",
                f"- command: `{command.strip()}`",
                f"- device: {device_name(device)}; torch {torch.__version__}",
                f"- {args.backbone} at {args.image_size}px, batch {args.batch_size}, precision {precision}, "
                f"compile {args.compile}, channels_last {device.type == 'cuda'}; "
                f"{len(data.samples)} real train images, augment medium",
                f"- model step (synthetic tensors on the device): **{step:.0f} images/s**",
                f"- end to end (training loop on the real images, mean of epochs 2..{args.epochs}): "
                f"**{e2e:.0f} images/s**",
                f"- ratio end-to-end / model step: **{ratio:.1%}**; one-time decode {decode_rate:.0f} images/s"
                + (f"; peak GPU memory {peak:.1f} GiB" if device.type == "cuda" else ""),
            ],
        )
        print(f"recorded in {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

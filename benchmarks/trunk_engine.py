"""The cpu-fast trunk pass in torch vs onnxruntime: images/s and how far they differ.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/trunk_engine.py --data ../shared/data/chest_xray_224 \
        [--images 256] [--backbone efficientnet_lite0] [--trainable-stages 3] [--repeats 3]

Real training images (the first --images of train/, decoded by pneumoscope at 224 px),
the ImageNet backbone's frozen stages as the cpu-fast recipe freezes them, fp32 (and torch
under bf16 autocast where the CPU runs bf16 natively); each engine's best of --repeats
passes over all images (batch TRUNK_BATCH, as training runs it), after one warm-up batch. Prints a Markdown row per engine and the largest
|activation difference| relative to the largest activation.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumoscope.data.cache import decode_samples  # noqa: E402
from pneumoscope.data.discover import discover_split  # noqa: E402
from pneumoscope.models import build_model  # noqa: E402
from pneumoscope.models.precision import native_bf16  # noqa: E402
from pneumoscope.training.recipes import RECIPES  # noqa: E402
from pneumoscope.training.trunk import TRUNK_BATCH, FrozenTrunk, trunk_activations  # noqa: E402
from pneumoscope.training.trunk_engine import build_engine  # noqa: E402


def timed_pass(trunk, images, engine, precision: str = "fp32") -> tuple[float, np.ndarray]:
    kw = dict(
        augment=None,
        gen=None,
        precision=precision,
        device=torch.device("cpu"),
        show_progress=False,
        engine=engine,
    )
    trunk_activations(trunk, images[:TRUNK_BATCH], **kw)  # warm-up
    started = time.perf_counter()
    out = trunk_activations(trunk, images, **kw)
    return time.perf_counter() - started, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, help="a Kermany root (its train/ is read)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--trainable-stages", type=int, default=RECIPES["cpu-fast"]["trainable_stages"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    samples = discover_split(Path(args.data) / "train", "train")[: args.images]
    images = decode_samples(samples, args.size, show_progress=False, cache_dir=False).images
    model = build_model(args.backbone, weights="imagenet").eval()
    trunk = FrozenTrunk(model, model.n_stages - args.trainable_stages)
    started = time.perf_counter()
    ort = build_engine(trunk, "onnxruntime")
    export_s = time.perf_counter() - started
    results = {}
    engines = [("torch", None, "fp32"), ("onnxruntime", ort, "fp32")]
    if native_bf16("cpu"):  # what --trunk-precision bf16 runs (torch only)
        engines.append(("torch bf16 (autocast)", None, "bf16"))
    for name, engine, precision in engines:
        runs = [timed_pass(trunk, images, engine, precision) for _ in range(args.repeats)]
        results[name] = (min(s for s, _ in runs), runs[0][1])
    print(
        f"{len(images)} images, {args.backbone} stages[:{model.n_stages - args.trainable_stages}], {args.size} px, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.processor() or platform.machine()}; onnxruntime export + check {export_s:.1f} s"
    )
    print(f"| engine | best of {args.repeats}: s | images/s |")
    print("|---|---:|---:|")
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.1f} | {len(images) / seconds:.1f} |")
    a, b = (results[n][1].astype(np.float32) for n in ("torch", "onnxruntime"))
    print(
        f"max |torch - onnxruntime| / max |torch| = {np.abs(a - b).max() / np.abs(a).max():.2e} (float16 storage)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CPU settings of the cpu-fast recipe's training step, each on and off: TopNet's CPU
settings (the contiguous input of the top's last BatchNorm; 5x5 depthwise convolutions in
fp32 inside a bf16 step) and onnxruntime's spinning threads during the augmented trunk
pass (trunk_engine.OnnxTrunk).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cpu_step.py --data ../shared/data/chest_xray_224 \
        [--images 256] [--repeats 3] [--trainable-stages 2,3]

Real training images (the first --images of train/, decoded by pneumoscope at 224 px),
efficientnet_lite0 with ImageNet weights:

- top step: forward, backward and AdamW step of the top (the top --trainable-stages) on
  the images' cached (clean) activations in batches of the recipe's 64, best of --repeats
  passes; the same starting weights for every setting; fp32, and bf16 autocast where the
  CPU runs bf16 natively. "off" is TopNet without a device (none of its CPU settings),
  "on" what training uses on a CPU.
- augmented trunk pass: the "robust" view of the images through the onnxruntime trunk, as
  training makes it, best of --repeats passes.

Prints one Markdown row per setting.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pneumoscope.data.augment import PRESETS  # noqa: E402
from pneumoscope.data.cache import decode_samples  # noqa: E402
from pneumoscope.data.discover import discover_split  # noqa: E402
from pneumoscope.models import build_model  # noqa: E402
from pneumoscope.models.onnx_session import open_session
from pneumoscope.models.precision import autocast, native_bf16  # noqa: E402
from pneumoscope.training.recipes import RECIPES  # noqa: E402
from pneumoscope.training.trunk import (  # noqa: E402
    FrozenTrunk,
    TopNet,
    activations_to_input,
    trunk_activations,
    view_generator,
)
from pneumoscope.training.trunk_engine import OnnxTrunk, _export  # noqa: E402

RECIPE = RECIPES["cpu-fast"]
CPU = torch.device("cpu")


def top_pass_seconds(
    model, k: int, device, acts: np.ndarray, labels: torch.Tensor, precision: str
) -> float:
    """One pass of training steps over acts with TopNet(model, k, device)."""
    top = TopNet(model, k, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    batch = RECIPE["batch_size"]
    started = time.perf_counter()
    for start in range(0, len(acts), batch):
        x = activations_to_input(acts[start : start + batch], CPU)
        with autocast(CPU, precision):
            logits = top(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[start : start + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - started


def top_step(
    model, k: int, acts: np.ndarray, labels: torch.Tensor, repeats: int, precision: str
) -> dict[str, float]:
    out = {}
    for name, device in (("off (torch defaults)", None), ("on (what training uses on a CPU)", CPU)):
        net = copy.deepcopy(model)
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.stages[k:].parameters():
            p.requires_grad_(True)
        for p in net.head.parameters():
            p.requires_grad_(True)
        top_pass_seconds(net, k, device, acts[: RECIPE["batch_size"]], labels, precision)  # warm-up
        out[name] = min(
            top_pass_seconds(net, k, device, acts, labels, precision) for _ in range(repeats)
        )
    return out


def augmented_pass(trunk, images: np.ndarray, repeats: int) -> dict[str, float]:
    engine = OnnxTrunk(trunk)
    spinning = open_session(_export(trunk), torch.get_num_threads(), spinning=True)
    out = {}
    for name, session in (
        ("onnxruntime threads spin between runs (its default)", spinning),
        ("threads sleep between runs (what training uses)", engine.session),
    ):
        engine.session = session
        kw = dict(
            augment=PRESETS[RECIPE["augment"]],
            precision="fp32",
            device=CPU,
            show_progress=False,
            engine=engine,
        )
        trunk_activations(trunk, images[:32], gen=view_generator(0, 0), **kw)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            trunk_activations(trunk, images, gen=view_generator(0, 0), **kw)
            times.append(time.perf_counter() - started)
        out[name] = min(times)
    return out


def row(name: str, seconds: float, n: int) -> None:
    print(f"| {name} | {seconds:.2f} | {n / seconds:.1f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, help="a Kermany root (its train/ is read)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trainable-stages", default="2,3", help="comma-separated tops to time")
    args = ap.parse_args(argv)
    samples = discover_split(Path(args.data) / "train", "train")[: args.images]
    decoded = decode_samples(samples, RECIPE["image_size"], show_progress=False, cache_dir=False)
    images, labels = decoded.images, torch.as_tensor(decoded.labels, dtype=torch.int64)
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights="imagenet", dropout=RECIPE["dropout"])
    precisions = ["fp32"] + (["bf16"] if native_bf16(CPU) else [])
    print(
        f"{len(images)} images, efficientnet_lite0, batch {RECIPE['batch_size']}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"| setting | best of {args.repeats}: s | images/s |")
    print("|---|---:|---:|")
    trunk = None
    for stages in (int(n) for n in args.trainable_stages.split(",")):
        k = model.n_stages - stages
        trunk = FrozenTrunk(model, k)
        acts = trunk_activations(
            trunk,
            images,
            augment=None,
            gen=None,
            precision="fp32",
            device=CPU,
            show_progress=False,
            engine=OnnxTrunk(trunk),
        )
        for precision in precisions:
            for name, seconds in top_step(model, k, acts, labels, args.repeats, precision).items():
                row(
                    f"top step, --trainable-stages {stages}, {precision}: {name}",
                    seconds,
                    len(images),
                )
    for name, seconds in augmented_pass(trunk, images, args.repeats).items():
        row(
            f"augmented trunk pass (stages[:{len(trunk.stages)}], the last top's trunk): {name}",
            seconds,
            len(images),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training step's fast path: unchanged on the CPU, bf16 / channels_last / GPU-resident
images / GPU augmentation / torch.compile on CUDA (those tests skip without a GPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pneumoscope.data.augment import PRESETS, augment_batch
from pneumoscope.data.cache import decode_samples
from pneumoscope.data.discover import discover_split
from pneumoscope.models import build_model
from pneumoscope.models.classifier import images_to_input
from pneumoscope.training import TrainConfig, step
from pneumoscope.training.loop import make_optimizer, make_scheduler

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (GPU fast path)"
)
needs_2_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL DDP)"
)


@pytest.fixture(scope="module")
def decoded(small_data_root):
    return decode_samples(
        discover_split(small_data_root / "train", "train"), 48, show_progress=False
    )


def tiny_training(precision="fp32", device="cpu"):
    cfg = TrainConfig(
        data="", out="", recipe="full", weights="none", image_size=48, batch_size=8, epochs=1
    )
    torch.manual_seed(0)
    model = step.prepare_model(
        build_model("efficientnet_lite0", weights="none"), torch.device(device)
    )
    optimizer = make_optimizer(model, cfg)
    return model, optimizer, make_scheduler(optimizer, cfg, 4)


# ----------------------------------------------------------------------------- CPU


def test_precision_auto_is_fp32_on_cpu_and_bad_names_are_refused():
    assert step.step_precision("auto", torch.device("cpu")) == "fp32"
    assert step.step_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="--precision must be one of"):
        step.step_precision("fp8", torch.device("cpu"))


def test_cpu_feed_is_the_model_input_contract(decoded):
    feed = step.BatchFeed(decoded.images, decoded.labels, torch.device("cpu"))
    idx = np.array([5, 0, 17, 3])
    x, y = feed(idx)
    assert torch.equal(x, images_to_input(decoded.images[idx]))  # bit for bit the old path
    assert y.tolist() == decoded.labels[idx].tolist()


def test_bf16_train_step_on_cpu_learns(decoded):
    model, optimizer, scheduler = tiny_training()
    model.train()
    feed = step.BatchFeed(decoded.images, decoded.labels, torch.device("cpu"))
    x, y = feed(np.arange(8))
    losses = [
        step.train_step(model, optimizer, scheduler, x, y, precision="bf16").item()
        for _ in range(4)
    ]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # the same batch four times: the step does optimise
    assert next(model.parameters()).dtype == torch.float32  # autocast, weights stay fp32


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
def test_gpu_feed_holds_images_on_the_device_and_matches_cpu(decoded, monkeypatch):
    idx = np.array([5, 0, 17, 3])
    want = images_to_input(decoded.images[idx])
    feed = step.BatchFeed(decoded.images, decoded.labels, torch.device("cuda"))
    assert feed.on_device and feed.images.is_cuda
    x, y = feed(idx)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x.cpu(), want) and y.cpu().tolist() == decoded.labels[idx].tolist()
    monkeypatch.setattr(step, "GPU_CACHE_FRACTION", 0.0)  # too big for the GPU: pinned host cache
    pinned = step.BatchFeed(decoded.images, decoded.labels, torch.device("cuda"))
    assert not pinned.on_device and pinned.images.is_pinned()
    x2, _ = pinned(idx)
    assert x2.is_cuda and torch.equal(x2.cpu(), want)


@needs_cuda
def test_gpu_augmentation_draws_the_same_parameters_as_on_cpu(decoded):
    x = images_to_input(decoded.images[:8])
    on_cpu = augment_batch(x, PRESETS["strong"], torch.Generator().manual_seed(3))
    on_gpu = augment_batch(x.cuda(), PRESETS["strong"], torch.Generator().manual_seed(3))
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-4, rtol=0)


@needs_cuda
def test_bf16_channels_last_step_on_gpu(decoded):
    model, optimizer, scheduler = tiny_training(device="cuda")
    assert step.step_precision("auto", torch.device("cuda")) in ("bf16", "fp32")
    model.train()
    x, y = step.BatchFeed(decoded.images, decoded.labels, torch.device("cuda"))(np.arange(8))
    losses = [
        step.train_step(model, optimizer, scheduler, x, y, precision="bf16").item()
        for _ in range(4)
    ]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@needs_cuda
@pytest.mark.parametrize("extra", [[], ["--compile"]], ids=["eager", "compile"])
def test_train_command_on_gpu(small_data_root, tmp_path, extra):
    from pneumoscope.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "-q",
                "train",
                "--data",
                str(small_data_root),
                "--out",
                str(out),
                "--backbone",
                "efficientnet_lite0",
                "--image-size",
                "64",
                "--batch-size",
                "8",
                "--val-fraction",
                "0.25",
                "--head-epochs",
                "1",
                "--epochs",
                "2",
                "--device",
                "cuda",
                *extra,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in rows)


@needs_2_gpus
def test_torchrun_two_gpus_nccl(small_data_root, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pneumoscope",
        "-q",
        "train",
        "--data",
        str(small_data_root),
        "--out",
        str(out),
        "--backbone",
        "efficientnet_lite0",
        "--image-size",
        "64",
        "--batch-size",
        "6",
        "--val-fraction",
        "0.3",
        "--head-epochs",
        "1",
        "--epochs",
        "2",
        "--device",
        "cuda",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "nccl"}

"""The one training step (train_step) and how batches reach it (BatchFeed), fast on a
GPU and unchanged on a CPU.

On CUDA (the full fine-tune recipe): the decoded uint8 images go to the GPU once (or
to pinned host memory when they do not fit), each batch is gathered, scaled and
augmented there, the model runs channels_last under bf16 autocast, and the loss is
summed on the device so the host never waits for the GPU inside an epoch. On the CPU
every step is the plain fp32 one, bit for bit what it was before this module existed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.models.precision import autocast, resolve_precision

log = logging.getLogger(__name__)

GPU_CACHE_FRACTION = 0.5  # of free GPU memory the uint8 image cache may take


def step_precision(precision: str, device: torch.device) -> str:
    """The full recipe's step: auto is bf16 on a GPU that supports it (Ampere and later)
    and fp32 on every CPU (the plain fp32 step there, bit for bit)."""
    return resolve_precision(precision, device, cpu_auto="fp32")


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On the device; channels_last on CUDA, where cuDNN's convolutions run fastest in it."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once
    return model


class BatchFeed:
    """Turns batch indices into (x float (B,1,S,S) in [0,1], y) on the training device.

    The whole uint8 cache lives on the GPU when it fits (a 224x224 image is 50 KB, the
    full train split about 260 MB); otherwise in pinned host memory, from which each
    batch is copied without blocking. On the CPU it is a zero-copy view of the array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device):
        self.device = device
        host = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.on_device = device.type != "cuda" or _fits_on_gpu(host.nbytes, device)
        if device.type == "cuda":
            self.images = host.to(device) if self.on_device else host.pin_memory()
            log.info(
                "image cache: %.0f MB %s",
                host.nbytes / 2**20,
                "on the GPU" if self.on_device else "in pinned host memory",
            )
        else:
            self.images = host

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.int64)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        if self.on_device:
            batch = self.images[index]
        else:  # pinned cache on the host: gather into pinned memory, copy asynchronously
            batch = self.images[index.cpu()].pin_memory().to(self.device, non_blocking=True)
        x = batch.unsqueeze(1).float().div_(255.0)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[index]


def _fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= GPU_CACHE_FRACTION * free


def train_step(
    net,
    optimizer,
    scheduler,
    x,
    y,
    *,
    loss_weights=None,
    label_smoothing: float = 0.0,
    precision: str = "fp32",
) -> torch.Tensor:
    """One optimisation step; returns the batch's mean loss as a detached device tensor
    (read it with .item() only when needed: that waits for the GPU)."""
    with autocast(x.device, precision):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, weight=loss_weights, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()

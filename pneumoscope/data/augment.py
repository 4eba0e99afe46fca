"""Batch augmentation for chest X-rays, on tensors, on whatever device the batch is on.

Chest X-rays differ between hospitals and machines in exposure, contrast, gamma,
framing and slight rotation, so those are what we vary. No horizontal flip by default:
the heart sits on the left, and a flipped film is an image no scanner produces.
Every sample draws its own parameters from a torch.Generator, so an epoch's
augmentation is a function of (seed, epoch) and a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    scale: float = 0.10  # zoom in [1-scale, 1+scale]
    rotate_deg: float = 10.0
    translate: float = 0.06  # fraction of the image side
    brightness: float = 0.10  # additive, on [0,1] intensities
    contrast: float = 0.25  # multiplicative around the image mean, in [1/(1+c), 1+c]
    gamma: float = 0.35  # gamma in [exp(-g), exp(g)]
    hflip: float = 0.0  # probability of a horizontal flip
    # width:height stretch in [exp(-a), exp(a)]: the originals were stretched to a square,
    # so a film of another aspect ratio (another site, another age) looks squeezed
    aspect: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "none": None,
    "light": AugmentConfig(scale=0.05, rotate_deg=5, translate=0.03, brightness=0.05, contrast=0.1, gamma=0.15),
    "medium": AugmentConfig(),
    "strong": AugmentConfig(scale=0.15, rotate_deg=15, translate=0.08, brightness=0.15, contrast=0.4, gamma=0.5),
    # wide framing (zoom 0.75-1.25): films of other sites frame the chest differently
    "wide": AugmentConfig(scale=0.25, rotate_deg=12, translate=0.08, brightness=0.12, contrast=0.5, gamma=0.5),
    # wide framing and aspect ratio (0.78-1.28): what differs between sites (benchmarks/RESULTS.md)
    "robust": AugmentConfig(scale=0.25, rotate_deg=12, translate=0.08, brightness=0.12, contrast=0.5, gamma=0.5,
                            aspect=0.25),
}


def _rand(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """n uniform draws from the (CPU) generator, on the batch's device. To a GPU they go
    through pinned memory without blocking: a plain .to() would make the host wait for
    every queued kernel at each batch."""
    values = torch.rand(n, generator=gen)
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return _rand(n, gen, device) * (high - low) + low


def _random_affine(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n, device = x.shape[0], x.device
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen, device) * math.pi / 180
    zoom = _uniform(n, 1 - cfg.scale, 1 + cfg.scale, gen, device)
    shift = _uniform(2 * n, -cfg.translate, cfg.translate, gen, device).view(n, 2) * 2
    flip = torch.where(_rand(n, gen, device) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    if cfg.aspect:  # drawn last, so presets without it keep their random stream
        stretch = torch.exp(_uniform(n, -cfg.aspect, cfg.aspect, gen, device) / 2)
        theta = theta * torch.stack([1 / stretch, stretch], 1).unsqueeze(2)  # rows: input x, input y
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n, device = x.shape[0], x.device
    shape = (n, 1, 1, 1)
    gamma = torch.exp(_uniform(n, -cfg.gamma, cfg.gamma, gen, device)).view(shape)
    contrast = torch.exp(_uniform(n, -math.log1p(cfg.contrast), math.log1p(cfg.contrast), gen, device)).view(shape)
    brightness = _uniform(n, -cfg.brightness, cfg.brightness, gen, device).view(shape)
    x = x.clamp(0, 1) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig | None, gen: torch.Generator) -> torch.Tensor:
    """x: float (B,1,S,S) in [0,1] -> augmented batch of the same shape and range."""
    if cfg is None:
        return x
    return _random_intensity(_random_affine(x, cfg, gen), cfg, gen)

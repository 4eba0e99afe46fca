"""Batch augmentation for chest X-rays, on tensors, on whatever device the batch is on.

Chest X-rays differ between hospitals and machines in exposure, contrast, gamma,
framing and slight rotation, so those are what we vary. No horizontal flip by default:
the heart sits on the left, and a flipped film is an image no scanner produces.
Every sample draws its own parameters from a torch.Generator, so an epoch's
augmentation is a function of (seed, epoch) and a resumed run repeats it exactly.

Shortcut breakers (the ``lungs`` preset): a model can read the film instead of the lungs
(the side marker, text labels, the collimation border, how the image was resampled and
compressed). Pasting markers on films of both classes, blanking the border ring, erasing
patches and jittering the resampling filter and JPEG quality make those cues carry no
label, so the model has to look elsewhere (benchmarks/shift_suite.py measures it).
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


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
    # shortcut breakers, each the probability per image (0: off, and nothing is drawn)
    markers: float = 0.0  # a synthetic film marker (R, L, a text label) pasted near an edge
    border: float = 0.0  # the border ring blanked, a random width per side
    erase: float = 0.0  # a random rectangle erased (random erasing)
    resample: float = 0.0  # down-up (or up-down) sampled with a random filter and factor
    jpeg: float = 0.0  # re-compressed as JPEG at quality 30-95

    def as_dict(self) -> dict:
        """The fields, less the shortcut breakers when all are off, so the cache keys of the
        presets that predate them stay as they were."""
        out = asdict(self)
        if not self.breaks_shortcuts:
            for name in SHORTCUT_FIELDS:
                out.pop(name)
        else:
            out["shortcut_version"] = SHORTCUT_VERSION
        return out

    @property
    def breaks_shortcuts(self) -> bool:
        return any(getattr(self, name) for name in SHORTCUT_FIELDS)


SHORTCUT_FIELDS = ("markers", "border", "erase", "resample", "jpeg")
SHORTCUT_VERSION = 1  # bump when the breakers' drawing changes: cached views are keyed by it


PRESETS = {
    "none": None,
    "light": AugmentConfig(
        scale=0.05, rotate_deg=5, translate=0.03, brightness=0.05, contrast=0.1, gamma=0.15
    ),
    "medium": AugmentConfig(),
    "strong": AugmentConfig(
        scale=0.15, rotate_deg=15, translate=0.08, brightness=0.15, contrast=0.4, gamma=0.5
    ),
    # wide framing (zoom 0.75-1.25): films of other sites frame the chest differently
    "wide": AugmentConfig(
        scale=0.25, rotate_deg=12, translate=0.08, brightness=0.12, contrast=0.5, gamma=0.5
    ),
    # wide framing and aspect ratio (0.78-1.28): what differs between sites (benchmarks/RESULTS.md)
    "robust": AugmentConfig(
        scale=0.25,
        rotate_deg=12,
        translate=0.08,
        brightness=0.12,
        contrast=0.5,
        gamma=0.5,
        aspect=0.25,
    ),
    # robust with wider zoom (0.6-1.4) and width:height (0.67-1.49): an older child's long,
    # narrow chest looks like an infant's and back (the site sample's false positives are
    # older children's healthy films; benchmarks/RESULTS.md, "The site sample")
    "age": AugmentConfig(
        scale=0.4,
        rotate_deg=12,
        translate=0.08,
        brightness=0.12,
        contrast=0.5,
        gamma=0.5,
        aspect=0.4,
    ),
    # robust + the shortcut breakers (benchmarks/RESULTS.md, "Shortcut and shift suites")
    "lungs": AugmentConfig(
        scale=0.25,
        rotate_deg=12,
        translate=0.08,
        brightness=0.12,
        contrast=0.5,
        gamma=0.5,
        aspect=0.25,
        markers=0.5,
        border=0.3,
        erase=0.3,
        resample=0.3,
        jpeg=0.3,
    ),
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
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    if cfg.aspect:  # drawn last, so presets without it keep their random stream
        stretch = torch.exp(_uniform(n, -cfg.aspect, cfg.aspect, gen, device) / 2)
        # rows: input x, input y
        theta = theta * torch.stack([1 / stretch, stretch], 1).unsqueeze(2)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _random_intensity(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n, device = x.shape[0], x.device
    shape = (n, 1, 1, 1)
    gamma = torch.exp(_uniform(n, -cfg.gamma, cfg.gamma, gen, device)).view(shape)
    contrast = torch.exp(
        _uniform(n, -math.log1p(cfg.contrast), math.log1p(cfg.contrast), gen, device)
    ).view(shape)
    brightness = _uniform(n, -cfg.brightness, cfg.brightness, gen, device).view(shape)
    x = x.clamp(0, 1) ** gamma
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1)


# ----------------------------------------------------------------------------- shortcut breakers

MARKER_TEXTS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "RIGHT", "LEFT", "SIN", "DEX")


@functools.lru_cache(maxsize=256)
def marker_mask(text: str, height: int) -> torch.Tensor:
    """float (h, w) coverage in [0, 1] of `text` in Pillow's bundled font, about `height` px tall."""
    font = ImageFont.load_default(size=max(6, int(height)))
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, fill=255, font=font)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)


def paste_marker(
    img: torch.Tensor,
    text: str,
    height: int,
    value: float,
    top: float,
    left: float,
    plate: float | None = None,
) -> torch.Tensor:
    """Paste `text` onto img (1,S,S) in place, its box's corner at fractions (top, left) of
    the free room (0: the top/left edge, 1: the bottom/right edge); `value` the letters'
    intensity, `plate` the intensity of a backing rectangle (None: no plate)."""
    size = img.shape[-1]
    mask = marker_mask(text, height)[:size, :size].to(img.device, img.dtype)
    h, w = mask.shape
    y, x = round(top * (size - h)), round(left * (size - w))
    region = img[0, y : y + h, x : x + w]
    if plate is not None:
        region.fill_(plate)
    region.mul_(1 - mask).add_(value * mask)
    return img


def _edge_position(u: float, v: float, w: float) -> tuple[float, float]:
    """(top, left) near a corner or along an edge from three uniforms."""
    near = lambda t: 0.12 * t if t < 0.5 else 1 - 0.12 * (t - 0.5)  # noqa: E731 (0-0.06 or 0.94-1)
    if w < 0.5:  # a corner
        return near(u), near(v)
    if w < 0.75:  # along the top or bottom edge
        return near(u), v
    return u, near(v)  # along the left or right edge


def _random_markers(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape[0], 8, generator=gen).tolist()
    x = x.clone()
    size = x.shape[-1]
    for img, (use, pick, height, bright, a, b, c, plate) in zip(x, u, strict=True):
        if use >= p:
            continue
        text = MARKER_TEXTS[int(pick * len(MARKER_TEXTS))]
        px = int(size * (0.04 + 0.10 * height) / max(1.0, len(text) / 3))  # long labels smaller
        # mostly bright, some dark
        value = 0.75 + 0.25 * bright if bright < 0.7 else (bright - 0.7) / 2
        top, left = _edge_position(a, b, c)
        paste_marker(img, text, px, value, top, left, plate=(1 - value) if plate < 0.3 else None)
    return x


def _box_masks(size: int, top, bottom, left, right, device) -> torch.Tensor:
    """bool (B,1,S,S): pixels with row in [top, bottom) and column in [left, right)."""
    r = torch.arange(size, device=device).view(1, 1, size, 1)
    c = torch.arange(size, device=device).view(1, 1, 1, size)
    col = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    return (r >= col(top)) & (r < col(bottom)) & (c >= col(left)) & (c < col(right))


def _random_border(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Blank each side's ring (a side on with probability 1/2, width up to 12%) to black,
    white or the image mean (collimation and cropping differ between sites)."""
    n, size = x.shape[0], x.shape[-1]
    u = _rand(n * 10, gen, x.device).view(n, 10)
    width = (u[:, 1:5] * 0.12 * size).round() * (u[:, 5:9] < 0.5)  # top, bottom, left, right
    inner = _box_masks(
        size, width[:, 0], size - width[:, 1], width[:, 2], size - width[:, 3], x.device
    )
    fill = torch.where(u[:, 9] < 0.6, 0.0, torch.where(u[:, 9] < 0.8, 1.0, x.mean(dim=(1, 2, 3))))
    blank = ~inner & (u[:, 0] < p).view(-1, 1, 1, 1)
    return torch.where(blank, fill.view(-1, 1, 1, 1), x)


def _random_erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """One rectangle of 2-15% of the image (aspect 0.3-3.3) set to a uniform grey level."""
    n, size = x.shape[0], x.shape[-1]
    u = _rand(n * 6, gen, x.device).view(n, 6)
    area = (0.02 + 0.13 * u[:, 1]) * size * size
    aspect = torch.exp((u[:, 2] * 2 - 1) * math.log(3.3))
    h = (area * aspect).sqrt().clamp(1, size).round()
    w = (area / aspect).sqrt().clamp(1, size).round()
    top, left = ((size - h) * u[:, 3]).round(), ((size - w) * u[:, 4]).round()
    box = _box_masks(size, top, top + h, left, left + w, x.device) & (u[:, 0] < p).view(-1, 1, 1, 1)
    return torch.where(box, u[:, 5].view(-1, 1, 1, 1), x)


RESAMPLE_MODES = ("nearest", "bilinear", "bicubic", "area")


def resample(img: torch.Tensor, factor: float, down: str, up: str) -> torch.Tensor:
    """img (B,1,S,S) to factor*S with `down`, then back to S with `up` (factor > 1: up first)."""
    size = img.shape[-1]
    inner = max(8, round(size * factor))

    def interp(t, n, mode):
        smooth = mode in ("bilinear", "bicubic")
        return F.interpolate(
            t,
            size=(n, n),
            mode=mode,
            antialias=smooth and n < t.shape[-1],
            **({"align_corners": False} if smooth else {}),
        )

    return interp(interp(img, inner, down), size, up).clamp(0, 1)


def _random_resample(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Down-up by 0.35-0.9 (a coarser source), or up-down by 1.5-4 (a full-size original
    brought to the model's size), each way with random filters."""
    u = torch.rand(x.shape[0], 5, generator=gen).tolist()
    out = x.clone()
    for i, (use, way, f, d, m) in enumerate(u):
        if use >= p:
            continue
        factor = 0.35 + 0.55 * f if way < 0.6 else 1.5 + 2.5 * f
        down = RESAMPLE_MODES[int(d * 4)]
        up = RESAMPLE_MODES[int(m * 3)]  # area is a down-sampling filter
        out[i : i + 1] = resample(
            x[i : i + 1], factor, down if factor < 1 else up, up if factor < 1 else down
        )
    return out


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """img (1,S,S) in [0,1] through a JPEG encode/decode at `quality` (on the CPU)."""
    u8 = (img.detach().cpu()[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
    return torch.from_numpy(back)[None].to(img.device, img.dtype)


def _random_jpeg(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape[0], 2, generator=gen).tolist()
    out = x.clone()
    for i, (use, q) in enumerate(u):
        if use < p:
            out[i] = jpeg_roundtrip(x[i], 30 + int(q * 66))
    return out


def _break_shortcuts(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Markers, border, erasing (film content), then resampling and JPEG (the transmission
    chain, which acts on whatever the film holds)."""
    for p, op in (
        (cfg.markers, _random_markers),
        (cfg.border, _random_border),
        (cfg.erase, _random_erase),
        (cfg.resample, _random_resample),
        (cfg.jpeg, _random_jpeg),
    ):
        if p:
            x = op(x, p, gen)
    return x


def augment_batch(x: torch.Tensor, cfg: AugmentConfig | None, gen: torch.Generator) -> torch.Tensor:
    """x: float (B,1,S,S) in [0,1] -> augmented batch of the same shape and range."""
    if cfg is None:
        return x
    x = _random_intensity(_random_affine(x, cfg, gen), cfg, gen)
    return _break_shortcuts(x, cfg, gen) if cfg.breaks_shortcuts else x

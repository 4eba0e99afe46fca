"""A simulated new site: real images with the film differences a second hospital brings
(tighter collimation / zoom, another exposure curve, burnt-in side markers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ZOOM = 0.8  # keep the central 80% of each side, scaled back up
GAMMA = 0.6  # brighter mid-tones: another detector / processing curve


def shift_image(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> the same film as the simulated site would store it."""
    h, w = gray.shape
    dh, dw = int(h * (1 - ZOOM) / 2), int(w * (1 - ZOOM) / 2)
    img = Image.fromarray(gray[dh : h - dh, dw : w - dw]).resize((w, h), Image.BILINEAR)
    out = np.rint(255.0 * (np.asarray(img, np.float64) / 255.0) ** GAMMA).astype(np.uint8)
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    s = max(4, w // 12)
    draw.rectangle([w // 20, h // 20, w // 20 + s, h // 20 + s], fill=255)  # a side marker
    draw.text((w // 20 + s // 4, h // 20 + s // 8), "R", fill=0)
    # a label
    draw.rectangle([w - w // 20 - 2 * s, h - h // 20 - s // 2, w - w // 20, h - h // 20], fill=230)
    return np.asarray(img)


def copy_folder(src: Path, dest: Path, shifted: bool) -> Path:
    """Copy every JPEG below `src` to `dest` (same relative paths), shifted or untouched."""
    for path in sorted(src.rglob("*.jpeg")):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if shifted:
            gray = np.asarray(Image.open(path).convert("L"))
            Image.fromarray(shift_image(gray)).save(target, quality=92)
        else:
            shutil.copy2(path, target)
    return dest

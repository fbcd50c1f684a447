"""Photo-like test images in PNG or JPEG folders, generated once and reused by the benchmarks.

Sizes vary (default 240-320 px per side, as small web images are); the content is smooth
structure plus sensor-like noise, so PNGs compress like photographs (poorly) and JPEGs like
camera JPEGs. Deterministic: image i is the same in every run and format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"png": "png", "jpeg": "jpg"}


def image_pixels(i: int, size_range: tuple[int, int] = (240, 320)) -> np.ndarray:
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = rng.uniform(0.005, 0.05, 2)
    phase = rng.uniform(0, 6.28)
    base = np.sin(xx * fx + phase)[..., None] * np.cos(yy * fy)[..., None] * rng.uniform(40, 120, 3)
    return np.clip(base + 128 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def make_folder(folder: Path, n: int, fmt: str, size_range: tuple[int, int] = (240, 320)) -> Path:
    """`folder` with images 0..n-1 in `fmt` ('png' or 'jpeg'); existing ones are kept."""
    ext = FORMATS[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"img_{i:06d}.{ext}"
        if path.exists():
            continue
        img = Image.fromarray(image_pixels(i, size_range))
        if fmt == "jpeg":
            img.save(path, quality=90)
        else:
            img.save(path)
    for extra in sorted(folder.glob(f"img_*.{ext}"))[n:]:
        extra.unlink()  # a folder of exactly n images
    return folder

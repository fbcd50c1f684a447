"""Test images written on demand: synthetic photos, every odd or broken input, real photographs.

Every writer takes a folder, writes one or more files into it and returns their paths;
content is deterministic (seeded), so tests can compare against known pixels.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

# The stored pixels of `write_exif_rotated`: quadrant colours of a 64 x 32 (w x h) image.
QUADRANTS = {
    "top_left": (255, 0, 0),
    "top_right": (0, 255, 0),
    "bottom_left": (0, 0, 255),
    "bottom_right": (255, 255, 255),
}
# The CMYK quadrants of `write_cmyk_jpeg` and the RGB Pillow turns them into.
CMYK_QUADRANTS = {
    "cyan": ((255, 0, 0, 0), (0, 255, 255)),
    "magenta": ((0, 255, 0, 0), (255, 0, 255)),
    "yellow": ((0, 0, 255, 0), (255, 255, 0)),
    "black": ((0, 0, 0, 255), (0, 0, 0)),
}
# Palette of `write_palette_png`: colour i, with alpha TRANSPARENCY[i].
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))
TRANSPARENCY = bytes([0, 128, 255, 255])


def synthetic_pixels(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise: structure for resampling, detail for rounding."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) * 7) % 256]
    noise = rng.integers(-40, 41, size=(height, width, 3))
    img = np.clip(np.stack(base, -1) + noise, 0, 255).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def write_rgb(
    folder: Path, name: str, size: tuple[int, int], seed: int = 0, **save: object
) -> Path:
    """One synthetic RGB image of ``size`` (w, h); the format follows the name's extension."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_pixels(*size, seed=seed)).save(path, **save)
    return path


def write_rgb_set(folder: Path, sizes: Iterable[tuple[int, int]], ext: str = "png") -> list[Path]:
    """Synthetic RGB images, one a size, named ``img_<w>x<h>.<ext>``."""
    return [
        write_rgb(folder, f"img_{w}x{h}.{ext}", (w, h), seed=i) for i, (w, h) in enumerate(sizes)
    ]


def write_gray(folder: Path, name: str = "gray.png", size: tuple[int, int] = (90, 70)) -> Path:
    path = Path(folder) / name
    Image.fromarray(synthetic_pixels(*size, channels=1), "L").save(path)
    return path


def write_truncated_jpeg(folder: Path, name: str = "truncated.jpg") -> Path:
    """A valid JPEG cut to half its bytes: headers intact, scan data missing."""
    full = write_rgb(folder, name, (256, 192), quality=90)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return full


def write_truncated_png(folder: Path, name: str = "truncated.png") -> Path:
    full = write_rgb(folder, name, (128, 96))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return full


def write_empty(folder: Path, name: str = "empty.jpg") -> Path:
    path = Path(folder) / name
    path.write_bytes(b"")
    return path


def write_text_as_image(folder: Path, name: str = "notes.jpg") -> Path:
    path = Path(folder) / name
    path.write_text("this is a text file, not a JPEG\n")
    return path


def write_cmyk_jpeg(folder: Path, name: str = "cmyk.jpg") -> Path:
    """64 x 64 CMYK JPEG, quadrants cyan, magenta / yellow, black (see CMYK_QUADRANTS)."""
    arr = np.zeros((64, 64, 4), np.uint8)
    colours = [c for c, _ in CMYK_QUADRANTS.values()]
    for (ys, xs), c in zip(_quadrant_slices(64, 64), colours):
        arr[ys, xs] = c
    path = Path(folder) / name
    Image.fromarray(arr, "CMYK").save(path, quality=95)
    return path


def write_png16(folder: Path, name: str = "gray16.png", width: int = 256) -> Path:
    """16-bit grayscale PNG, a horizontal ramp over the full 0..65535 range (8 rows)."""
    ramp = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    path = Path(folder) / name
    Image.fromarray(np.repeat(ramp[None], 8, axis=0)).save(path)  # mode I;16
    return path


def png16_expected(width: int = 256) -> np.ndarray:
    """The 8-bit values `write_png16`'s ramp should decode to."""
    return np.round(np.linspace(0, 65535, width) / 257).astype(np.uint8)


def write_palette_png(folder: Path, name: str = "palette.png") -> Path:
    """32 x 8 palette PNG with per-entry alpha (tRNS); column block i uses palette entry i."""
    idx = np.repeat(np.arange(4, dtype=np.uint8), 8)[None].repeat(8, axis=0)
    img = Image.fromarray(idx, "P")
    img.putpalette([v for c in PALETTE for v in c])
    path = Path(folder) / name
    img.save(path, transparency=TRANSPARENCY)
    return path


def write_rgba_png(folder: Path, name: str = "rgba.png", size: tuple[int, int] = (40, 30)) -> Path:
    """Synthetic RGB with a left-to-right alpha ramp (0 = fully transparent)."""
    rgb = synthetic_pixels(*size)
    alpha = np.repeat(np.linspace(0, 255, size[0]).astype(np.uint8)[None], size[1], axis=0)
    path = Path(folder) / name
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return path


def write_tiny(
    folder: Path, name: str = "tiny.png", colour: tuple[int, int, int] = (200, 30, 90)
) -> Path:
    """A 1 x 1 image."""
    path = Path(folder) / name
    Image.new("RGB", (1, 1), colour).save(path)
    return path


def write_wide(folder: Path, name: str = "wide.png", size: tuple[int, int] = (4000, 20)) -> Path:
    """A very elongated image (w x h)."""
    return write_rgb(folder, name, size, seed=7)


def write_exif_rotated(folder: Path, orientation: int = 6, name: str | None = None) -> Path:
    """64 x 32 (w x h) JPEG with QUADRANTS as stored pixels and EXIF ``orientation``.

    Orientation 6 means "rotate 90 degrees clockwise to display", 8 counter-clockwise.
    """
    arr = np.zeros((32, 64, 3), np.uint8)
    for (ys, xs), c in zip(_quadrant_slices(32, 64), QUADRANTS.values()):
        arr[ys, xs] = c
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = Path(folder) / (name or f"exif{orientation}.jpg")
    Image.fromarray(arr).save(path, quality=95, exif=exif)
    return path


def write_bomb(folder: Path, factor: float = 3.0, name: str | None = None) -> Path:
    """A 1-bit PNG of zeros with ``factor`` x Pillow's decompression-bomb pixel limit.

    Factor 1..2 is where Pillow only warns; above 2 it refuses. The rows compress to a few
    kilobytes and are streamed, so writing takes well under a second and little memory.
    """
    side = math.isqrt(int(factor * Image.MAX_IMAGE_PIXELS)) + 1
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(1)
    block = row * 1024
    parts = [comp.compress(block) for _ in range(side // 1024)]
    parts += [comp.compress(row * (side % 1024)), comp.flush()]
    path = Path(folder) / (name or f"bomb_{factor:g}x.png")
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )
    return path


def write_odd_valid(folder: Path) -> dict[str, Path]:
    """Every odd but valid input, by kind."""
    return {
        "cmyk": write_cmyk_jpeg(folder),
        "png16": write_png16(folder),
        "palette": write_palette_png(folder),
        "rgba": write_rgba_png(folder),
        "gray": write_gray(folder),
        "tiny": write_tiny(folder),
        "wide": write_wide(folder),
        "exif6": write_exif_rotated(folder, 6),
        "exif8": write_exif_rotated(folder, 8),
    }


def write_broken(folder: Path) -> dict[str, Path]:
    """Every input that must fail to decode, by kind (nothing over the bomb limit here)."""
    return {
        "truncated_jpeg": write_truncated_jpeg(folder),
        "truncated_png": write_truncated_png(folder),
        "empty": write_empty(folder),
        "text": write_text_as_image(folder),
        "missing": Path(folder) / "missing.png",
    }


def copy_skimage_photos(folder: Path) -> list[Path]:
    """Bundled scikit-image photographs (no download): four RGB and one gray, PNG and JPEG."""
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, ext in (
        ("astronaut", "png"),
        ("chelsea", "jpg"),
        ("coffee", "png"),
        ("rocket", "jpg"),
        ("camera", "png"),
    ):
        path = folder / f"{name}.{ext}"
        Image.fromarray(getattr(data, name)()).save(
            path, **({"quality": 92} if ext == "jpg" else {})
        )
        out.append(path)
    return out


def _quadrant_slices(h: int, w: int) -> list[tuple[slice, slice]]:
    top, bottom, left, right = (
        slice(0, h // 2),
        slice(h // 2, h),
        slice(0, w // 2),
        slice(w // 2, w),
    )
    return [(top, left), (top, right), (bottom, left), (bottom, right)]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )

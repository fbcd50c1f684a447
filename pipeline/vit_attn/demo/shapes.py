"""Procedural demo images: one object (disc, square, triangle or cross) on a cluttered background.

Used to train and to show the shipped demo ViT (``pipeline/vit_attn/demo/assets/demo_vit.*``, made by
``scripts/train_demo_model.py``) and by ``make demo``, which must work offline.

Every image is drawn from its own random stream ``numpy.random.default_rng([seed, index])``,
so image ``i`` does not depend on ``n`` and the same ``(seed, n, sizes)`` gives byte-identical
files. numpy and Pillow only (no torch).

Each image holds exactly one *object* of one of :data:`CLASSES`, drawn last in one flat colour
(no antialiasing), so its pixels are exactly the pixels of its mask. The background is a smooth
colour field, stripes or a gradient with pixel noise, plus clutter in other colours that is not a
class shape: thin lines and zig-zags, ring and arc outlines, elongated ellipses and small
irregular blobs. The object lies fully inside the centred square of side
``safe_frac * min(width, height)``: timm's eval transform (shorter side resized to
``floor(S / crop_pct)``, then a centre crop of ``S``) keeps the centred square of side
``min(width, height) * S / floor(S / crop_pct)`` (about 0.90 for ``crop_pct=0.9``), so with the
default ``safe_frac=0.86`` the crop never cuts the object, whatever the aspect ratio.

Layout written by :func:`generate` (``OUT`` is ``out_dir``)::

    OUT/images/img_00000.png   RGB images (what a recursive image source should list)
    OUT/masks/img_00000.png    object masks, mode "L", 255 = object, 0 = elsewhere, same size
    OUT/labels.csv             header ``path,label,class_name``; path relative to OUT/images

Command line: ``python -m vit_attn.demo.shapes OUT --n N --seed S``.
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASSES",
    "DEFAULT_SIZES",
    "RADIUS_FRAC",
    "DemoImage",
    "Sample",
    "generate",
    "main",
    "render",
    "render_index",
]

CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "cross")

# (width, height) pairs, as Pillow's ``Image.size``; about a third are not square.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64),
    (80, 80),
    (96, 96),
    (112, 112),
    (128, 128),
    (128, 96),
    (96, 128),
    (128, 80),
    (80, 128),
    (112, 80),
)

IMAGES_DIR = "images"
MASKS_DIR = "masks"
LABELS_FILE = "labels.csv"

# Object size: radius of the shape's reference circle, as a fraction of the safe square's side.
# At the demo model's 64 px input an object spans about 2-4 of its 8 px patches: big enough
# for a small ViT to tell the shapes apart, small enough (~12% of the area on average) that
# attention on it is far above chance.
RADIUS_FRAC: tuple[float, float] = (0.16, 0.27)
# Orientation: a multiple of 90 degrees plus a small tilt (squares stay squares, not diamonds).
_MAX_TILT_DEG = 12.0
_MIN_COLOR_DIST = 90.0  # RGB distance between the object and the background under it
_MIN_CLUTTER_DIST = 70.0  # RGB distance between the object and any clutter colour


@dataclass(frozen=True)
class Sample:
    """One drawn image in memory (see :func:`render`)."""

    image: Image.Image  # RGB
    mask: np.ndarray  # bool (height, width), True on the object's pixels
    label: int
    color: tuple[int, int, int]  # the object's flat RGB colour
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the mask, x1/y1 exclusive

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


@dataclass(frozen=True)
class DemoImage:
    """One generated file pair (see :func:`generate`)."""

    index: int
    path: Path  # OUT/images/<name>
    mask_path: Path  # OUT/masks/<name>
    name: str  # relative name, the same under images/ and masks/, and in labels.csv
    label: int
    class_name: str
    size: tuple[int, int]  # (width, height)
    color: tuple[int, int, int]
    bbox: tuple[int, int, int, int]


# ---------------------------------------------------------------------------------- drawing


def _rand_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _color_dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A float (h, w, 3) background in [0, 255]."""
    kind = rng.integers(3)
    if kind == 0:  # smooth colour noise: a small random grid upsampled
        gh, gw = rng.integers(2, 6, size=2)
        grid = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float64)
    elif kind == 1:  # stripes between two colours along a random direction
        c0, c1 = _rand_color(rng), _rand_color(rng)
        ang = rng.uniform(0, math.pi)
        period = rng.uniform(5, 20)
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (xx * math.cos(ang) + yy * math.sin(ang)) * (2 * math.pi / period)
        t = 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:  # hard stripes
            t = (t > 0.5).astype(np.float64)
        bg = c0 + (c1 - c0) * t[..., None]
    else:  # linear gradient
        c0, c1 = _rand_color(rng), _rand_color(rng)
        ang = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        p = xx * math.cos(ang) + yy * math.sin(ang)
        t = (p - p.min()) / max(float(p.max() - p.min()), 1e-6)
        bg = c0 + (c1 - c0) * t[..., None]
    bg = bg + rng.normal(0.0, rng.uniform(3, 14), size=(h, w, 1 if rng.random() < 0.5 else 3))
    return np.clip(bg, 0, 255)


def _clutter_color(rng: np.random.Generator, obj: np.ndarray) -> tuple[int, int, int]:
    for _ in range(20):
        c = _rand_color(rng)
        if _color_dist(c, obj) >= _MIN_CLUTTER_DIST:
            break
    return (int(c[0]), int(c[1]), int(c[2]))


def _draw_clutter(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    w: int,
    h: int,
    obj_color: np.ndarray,
    r_obj: float,
) -> None:
    """Distractors that are not class shapes, all smaller or thinner than the object."""
    # Clutter level varies per image: a quarter of the images are nearly clean, which also lets
    # a ViT trained from scratch get past its initial plateau (uniform attention at init).
    n = int(rng.integers(0, 3)) if rng.random() < 0.25 else int(rng.integers(4, 14))
    m = min(w, h)
    for _ in range(n):
        col = _clutter_color(rng, obj_color)
        kind = rng.integers(5)
        cx, cy = rng.uniform(-0.05 * w, 1.05 * w), rng.uniform(-0.05 * h, 1.05 * h)
        if kind == 0:  # straight line
            length = rng.uniform(0.15, 0.6) * m
            a = rng.uniform(0, math.pi)
            dx, dy = 0.5 * length * math.cos(a), 0.5 * length * math.sin(a)
            draw.line(
                [(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=col, width=int(rng.integers(1, 4))
            )
        elif kind == 1:  # zig-zag polyline
            k = int(rng.integers(3, 6))
            step = rng.uniform(0.05, 0.15) * m
            zig, a = [(cx, cy)], rng.uniform(0, 2 * math.pi)
            for _ in range(k):
                a += rng.uniform(-2.0, 2.0)
                zig.append((zig[-1][0] + step * math.cos(a), zig[-1][1] + step * math.sin(a)))
            draw.line(zig, fill=col, width=int(rng.integers(1, 3)))
        elif kind == 2:  # ring or arc outline (hollow, so not a disc)
            r = rng.uniform(0.04, 0.14) * m
            box = [cx - r, cy - r, cx + r, cy + r]
            wd = int(rng.integers(1, 3))
            if rng.random() < 0.5:
                draw.ellipse(box, outline=col, width=wd)
            else:
                s = rng.uniform(0, 360)
                draw.arc(box, s, s + rng.uniform(90, 270), fill=col, width=wd)
        elif kind == 3:  # elongated ellipse (aspect >= 2.5, so not a disc), rotated
            a_len = rng.uniform(0.05, 0.12) * m
            b_len = a_len / rng.uniform(2.5, 5.0)
            t = np.linspace(0, 2 * math.pi, 20, endpoint=False)
            ang = rng.uniform(0, math.pi)
            x, y = a_len * np.cos(t), b_len * np.sin(t)
            pts = np.stack(
                [
                    cx + x * math.cos(ang) - y * math.sin(ang),
                    cy + x * math.sin(ang) + y * math.cos(ang),
                ],
                1,
            )
            draw.polygon([tuple(p) for p in pts], fill=col)
        else:  # small irregular blob: a polygon with jagged radii, smaller than the object
            k = int(rng.integers(5, 10))
            t = np.sort(rng.uniform(0, 2 * math.pi, size=k))
            rad = rng.uniform(0.3, 1.0, size=k) * min(0.6 * r_obj, 0.08 * m)
            pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)
            draw.polygon([tuple(p) for p in pts], fill=col)


def _shape_polygon(label: int, r: float, ang: float) -> np.ndarray | None:
    """Vertices (k, 2) around the origin, or None for the disc."""
    if label == 0:
        return None
    if label == 1:  # square, half side 0.9 r
        a = 0.9 * r
        pts = np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    elif label == 2:  # equilateral triangle, circumradius 1.2 r
        t = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) - math.pi / 2
        pts = 1.2 * r * np.stack([np.cos(t), np.sin(t)], 1)
    else:  # plus-shaped cross, arm half length 1.05 r, arm half width 0.35 r
        L, hw = 1.05 * r, 0.35 * r
        pts = np.array(
            [
                [-hw, -L],
                [hw, -L],
                [hw, -hw],
                [L, -hw],
                [L, hw],
                [hw, hw],
                [hw, L],
                [-hw, L],
                [-hw, hw],
                [-L, hw],
                [-L, -hw],
                [-hw, -hw],
            ]
        )
    c, s = math.cos(ang), math.sin(ang)
    return pts @ np.array([[c, s], [-s, c]])


def render(
    rng: np.random.Generator,
    size: tuple[int, int],
    label: int | None = None,
    safe_frac: float = 0.86,
    radius_frac: tuple[float, float] = RADIUS_FRAC,
) -> Sample:
    """Draw one image of ``size`` = (width, height) from ``rng``."""
    w, h = int(size[0]), int(size[1])
    if label is None:
        label = int(rng.integers(len(CLASSES)))
    side = safe_frac * min(w, h)
    x_lo, y_lo = (w - side) / 2, (h - side) / 2

    # Object geometry first (the clutter needs its size), placed fully inside the safe square.
    r = rng.uniform(*radius_frac) * side
    ang = math.pi / 2 * int(rng.integers(4)) + math.radians(
        rng.uniform(-_MAX_TILT_DEG, _MAX_TILT_DEG)
    )
    poly = _shape_polygon(label, r, ang)
    ext_x = ext_y = r
    if poly is not None:
        ext_x, ext_y = float(np.abs(poly[:, 0]).max()), float(np.abs(poly[:, 1]).max())
    cx = rng.uniform(x_lo + ext_x + 1, x_lo + side - ext_x - 1)
    cy = rng.uniform(y_lo + ext_y + 1, y_lo + side - ext_y - 1)

    bg = _background(rng, w, h)

    # Object colour: far enough from the background under the object.
    x0, x1 = int(max(cx - ext_x, 0)), int(min(cx + ext_x + 1, w))
    y0, y1 = int(max(cy - ext_y, 0)), int(min(cy + ext_y + 1, h))
    under = bg[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(30):
        c = _rand_color(rng)
        c = _rand_color(rng)
        d = _color_dist(c, under)
        if d > best_d:
            best, best_d = c, d
        if d >= _MIN_COLOR_DIST:
            break
    assert best is not None  # distances are >= 0 > best_d's start
    obj_color = best

    img = Image.fromarray(bg.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    _draw_clutter(draw, rng, w, h, obj_color, r)

    color = (int(obj_color[0]), int(obj_color[1]), int(obj_color[2]))
    mask_img = Image.new("L", (w, h), 0)
    mdraw = ImageDraw.Draw(mask_img)
    if poly is None:
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=color)
        mdraw.ellipse(box, fill=255)
    else:
        pts = [tuple(p) for p in (poly + np.array([cx, cy]))]
        draw.polygon(pts, fill=color)
        mdraw.polygon(pts, fill=255)
    mask = np.asarray(mask_img) > 0
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Sample(image=img, mask=mask, label=label, color=color, bbox=bbox)


def render_index(
    seed: int,
    index: int,
    sizes=DEFAULT_SIZES,
    safe_frac: float = 0.86,
    radius_frac: tuple[float, float] = RADIUS_FRAC,
) -> Sample:
    """Image ``index`` of the stream ``seed``: the same one :func:`generate` writes."""
    rng = np.random.default_rng([int(seed), int(index)])
    size = sizes[int(rng.integers(len(sizes)))]
    return render(rng, size, safe_frac=safe_frac, radius_frac=radius_frac)


# ---------------------------------------------------------------------------------- files


def generate(
    out_dir: Path, n: int, seed: int, sizes=DEFAULT_SIZES, safe_frac: float = 0.86
) -> list[DemoImage]:
    """Write ``n`` images, their masks and ``labels.csv`` under ``out_dir`` (layout above).

    ``sizes`` holds (width, height) pairs; each image picks one at random.
    """
    out_dir = Path(out_dir)
    img_dir, mask_dir = out_dir / IMAGES_DIR, out_dir / MASKS_DIR
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    sizes = tuple(tuple(int(v) for v in s) for s in sizes)
    width = max(5, len(str(max(n - 1, 0))))
    items: list[DemoImage] = []
    for i in range(n):
        s = render_index(seed, i, sizes, safe_frac)
        name = f"img_{i:0{width}d}.png"
        ipath, mpath = img_dir / name, mask_dir / name
        # Fixed PNG settings and no metadata: byte-identical for the same inputs.
        s.image.save(ipath, format="PNG", compress_level=6)
        Image.fromarray(s.mask.astype(np.uint8) * 255, "L").save(
            mpath, format="PNG", compress_level=6
        )
        items.append(
            DemoImage(
                index=i,
                path=ipath,
                mask_path=mpath,
                name=name,
                label=s.label,
                class_name=s.class_name,
                size=s.image.size,
                color=s.color,
                bbox=s.bbox,
            )
        )
    with open(out_dir / LABELS_FILE, "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["path", "label", "class_name"])
        for it in items:
            wr.writerow([it.name, it.label, it.class_name])
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vit_attn.demo.shapes",
        description="Write procedural demo images, masks and labels.csv.",
    )
    p.add_argument("out", type=Path, help="output folder (images/, masks/, labels.csv)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    items = generate(a.out, a.n, a.seed)
    print(
        f"wrote {len(items)} images to {a.out / IMAGES_DIR}, masks to {a.out / MASKS_DIR}, "
        f"labels to {a.out / LABELS_FILE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Attention overlays: colormaps, bilinear upsampling, blending and per-head grids.

Pure numpy + Pillow (matplotlib only for its colormap tables, imported lazily), so the
function that runs per batch in the hot path (`blend`) has no torch dependency and no
per-image Python loop.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vit_attn.errors import ConfigError
from vit_attn.pngencode import encode_png

# How `normalize_maps` turns values into colour levels (low level; `vit-attn show --normalize`
# picks among the user-facing scales in render.NORMALIZE_MODES, built on these).
MAP_SCALINGS = ("per_map", "none", "range")


@functools.lru_cache(maxsize=32)
def colormap_lut(name: str = "inferno") -> np.ndarray:
    """The matplotlib colormap `name` as a read-only [256, 3] uint8 table (cached).

    A table lookup is the cheapest way to colour a map per pixel; matplotlib is imported
    here, not at module import, so workers that never colour anything do not pay for it.
    """
    from matplotlib import colormaps

    try:
        cmap = colormaps[name]
    except KeyError:
        raise ConfigError(
            f"unknown colormap {name!r}; use a matplotlib name such as "
            "'inferno', 'viridis', 'magma', 'jet' or 'gray'"
        ) from None
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    lut = np.round(rgba[:, :3] * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


@functools.lru_cache(maxsize=64)
def interp_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D linear interpolation with half-pixel centres as two taps per output pixel.

    Same convention as torch's `F.interpolate(mode="bilinear", align_corners=False)`:
    output pixel i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0, so
    ``out[i] = x[i0[i]] * w0[i] + x[i1[i]] * w1[i]`` (int64 indices, float32 weights).

    Written out as two products and one sum (not a matrix product, whose rounding depends on
    the BLAS kernel), so the exported graph (`vit_attn.overlay_graph`), which does the same
    float32 operations, gives the same bits and hence the same colour levels.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    taps = (i0, i1, (1.0 - w1).astype(np.float32), w1.astype(np.float32))
    for a in taps:
        a.flags.writeable = False
    return taps


def _interp_axis(maps: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    i0, i1, w0, w1 = interp_taps(maps.shape[axis], n_out)
    shape = [1] * maps.ndim
    shape[axis] = n_out
    out = np.take(maps, i0, axis=axis)
    out *= w0.reshape(shape)
    right = np.take(maps, i1, axis=axis)
    right *= w1.reshape(shape)
    out += right
    return out


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize maps [..., gh, gw] to [..., H, W] (float32), row-major as stored.

    Patch (r, c) lands on the pixel block rows r*H/gh.., cols c*W/gw..: no transpose, no
    flip. Separable: columns first, then rows, each output value two products and a sum
    (`interp_taps`), the same float32 steps as the exported graph's overlays.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim < 2:
        raise ValueError(f"maps must have at least 2 dims [..., gh, gw], got shape {maps.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return _interp_axis(_interp_axis(maps, out_w, -1), out_h, -2)


def normalize_maps(
    maps: np.ndarray,
    mode: str = "per_map",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Scale maps [..., gh, gw] to [0, 1] (float32) so one colormap fits them all.

    Modes: "per_map" (each map's own min..max; constant maps become 0), "none" (values are
    already probabilities: clip to [0, 1]), "range" (the explicit `vmin`..`vmax`, e.g. a
    dataset-wide scale so maps stay comparable across images).
    """
    if mode not in MAP_SCALINGS:
        raise ConfigError(f"normalize mode must be one of {MAP_SCALINGS}, got {mode!r}")
    if mode != "range" and (vmin is not None or vmax is not None):
        raise ConfigError("vmin/vmax are only used with normalize mode 'range'")
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "none":
        return np.clip(maps, 0.0, 1.0)
    if mode == "range":
        if vmin is None or vmax is None or not vmax > vmin:
            raise ConfigError(f"normalize mode 'range' needs vmin < vmax, got {vmin}, {vmax}")
        return np.clip((maps - np.float32(vmin)) / np.float32(vmax - vmin), 0.0, 1.0)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    scale = np.divide(1.0, span, out=np.zeros_like(span), where=span > 0)
    return (maps - lo) * scale


def alpha_weight(alpha: float) -> int:
    """The blend weight of the colour in 1/256 steps (8.8 fixed point): round(alpha * 256)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    return int(round(alpha * 256))


def blend(
    images_u8: np.ndarray,
    maps: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "inferno",
    normalize: str = "per_map",
    *,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Colour maps [B, gh, gw] and alpha-blend them onto images [B, H, W, 3] uint8.

    Normalisation runs at grid resolution (bilinear weights are convex, so it commutes with
    upsampling) and the blend is 8.8 fixed-point integer arithmetic: the per-batch cost is
    the separable upsampling, one table gather and a few uint16 passes. alpha=0 returns the
    images. The exported graph makes the same bytes (`vit_attn.overlay_graph`); the pipeline
    blends here only for graphs without overlay outputs.
    """
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [B, H, W, 3], got {images_u8.dtype} {images_u8.shape}"
        )
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != images_u8.shape[0]:
        raise ValueError(f"maps must be [B, gh, gw] with B={images_u8.shape[0]}, got {maps.shape}")
    a8 = alpha_weight(alpha)
    if a8 == 0:
        return images_u8.copy()
    table = _weighted_lut(cmap, a8)  # first: an unknown colormap fails before any work
    height, width = images_u8.shape[1:3]
    # Scale to LUT indices before upsampling and add the rounding offset there: interpolation
    # rows sum to 1, so values stay in [0.5, 255.5] and the truncating cast rounds.
    levels = normalize_maps(maps, normalize, vmin=vmin, vmax=vmax) * np.float32(255.0)
    levels += np.float32(0.5)
    index = upsample_maps(levels, (height, width)).astype(np.uint8)
    # np.take with axis=0 is several times faster than fancy indexing `table[index]`.
    colour = np.take(table, index, axis=0)  # [B, H, W, 3] uint16
    out = images_u8.astype(np.uint16)
    out *= np.uint16(256 - a8)
    out += colour
    out >>= 8
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _weighted_lut(cmap: str, a8: int) -> np.ndarray:
    """The colour table times the blend weight plus the rounding half (uint16), so a pixel
    costs one gather and one add."""
    table = colormap_lut(cmap).astype(np.uint16) * np.uint16(a8) + np.uint16(128)
    table.flags.writeable = False
    return table


def head_grid(
    image_u8: np.ndarray,
    maps: np.ndarray,
    alpha: float = 0.5,
    cmap: str = "inferno",
    ncols: int | None = None,
    titles: bool = True,
    *,
    border: int = 2,
    normalize: str = "per_map",
    mean: np.ndarray | None = None,
) -> np.ndarray:
    """One image with each head's map overlaid, tiled: first the head mean, then h0, h1, ...

    For looking at what each head does side by side; tiles are separated (and framed) by a
    `border`-pixel white line and labelled "mean", "h0", ... with Pillow's default font.
    `mean` is the first tile's map when the caller scaled each head by its own scale: the
    mean of scaled maps is not the mean map on the mean scale.
    """
    image_u8 = np.asarray(image_u8)
    if image_u8.dtype != np.uint8 or image_u8.ndim != 3 or image_u8.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image_u8.dtype} {image_u8.shape}")
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [num_heads, gh, gw], got shape {maps.shape}")
    first = maps.mean(axis=0) if mean is None else np.asarray(mean, dtype=np.float32)
    tiles_maps = np.concatenate([first[None], maps], axis=0)
    n = tiles_maps.shape[0]
    tiles = blend(
        np.broadcast_to(image_u8, (n, *image_u8.shape)), tiles_maps, alpha, cmap, normalize
    )
    return tile_grid(tiles, head_labels(maps.shape[0]), ncols, titles, border=border)


def head_labels(num_heads: int) -> list[str]:
    """The tile labels of `head_grid`: "mean", "h0", "h1", ..."""
    return ["mean"] + [f"h{i}" for i in range(num_heads)]


def tile_grid(
    tiles: np.ndarray,
    labels: list[str],
    ncols: int | None = None,
    titles: bool = True,
    *,
    border: int = 2,
) -> np.ndarray:
    """Tiles [n, H, W, 3] uint8 side by side, `head_grid`'s layout: framed by `border` white
    pixels, each labelled in its top-left corner; for overlays already blended (the graph's)."""
    n = tiles.shape[0]
    ncols = int(ncols) if ncols else math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    nrows = math.ceil(n / ncols)
    h, w = tiles.shape[1:3]
    grid = np.full(
        (nrows * h + (nrows + 1) * border, ncols * w + (ncols + 1) * border, 3), 255, np.uint8
    )
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        y0, x0 = border + r * (h + border), border + c * (w + border)
        grid[y0 : y0 + h, x0 : x0 + w] = tile
    if titles:
        grid = _label_tiles(grid, labels, ncols, h, w, border)
    return grid


def _label_tiles(
    grid: np.ndarray, labels: list[str], ncols: int, h: int, w: int, border: int
) -> np.ndarray:
    """Draw each label on a dark box in its tile's top-left corner (readable on any map).

    The boxes are opaque, so what they hold does not depend on the tiles: they are drawn once
    per layout (`_label_boxes`) and copied into every grid (a run writes one grid per image).
    """
    for rows, cols, pixels in _label_boxes(tuple(labels), ncols, h, w, border, grid.shape):
        grid[rows, cols] = pixels
    return grid


@functools.lru_cache(maxsize=16)
def _label_boxes(
    labels: tuple[str, ...], ncols: int, h: int, w: int, border: int, shape: tuple[int, ...]
) -> list[tuple[slice, slice, np.ndarray]]:
    """Each label's box as drawn by Pillow's default font: (rows, cols, pixels), in order."""
    canvas = Image.new("RGB", (shape[1], shape[0]))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    boxes = []
    for i, label in enumerate(labels):
        r, c = divmod(i, ncols)
        x0, y0 = border + c * (w + border) + 2, border + r * (h + border) + 2
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        box = (left - 2, top - 2, right + 2, bottom + 2)  # inclusive corners, as Pillow draws
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x0, y0), label, fill=(255, 255, 255), font=font)
        rows = slice(max(0, int(box[1])), min(shape[0], int(box[3]) + 1))
        cols = slice(max(0, int(box[0])), min(shape[1], int(box[2]) + 1))
        boxes.append((rows, cols))
    pixels = np.asarray(canvas)
    stamped = []
    for rows, cols in boxes:  # copied after all are drawn: a later box may cover an earlier one
        patch = pixels[rows, cols].copy()
        patch.flags.writeable = False
        stamped.append((rows, cols, patch))
    return stamped


def save_png(array_u8: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write an RGB [H, W, 3] or grey [H, W] uint8 array as PNG, creating parent folders."""
    data = encode_png(array_u8)  # raises ValueError on anything but uint8 grey/RGB/RGBA
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path

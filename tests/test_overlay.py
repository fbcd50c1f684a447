"""Overlays: upsampling against torch's bilinear, orientation on non-square grids, blending."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from vit_attn.errors import ConfigError
from vit_attn.overlay import (
    blend,
    colormap_lut,
    head_grid,
    head_labels,
    normalize_maps,
    save_png,
    tile_grid,
    upsample_maps,
)

torch = pytest.importorskip("torch")


def _torch_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Independent reference: F.interpolate bilinear, align_corners=False, in float64."""
    lead = maps.shape[:-2]
    t = torch.from_numpy(maps.reshape(-1, 1, *maps.shape[-2:]).astype(np.float64))
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out.numpy().reshape(*lead, *size)


@pytest.mark.parametrize(
    ("grid", "size"),
    [
        ((14, 14), (224, 224)),
        ((4, 6), (64, 96)),  # non-square, integer patch size 16
        ((3, 5), (7, 11)),  # non-integer scale factors
        ((10, 12), (4, 5)),  # downsampling uses the same formula
        ((1, 7), (16, 112)),  # a single row
    ],
)
def test_upsample_matches_torch_bilinear(grid: tuple[int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 3, *grid))
    got = upsample_maps(maps, size)
    assert got.dtype == np.float32
    assert got.shape == (2, 3, *size)
    np.testing.assert_allclose(got, _torch_bilinear(maps, size), rtol=0, atol=1e-5)


def test_upsample_keeps_patch_positions_on_non_square_grid() -> None:
    gh, gw, p = 3, 5, 16
    eye = np.zeros((gh * gw, gh, gw), dtype=np.float32)
    for i in range(gh * gw):
        eye[i, i // gw, i % gw] = 1.0  # row-major, as cls_attention is stored
    up = upsample_maps(eye, (gh * p, gw * p))
    for i in range(gh * gw):
        r, c = divmod(i, gw)
        y, x = np.unravel_index(np.argmax(up[i]), up[i].shape)
        assert r * p <= y < (r + 1) * p and c * p <= x < (c + 1) * p, (r, c, y, x)
        block = up[i, r * p : (r + 1) * p, c * p : (c + 1) * p]
        # the block holds most of the mass and its centre pixels are the patch value
        assert block.sum() > 0.5 * up[i].sum()
        assert block[p // 2 - 1 : p // 2 + 1, p // 2 - 1 : p // 2 + 1].min() > 0.9


def test_normalize_modes() -> None:
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(4, 3, 5)).astype(np.float32)
    maps[2] = 7.0  # constant map
    out = normalize_maps(maps)
    assert out.dtype == np.float32
    for i in (0, 1, 3):
        assert out[i].min() == 0.0 and out[i].max() == pytest.approx(1.0)
    assert not out[2].any()
    np.testing.assert_array_equal(normalize_maps(maps, "none"), np.clip(maps, 0, 1))
    ranged = normalize_maps(maps, "range", vmin=-1.0, vmax=1.0)
    np.testing.assert_allclose(ranged, np.clip((maps + 1) / 2, 0, 1), atol=1e-7)
    with pytest.raises(ConfigError):
        normalize_maps(maps, "bogus")
    with pytest.raises(ConfigError):
        normalize_maps(maps, vmin=0.0, vmax=1.0)  # per_map ignores a range: refuse
    with pytest.raises(ConfigError):
        normalize_maps(maps, "range", vmin=1.0, vmax=1.0)


def test_colormap_lut() -> None:
    from matplotlib import colormaps

    lut = colormap_lut("viridis")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[-1], np.round(np.array(colormaps["viridis"](1.0)[:3]) * 255))
    assert colormap_lut("viridis") is lut  # cached
    with pytest.raises(ConfigError, match="unknown colormap"):
        colormap_lut("no-such-map")


def test_blend_shapes_alpha_and_colours() -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(3, 32, 48, 3), dtype=np.uint8)
    maps = rng.random((3, 2, 3)).astype(np.float32)

    out = blend(images, maps, alpha=0.4)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(blend(images, maps, alpha=0.0), images)

    # alpha=1 is the colormap alone; compare with an independent float64 path
    lut = colormap_lut("inferno")
    norm = normalize_maps(maps)
    index = np.clip(np.rint(_torch_bilinear(norm.astype(np.float64), (32, 48)) * 255), 0, 255)
    want = lut[index.astype(np.uint8)]
    got = blend(images, maps, alpha=1.0)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 3  # 1 LUT step at most
    assert (got == want).all(axis=-1).mean() > 0.99

    # alpha=0.5 is the rounded mean of image and colour
    half = blend(images, maps, alpha=0.5).astype(int)
    ref = (images.astype(int) + got.astype(int)) / 2
    assert np.abs(half - ref).max() <= 1


def test_blend_rejects_bad_input() -> None:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        blend(images.astype(np.float32), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        blend(images, np.zeros((3, 2, 2)))
    with pytest.raises(ConfigError):
        blend(images, np.zeros((2, 2, 2)), alpha=1.5)


def test_head_grid_layout_and_labels(tmp_path) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    maps = rng.random((3, 2, 3)).astype(np.float32)
    border = 2
    plain = head_grid(image, maps, alpha=0.5, titles=False)  # 4 tiles -> 2 x 2
    assert plain.dtype == np.uint8
    assert plain.shape == (2 * 32 + 3 * border, 2 * 48 + 3 * border, 3)
    mean_tile = blend(image[None], maps.mean(axis=0)[None], 0.5)[0]
    np.testing.assert_array_equal(plain[border : border + 32, border : border + 48], mean_tile)
    head2 = blend(image[None], maps[2:3], 0.5)[0]
    y0, x0 = border + 32 + border, border + 48 + border
    np.testing.assert_array_equal(plain[y0 : y0 + 32, x0 : x0 + 48], head2)
    assert (plain[:border] == 255).all() and (plain[:, 48 + border : 48 + 2 * border] == 255).all()

    labelled = head_grid(image, maps, alpha=0.5)
    assert labelled.shape == plain.shape
    assert (labelled != plain).any()

    row = head_grid(image, maps, ncols=4, titles=False)
    assert row.shape == (32 + 2 * border, 4 * 48 + 5 * border, 3)

    path = save_png(labelled, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), labelled)


def _labelled_by_pillow(plain: np.ndarray, labels, ncols: int, h: int, w: int, border: int):
    """Reference: each label drawn by Pillow onto the grid itself, box then text, in order."""
    canvas = Image.fromarray(plain)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, label in enumerate(labels):
        r, c = divmod(i, ncols)
        x0, y0 = border + c * (w + border) + 2, border + r * (h + border) + 2
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
        draw.text((x0, y0), label, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


@pytest.mark.parametrize(
    ("n", "h", "w", "ncols", "border"),
    [
        (4, 224, 224, None, 2),  # a run's grid: mean + 3 heads
        (13, 32, 48, None, 2),  # mean + 12 heads, a ragged last row
        (7, 6, 9, 3, 0),  # tiles smaller than a label: boxes overlap and leave the grid
        (17, 20, 14, 5, 1),  # labels "h10".. wider than a tile
    ],
)
def test_labels_are_pillows_on_every_grid(n, h, w, ncols, border) -> None:
    # Labels are stamped from a cache drawn once per layout; every grid must get exactly the
    # pixels Pillow draws on it, whatever its tiles hold (two different tile sets).
    rng = np.random.default_rng(n)
    labels = head_labels(n - 1)
    for _ in range(2):
        tiles = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        plain = tile_grid(tiles, labels, ncols, titles=False, border=border)
        cols = ncols or int(np.ceil(np.sqrt(n)))
        expected = _labelled_by_pillow(plain, labels, cols, h, w, border)
        got = tile_grid(tiles, labels, ncols, border=border)
        np.testing.assert_array_equal(got, expected)
        assert (got != plain).any()

"""The PNG encoder against Pillow's decoder: every pixel back, the text chunks read, bad input
refused before a file exists."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zlib

import numpy as np
import pytest
from PIL import Image

from vit_attn import pngencode
from vit_attn.outputs import PNG_DIGEST, PNG_MARKER, PNG_PLACE, is_ours, write_png
from vit_attn.pngencode import encode_png

DEFAULT_DEFLATE = pngencode.DEFLATE  # before any fixture changes it


@pytest.fixture(autouse=True, params=["isal", "zlib"])
def deflate(request, monkeypatch) -> str:
    """Every test runs with both deflate back ends (ISA-L, and zlib where isal is missing)."""
    if request.param == "isal" and pngencode.isal_zlib is None:
        pytest.skip("isal is not installed")
    monkeypatch.setattr(pngencode, "DEFLATE", request.param)
    return request.param


def _decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()  # reads the CRCs and the whole IDAT: a corrupt stream raises here
    return im


@pytest.mark.parametrize(
    "shape", [(1, 1), (7, 5), (64, 48), (1, 9, 3), (5, 1, 3), (454, 454, 3), (33, 17, 4)]
)
def test_every_pixel_comes_back(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels.flat[::7] = 255  # both ends of the range, so the Up filter wraps modulo 256
    pixels.flat[3::11] = 0
    im = _decoded(encode_png(pixels))
    assert im.format == "PNG" and im.size == (shape[1], shape[0])
    assert im.mode == {2: "L", 3: "RGB", 4: "RGBA"}[len(shape) if len(shape) == 2 else shape[2]]
    np.testing.assert_array_equal(np.asarray(im), pixels)


def test_a_strided_view_is_encoded_as_its_values() -> None:
    base = np.arange(40 * 30 * 3, dtype=np.uint32).reshape(40, 30, 3).astype(np.uint8)
    view = base[::2, ::-1]  # not contiguous
    np.testing.assert_array_equal(np.asarray(_decoded(encode_png(view))), view)


def test_text_chunks_latin1_and_beyond() -> None:
    pixels = np.zeros((4, 4, 3), np.uint8)
    text = {PNG_MARKER: "photos/été/ünïcode ✓ 猫.jpg", "plain": "a/b c.png"}
    im = _decoded(encode_png(pixels, text))
    assert im.text == text


def test_a_photographic_picture_is_no_larger_than_pillows() -> None:
    # Photographs (what overlays are made of): a gradient with sensor-like noise. On flat,
    # synthetic content Pillow's per-row filter search compresses further; not on these.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:224, 0:224]
    photo = np.stack([x, y, (x + y) // 2], -1) + rng.normal(0, 4, (224, 224, 3))
    photo = photo.clip(0, 255).astype(np.uint8)
    data = encode_png(photo)
    pillow = io.BytesIO()
    Image.fromarray(photo).save(pillow, format="PNG", compress_level=1)
    assert len(data) <= len(pillow.getvalue())
    assert len(data) < 0.8 * len(zlib.compress(photo.tobytes(), 1))  # the filter pays


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
    ],
)
def test_bad_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8|channels"):
        encode_png(bad)


def test_bad_text_key_is_refused() -> None:
    with pytest.raises(ValueError, match="text key"):
        encode_png(np.zeros((2, 2), np.uint8), {"": "x"})


def test_isal_is_the_default_where_installed(deflate: str) -> None:
    # A dependency of the package: a broken install would silently cost 4x in PNG encoding.
    assert DEFAULT_DEFLATE == "isal"


def test_write_png_marks_the_file_and_refuses_bad_input_before_any_file(tmp_path) -> None:
    out = tmp_path / "out"
    target = out / "sub" / "a.png"
    pixels = np.full((8, 8, 3), 200, np.uint8)
    write_png(pixels, target, out, "a.jpg")
    text = Image.open(target).text
    assert is_ours(target, out) and text[PNG_MARKER] == "a.jpg"
    assert text[PNG_PLACE] == os.path.join("sub", "a.png")
    idat = target.read_bytes()
    start = idat.index(b"IDAT") + 4
    length = int.from_bytes(idat[start - 8 : start - 4], "big")
    assert text[PNG_DIGEST] == hashlib.sha256(idat[start : start + length]).hexdigest()
    with pytest.raises(ValueError):
        write_png(pixels.astype(np.float64), out / "b.png", out, "b")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.png"]


def test_is_ours_only_for_the_tools_png_at_its_place_and_unchanged(tmp_path) -> None:
    # Deletion and replacement trust this: a user's copy of an overlay elsewhere in png_dir,
    # a renamed one, or one edited and saved with its text kept, is the user's file.
    from PIL import PngImagePlugin

    target = tmp_path / "a.png"
    write_png(np.full((64, 64, 3), 7, np.uint8), target, tmp_path, "a.jpg")
    assert is_ours(target, tmp_path)
    assert not is_ours(target, tmp_path / "elsewhere")  # recorded place a.png, here ../a.png
    (tmp_path / "copies").mkdir()
    for copy in (tmp_path / "copies" / "a.png", tmp_path / "a_copy.png"):
        shutil.copyfile(target, copy)
        assert not is_ours(copy, tmp_path)
    with Image.open(target) as im:  # edited, saved with every text chunk kept
        info = PngImagePlugin.PngInfo()
        for key, value in im.text.items():
            info.add_text(key, value)
        edited = im.convert("RGB")
    edited.putpixel((0, 0), (255, 0, 0))
    edited.save(tmp_path / "b.png", pnginfo=info)
    os.replace(tmp_path / "b.png", target)
    assert PNG_DIGEST in Image.open(target).text and not is_ours(target, tmp_path)
    # Only the marker (an earlier version, another writer): not enough.
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_MARKER, "b.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "c.png", pnginfo=info)
    assert not is_ours(tmp_path / "c.png", tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "d.png")
    assert not is_ours(tmp_path / "d.png", tmp_path)
    (tmp_path / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\xff" * 40)
    assert not is_ours(tmp_path / "e.png", tmp_path)
    assert not is_ours(tmp_path / "missing.png", tmp_path)


def test_is_ours_reads_no_further_than_the_pixels_and_takes_a_cut_file_at_its_place(
    tmp_path,
) -> None:
    # A file cut inside its pixel data (the disk lost the end of a write) holds no picture:
    # it is ours where its record says it lies, so a resume replaces it.
    target = tmp_path / "a.png"
    write_png(np.full((64, 64, 3), 7, np.uint8), target, tmp_path, "a.jpg")
    data = target.read_bytes()
    idat = data.index(b"IDAT")
    target.write_bytes(data[: idat + 8])
    with pytest.raises(OSError):
        Image.open(target).load()
    assert is_ours(target, tmp_path)
    moved = tmp_path / "moved.png"
    os.replace(target, moved)
    assert not is_ours(moved, tmp_path)

"""The PNG encoder against Pillow's decoder: every pixel back, the text chunks read, bad input
refused before a file exists."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from vit_attn import pngencode
from vit_attn.outputs import PNG_MARKER, is_ours, write_png
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
    target = tmp_path / "out" / "a.png"
    pixels = np.full((8, 8, 3), 200, np.uint8)
    write_png(pixels, target, tmp_path / "out", "a.jpg")
    assert is_ours(target) and Image.open(target).text == {PNG_MARKER: "a.jpg"}
    with pytest.raises(ValueError):
        write_png(pixels.astype(np.float64), tmp_path / "out" / "b.png", tmp_path / "out", "b")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_is_ours_reads_the_marker_without_decoding_the_pixels(tmp_path) -> None:
    # A rerun checks every PNG it may replace; decoding each one cost ~2 ms per PNG of
    # start-up. The marker precedes the pixels: a file cut inside its image data is still
    # recognised (and so replaced), which it could not be if the pixels were read.
    target = tmp_path / "a.png"
    write_png(np.full((64, 64, 3), 7, np.uint8), target, tmp_path, "a.jpg")
    data = target.read_bytes()
    idat = data.index(b"IDAT")
    target.write_bytes(data[: idat + 8])
    with pytest.raises(OSError):
        Image.open(target).load()
    assert is_ours(target)
    # A PNG whose text follows its pixels (another writer) is still read to the end.
    other = tmp_path / "b.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_MARKER, "b.jpg")
    Image.new("RGB", (4, 4)).save(other, pnginfo=info)
    assert is_ours(other)
    Image.new("RGB", (4, 4)).save(tmp_path / "c.png")
    assert not is_ours(tmp_path / "c.png")

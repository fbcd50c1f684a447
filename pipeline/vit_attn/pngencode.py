"""PNG bytes for the pictures a run writes, at a fraction of Pillow's encoding cost.

Pillow picks a filter for every row by trying all five and compresses with deflate's default
strategy: on a 454x454 head grid that is ~24 ms of CPU, more than vit_tiny's inference per
image. Overlays are photographs blended with smooth colour maps, and one fixed filter ("Up":
each row minus the row above, computed by numpy for the whole picture) followed by zlib's
run-length strategy at level 1 encodes the same grid in ~5 ms and to a smaller file. Deflate
itself is then most of the cost, so it runs in ISA-L (the `isal` package: Intel's deflate,
zlib-format output, ~4x faster than zlib at the same size) where that is installed, in zlib
otherwise (docs/PERFORMANCE.md, "PNG encoding"). On flat synthetic pictures (a colour map alone, no
photograph) Pillow's filter search compresses several times further; runs write overlays,
and the viewer's pictures are sent, not kept. The container is the standard one (IHDR, tEXt/iTXt,
one IDAT, IEND); any PNG reader opens it, and the tests read it back with Pillow.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

import numpy as np

try:  # a dependency on every platform with wheels; zlib keeps the encoder working elsewhere
    from isal import isal_zlib
except ImportError:  # pragma: no cover - exercised by forcing DEFLATE = "zlib" in the tests
    isal_zlib = None  # type: ignore[assignment]

# Which deflate `encode_png` uses: "isal" when it can be imported, else "zlib". Both write the
# standard zlib stream PNG wants; only speed and (by a few percent) size differ.
DEFLATE = "isal" if isal_zlib is not None else "zlib"

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
_FILTER_UP = 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    keyword = key.encode("latin-1")
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        raise ValueError(f"PNG text key {key!r} must be 1-79 Latin-1 characters")
    try:
        return _chunk(b"tEXt", keyword + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # an image name beyond Latin-1: international text, UTF-8
        return _chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def _deflate(data: memoryview) -> bytes:
    """The IDAT stream: ISA-L's level 1, or zlib's run-length strategy at level 1 (the two
    fastest settings that still compress filtered overlays; their sizes are within ~1%)."""
    if DEFLATE == "isal" and isal_zlib is not None:
        return isal_zlib.compress(data, 1)
    deflate = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    return deflate.compress(data) + deflate.flush()


def encode_png(pixels: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
    """One 8-bit PNG of a uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` array, with text chunks."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or a.size == 0:
        raise ValueError(
            f"expected a non-empty uint8 [H, W] or [H, W, C] array, got {a.dtype} {a.shape}"
        )
    channels = 1 if a.ndim == 2 else a.shape[2]
    if channels not in _COLOUR_TYPE:
        raise ValueError(f"a PNG holds 1, 3 or 4 channels, not {channels}")
    height, width = a.shape[:2]
    rows = a.reshape(height, width * channels)
    scan = np.empty((height, width * channels + 1), np.uint8)
    scan[:, 0] = _FILTER_UP
    scan[0, 1:] = rows[0]  # the row above the first is zero
    np.subtract(rows[1:], rows[:-1], out=scan[1:, 1:])  # uint8 wraps modulo 256, as PNG wants
    idat = _deflate(scan.data)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPE[channels], 0, 0, 0)
    parts = [SIGNATURE, _chunk(b"IHDR", header)]
    parts += [_text_chunk(k, v) for k, v in (text or {}).items()]
    parts += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    return b"".join(parts)

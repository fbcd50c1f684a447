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

import hashlib
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

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


def encode_png(
    pixels: np.ndarray, text: Mapping[str, str] | None = None, digest_key: str | None = None
) -> bytes:
    """One 8-bit PNG of a uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` array, with text chunks.

    With `digest_key`, one more text chunk holds the sha256 of the pixel data (the IDAT
    stream), so that `read_png_record` can tell the pixels are still the ones written."""
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
    if digest_key is not None:
        parts.append(_text_chunk(digest_key, hashlib.sha256(idat).hexdigest()))
    parts += [_chunk(b"IDAT", idat), _chunk(b"IEND", b"")]
    return b"".join(parts)


# A text chunk larger than this is not one of ours: reading stops there.
_MAX_TEXT_CHUNK = 1 << 20


@dataclass(frozen=True)
class PngRecord:
    """What `read_png_record` finds: the text chunks before the pixels, and whether the
    pixel data is whole and has the digest its `digest_key` chunk records."""

    text: dict[str, str]
    digest_matches: bool
    truncated: bool


def read_png_record(path: str | os.PathLike[str], digest_key: str) -> PngRecord | None:
    """The text chunks a PNG carries before its pixel data, and the check of that data
    against the digest recorded under `digest_key` (hashed as read, never decoded).

    None when the file is not a PNG or cannot be read. A PNG without `digest_key` before its
    pixels is read no further than its first IDAT chunk."""
    text: dict[str, str] = {}
    digest = hashlib.sha256()
    seen_pixels = False
    try:
        with open(path, "rb") as f:
            if f.read(len(SIGNATURE)) != SIGNATURE:
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    break  # no IEND: cut short
                length, kind = struct.unpack(">I", head[:4])[0], head[4:]
                if kind == b"IDAT":
                    if digest_key not in text:
                        return PngRecord(text, False, False)
                    seen_pixels = True
                    left = length
                    while left:
                        block = f.read(min(left, 1 << 20))
                        if not block:
                            return PngRecord(text, False, True)
                        digest.update(block)
                        left -= len(block)
                    f.seek(4, os.SEEK_CUR)  # the CRC
                    continue
                if kind == b"IEND":
                    break
                if kind in (b"tEXt", b"iTXt") and not seen_pixels:
                    if length > _MAX_TEXT_CHUNK:
                        return PngRecord(text, False, False)
                    data = f.read(length)
                    if len(data) < length:
                        return PngRecord(text, False, True)
                    key, value = _parse_text(kind, data)
                    if key is not None:
                        text[key] = value
                    f.seek(4, os.SEEK_CUR)
                    continue
                f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return None
    if not seen_pixels:
        return PngRecord(text, False, digest_key in text)
    return PngRecord(text, text.get(digest_key) == digest.hexdigest(), False)


def _parse_text(kind: bytes, data: bytes) -> tuple[str | None, str]:
    """A tEXt or uncompressed iTXt chunk's key and value; (None, "") for anything else."""
    key, sep, rest = data.partition(b"\0")
    if not sep:
        return None, ""
    try:
        if kind == b"tEXt":
            return key.decode("latin-1"), rest.decode("latin-1")
        if rest[:1] != b"\0":  # compressed international text: never ours
            return None, ""
        _lang, _, rest = rest[2:].partition(b"\0")
        _translated, _, value = rest.partition(b"\0")
        return key.decode("latin-1"), value.decode("utf-8")
    except UnicodeDecodeError:
        return None, ""

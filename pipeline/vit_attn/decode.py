"""Image decoding and preprocessing: from an image file to model input.

The resize and crop mirror timm's eval transform (``transforms_imagenet_eval``) with Pillow
alone, so the decode hot path needs no torch, and ``normalize`` is torchvision's
``ToTensor`` + ``Normalize`` in float32. A broken image raises ``ImageDecodeError`` with a
short reason, which the store records per image; it never stops a run.
"""

from __future__ import annotations

import io
import math
import re
import stat
import struct
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageDecodeError

__all__ = [
    "Preprocess",
    "load_batch",
    "load_image",
    "normalize",
    "preprocess_for_model",
]

# timm.data.constants, copied so that importing this module does not import torch.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash", "border")

# A JPEG is decoded at 1/2, 1/4 or 1/8 scale only while the reduced image stays at least
# this many times the resized size on both axes, so the final resample still antialiases.
DRAFT_MARGIN = 2
# Beyond this many times the output area (aspect ratios past ~50:1), resample only the kept
# part: resizing all of a 4000 x 20 strip to 49600 x 248 takes 0.4 s, its kept part 1 ms.
_BOX_RESIZE_AREA = 64

# What Pillow's plugins raise on corrupt data, besides OSError ("image file is truncated").
_DECODE_FAILURES = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    struct.error,
    ZeroDivisionError,
)


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes model input; the fields of timm's eval data config."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        try:
            size = tuple(int(v) for v in self.input_size)
            mean = tuple(float(v) for v in self.mean)
            std = tuple(float(v) for v in self.std)
            crop_pct = float(self.crop_pct)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preprocess: invalid value ({e})") from e
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(
                f"preprocess: input_size must be two positive ints (H, W), got {size}"
            )
        if len(mean) != 3 or len(std) != 3 or 0.0 in std:
            raise ConfigError(
                f"preprocess: mean and std need 3 values, std non-zero: {mean}, {std}"
            )
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(
                f"preprocess: interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(
                f"preprocess: crop_mode {self.crop_mode!r} is not one of {CROP_MODES}"
            )
        if not crop_pct > 0:
            raise ConfigError(f"preprocess: crop_pct must be > 0, got {crop_pct}")
        for name, value in (
            ("input_size", size),
            ("mean", mean),
            ("std", std),
            ("crop_pct", crop_pct),
        ):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for the store attributes and the fingerprint."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**fields)


def preprocess_for_model(model: Any, input_size: tuple[int, int]) -> Preprocess:
    """The model's eval preprocessing at the input size it really runs at.

    ``input_size`` is passed explicitly because ``resolve_data_config`` ignores an
    ``img_size`` given to ``create_model`` and would report the pretrained size.
    """
    from timm.data import resolve_data_config  # lazy: timm imports torch

    h, w = input_size
    cfg = resolve_data_config(args={"input_size": (3, h, w)}, model=model)
    return Preprocess(
        input_size=(h, w),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"] or "center",
    )


def normalize(batch_u8: np.ndarray, prep: Preprocess) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], ``(x / 255 - mean) / std``.

    Done in float32 step by step, like torchvision's ``ToTensor`` + ``Normalize``, so the
    numbers match the torch reference to float rounding.
    """
    if batch_u8.ndim != 4 or batch_u8.shape[-1] != 3:
        raise ValueError(f"normalize expects [B, H, W, 3], got shape {batch_u8.shape}")
    x = batch_u8.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    x /= np.float32(255)
    x -= np.asarray(prep.mean, np.float32)[:, None, None]
    x /= np.asarray(prep.std, np.float32)[:, None, None]
    return x


@dataclass(frozen=True)
class _Plan:
    """Where the pixels go, in the coordinates of the resized (not yet cropped) image."""

    resize: tuple[int, int]  # (w, h) of the whole image after the resize
    crop: tuple[int, int, int, int]  # kept part of it: left, top, right, bottom
    paste: tuple[int, int]  # where the kept part lands in the output (padding when > 0)


def _resized_size(w: int, h: int, prep: Preprocess) -> tuple[int, int]:
    """The (w, h) timm resizes to, with its rounding (torchvision's for the shortest edge)."""
    scale_h, scale_w = (math.floor(x / prep.crop_pct) for x in prep.input_size)
    if prep.crop_mode == "squash":
        return scale_w, scale_h
    if prep.crop_mode == "center" and scale_h == scale_w:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = scale_h, int(scale_h * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    # timm ResizeKeepRatio: the shortest edge fits for center, the longest for border.
    ratios = (h / scale_h, w / scale_w)
    ratio = max(ratios) if prep.crop_mode == "border" else min(ratios)
    return max(1, round(w / ratio)), max(1, round(h / ratio))


def _crop_axis(length: int, target: int) -> tuple[int, int, int]:
    """(start, size, paste offset) on one axis: torchvision's center crop, padding if short."""
    if length >= target:
        return int(round((length - target) / 2.0)), target, 0
    return 0, length, (target - length) // 2


def _plan(w: int, h: int, prep: Preprocess) -> _Plan:
    rw, rh = _resized_size(w, h, prep)
    x0, cw, px = _crop_axis(rw, prep.input_size[1])
    y0, ch, py = _crop_axis(rh, prep.input_size[0])
    return _Plan((rw, rh), (x0, y0, x0 + cw, y0 + ch), (px, py))


def _resize_crop(
    img: Image.Image, plan: _Plan, box: tuple[float, ...], prep: Preprocess
) -> Image.Image:
    """Resize ``box`` of ``img`` (all of it unless drafted) to the plan, then crop and pad."""
    resample = _RESAMPLE[prep.interpolation]
    (rw, rh), (x0, y0, x1, y1) = plan.resize, plan.crop
    out_h, out_w = prep.input_size
    if rw * rh <= _BOX_RESIZE_AREA * out_h * out_w:
        # Whole image then crop, exactly as timm does (bit-identical pixels).
        if (rw, rh) != img.size or box != (0, 0, *img.size):
            img = img.resize((rw, rh), resample, box=(box[0], box[1], box[2], box[3]))
        if (x0, y0, x1, y1) != (0, 0, rw, rh):
            img = img.crop((x0, y0, x1, y1))
    else:
        # Same filter taps, but not bit-identical: Pillow may run the two passes in the other
        # order (its 8-bit intermediate clips differently at sharp edges) and the box has
        # float rounding. Typical differences are 0 or 1 level.
        sx, sy = (box[2] - box[0]) / rw, (box[3] - box[1]) / rh
        part = (box[0] + x0 * sx, box[1] + y0 * sy, box[0] + x1 * sx, box[1] + y1 * sy)
        img = img.resize((x1 - x0, y1 - y0), resample, box=part)
    if img.size != (out_w, out_h):
        fill = tuple(round(255 * m) for m in prep.mean) if prep.crop_mode == "border" else (0, 0, 0)
        canvas = Image.new("RGB", (out_w, out_h), fill)
        canvas.paste(img, plan.paste)
        img = canvas
    return img


# --------------------------------------------------------------------------- decoding

# EXIF orientation -> (axes swapped, draft padding on the left, on the top) after the
# transpose that ImageOps.exif_transpose applies.
_ORIENTATION_LAYOUT = {
    1: (False, False, False),
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}


def load_image(
    path: Path | str | bytes | BinaryIO, prep: Preprocess, *, draft: bool = True
) -> np.ndarray:
    """Decode one file (or its bytes, or an open binary file object: from a shard, a Parquet
    row or object storage) into the model-input image: uint8 [H, W, 3] RGB, resized and cropped.

    Not normalised: this is also the picture overlays are drawn on. EXIF orientation is
    applied; alpha is dropped (what timm's ``convert('RGB')`` does, not a composite);
    16-bit images are scaled to 8 bits. The pixels equal timm's eval transform exactly,
    except for JPEGs decoded at reduced scale (``draft``, see ``DRAFT_MARGIN``: a level or
    so) and aspect ratios past ~50:1 (see ``_BOX_RESIZE_AREA``: 0-1 level on photographs, up
    to ~15 levels at single pixels of pure noise, where Pillow's pass order matters most).

    Raises:
        ImageDecodeError: with a short reason (missing, empty, not an image, truncated,
            too large for Pillow's decompression-bomb limit, unsupported mode).
    """
    with _open(Path(path) if isinstance(path, str) else path) as img:
        size = img.size
        box = _draft(img, prep) if draft else (0, 0, *size)
        try:
            img.load()
            orientation = _orientation(img)
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
                box = _transpose_box(box, img.size, orientation)
        except _DECODE_FAILURES as e:
            raise ImageDecodeError(f"truncated or corrupt image data ({e})") from e
        try:
            rgb = _to_rgb(img)
        except ValueError as e:
            raise ImageDecodeError(f"unsupported colour mode {img.mode} ({e})") from e
    if _ORIENTATION_LAYOUT[orientation][0]:
        size = size[::-1]
    return np.asarray(_resize_crop(rgb, _plan(*size, prep), box, prep))


def _open(path: Path | bytes | BinaryIO) -> Image.Image:
    """Open lazily (header only) and refuse what is not worth decoding."""
    if isinstance(path, bytes):
        if not path:
            raise ImageDecodeError("empty file (0 bytes)")
    elif isinstance(path, Path):
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageDecodeError("file not found") from None
        except OSError as e:
            raise ImageDecodeError(f"cannot read file ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError("not a regular file")
        if st.st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x its limit Pillow only warns (to stderr, once per worker); the
            # size check below refuses those images with a reason of their own.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # The warning arrives here as an exception only where warnings are errors.
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageDecodeError(_too_large(f"{int(found[1]):,} pixels" if found else "it")) from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read file ({e.strerror or e})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.size[0] * img.size[1] > limit:
        # Pillow only warns between 1x and 2x its limit; we refuse, so each image's memory
        # stays bounded in workers that decode many at once.
        img.close()
        raise ImageDecodeError(_too_large(f"{img.size[0]} x {img.size[1]} pixels"))
    return img


def _too_large(size: str) -> str:
    return (
        f"image too large: {size} is over the decompression-bomb limit of "
        f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except _DECODE_FAILURES:
        return 1  # unreadable EXIF: show the pixels as stored
    return value if value in _ORIENTATION_LAYOUT else 1


def _draft(img: Image.Image, prep: Preprocess) -> tuple[float, ...]:
    """Ask the JPEG decoder for a reduced scale; return where the image lies in its output.

    Pillow picks the largest of 1/2, 1/4, 1/8 that keeps the decoded size at or above the
    request, and the request is ``DRAFT_MARGIN`` x the resized size, so the final resample
    still downsamples by at least that factor and the pixels stay near-identical.
    """
    w, h = img.size
    if img.format not in ("JPEG", "MPO"):
        return (0, 0, w, h)
    swapped = _ORIENTATION_LAYOUT[_orientation(img)][0]  # JPEG EXIF is read with the header
    rw, rh = _plan(*((h, w) if swapped else (w, h)), prep).resize
    want = (rh, rw) if swapped else (rw, rh)
    request = (DRAFT_MARGIN * want[0], DRAFT_MARGIN * want[1])
    if min(w // request[0], h // request[1]) < 2:
        return (0, 0, w, h)
    drafted = img.draft("RGB", request)
    return tuple(drafted[1]) if drafted else (0, 0, w, h)


def _transpose_box(
    box: tuple[float, ...], size: tuple[int, int], orientation: int
) -> tuple[float, ...]:
    """Move the draft box with the EXIF transpose: a reduced JPEG's partial last pixel
    (right/bottom) lands on another side."""
    swapped, left, top = _ORIENTATION_LAYOUT[orientation]
    bw, bh = (box[3], box[2]) if swapped else (box[2], box[3])
    x0 = size[0] - bw if left else 0
    y0 = size[1] - bh if top else 0
    return (x0, y0, x0 + bw, y0 + bh)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB uint8 from any mode; alpha is dropped like timm's ``convert('RGB')``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # Pillow's convert clips 16-bit values at 255; scale the full range instead. Mode I
        # is how some Pillow versions and TIFFs hold 16-bit data, so it is read as 0..65535.
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        # Float images follow the [0, 1] convention of scientific tools (scikit-image, tifffile).
        unit = np.clip(np.nan_to_num(np.asarray(img, np.float32)), 0.0, 1.0)
        return Image.fromarray(np.rint(unit * 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # same colours; skips Pillow's warning on byte transparency
    return img.convert("RGB")


def load_batch(
    paths: Sequence[Path | str | bytes | ImageDecodeError],
    prep: Preprocess,
    *,
    threads: int = 1,
    draft: bool = True,
) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch: uint8 [B, H, W, 3] and one error reason per image (None when ok).

    An item is a file, the bytes of one, or the ImageDecodeError its reader already met
    (a missing shard, a truncated member): that image fails with the error's reason.

    A failed image stays zeros, so the batch keeps its shape and order. Pillow releases the
    GIL while decoding and resampling, so ``threads > 1`` uses idle cores (one process
    feeding a GPU): 2 threads gave 1.6-1.8x on 2 idle cores (docs/PERFORMANCE.md, "Decode
    throughput"). The default is 1 because on CPU runs the other cores already run inference
    in other Dask worker processes.
    """
    h, w = prep.input_size
    batch = np.zeros((len(paths), h, w, 3), np.uint8)
    errors: list[str | None] = [None] * len(paths)

    def decode(i: int) -> None:
        item = paths[i]
        if isinstance(item, ImageDecodeError):
            errors[i] = str(item)
            return
        try:
            batch[i] = load_image(item, prep, draft=draft)
        except ImageDecodeError as e:
            errors[i] = str(e)

    if threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(min(threads, len(paths))) as pool:
            list(pool.map(decode, range(len(paths))))
    else:
        for i in range(len(paths)):
            decode(i)
    return batch, errors

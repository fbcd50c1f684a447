"""JPEG decoding on the inference device: nvJPEG through torchvision, resize and crop there.

With `inference.device: cuda`, a batch's baseline RGB/grey JPEGs are decoded in one
`torchvision.io.decode_jpeg(..., device="cuda")` call, resized (antialiased, the model's
interpolation) and cropped on the GPU with the same geometry as `vit_attn.decode` (timm's eval
transform), and handed to the graph as a device tensor (IO binding, no host copy). Everything
else, and every JPEG the device cannot decode, takes the Pillow path (`decode.load_image`), so
failures are recorded per image exactly as there. The same code runs with `device="cpu"`
(libjpeg through torchvision), which is how the tests compare it with the Pillow path.

The pixels differ from Pillow's by a level or so (another JPEG IDCT, torch's antialiased
resampling, and no reduced-scale JPEG draft): mean below 1 level, 99th percentile <= 4 levels,
the tolerance the draft decoding already has (tests/test_gpu_decode.py).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .decode import Preprocess, _open, _plan
from .decode import load_batch as host_load_batch
from .errors import ImageDecodeError

# Interpolations torch resamples like Pillow (antialiased when downsampling); the others
# (box, hamming, lanczos) decode on the host.
_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}
_DEVICE_MODES = ("RGB", "L")  # Pillow modes of JPEGs the device path takes (not CMYK, YCCK)


@functools.cache
def available(device: str) -> bool:
    """Whether torch can decode on `device` (a CUDA onnxruntime next to a CPU-only torch
    cannot): where not, the run decodes on the host as before, with one warning."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        ok = False
    else:
        ok = device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available())
    if not ok:
        warnings.warn(
            f"JPEG decoding on {device} is not available (torch/torchvision without CUDA?); "
            "decoding on the host",
            stacklevel=2,
        )
    return ok


def supports(prep: Preprocess) -> bool:
    """Whether `prep` can run on the device (its interpolation has a torch equivalent)."""
    return prep.interpolation in _MODES


def _device_candidate(path: Path) -> bytes | None:
    """The file's bytes if it is a complete RGB or grey JPEG within the size limits, else None.

    Anything else (other formats, CMYK, a missing end-of-image marker, any header problem) goes
    to the Pillow path, which decodes it or records why not.
    """
    try:
        with _open(path) as img:
            if img.format != "JPEG" or img.mode not in _DEVICE_MODES:
                return None
    except ImageDecodeError:
        return None
    data = path.read_bytes()
    # nvJPEG decodes a truncated file without complaint; Pillow reports it. Keep Pillow's verdict.
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None
    return data


def _resize_crop(img, prep: Preprocess):  # img: uint8 [3, h, w] tensor on the device
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    plan = _plan(int(w), int(h), prep)
    (rw, rh), (x0, y0, x1, y1) = plan.resize, plan.crop
    out_h, out_w = prep.input_size
    if (rw, rh) != (w, h):
        mode = InterpolationMode(_MODES[prep.interpolation])
        img = F.resize(
            img, [rh, rw], interpolation=mode, antialias=mode != InterpolationMode.NEAREST
        )
    img = img[:, y0:y1, x0:x1]
    if img.shape[-2:] != (out_h, out_w):
        fill = [round(255 * m) for m in prep.mean] if prep.crop_mode == "border" else [0, 0, 0]
        canvas = torch.tensor(fill, dtype=torch.uint8, device=img.device)[:, None, None]
        canvas = canvas.expand(3, out_h, out_w).clone()
        px, py = plan.paste
        canvas[:, py : py + img.shape[1], px : px + img.shape[2]] = img
        img = canvas
    return img.permute(1, 2, 0)  # HWC, the layout of decode.load_image


def load_batch(
    paths: Sequence[Path | str], prep: Preprocess, device: str, *, threads: int = 1
) -> tuple[np.ndarray, list[str | None], Any]:
    """Decode a batch on `device`: host uint8 [B, H, W, 3], errors, and the device tensor.

    The device tensor (uint8 [B, H, W, 3] on `device`) feeds the graph; the host array is its
    copy for overlays and PNGs. Failed images stay zeros in both, like `decode.load_batch`.
    `threads` decode the files that take the Pillow path.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    h, w = prep.input_size
    out = torch.zeros((len(paths), h, w, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(paths)
    host: list[int] = []
    on_device: list[int] = []
    datas = []
    for i, p in enumerate(paths):
        data = _device_candidate(Path(p)) if supports(prep) else None
        if data is None:
            host.append(i)
        else:
            on_device.append(i)
            datas.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if datas:
        decoded: list = []
        try:
            decoded = list(
                decode_jpeg(
                    datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
                )
            )
        except RuntimeError:
            # One bad file fails the whole call: retry one by one, the rest on the host.
            for one in datas:
                try:
                    decoded.append(
                        decode_jpeg(
                            one, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
                        )
                    )
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(on_device, decoded):
            if img is None:
                host.append(i)
            else:
                out[i] = _resize_crop(img, prep)
    if host:
        host = sorted(host)
        pixels, host_errors = host_load_batch([paths[i] for i in host], prep, threads=threads)
        out[host] = torch.from_numpy(pixels).to(device)
        for i, err in zip(host, host_errors):
            errors[i] = err
    return out.cpu().numpy(), errors, out

"""Pictures of one image's attention, read back from a store (for `vit-attn show`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .data import Preprocess, load_image
from .errors import ImageDecodeError, PipelineError
from .overlay import blend, head_grid

HEAD_FUSIONS = {"mean": np.mean, "max": np.max, "min": np.min}


def image_index(group: Any, image: str | int) -> int:
    """An image given as an index or as its path as listed in the store."""
    n = group["status"].shape[0]
    text = str(image)
    if text.lstrip("-").isdigit():
        i = int(text)
        if not -n <= i < n:
            raise PipelineError(f"--image {i} is out of range: the store holds {n} images")
        return i % n
    paths = group["image_path"][:]
    hits = np.flatnonzero(paths == text)
    if hits.size == 0:
        raise PipelineError(f"--image {text!r} is not in the store; give an index or a path as `vit-attn inspect` lists")
    return int(hits[0])


def model_input_image(group: Any, index: int) -> np.ndarray:
    """Re-decode the image the model saw; a neutral grey canvas if the file has moved."""
    attrs = group.attrs
    prep = Preprocess.from_dict(attrs["preprocess"])
    rel = str(group["image_path"][index])
    path = Path(rel) if Path(rel).is_absolute() else Path(attrs["image_root"]) / rel
    try:
        return load_image(path, prep)
    except ImageDecodeError:
        return np.full((*prep.input_size, 3), 128, np.uint8)


def render_image(
    group: Any,
    store_path: Path,
    image: str | int,
    layer: int | None = None,
    head: str = "mean",
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> np.ndarray:
    """One layer's CLS map of one image over the model input: a head, a fusion, or a grid of all."""
    i = image_index(group, image)
    status = int(group["status"][i])
    if status != 1:
        reason = f"failed: {group['error'][i]}" if status == 2 else "not processed yet"
        raise PipelineError(f"image {i} ({group['image_path'][i]}) has no attention: {reason}")
    layers = group["layer"][:].tolist()
    if layer is None:
        li = len(layers) - 1
    else:
        block = layer % group.attrs["model"]["depth"]
        if block not in layers:
            raise PipelineError(f"--layer {layer} is not stored; the store holds blocks {layers}")
        li = layers.index(block)
    maps = group["cls_attention"][i, li].astype(np.float32)  # [heads, gh, gw]
    base = model_input_image(group, i)
    if head == "grid":
        return head_grid(base, maps, alpha=alpha, cmap=cmap)
    if head in HEAD_FUSIONS:
        chosen = HEAD_FUSIONS[head](maps, axis=0)
    elif head.isdigit() and int(head) < maps.shape[0]:
        chosen = maps[int(head)]
    else:
        raise PipelineError(f"--head {head!r}: give 0..{maps.shape[0] - 1}, mean, max, min or grid")
    return blend(base[None], chosen[None], alpha=alpha, cmap=cmap)[0]

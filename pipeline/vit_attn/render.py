"""Pictures of one image's attention, read back from a store (for `vit-attn show`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .datasource import read_listed_image
from .decode import Preprocess, load_image
from .errors import ImageDecodeError, PipelineError, SourceChangedError
from .identity import local_stat, pair_change
from .maps import HEAD_FUSIONS, fuse_heads, mass_threshold_mask
from .numbers import parse_int
from .overlay import blend, head_grid
from .remote import is_url
from .roles import MAP_ARRAYS, default_map
from .store import STATUS_FAILED, STATUS_OK, find_image, read_rows

log = logging.getLogger(__name__)

# per_map: each map's own min..max. per_image: 0..the largest value of any head of this image
# and layer, so heads compare. dataset: 0..a per-(layer, head) scale over the whole store
# (analysis.dataset_scale), so images compare.
NORMALIZE_MODES = ("per_map", "per_image", "dataset")
OUTLINE_RGB = (0, 255, 255)
GRID_BORDER = 2


def model_input_image(group: Any, index: int) -> np.ndarray:
    """Re-decode the image the model saw; a neutral grey canvas if the file has moved.

    A local file whose size or modification time differs from what the store recorded
    (`image_bytes`, `image_mtime_ns`) is not the image the stored attention belongs to:
    SourceChangedError, never the old maps over a new picture.
    """
    attrs = group.attrs
    prep = Preprocess.from_dict(attrs["preprocess"])
    # written with the store's template: a missing chunk reads "", which named the image
    # folder itself as a changed input
    rel = str(read_rows(group["image_path"], index, "image_path", index, written=True))
    root = str(attrs["image_root"])
    path: Path | bytes | None = Path(rel) if Path(rel).is_absolute() else Path(root) / rel
    remote = is_url(root) or "source" in attrs.get("fingerprint_inputs", {})
    if not remote:
        _check_unchanged(group, index, rel, str(path))
    try:
        if remote:  # on object storage, in a shard or a Parquet file: found through the source
            path = read_listed_image(attrs, rel, _recorded(group, index))
        if path is None:
            raise ImageDecodeError("its source holds it no longer")
        return load_image(path, prep)
    except ImageDecodeError as exc:
        log.warning("image %d: %s; its maps are drawn on grey", index, exc)
        return np.full((*prep.input_size, 3), 128, np.uint8)


def _recorded(group: Any, index: int) -> tuple[int, int] | None:
    """The (size, mtime_ns) the run recorded for image `index` (for shard and Parquet images:
    their file's), or None where the store keeps none."""
    if "image_bytes" not in group or "image_mtime_ns" not in group:
        return None
    return int(group["image_bytes"][index]), int(group["image_mtime_ns"][index])


def _check_unchanged(group: Any, index: int, rel: str, path: str) -> None:
    """Raise SourceChangedError when the file at `path` is not the one the run recorded."""
    recorded = _recorded(group, index)  # None: a store without identity
    # None: unchanged, or gone (drawn on grey, as documented)
    change = None if recorded is None else pair_change(recorded, local_stat(path))
    if change is None:
        return
    raise SourceChangedError(
        f"image {index} ({rel}: {change}) changed since the run: its "
        "stored attention belongs to the old file; rerun `vit-attn run CONFIG --redo-changed` "
        "to recompute it"
    )


def render_image(
    group: Any,
    store_path: Path,
    image: str | int,
    layer: int | None = None,
    head: str = "mean",
    alpha: float | None = None,
    cmap: str | None = None,
    normalize: str = "per_map",
    mask: float | None = None,
    map_name: str | None = None,
    latent: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """One layer's map of one image over the model input: a head, a fusion, or a grid of all.

    `map_name` is one of the store's map arrays (`roles.MAP_ARRAYS`; default: the attention
    pool's map, else the CLS map, else received attention). `pool_attention` has no layer;
    with several latent queries `latent` picks one (default: their mean). `normalize` picks
    the colour scale (NORMALIZE_MODES); `mask`, a mass fraction t, draws the outline of each
    shown map's `maps.mass_threshold_mask(map, t)` (computed on the raw map).
    `storage_options` reach a store on object storage (`dataset` reads the whole store).
    `alpha` and `cmap` default to the run's (`output.overlay_alpha`, `output.colormap`), so a
    picture matches the stored overlays and the viewer's.
    """
    output = (group.attrs.get("config") or {}).get("output") or {}
    alpha = float(output.get("overlay_alpha", 0.5)) if alpha is None else alpha
    cmap = str(output.get("colormap", "inferno")) if cmap is None else cmap
    if normalize not in NORMALIZE_MODES:
        raise PipelineError(f"--normalize {normalize!r}: give one of {', '.join(NORMALIZE_MODES)}")
    if mask is not None and not 0.0 < mask <= 1.0:
        raise PipelineError(f"--mask {mask}: give a mass fraction in (0, 1], e.g. 0.6")
    i = find_image(group["status"].shape[0], image, lambda: group["image_path"][:])
    status = int(read_rows(group["status"], i, "status", i))
    if status != STATUS_OK:
        reason = f"failed: {group['error'][i]}" if status == STATUS_FAILED else "not processed yet"
        raise PipelineError(f"image {i} ({group['image_path'][i]}) has no attention: {reason}")
    name = _map_name(group, map_name)
    layers = group["layer"][:].tolist()
    if name == "pool_attention":
        if layer is not None:
            raise PipelineError(
                "--layer: pool_attention is the attention pool's map, after every block; "
                "it has no layer (leave --layer out, or pick another --map)"
            )
        li = len(layers) - 1
        maps = _pool_maps(
            read_rows(group[name], i, name, i, written=True).astype(np.float32), latent
        )
    else:
        if latent is not None:
            raise PipelineError(f"--latent: only pool_attention has latent queries, not {name}")
        if layer is None:
            li = len(layers) - 1
        else:
            depth = int(group.attrs["model"]["depth"])
            if not -depth <= layer < depth:
                raise PipelineError(
                    f"--layer {layer}: the model has blocks 0..{depth - 1} (or -{depth}..-1); "
                    f"the store holds blocks {layers}"
                )
            block = layer % depth
            if block not in layers:
                raise PipelineError(
                    f"--layer {layer} is not stored; the store holds blocks {layers}"
                )
            li = layers.index(block)
        maps = read_rows(group[name], (i, li), name, i, written=True).astype(
            np.float32
        )  # [heads, gh, gw]
    base = model_input_image(group, i)
    # [heads] top of the colour scale, or None
    top = _scale_tops(store_path, maps, li, normalize, name, latent, storage_options)
    mode = "per_map" if top is None else "none"
    if head == "grid":
        shown = maps if top is None else maps / top[:, None, None]
        # the mean tile as --head mean draws it: the mean map over the mean of the scales
        mean = None if top is None else maps.mean(axis=0) / top.mean()
        ncols = math.ceil(math.sqrt(maps.shape[0] + 1))  # head_grid's own default, made explicit
        out = head_grid(
            base,
            shown,
            alpha=alpha,
            cmap=cmap,
            ncols=ncols,
            border=GRID_BORDER,
            normalize=mode,
            mean=mean,
        )
        if mask is not None:
            masks = mass_threshold_mask(
                np.concatenate([maps.mean(axis=0, keepdims=True), maps]), mask
            )
            h, w = base.shape[:2]
            for k, m in enumerate(masks):
                r, c = divmod(k, ncols)
                y0, x0 = GRID_BORDER + r * (h + GRID_BORDER), GRID_BORDER + c * (w + GRID_BORDER)
                _draw_outline(out[y0 : y0 + h, x0 : x0 + w], m)
        return out
    if head in HEAD_FUSIONS:
        chosen = fuse_heads(maps, head, axis=0)
        chosen_top = None if top is None else fuse_heads(top, head, axis=0)
    elif (h := parse_int(head)) is not None and -maps.shape[0] <= h < maps.shape[0]:
        chosen = maps[h]  # negatives count from the last head, as --layer and --image do
        chosen_top = None if top is None else top[h]
    else:
        n = maps.shape[0]
        raise PipelineError(
            f"--head {head!r}: give 0..{n - 1} (or -{n}..-1), mean, max, min or grid"
        )
    shown = chosen if chosen_top is None else chosen / chosen_top
    out = blend(base[None], shown[None], alpha=alpha, cmap=cmap, normalize=mode)[0]
    if mask is not None:
        _draw_outline(out, mass_threshold_mask(chosen, mask))
    return out


def _map_name(group: Any, requested: str | None) -> str:
    """The map array to draw: the requested one if the store has it, else the default."""
    present = [n for n in MAP_ARRAYS if n in group]
    if not present:
        raise PipelineError("the store holds no attention map array (cls/pool/received_attention)")
    if requested is None:
        return default_map(present)
    full = requested if requested.endswith("_attention") else f"{requested}_attention"
    if full not in present:
        raise PipelineError(
            f"--map {requested}: the store holds {', '.join(present)}"
            + (" (its model has no class token)" if full == "cls_attention" else "")
        )
    return full


def _pool_maps(maps: np.ndarray, latent: int | None) -> np.ndarray:
    """[heads, gh, gw] from one image's pool_attention ([heads, ..] or [latents, heads, ..])."""
    if maps.ndim == 3:
        if latent not in (None, 0):
            raise PipelineError(f"--latent {latent}: the attention pool has one latent query")
        return maps
    if latent is None:
        return maps.mean(axis=0)
    if not 0 <= latent < maps.shape[0]:
        raise PipelineError(f"--latent {latent}: give 0..{maps.shape[0] - 1}")
    return maps[latent]


def _scale_tops(
    store_path: Path,
    maps: np.ndarray,
    layer_index: int,
    normalize: str,
    map_name: str = "cls_attention",
    latent: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> np.ndarray | None:
    """Per head, the value drawn in the colormap's top colour (the bottom is 0); None for per_map."""
    if normalize == "per_map":
        return None
    if normalize == "per_image":
        top = np.full(maps.shape[0], float(maps.max()))
    else:
        from .analysis import dataset_scale
        from .store import open_dataset

        ds = open_dataset(store_path, storage_options=storage_options)
        top = dataset_scale(ds, layer_index, map_name=map_name, latent=latent)
    return np.maximum(top, np.finfo(np.float32).tiny)


def _draw_outline(canvas: np.ndarray, mask: np.ndarray) -> None:
    """Draw the outline of a patch-grid mask [gh, gw] onto an RGB canvas [H, W, 3] in place.

    Patches map onto pixels as in the overlay (patch r covers rows r*H/gh ..); the line runs on
    both sides of every mask edge (2 px) and along the image border where the mask touches it.
    """
    h, w = canvas.shape[:2]
    gh, gw = mask.shape
    rows = np.minimum(np.arange(h) * gh // h, gh - 1)
    cols = np.minimum(np.arange(w) * gw // w, gw - 1)
    px = mask[rows][:, cols]
    edge = np.zeros_like(px)
    dy, dx = px[1:] != px[:-1], px[:, 1:] != px[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[[0, -1]] |= px[[0, -1]]
    edge[:, [0, -1]] |= px[:, [0, -1]]
    canvas[edge] = OUTLINE_RGB

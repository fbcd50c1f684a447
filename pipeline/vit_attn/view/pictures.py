"""The viewer's pictures, drawn with the project's own rendering code and sent as PNG.

- the map at patch resolution (one pixel per patch, `overlay.normalize_maps` + the colour
  table of `overlay.colormap_lut`): the browser scales it up without smoothing, so every
  pixel the page shows is one stored value's colour;
- the overlay: `overlay.blend` over the re-decoded model input (`render.model_input_image`),
  with the outline of `maps.mass_threshold_mask` drawn as `vit-attn show --mask` does;
- the head grid: `overlay.head_grid`;
- grid thumbnails: the stored overlays reduced by an integer factor, sent as raw RGB bytes
  (nothing to encode or decode: a page of 60 is ~2 MB over the loopback).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

from ..errors import SourceChangedError
from ..maps import mass_threshold_mask
from ..overlay import blend, colormap_lut, head_grid, normalize_maps
from ..pngencode import encode_png
from ..render import _draw_outline, model_input_image
from ..store import STATUS_OK, STATUS_PENDING, read_rows, rows_without_chunk
from .data import Selection, StoreData, ViewError, thumb_factor, thumb_size

log = logging.getLogger(__name__)

FAILED_RGB = (120, 30, 30)
PENDING_RGB = (70, 70, 70)
GRID_BORDER = 2  # overlay.head_grid's default border, in pixels
GRID_TILE = 160  # largest tile side of the head grid, in pixels
THUMB_CACHE = 2000  # thumbnails kept in memory (~40 KB each at 112 px)


def map_colours(values: np.ndarray, cmap: str) -> np.ndarray:
    """A map [gh, gw] as colours [gh, gw, 3]: its own min..max onto the colour table, rounded."""
    levels = normalize_maps(values[None], "per_map")[0] * np.float32(255.0) + np.float32(0.5)
    return np.take(colormap_lut(cmap), levels.astype(np.uint8), axis=0)


def head_grid_columns(n_heads: int) -> int:
    """Columns of `overlay.head_grid` for mean + n heads (its own default, made explicit)."""
    return math.ceil(math.sqrt(n_heads + 1))


class Pictures:
    """Draws and caches what the page shows; the decoded inputs are kept for a few images."""

    def __init__(self, data: StoreData) -> None:
        self.data = data
        meta = data.meta()
        self.alpha = meta["overlay_alpha"]
        self.cmap = meta["colormap"]
        try:
            colormap_lut(self.cmap)
        except Exception:
            self.cmap = "inferno"
        self._lock = threading.Lock()
        self._inputs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._thumbs: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._decoding: dict[int, threading.Lock] = {}
        self._generation = data.generation

    def _drop_if_stale(self) -> None:
        """The store changed since these were drawn (an image redone from a changed file, a
        status that moved): forget them (caller holds the lock)."""
        if self._generation != self.data.generation:
            self._inputs.clear()
            self._thumbs.clear()
            self._generation = self.data.generation

    def model_input(self, image: int) -> np.ndarray:
        """The image the model saw (re-decoded from the source; grey if the file is gone).

        Decoded once per image even when the image and overlay requests arrive together.
        """
        self.data.ensure_current()
        with self._lock:
            self._drop_if_stale()
            if image in self._inputs:
                self._inputs.move_to_end(image)
                return self._inputs[image]
            lock = self._decoding.setdefault(image, threading.Lock())
            generation = self._generation
        with lock:
            with self._lock:
                if image in self._inputs:
                    return self._inputs[image]
            try:
                value = model_input_image(self.data.group, image)
            except SourceChangedError as exc:  # not this store's picture: say so, draw nothing
                with self._lock:
                    self._decoding.pop(image, None)
                raise ViewError(str(exc), 409) from None
            except (KeyError, TypeError, ValueError):  # no preprocessing recorded: neutral grey
                value = np.full((*self._input_hw(), 3), 128, np.uint8)
            with self._lock:
                self._decoding.pop(image, None)
                self._drop_if_stale()
                if generation == self._generation:  # else decoded before the store changed
                    self._inputs[image] = value
                    while len(self._inputs) > 16:
                        self._inputs.popitem(last=False)
        return value

    def map_png(self, image: int, sel: Selection) -> bytes:
        return encode_png(map_colours(self.data.chosen_map(image, sel), self.cmap))

    def overlay_png(self, image: int, sel: Selection, mask: float | None) -> bytes:
        chosen = self.data.chosen_map(image, sel)
        base = self.model_input(image)
        out = blend(base[None], chosen[None], alpha=self.alpha, cmap=self.cmap)[0]
        if mask is not None:
            _draw_outline(out, mass_threshold_mask(chosen, mask))
        return encode_png(out)

    def input_png(self, image: int) -> bytes:
        return encode_png(self.model_input(image))

    def grid_png(self, image: int, sel: Selection) -> bytes:
        """Every head's overlay and the mean's, tiled by `overlay.head_grid` at tile size
        <= GRID_TILE (inputs larger than that are reduced by an integer factor first)."""
        maps = self.data.head_maps(image, sel)
        base = self.model_input(image)
        factor = thumb_factor(base.shape[:2], GRID_TILE)
        if factor > 1:
            base = np.asarray(Image.fromarray(base).reduce(factor))
        out = head_grid(
            base,
            maps,
            alpha=self.alpha,
            cmap=self.cmap,
            ncols=head_grid_columns(maps.shape[0]),
            border=GRID_BORDER,
        )
        return encode_png(out)

    def thumbnails(self, ids: np.ndarray, box: int) -> tuple[tuple[int, int], bytes]:
        """Thumbnails of `ids` as raw uint8 RGB [n, th, tw, 3] and their (th, tw).

        Stored overlays when the store has them, reduced by `thumb_factor` (a box filter);
        otherwise the re-decoded input blended with the first map source's head mean at the
        last layer. Failed images are a dark red tile, pending ones grey. Kept in memory
        (LRU), so paging back and forth reads nothing twice.
        """
        input_hw = self._input_hw()
        factor = thumb_factor(input_hw, box)
        th, tw = thumb_size(input_hw, box)
        out = np.zeros((len(ids), th, tw, 3), np.uint8)
        todo = []
        self.data.ensure_current()
        with self._lock:
            self._drop_if_stale()
            generation = self._generation
            for k, i in enumerate(ids.tolist()):
                hit = self._thumbs.get((i, box))
                if hit is None:
                    todo.append(k)
                else:
                    out[k] = hit
        if todo:
            wanted = ids[todo]
            status = self.data.statuses(wanted)
            ok = np.flatnonzero(status == STATUS_OK)
            pictures = self._thumb_pictures(wanted, ok)
            for n, k in enumerate(todo):
                if n in pictures:
                    pic = Image.fromarray(pictures[n])
                    out[k] = np.asarray(pic.reduce(factor) if factor > 1 else pic)
                else:
                    # failed, or ok but unreadable (a damaged chunk): the failed tile
                    out[k] = FAILED_RGB if status[n] != STATUS_PENDING else PENDING_RGB
            with self._lock:
                self._drop_if_stale()
                for n, k in enumerate(todo):
                    # Pending images may be done by the next look, unreadable ones restored;
                    # nothing drawn before the store changed is kept.
                    if generation == self._generation and status[n] == STATUS_OK and n in pictures:
                        self._thumbs[(int(ids[k]), box)] = out[k]
                while len(self._thumbs) > THUMB_CACHE:
                    self._thumbs.popitem(last=False)
        return (th, tw), out.tobytes()

    def _thumb_pictures(self, wanted: np.ndarray, ok: np.ndarray) -> dict[int, np.ndarray]:
        """Full-size pictures of the ok images among `wanted`, by position in `wanted`.

        Read together; if that fails (a damaged chunk, a changed source file), image by
        image, so one bad image costs its own tile (drawn like a failed one), not the page.
        """
        if not ok.size:
            return {}
        if self.data.meta()["overlays"]:
            try:
                stored = self.data.overlays(wanted[ok])
                # Status 1 but no chunk (a damaged store): zeros, not pictures; say so.
                absent = rows_without_chunk(self.data.overlays_array(), wanted[ok].tolist())
                return {int(k): stored[n] for n, k in enumerate(ok) if int(wanted[k]) not in absent}
            except Exception:  # noqa: BLE001 - any codec error; each image is retried below
                log.warning("thumbnails: reading overlays together failed; reading one by one")
        pictures: dict[int, np.ndarray] = {}
        for k in ok.tolist():
            image = int(wanted[k])
            try:
                pictures[k] = self._thumb_picture(image)
            except Exception as exc:  # noqa: BLE001 - the tile says it; the log says why
                log.warning("thumbnail of image %d: %s", image, exc)
        return pictures

    def _thumb_picture(self, image: int) -> np.ndarray:
        if self.data.meta()["overlays"]:
            return read_rows(self.data.overlays_array(), image, "overlay", image, written=True)
        if not self.data.sources:
            raise ViewError("the store holds no map to draw")
        sel = Selection(self.data.sources[0].name, -1, "mean")
        base = self.model_input(image)
        chosen = self.data.chosen_map(image, sel)
        return blend(base[None], chosen[None], self.alpha, self.cmap)[0]

    def _input_hw(self) -> tuple[int, int]:
        size = self.data.meta()["input_size"] or list(self.data.grid)
        return int(size[0]), int(size[1])

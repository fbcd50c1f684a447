"""The viewer's pictures, drawn with the project's own rendering code and sent as PNG.

- the map at patch resolution (one pixel per patch, `overlay.normalize_maps` + the colour
  table of `overlay.colormap_lut`): the browser scales it up without smoothing, so every
  pixel the page shows is one stored value's colour;
- the overlay: `overlay.blend` over the re-decoded model input (`render.model_input_image`),
  with the outline of `maps.mass_threshold_mask` drawn as `vit-attn show --mask` does;
- the head grid: `overlay.head_grid`;
- a sheet of grid thumbnails for a page of images (one request per page).
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

from ..maps import mass_threshold_mask
from ..overlay import blend, colormap_lut, head_grid, normalize_maps
from ..render import _draw_outline, model_input_image
from ..store import STATUS_FAILED, STATUS_OK
from .data import Selection, StoreData, thumb_size

FAILED_RGB = (120, 30, 30)
PENDING_RGB = (70, 70, 70)
GRID_BORDER = 2  # overlay.head_grid's default border, in pixels


def encode_png(array_u8: np.ndarray) -> bytes:
    """PNG bytes of an RGB or grey uint8 array (zlib level 1: these are sent, not archived)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array_u8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


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

    def model_input(self, image: int) -> np.ndarray:
        """The image the model saw (re-decoded from the source; grey if the file is gone)."""
        with self._lock:
            if image in self._inputs:
                self._inputs.move_to_end(image)
                return self._inputs[image]
        try:
            value = model_input_image(self.data.group, image)
        except (KeyError, TypeError, ValueError):  # no preprocessing recorded: a neutral canvas
            h, w = self.data.meta()["input_size"] or list(self.data.grid)
            value = np.full((int(h), int(w), 3), 128, np.uint8)
        with self._lock:
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
        maps = self.data.head_maps(image, sel)
        out = head_grid(
            self.model_input(image),
            maps,
            alpha=self.alpha,
            cmap=self.cmap,
            ncols=head_grid_columns(maps.shape[0]),
            border=GRID_BORDER,
        )
        return encode_png(out)

    def sheet_png(self, ids: np.ndarray, box: int) -> bytes:
        """Thumbnails of `ids` side by side in one row, each (h, w) = `data.thumb_size`.

        Stored overlays when the store has them; otherwise the re-decoded input blended with
        the first map source's head mean at the last layer. Failed images are a dark red
        tile, pending ones grey.
        """
        meta = self.data.meta()
        h, w = meta["input_size"] or [self.data.grid[0] or 1, self.data.grid[1] or 1]
        th, tw = thumb_size((int(h), int(w)), box)
        sheet = np.zeros((th, tw * max(len(ids), 1), 3), np.uint8)
        if len(ids) == 0:
            return encode_png(sheet)
        status = np.asarray([self.data.image_status(int(i)) for i in ids])
        ok = np.flatnonzero(status == STATUS_OK)
        pictures: dict[int, np.ndarray] = {}
        if ok.size and meta["overlays"]:
            stored = self.data.overlays(np.asarray(ids)[ok])
            pictures = {int(k): stored[n] for n, k in enumerate(ok)}
        elif ok.size and self.data.sources:
            sel = Selection(self.data.sources[0].name, -1, "mean")
            for k in ok.tolist():
                base = self.model_input(int(ids[k]))
                pictures[k] = blend(
                    base[None],
                    self.data.chosen_map(int(ids[k]), sel)[None],
                    self.alpha,
                    self.cmap,
                )[0]
        for k in range(len(ids)):
            tile = sheet[:, k * tw : (k + 1) * tw]
            if k in pictures:
                pic = pictures[k]
                if pic.shape[:2] != (th, tw):
                    pic = np.asarray(Image.fromarray(pic).resize((tw, th), Image.Resampling.BOX))
                tile[:] = pic
            else:
                tile[:] = FAILED_RGB if status[k] == STATUS_FAILED else PENDING_RGB
        return encode_png(sheet)

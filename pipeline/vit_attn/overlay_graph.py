"""Overlays inside the exported graph: the same pictures as `overlay.blend`, as uint8 outputs.

`OverlayGraph` turns the map a store shows (`task.overlay_maps`: the default map's last
stored layer, as the store keeps it) and the graph's own uint8 input pixels into `overlay`
(the head mean) and, for `overlays: heads`, `overlay_heads`, step for step as numpy does:

- the map is rounded to the store's dtype (float16) and back, as the host reads it from the
  batch arrays; the head mean is a sum in head order divided by the count (numpy's `mean`);
- each map is scaled to its own min..max (`overlay.normalize_maps`, "per_map"), times 255
  plus 0.5, upsampled with the two taps of `overlay.interp_taps` (two products and a sum),
  and floored to a colour level;
- a level picks a row of the colour table already multiplied by the blend weight, plus the
  rounding half (`overlay._weighted_lut`, as float32: the values are small integers), and
  ``floor((pixel * (256 - a8) + row) / 256)`` is the blended byte, exact in float32.

Every step is a float32 operation with one rounding, in the same order as numpy, so the
bytes equal `overlay.blend`'s (tested on the fp32 and the mixed graph and the torch backend).
The nodes sit outside the `vit` module, so `precision: mixed` keeps them fp32
(`precision.scope_selector`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .layout import TokenLayout
from .overlay import alpha_weight, colormap_lut, interp_taps
from .roles import default_map
from .specs import OutputSpec

OVERLAY_OUTPUTS = {"none": (), "mean": ("overlay",), "heads": ("overlay", "overlay_heads")}


def overlay_names(spec: OutputSpec) -> tuple[str, ...]:
    """The overlay outputs a pixel-input graph returns for `spec`, in order."""
    return OVERLAY_OUTPUTS[spec.overlays]


class OverlayGraph(nn.Module):
    """uint8 pixels [B, H, W, 3] and the graph's maps -> `overlay` (and `overlay_heads`)."""

    # Interpolation taps (buffers, so they follow the module to a device): x along the width,
    # y along the height; weights shaped to broadcast over their axis.
    i0x: torch.Tensor
    i1x: torch.Tensor
    w0x: torch.Tensor
    w1x: torch.Tensor
    i0y: torch.Tensor
    i1y: torch.Tensor
    w0y: torch.Tensor
    w1y: torch.Tensor
    table: torch.Tensor

    def __init__(self, spec: OutputSpec, layout: TokenLayout, map_names: list[str]) -> None:
        super().__init__()
        self.names = overlay_names(spec)
        if not self.names:
            raise ValueError("OverlayGraph needs output.overlays 'mean' or 'heads'")
        self.map_name = default_map(map_names)
        self.map_dtype = getattr(torch, spec.map_dtype)
        height, width = layout.input_size
        gh, gw = layout.grid
        a8 = alpha_weight(spec.overlay_alpha)
        table = colormap_lut(spec.colormap).astype(np.float32) * np.float32(a8) + np.float32(128)
        self.keep = float(256 - a8)
        self.register_buffer("table", torch.from_numpy(table))
        for axis, n_in, n_out in (("x", gw, width), ("y", gh, height)):
            i0, i1, w0, w1 = interp_taps(n_in, n_out)
            shape = (n_out,) if axis == "x" else (n_out, 1)
            self.register_buffer(f"i0{axis}", torch.from_numpy(i0.copy()))
            self.register_buffer(f"i1{axis}", torch.from_numpy(i1.copy()))
            self.register_buffer(f"w0{axis}", torch.from_numpy(w0.reshape(shape).copy()))
            self.register_buffer(f"w1{axis}", torch.from_numpy(w1.reshape(shape).copy()))

    def forward(
        self, pixels: torch.Tensor, outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        heads = self.source_maps(outputs[self.map_name])  # [B, heads, gh, gw]
        base = pixels.to(torch.float32) * self.keep  # [B, H, W, 3], once per image
        out = {"overlay": self._blend(base, _mean_dim1(heads).unsqueeze(1))[:, 0]}
        if "overlay_heads" in self.names:
            out["overlay_heads"] = self._blend(base, heads)
        return out

    def source_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """`task.overlay_maps` in the graph: [B, heads, gh, gw] float32, as the store holds them."""
        maps = maps.to(self.map_dtype).to(torch.float32)
        if self.map_name != "pool_attention":
            return maps[:, -1]  # the last stored layer
        return maps if maps.dim() == 4 else _mean_dim1(maps)  # latent queries averaged

    def _blend(self, base: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """`overlay.blend` of maps [B, n, gh, gw] onto the scaled pixels: [B, n, H, W, 3] uint8."""
        maps = torch.where(torch.isfinite(maps), maps, torch.zeros_like(maps))
        lo = maps.amin(dim=(-2, -1), keepdim=True)
        span = maps.amax(dim=(-2, -1), keepdim=True) - lo
        scale = torch.where(span > 0, 1.0 / span, torch.zeros_like(span))
        levels = (maps - lo) * scale
        levels = levels * 255.0
        levels = levels + 0.5
        cols = _taps(levels, -1, self.i0x, self.i1x, self.w0x, self.w1x)
        up = _taps(cols, -2, self.i0y, self.i1y, self.w0y, self.w1y)  # [B, n, H, W]
        index = torch.floor(up).to(torch.int64)
        colour = torch.index_select(self.table, 0, index.reshape(-1))
        colour = colour.reshape(*index.shape, 3)
        blended = (colour + base.unsqueeze(1)) * (1.0 / 256.0)
        return torch.floor(blended).to(torch.uint8)


def _taps(
    x: torch.Tensor,
    dim: int,
    i0: torch.Tensor,
    i1: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
) -> torch.Tensor:
    """`overlay._interp_axis`: x[i0] * w0 + x[i1] * w1 along `dim`."""
    return torch.index_select(x, dim, i0) * w0 + torch.index_select(x, dim, i1) * w1


def _mean_dim1(x: torch.Tensor) -> torch.Tensor:
    """numpy's float32 `mean(axis=1)`: the sum in index order, then one division."""
    total = x[:, 0]
    for i in range(1, x.shape[1]):
        total = total + x[:, i]
    return total / float(x.shape[1])

"""What the exported graph (and the torch backend) takes as input, kept free of torch.

The pipeline feeds the graph the decoded, resized and cropped batch exactly as the decoder
leaves it: uint8 ``[B, H, W, 3]`` (NHWC, RGB). The graph converts and normalises inside
(``(x / 255 - mean) / std`` in float32, the model's eval mean and std), so the host builds no
float32 batch and a GPU receives a quarter of the bytes. ``float32-nchw`` is the model's own
input (already normalised ``[B, 3, H, W]``): the tests' reference path against timm.

The input format is part of the export cache key: a graph exported for one format is never
fed the other (the runners also check the batch against the graph's declared input).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BackendError

FLOAT_NCHW = "float32-nchw"
UINT8_NHWC = "uint8-nhwc"
INPUT_FORMATS = (FLOAT_NCHW, UINT8_NHWC)
# What the pipeline (task.py) feeds every graph it runs.
PIPELINE_INPUT = UINT8_NHWC

_DTYPES = {FLOAT_NCHW: np.float32, UINT8_NHWC: np.uint8}
# onnxruntime's name for each format's element type.
ORT_TYPES = {FLOAT_NCHW: "tensor(float)", UINT8_NHWC: "tensor(uint8)"}


@dataclass(frozen=True)
class GraphInput:
    """The graph's input format and, for pixels, the normalisation done inside the graph."""

    format: str = FLOAT_NCHW
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.format not in INPUT_FORMATS:
            raise BackendError(f"graph input must be one of {INPUT_FORMATS}, got {self.format!r}")

    @classmethod
    def pixels(cls, mean: tuple[float, ...], std: tuple[float, ...]) -> GraphInput:
        """uint8 NHWC in, normalised with the model's eval `mean` and `std` inside the graph."""
        m = (float(mean[0]), float(mean[1]), float(mean[2]))
        s = (float(std[0]), float(std[1]), float(std[2]))
        return cls(UINT8_NHWC, m, s)

    def example_shape(self, batch: int, input_size: tuple[int, int]) -> tuple[int, ...]:
        h, w = input_size
        return (batch, h, w, 3) if self.format == UINT8_NHWC else (batch, 3, h, w)


def format_of_ort_type(ort_type: str, shape: list) -> str:
    """The input format of an onnxruntime session input (type string and shape)."""
    if ort_type == ORT_TYPES[UINT8_NHWC] and len(shape) == 4 and shape[-1] == 3:
        return UINT8_NHWC
    if ort_type == ORT_TYPES[FLOAT_NCHW] and len(shape) == 4 and shape[1] == 3:
        return FLOAT_NCHW
    raise BackendError(
        f"the graph's input is {ort_type} {shape}; expected uint8 [B, H, W, 3] or float32 "
        "[B, 3, H, W]: not a vit-attn graph, or from another version (delete it to re-export)"
    )


def check_batch(batch: np.ndarray, fmt: str, what: str = "the graph") -> np.ndarray:
    """The batch as a C-contiguous array of the format `fmt`, or one clear error."""
    dtype = _DTYPES[fmt]
    channels = batch.shape[-1] if fmt == UINT8_NHWC else (batch.shape[1] if batch.ndim > 1 else 0)
    if batch.dtype != dtype or batch.ndim != 4 or channels != 3:
        want = "uint8 [B, H, W, 3]" if fmt == UINT8_NHWC else "float32 [B, 3, H, W]"
        raise BackendError(
            f"{what} takes {want} batches ({fmt}), got {batch.dtype} {list(batch.shape)}; "
            "a graph exported for another input format (an old cache?) must be re-exported"
        )
    return np.ascontiguousarray(batch)

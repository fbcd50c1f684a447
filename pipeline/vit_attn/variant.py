"""Which attention kernel blocks run for their own output, per device; how probabilities are captured.

A block whose whole softmax is captured computes it explicitly (the probabilities are an
output). Every other block may keep timm's fused attention (`F.scaled_dot_product_attention`),
which torch's dynamo exporter writes as the ONNX opset-23 `Attention` op: onnxruntime's CUDA EP
runs it with flash / memory-efficient kernels in fp16 (no `[B, H, T, T]` tensor in memory),
while its CPU EP runs it slower than the plain graph (docs/PERFORMANCE.md, "Fused attention on
the CPU"). So the variant is chosen by device, by measurement; it is part of the graph-cache key.

The capture mode says how the stored probabilities are computed (`CAPTURES`): `rows`, the
default, computes only the query rows that are stored (the CLS row for `cls_attention` alone)
from the block's own q and k, beside the block's kernel; `full` takes every captured block's
whole softmax, as graphs did before. Both are part of the graph-cache key.
Torch-free: the cache key is computed before any model is built.
"""

from __future__ import annotations

from .errors import ExportError

PLAIN = "plain"  # every block: matmul, softmax, matmul
FUSED = "fused"  # blocks whose whole softmax is not captured: one ONNX `Attention` node (opset 23)
ATTENTION_VARIANTS = (PLAIN, FUSED)

# How captured probabilities are computed (`vit_attn.export.AttentionGraph`).
ROWS = "rows"  # only the stored query rows, from q and k, where the block allows it
FULL = "full"  # the block's whole softmax, sliced afterwards (graphs before the rows capture)
CAPTURES = (ROWS, FULL)

# Measured, not assumed: the plain graph beats the `Attention` op on onnxruntime's CPU EP.
_BY_DEVICE = {"cpu": PLAIN, "cuda": FUSED}

# The ONNX opset each variant is exported at (`Attention` exists from opset 23; None: the
# exporter's default, as before the fused variant existed).
OPSET: dict[str, int | None] = {PLAIN: None, FUSED: 23}


def for_device(device: str) -> str:
    """The attention variant a run on `device` (`inference.device`) exports."""
    return _BY_DEVICE.get(device, PLAIN)


def check(variant: str) -> str:
    if variant not in ATTENTION_VARIANTS:
        raise ExportError(f"attention variant must be one of {ATTENTION_VARIANTS}, got {variant!r}")
    return variant


def check_capture(capture: str) -> str:
    if capture not in CAPTURES:
        raise ExportError(f"capture mode must be one of {CAPTURES}, got {capture!r}")
    return capture


def describe(variant: str) -> str:
    """One line for `vit-attn export`."""
    if variant == FUSED:
        return "fused attention (ONNX Attention op) in the blocks whose whole softmax is not stored"
    return "plain attention (matmul + softmax) in every block"

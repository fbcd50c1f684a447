"""Fused attention (the ONNX `Attention` op) in the blocks whose probabilities are not stored."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from timm.utils import AttentionExtract

from vit_attn.export import AttentionGraph, export_onnx
from vit_attn.graphinput import GraphInput
from vit_attn.precision import node_scopes
from vit_attn.runtime import OrtRunner, RuntimeOptions, TorchRunner
from vit_attn.specs import OutputSpec
from vit_attn.variant import FUSED, PLAIN, for_device

from .conftest import sharpened_model
from .helpers import block_of, block_output_nodes, softmax_shapes

NAME, SEED, SHARPEN = "vit_tiny_patch16_224", 7, 16.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIXELS = GraphInput.pixels(MEAN, STD)
# Block 1 captured; blocks 0 and 2 are not (2 runs for the logits).
SPEC = OutputSpec(layers=(1,), attention=True, logits=True, topk=0)

pytestmark = pytest.mark.slow  # exports of fused graphs (opset 23)


def model():
    return sharpened_model(NAME, factor=SHARPEN, seed=SEED, depth=3)


def batch(n: int = 3) -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def host_normalised(u8: np.ndarray) -> torch.Tensor:
    """float64 reference of the normalisation, then float32 for timm."""
    x = (u8.transpose(0, 3, 1, 2) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[
        :, None, None
    ]
    return torch.from_numpy(x.astype(np.float32))


def graph_and_timm(
    path,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[torch.Tensor], np.ndarray]:
    """The batch, the graph's outputs on it, and timm's attention maps and logits for it."""
    u8 = batch()
    outs = OrtRunner(path, RuntimeOptions(threads=2)).run(u8)
    twin = model()
    x = host_normalised(u8)
    with torch.no_grad():
        maps = list(AttentionExtract(twin.model, method="hook")(x).values())
        logits = twin.model(x).numpy()
    return u8, outs, maps, logits


@pytest.fixture(scope="module")
def fused_fp32(export_cache):
    loaded = model()
    path = export_onnx(loaded, SPEC, "fp32", export_cache, PIXELS, attention=FUSED)
    return loaded, path


def test_attention_op_only_in_uncaptured_blocks(fused_fp32):
    _, path = fused_fp32
    nodes = onnx.load(str(path)).graph.node
    fused_blocks = sorted(block_of(n) for n in nodes if n.op_type == "Attention")
    softmax_blocks = {block_of(n) for n in nodes if n.op_type == "Softmax"}
    assert fused_blocks == [0, 2]
    assert 1 in softmax_blocks and not {0, 2} & softmax_blocks


def test_fused_graph_equals_timm(fused_fp32):
    loaded, path = fused_fp32
    u8, outs, maps, logits = graph_and_timm(path)
    assert maps[1].max() > 0.2
    np.testing.assert_allclose(outs["attention"][:, 0], maps[1].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        outs["cls_attention"][:, 0], maps[1][:, :, 0, 1:].reshape(3, -1, 14, 14), atol=1e-5
    )
    np.testing.assert_allclose(outs["logits"], logits, atol=1e-4, rtol=1e-4)


def test_torch_backend_runs_the_same_variant(fused_fp32):
    loaded, path = fused_fp32
    u8 = batch(2)
    graph = AttentionGraph(loaded, SPEC, PIXELS, FUSED)
    got = TorchRunner(graph, RuntimeOptions()).run(u8)
    ort = OrtRunner(path, RuntimeOptions(threads=2)).run(u8)
    np.testing.assert_allclose(got["attention"], ort["attention"], atol=1e-5)
    # the captured block still computes its softmax; the others kept timm's fused path
    flags = [a.fused_attn for a in graph._attns]
    assert flags == [True, False, True]


def test_mixed_fused_graph_keeps_the_guarantees(fused_fp32, export_cache):
    """softmax, layer norms and head fp32; attention within 2e-3 of fp32 (16x sharpened)."""
    loaded, fp32_path = fused_fp32
    path = export_onnx(loaded, SPEC, "mixed", export_cache, PIXELS, attention=FUSED)
    m = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    half, full = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    fused = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(fused) == 2 and all(types.get(n.input[0]) == half for n in fused)
    for n in m.graph.node:
        if n.op_type in ("Softmax", "LayerNormalization") or any(
            s.startswith("vit.head") for s in node_scopes(n)
        ):
            assert all(types.get(i, full) == full for i in n.input if i), (n.op_type, n.name)
    u8 = batch()
    fp32 = OrtRunner(fp32_path, RuntimeOptions(threads=2)).run(u8)
    mixed = OrtRunner(path, RuntimeOptions(threads=2)).run(u8)  # CPU EP runs fp16 Attention
    assert fp32["attention"].max() > 0.2
    err = np.abs(mixed["attention"] - fp32["attention"]).max()
    assert 0 < err < 2e-3, err  # > 0: the mixed pass really converted something
    np.testing.assert_allclose(mixed["attention"].sum(-1), 1.0, atol=1e-3)


def test_variant_by_device_and_in_the_cache_key(tmp_path):
    from vit_attn import graphcache
    from vit_attn.config import parse_config

    assert (for_device("cpu"), for_device("cuda")) == (PLAIN, FUSED)
    raw = {
        "model": {"name": NAME, "kwargs": {"depth": 2}},
        "data": {"source": str(tmp_path)},
        "output": {"store": str(tmp_path / "s.zarr")},
    }
    keys = {
        graphcache.cache_key(
            parse_config(
                {**raw, "inference": {"device": d, "allow_cpu_fallback": True}}, base=tmp_path
            )
        )
        for d in ("cpu", "cuda")
    }
    assert len(keys) == 2


@pytest.mark.parametrize("logits", [True, False])
def test_cls_rows_beside_the_fused_kernel(export_cache, logits):
    """CLS maps alone: the captured block computes its CLS row from q and k and, when its
    output is needed (logits), runs the fused kernel like the others; without logits it stops
    after q and k and no later block exists in the graph. The maps are timm's."""
    loaded = model()
    spec = OutputSpec(layers=(1,), logits=logits, topk=0)
    graph = AttentionGraph(loaded, spec, PIXELS, FUSED)
    assert (graph.rows_blocks, graph.query_rows) == ((1,), 1)
    path = export_onnx(loaded, spec, "fp32", export_cache, PIXELS, attention=FUSED)
    nodes = onnx.load(str(path)).graph.node
    fused_blocks = sorted(block_of(n) for n in nodes if n.op_type == "Attention")
    assert fused_blocks == ([0, 1, 2] if logits else [0])
    assert softmax_shapes(path) == {1: [(3, 1, 197)]}
    assert bool(block_output_nodes(path, 1)) == logits
    assert logits or not [n for n in nodes if block_of(n) == 2]

    u8, outs, maps, want_logits = graph_and_timm(path)
    want = maps[1][:, :, 0, 1:].reshape(3, 1, -1, 14, 14).numpy()
    np.testing.assert_allclose(outs["cls_attention"], want, atol=1e-5, rtol=0)
    if logits:
        np.testing.assert_allclose(outs["logits"], want_logits, atol=1e-4, rtol=1e-4)
    eager = TorchRunner(graph, RuntimeOptions()).run(u8)
    np.testing.assert_allclose(eager["cls_attention"], want, atol=1e-5, rtol=0)


def test_capture_mode_is_in_the_export_key():
    from vit_attn.export import export_fingerprint

    loaded, spec = model(), OutputSpec(layers=(1,), logits=False, topk=0)
    keys = {export_fingerprint(loaded, spec, "fp32", PIXELS, PLAIN, c) for c in ("rows", "full")}
    assert len(keys) == 2


def test_the_pipeline_exports_the_device_variant(tmp_path, monkeypatch):
    """`graphcache.build` (what `vit-attn run` and `export` call) exports the variant of
    `inference.device` with the rows capture, as its cache key says."""
    from vit_attn import export, graphcache
    from vit_attn.config import parse_config
    from vit_attn.variant import ROWS

    asked: list[tuple[str, str]] = []

    def fake_export(*args, attention=PLAIN, capture="full", **kwargs):
        asked.append((attention, capture))
        graph = tmp_path / "graph.onnx"
        graph.write_bytes(b"")  # as an export would leave it (its size goes into the record)
        return graph

    monkeypatch.setattr(export, "export_onnx", fake_export)
    raw = {
        "model": {"name": NAME, "kwargs": {"depth": 1}},
        "data": {"source": str(tmp_path)},
        "output": {"store": str(tmp_path / "s.zarr")},
    }
    for device in ("cpu", "cuda"):
        inference = {"device": device, "allow_cpu_fallback": True, "cache_dir": str(tmp_path)}
        graphcache.build(parse_config({**raw, "inference": inference}, base=tmp_path), export=True)
    assert asked == [(PLAIN, ROWS), (FUSED, ROWS)]

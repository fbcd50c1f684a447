"""The exported graph's attention against timm's AttentionExtract and float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.utils import AttentionExtract

from vit_attn.export import AttentionGraph, OutputSpec, export_onnx
from vit_attn.runtime import OrtRunner, RuntimeOptions, TorchRunner

from .conftest import sharpened_model
from .helpers import block_output_nodes, softmax_shapes

# (timm name, extra create kwargs): CLS only, CLS + distillation token, CLS + 4 registers
# at a small non-default size, and a non-square input.
CASES = {
    "vit_tiny": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"img_size": (98, 70)}),
    "vit_nonsquare": ("vit_tiny_patch16_224", {"img_size": (96, 160)}),
}


def reference_attention(loaded, x: torch.Tensor) -> list[np.ndarray]:
    """Per-block softmax probabilities from timm's own extractor, on a separate model copy."""
    name, kwargs = loaded.source.name, dict(loaded.source.kwargs)
    twin = sharpened_model(
        name, factor=SHARPEN, seed=loaded.source.seed, img_size=loaded.source.img_size, **kwargs
    )
    extractor = AttentionExtract(twin.model, method="hook")
    with torch.no_grad():
        maps = extractor(x)
    assert len(maps) == loaded.layout.depth, (
        "AttentionExtract found no attention: fused attention on?"
    )
    return [m.double().numpy() for m in maps.values()]


SHARPEN = 16.0


@pytest.fixture(scope="module", params=list(CASES))
def exported_case(request, export_cache):
    name, kwargs = CASES[request.param]
    loaded = sharpened_model(name, factor=SHARPEN, **kwargs)
    spec = OutputSpec(layers=loaded.layout.resolve_layers([0, -1]), attention=True, rollout=True)
    path = export_onnx(loaded, spec, "fp32", cache_dir=export_cache)
    runner = OrtRunner(path, RuntimeOptions(threads=2))
    x = torch.randn(3, 3, *loaded.layout.input_size, generator=torch.Generator().manual_seed(1))
    outs = runner.run(x.numpy())
    return loaded, spec, x, outs, reference_attention(loaded, x)


def test_layout_records_prefix_tokens_and_grid(exported_case):
    loaded, *_ = exported_case
    lay = loaded.layout
    expected = {
        "vit_tiny_patch16_224": 1,
        "deit_tiny_distilled_patch16_224": 2,
        "vit_small_patch14_reg4_dinov2": 5,
    }[loaded.source.name]
    assert lay.num_prefix_tokens == expected
    h, w = lay.input_size
    assert lay.grid == (h // lay.patch_size[0], w // lay.patch_size[1])


def test_full_attention_matches_attention_extract(exported_case):
    loaded, spec, _, outs, ref = exported_case
    att = outs["attention"]
    lay = loaded.layout
    assert att.shape == (3, 2, lay.num_heads, lay.num_tokens, lay.num_tokens)
    for j, block in enumerate(spec.layers):
        np.testing.assert_allclose(att[:, j], ref[block], atol=1e-5, rtol=0)
    # sharpened enough that a wrong index would show
    assert ref[-1].max() > 0.2


def test_cls_attention_is_cls_row_over_patches(exported_case):
    loaded, spec, _, outs, ref = exported_case
    lay = loaded.layout
    gh, gw = lay.grid
    cls = outs["cls_attention"]
    assert cls.shape == (3, 2, lay.num_heads, gh, gw)
    for j, block in enumerate(spec.layers):
        expected = ref[block][:, :, 0, lay.num_prefix_tokens :].reshape(3, lay.num_heads, gh, gw)
        np.testing.assert_allclose(cls[:, j], expected, atol=1e-5, rtol=0)


def rollout_reference(
    attentions: list[np.ndarray], prefix: int, grid: tuple[int, int]
) -> np.ndarray:
    """Abnar & Zuidema rollout in float64, written independently of the graph."""
    batch, _, tokens, _ = attentions[0].shape
    result = np.zeros((batch, *grid))
    for b in range(batch):
        joint = np.eye(tokens)
        for a in attentions:
            fused = a[b].mean(axis=0) + np.eye(tokens)
            fused /= fused.sum(axis=1, keepdims=True)
            joint = fused @ joint
        result[b] = joint[0, prefix:].reshape(grid)
    return result


def test_rollout_matches_float64_reference(exported_case):
    loaded, _, _, outs, ref = exported_case
    expected = rollout_reference(ref, loaded.layout.num_prefix_tokens, loaded.layout.grid)
    np.testing.assert_allclose(outs["rollout"], expected, atol=1e-5, rtol=1e-4)


def test_logits_and_topk_match_torch(exported_case):
    loaded, spec, x, outs, _ = exported_case
    if loaded.layout.num_classes == 0:  # DINOv2 has no classifier: no logits, no top-k
        assert "logits" not in outs and "topk_index" not in outs
        return
    with torch.no_grad():
        logits = loaded.model(x).double().numpy()
    np.testing.assert_allclose(outs["logits"], logits, atol=1e-4, rtol=1e-4)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :5]
    np.testing.assert_array_equal(outs["topk_index"], top)
    np.testing.assert_allclose(outs["topk_prob"], np.take_along_axis(probs, top, 1), atol=1e-6)


def test_torch_backend_equals_onnxruntime(exported_case):
    loaded, spec, x, outs, _ = exported_case
    runner = TorchRunner(AttentionGraph(loaded, spec), RuntimeOptions())
    torch_outs = runner.run(x.numpy())
    for name in ("cls_attention", "attention", "rollout"):
        np.testing.assert_allclose(torch_outs[name], outs[name], atol=1e-5)


def test_cls_maps_alone_compute_the_cls_rows_only(exported_case, export_cache):
    """Blocks 0 and -1, CLS maps only: each block computes its CLS row from q and k (block 0
    still runs its own attention for block 1), the last one stops after q and k, in the graph
    and in eager torch; the maps equal those of the full graph."""
    loaded, spec, x, outs, _ = exported_case
    lay = loaded.layout
    rows_spec = OutputSpec(layers=spec.layers, logits=False, topk=0)
    graph = AttentionGraph(loaded, rows_spec)
    assert (graph.rows_blocks, graph.query_rows, graph.stop_block) == (
        spec.layers,
        1,
        lay.depth - 1,
    )
    path = export_onnx(loaded, rows_spec, "fp32", cache_dir=export_cache)
    got = OrtRunner(path, RuntimeOptions(threads=2)).run(x.numpy())
    assert list(got) == ["cls_attention"]
    np.testing.assert_allclose(got["cls_attention"], outs["cls_attention"], atol=1e-5, rtol=0)
    row = (lay.num_heads, 1, lay.num_tokens)
    whole = (lay.num_heads, lay.num_tokens, lay.num_tokens)
    shapes = softmax_shapes(path)
    assert sorted(shapes[0]) == sorted([whole, row]) and shapes[lay.depth - 1] == [row]
    assert block_output_nodes(path, 0) and not block_output_nodes(path, lay.depth - 1)

    last = loaded.model.blocks[-1]
    calls: list[str] = []
    hooks = [
        last.attn.proj.register_forward_hook(lambda *_: calls.append("proj")),
        last.mlp.register_forward_hook(lambda *_: calls.append("mlp")),
    ]
    try:
        eager = TorchRunner(graph, RuntimeOptions()).run(x.numpy())
    finally:
        for h in hooks:
            h.remove()
    assert calls == []  # eager torch stops after the last block's q and k
    np.testing.assert_allclose(eager["cls_attention"], outs["cls_attention"], atol=1e-5, rtol=0)
    # The full graph's wrapper on the same model is neither stopped nor captured into by it.
    again = TorchRunner(AttentionGraph(loaded, spec), RuntimeOptions()).run(x.numpy())
    np.testing.assert_allclose(again["attention"], outs["attention"], atol=1e-5)


@pytest.mark.slow  # two exports: fp32 and mixed
def test_mixed_precision_within_2e3_on_16x_sharpened_attention(export_cache):
    loaded = sharpened_model("vit_tiny_patch16_224", factor=16.0, seed=3)
    spec = OutputSpec(
        layers=tuple(range(loaded.layout.depth)), attention=True, topk=0, logits=False
    )
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    fp32 = OrtRunner(export_onnx(loaded, spec, "fp32", export_cache), RuntimeOptions()).run(x)
    mixed = OrtRunner(export_onnx(loaded, spec, "mixed", export_cache), RuntimeOptions()).run(x)
    assert fp32["attention"].max() > 0.2  # peaked attention, where fp16 activations hurt most
    err = np.abs(mixed["attention"] - fp32["attention"]).max()
    assert err < 2e-3, err
    np.testing.assert_allclose(mixed["attention"].sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(mixed["cls_attention"], fp32["cls_attention"], atol=2e-3)


def test_mixed_graph_keeps_softmax_and_layernorm_in_fp32(export_cache):
    import onnx

    loaded = sharpened_model("vit_tiny_patch16_224", factor=1.0, seed=4, depth=2)
    path = export_onnx(loaded, OutputSpec(layers=(1,)), "mixed", export_cache)
    model = onnx.load(str(path))
    model = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == "MatMul" and "attn.qkv" in str(node.metadata_props):
            assert types[node.output[0]] == onnx.TensorProto.FLOAT16, node.name
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert weights, "no fp16 weights: the conversion did nothing"


def test_partial_batches_and_batch_one(export_cache):
    loaded = sharpened_model("vit_tiny_patch16_224", seed=5, depth=2)
    spec = OutputSpec(layers=(1,))
    runner = OrtRunner(export_onnx(loaded, spec, "fp32", export_cache), RuntimeOptions(threads=1))
    x = np.random.default_rng(1).standard_normal((5, 3, 224, 224)).astype(np.float32)
    full = runner.run(x)["cls_attention"]
    for lo, hi in ((0, 1), (1, 4), (4, 5)):
        np.testing.assert_allclose(runner.run(x[lo:hi])["cls_attention"], full[lo:hi], atol=1e-6)

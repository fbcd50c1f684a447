"""uint8 pixels in, normalised in the graph: equal to the host's numpy preprocessing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from timm.utils import AttentionExtract

from vit_attn.decode import Preprocess, normalize
from vit_attn.errors import BackendError
from vit_attn.export import AttentionGraph, export_onnx
from vit_attn.graphinput import FLOAT_NCHW, UINT8_NHWC, GraphInput
from vit_attn.precision import node_scopes
from vit_attn.runtime import OrtRunner, RuntimeOptions, TorchRunner
from vit_attn.specs import OutputSpec

from .conftest import sharpened_model

SIZE = (48, 64)  # non-square: an H/W swap in the layout would show
# A model's own eval statistics (not ImageNet's) so a hard-coded mean would show.
PREP = Preprocess(SIZE, mean=(0.5, 0.25, 0.75), std=(0.2, 0.3, 0.4))


def pixels(n: int, seed: int = 0) -> np.ndarray:
    """Every level 0..255 in every channel, in random places."""
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)
    u8.reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]
    return u8


@pytest.fixture(scope="module")
def model():
    return sharpened_model("vit_tiny_patch16_224", factor=16.0, seed=5, img_size=SIZE, depth=2)


@pytest.fixture(scope="module")
def spec(model):
    return OutputSpec(layers=(0, 1), attention=True, logits=True, topk=3)


def _with_normalised_output(path, out_path) -> str:
    """The exported graph plus the output of its input normalisation as one more output."""
    m = onnx.load(str(path))
    inside = [n for n in m.graph.node if any(s == "pixels" for s in node_scopes(n))]
    assert inside, "no node of the PixelNormalize module in the graph"
    name = inside[-1].output[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(out_path))
    return name


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_graph_normalises_like_numpy_to_1e6(model, spec, export_cache, tmp_path, precision):
    path = export_onnx(model, spec, precision, export_cache, GraphInput.pixels(PREP.mean, PREP.std))
    name = _with_normalised_output(path, tmp_path / "probe.onnx")
    runner = OrtRunner(tmp_path / "probe.onnx", RuntimeOptions(threads=1))
    assert runner.input_format == UINT8_NHWC
    u8 = pixels(3)
    got = runner.run(u8)[name]
    expected = normalize(u8, PREP)
    assert got.dtype == np.float32 and got.shape == (3, 3, *SIZE)  # NCHW inside, fp32 in mixed
    assert np.abs(got - expected).max() <= 1e-6
    # and the independent float64 definition, (x / 255 - mean) / std
    ref = (u8.transpose(0, 3, 1, 2) / 255.0 - np.array(PREP.mean)[:, None, None]) / np.array(
        PREP.std
    )[:, None, None]
    assert np.abs(got - ref).max() <= 1e-5


def test_uint8_graph_equals_float_graph_and_timm(model, spec, export_cache):
    u8 = pixels(3, seed=1)
    x = normalize(u8, PREP)
    graph_u8 = OrtRunner(
        export_onnx(model, spec, "fp32", export_cache, GraphInput.pixels(PREP.mean, PREP.std)),
        RuntimeOptions(threads=1),
    )
    graph_f32 = OrtRunner(export_onnx(model, spec, "fp32", export_cache), RuntimeOptions(threads=1))
    assert graph_f32.input_format == FLOAT_NCHW
    a, b = graph_u8.run(u8), graph_f32.run(x)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    # timm's own extractor on the host-normalised batch (an independent reference)
    twin = sharpened_model("vit_tiny_patch16_224", factor=16.0, seed=5, img_size=SIZE, depth=2)
    with torch.no_grad():
        maps = list(AttentionExtract(twin.model, method="hook")(torch.from_numpy(x)).values())
    assert maps[1].max() > 0.2
    for j in range(2):
        np.testing.assert_allclose(a["attention"][:, j], maps[j].numpy(), atol=1e-5)


def test_torch_backend_takes_the_same_pixels(model, spec, export_cache):
    u8 = pixels(2, seed=2)
    torch_runner = TorchRunner(
        AttentionGraph(model, spec, GraphInput.pixels(PREP.mean, PREP.std)), RuntimeOptions()
    )
    assert torch_runner.input_format == UINT8_NHWC
    ort = OrtRunner(
        export_onnx(model, spec, "fp32", export_cache, GraphInput.pixels(PREP.mean, PREP.std)),
        RuntimeOptions(threads=1),
    )
    a, b = torch_runner.run(u8), ort.run(u8)
    for name in ("cls_attention", "attention", "logits"):
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


def test_io_binding_takes_uint8(model, spec, export_cache):
    path = export_onnx(model, spec, "fp32", export_cache, GraphInput.pixels(PREP.mean, PREP.std))
    plain = OrtRunner(path, RuntimeOptions(threads=1))
    bound = OrtRunner(path, RuntimeOptions(threads=1), io_binding=True)
    u8 = pixels(2, seed=3)
    np.testing.assert_array_equal(bound.run(u8)["attention"], plain.run(u8)["attention"])
    # a batch already in a torch tensor (the device-decode path): its memory is bound as is
    from_tensor = plain.run_tensor(torch.from_numpy(u8))
    np.testing.assert_array_equal(from_tensor["attention"], plain.run(u8)["attention"])
    with pytest.raises(BackendError, match="takes uint8-nhwc batches, got torch.float32"):
        plain.run_tensor(torch.zeros((1, *SIZE, 3)))


def test_wrong_input_format_is_one_clear_error(model, spec, export_cache):
    u8 = pixels(1)
    graph_f32 = OrtRunner(export_onnx(model, spec, "fp32", export_cache), RuntimeOptions(threads=1))
    # An old float graph is never fed pixels: it names the graph and says what to do.
    with pytest.raises(BackendError, match=r"float32 \[B, 3, H, W\].*got uint8.*re-export"):
        graph_f32.run(u8)
    graph_u8 = OrtRunner(
        export_onnx(model, spec, "fp32", export_cache, GraphInput.pixels(PREP.mean, PREP.std)),
        RuntimeOptions(threads=1),
    )
    with pytest.raises(BackendError, match=r"uint8 \[B, H, W, 3\].*got float32"):
        graph_u8.run(normalize(u8, PREP))
    with pytest.raises(BackendError, match=r"uint8 \[B, H, W, 3\].*\[1, 3, 48, 64\]"):
        graph_u8.run(u8.transpose(0, 3, 1, 2).copy())  # NCHW pixels: channels last expected
    with pytest.raises(BackendError, match="graph input must be one of"):
        GraphInput("uint8-nchw")


def test_input_format_is_in_the_export_key(model, spec, export_cache):
    f32 = export_onnx(model, spec, "fp32", export_cache)
    u8 = export_onnx(model, spec, "fp32", export_cache, GraphInput.pixels(PREP.mean, PREP.std))
    other = export_onnx(model, spec, "fp32", export_cache, GraphInput.pixels(PREP.mean, (1, 1, 1)))
    assert len({f32, u8, other}) == 3
    assert onnx.load(str(u8)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


def test_input_format_is_in_the_graph_cache_key(tmp_path, monkeypatch):
    """The fast start's key changes with the pipeline's input format (no model is built)."""
    from vit_attn import graphcache
    from vit_attn.config import parse_config

    raw = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}},
        "data": {"source": str(tmp_path)},
        "output": {"store": str(tmp_path / "s.zarr")},
        "inference": {"cache_dir": str(tmp_path / "cache")},
    }
    cfg = parse_config(raw, base=tmp_path)
    key = graphcache.cache_key(cfg)
    assert graphcache.cache_key(cfg) == key
    monkeypatch.setattr(graphcache, "PIPELINE_INPUT", FLOAT_NCHW)
    assert graphcache.cache_key(cfg) != key

"""Overlays made in the exported graph: the same bytes as numpy's `overlay.blend`.

The reference is `overlay.blend` (and `head_grid`) applied to the graph's own maps as the
store keeps them (float16), i.e. what `task.py` computed on the host before the graph made
overlays; the head mean inside the graph is checked against the stored map directly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import zarr
from PIL import Image

from vit_attn import graphcache
from vit_attn.cli import main as cli_main
from vit_attn.config import parse_config
from vit_attn.export import AttentionGraph, export_fingerprint, export_onnx
from vit_attn.graphinput import GraphInput
from vit_attn.outputs import png_path
from vit_attn.overlay import blend, colormap_lut, head_grid
from vit_attn.precision import node_scopes
from vit_attn.render import model_input_image
from vit_attn.runtime import OrtRunner, RuntimeOptions, TorchRunner
from vit_attn.specs import OutputSpec
from vit_attn.task import overlay_maps

from .conftest import sharpened_model
from .helpers import write_config

SIZE = (48, 64)  # non-square: 3 x 4 patches, an H/W swap shows
PIXELS = GraphInput.pixels((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    return sharpened_model("vit_tiny_patch16_224", factor=8.0, seed=3, img_size=SIZE, depth=2)


def heads_spec(**kw) -> OutputSpec:
    return OutputSpec(layers=(0, 1), logits=False, topk=0, overlays="heads", **kw)


def reference(outs: dict[str, np.ndarray], u8: np.ndarray, alpha=0.5, cmap="inferno"):
    """numpy's overlays of the graph's maps as the store holds them (float16)."""
    stored = {k: v.astype(np.float16) for k, v in outs.items() if k.endswith("_attention")}
    heads = overlay_maps(stored)  # [n, heads, gh, gw] float32
    mean = blend(u8, heads.mean(axis=1), alpha, cmap)
    n, nh = heads.shape[:2]
    per_head = blend(np.repeat(u8, nh, 0), heads.reshape(n * nh, *heads.shape[2:]), alpha, cmap)
    return mean, per_head.reshape(n, nh, *u8.shape[1:])


def assert_same_picture(got: np.ndarray, want: np.ndarray) -> None:
    """Within 1 LSB, and (a level tie apart) the same bytes."""
    assert got.dtype == np.uint8 and got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1
    assert (diff != 0).mean() <= 1e-4


def run_backend(backend: str, model, spec, export_cache, u8):
    if backend == "torch":
        graph = AttentionGraph(model, spec, PIXELS)
        return TorchRunner(graph, RuntimeOptions(threads=1)).run(u8)
    path = export_onnx(model, spec, backend, export_cache, PIXELS)
    return OrtRunner(path, RuntimeOptions(threads=1)).run(u8)


@pytest.mark.parametrize(
    "backend",
    [
        "fp32",
        pytest.param("mixed", marks=pytest.mark.slow),
        pytest.param("torch", marks=pytest.mark.slow),
    ],
)
def test_graph_overlays_equal_numpy_blend(model, export_cache, backend):
    spec = heads_spec()
    u8 = pixels(5)
    outs = run_backend(backend, model, spec, export_cache, u8)
    assert outs["overlay"].shape == (5, *SIZE, 3)
    assert outs["overlay_heads"].shape == (5, 3, *SIZE, 3)
    mean, per_head = reference(outs, u8)
    assert_same_picture(outs["overlay"], mean)
    assert_same_picture(outs["overlay_heads"], per_head)
    assert outs["overlay"].std() > 10  # a picture, not a constant


def _with_mean_map_output(path, out_path) -> str:
    """The graph plus its overlay head mean (the one Div of the overlay nodes) as an output."""
    m = onnx.load(str(path))
    divs = [n for n in m.graph.node if n.op_type == "Div" and "overlays" in node_scopes(n)]
    assert len(divs) == 1, [n.name for n in divs]
    name = divs[0].output[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(out_path))
    return name


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_graph_mean_map_is_the_stored_head_mean(model, export_cache, tmp_path, precision):
    path = export_onnx(model, heads_spec(), precision, export_cache, PIXELS)
    name = _with_mean_map_output(path, tmp_path / "probe.onnx")
    outs = OrtRunner(tmp_path / "probe.onnx", RuntimeOptions(threads=1)).run(pixels(4, seed=1))
    stored = outs["cls_attention"].astype(np.float16)  # what the store keeps
    np.testing.assert_array_equal(outs[name], stored[:, -1].astype(np.float32).mean(axis=1))
    # and an independent float64 head mean of the last layer
    ref = outs["cls_attention"][:, -1].astype(np.float64).mean(axis=1)
    np.testing.assert_allclose(outs[name], ref, rtol=2e-3, atol=1e-6)


@pytest.mark.slow
def test_mean_graph_returns_the_same_overlay(model, export_cache):
    u8 = pixels(3, seed=2)
    mean_spec = dataclasses.replace(heads_spec(), overlays="mean")
    graph = AttentionGraph(model, mean_spec, PIXELS)
    assert graph.output_names == ["cls_attention", "overlay"]
    got = OrtRunner(export_onnx(model, mean_spec, "fp32", export_cache, PIXELS), RuntimeOptions())
    heads = OrtRunner(
        export_onnx(model, heads_spec(), "fp32", export_cache, PIXELS), RuntimeOptions()
    )
    np.testing.assert_array_equal(got.run(u8)["overlay"], heads.run(u8)["overlay"])


def test_float_input_graph_has_no_overlays(model):
    assert AttentionGraph(model, heads_spec()).output_names == ["cls_attention"]
    assert "overlay" not in AttentionGraph(model, OutputSpec(layers=(1,)), PIXELS).output_names


@pytest.mark.slow
@pytest.mark.parametrize(
    ("alpha", "cmap"), [(0.0, "inferno"), (1.0, "viridis"), (0.3, "gray"), (0.7, "jet")]
)
def test_alpha_and_colormap(model, export_cache, alpha, cmap):
    spec = heads_spec(overlay_alpha=alpha, colormap=cmap)
    u8 = pixels(3, seed=4)
    outs = run_backend("fp32", model, spec, export_cache, u8)
    mean, per_head = reference(outs, u8, alpha, cmap)
    assert_same_picture(outs["overlay"], mean)
    assert_same_picture(outs["overlay_heads"], per_head)
    if alpha == 0.0:  # the image itself
        np.testing.assert_array_equal(outs["overlay"], u8)
        np.testing.assert_array_equal(outs["overlay_heads"], np.repeat(u8[:, None], 3, 1))
    if alpha == 1.0:  # the colour table alone
        lut = {tuple(c) for c in colormap_lut(cmap)}
        assert {tuple(c) for c in outs["overlay"].reshape(-1, 3)} <= lut


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pool", "map_name", "latents"),
    [("avg", "received_attention", 0), ("map", "pool_attention", 1), ("map", "pool_attention", 2)],
)
def test_models_without_class_token(export_cache, pool, map_name, latents):
    loaded = sharpened_model(
        "vit_tiny_patch16_224",
        factor=8.0,
        seed=1,
        img_size=SIZE,
        depth=2,
        class_token=False,
        global_pool=pool,
    )
    if latents == 2:  # no timm preset has two latent queries: swap a pool in (test_families)
        from timm.layers import AttentionPoolLatent

        from vit_attn.model import token_layout

        torch.manual_seed(0)
        attn_pool = AttentionPoolLatent(192, num_heads=3, latent_len=2, pool_type="avg")
        with torch.no_grad():
            attn_pool.latent *= 40.0
        attn_pool.fused_attn = False
        loaded.model.attn_pool = attn_pool.eval()
        loaded.layout = token_layout(loaded.model)
    lay = loaded.layout
    assert lay.maps[0] == map_name and lay.pool_latents == latents
    spec = OutputSpec(
        layers=(0, 1),
        logits=False,
        topk=0,
        cls_attention=False,
        received_attention=map_name == "received_attention",
        pool_attention=map_name == "pool_attention",
        class_token=False,
        overlays="heads",
    )
    u8 = pixels(3, seed=5)
    for backend in ("fp32", "torch"):
        outs = run_backend(backend, loaded, spec, export_cache, u8)
        assert map_name in outs and "cls_attention" not in outs
        if latents == 2:
            assert outs[map_name].shape == (3, 2, 3, *lay.grid)
        mean, per_head = reference(outs, u8)
        assert_same_picture(outs["overlay"], mean)
        assert_same_picture(outs["overlay_heads"], per_head)


@pytest.mark.slow
def test_mixed_graph_keeps_overlay_nodes_fp32(model, export_cache):
    path = export_onnx(model, heads_spec(), "mixed", export_cache, PIXELS)
    graph = onnx.load(str(path)).graph
    nodes = [n for n in graph.node if "overlays" in node_scopes(n)]
    assert len(nodes) > 20
    # The mixed pass names what it converts `<tensor>__fp16`: no overlay node touches one.
    for node in nodes:
        assert not any(t.endswith("__fp16") for t in (*node.input, *node.output)), node.name
    # The only fp16 there is the deliberate rounding of the map to the store's dtype.
    to_half = [
        n
        for n in nodes
        if n.op_type == "Cast" and onnx.helper.get_attribute_value(n.attribute[0]) == 10
    ]
    assert [list(n.input) for n in to_half] == [["cls_attention"]]
    assert {o.name: o.type.tensor_type.elem_type for o in graph.output}["overlay"] == (
        onnx.TensorProto.UINT8
    )


def test_overlay_settings_are_in_the_export_and_cache_keys(model, tmp_path):
    keys = {
        export_fingerprint(model, heads_spec(**kw), "fp32", PIXELS)
        for kw in ({}, {"overlay_alpha": 0.6}, {"colormap": "viridis"})
    }
    keys.add(export_fingerprint(model, dataclasses.replace(heads_spec(), overlays="mean"), "fp32"))
    assert len(keys) == 4

    raw = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}},
        "data": {"source": str(tmp_path)},
        "inference": {"cache_dir": str(tmp_path / "cache")},
    }

    def key(**output) -> str:
        cfg = {**raw, "output": {"store": str(tmp_path / "s.zarr"), **output}}
        return graphcache.cache_key(parse_config(cfg, base=tmp_path))

    on = {
        key(overlays="heads"),
        key(overlays="heads", overlay_alpha=0.6),
        key(overlays="heads", colormap="viridis"),
        key(overlays="mean"),
        key(overlays="none"),
    }
    assert len(on) == 5
    # without overlays, their settings do not decide the graph
    assert key(overlays="none") == key(overlays="none", colormap="viridis", overlay_alpha=0.2)


@pytest.mark.slow
def test_run_stores_the_graph_overlays_and_pngs(
    tmp_path, small_dataset, small_checkpoint, export_cache, monkeypatch
):
    """A whole run: the store's overlays and the head-grid PNGs come from the graph (numpy's
    blend is not called) and equal numpy's pictures; the broken image's rows stay zeros."""
    from vit_attn import task

    def no_host_blend(*args, **kwargs):
        raise AssertionError("overlays blended on the host although the graph made them")

    monkeypatch.setattr(task, "blend", no_host_blend)
    monkeypatch.setattr(task, "head_grid", no_host_blend)
    config = write_config(
        tmp_path,
        small_dataset,
        small_checkpoint,
        export_cache,
        attention={"layers": [0, -1], "rollout": False, "full": False},
        output={"png_dir": str(tmp_path / "png"), "png_heads": True, "colormap": "viridis"},
    )
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    group = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")
    status = group["status"][:]
    ok = np.flatnonzero(status == 1)
    failed = np.flatnonzero(status == 2)
    assert len(ok) == 24 and len(failed) == 1
    assert not group["overlay"][int(failed[0])].any()
    assert not group["overlay_heads"][int(failed[0])].any()
    heads = overlay_maps({"cls_attention": group["cls_attention"][:]})
    paths = group["image_path"][:]
    for i in ok[:6]:
        image = model_input_image(group, int(i))
        want = blend(image[None], heads[i : i + 1].mean(axis=1), 0.5, "viridis")[0]
        assert_same_picture(group["overlay"][int(i)], want)
        want_heads = blend(np.repeat(image[None], 3, 0), heads[i], 0.5, "viridis")
        assert_same_picture(group["overlay_heads"][int(i)], want_heads)
        target = png_path(tmp_path / "png", group.attrs["image_root"], str(paths[i]), ".heads.png")
        grid = np.asarray(Image.open(target))
        assert_same_picture(grid, head_grid(image, heads[i], 0.5, "viridis"))


@pytest.mark.slow
def test_torch_runner_overlays_match_ort(model, export_cache):
    """The torch backend's graph and the exported one return the same overlays."""
    u8 = pixels(2, seed=6)
    spec = heads_spec()
    ort_outs = run_backend("fp32", model, spec, export_cache, u8)
    with torch.inference_mode():
        torch_outs = run_backend("torch", model, spec, export_cache, u8)
    assert_same_picture(torch_outs["overlay_heads"], ort_outs["overlay_heads"])


@pytest.mark.slow
def test_io_binding_returns_the_overlays(model, export_cache):
    """uint8 outputs get preallocated host buffers under IO binding (the GPU path's code)."""
    u8 = pixels(2, seed=7)
    path = export_onnx(model, heads_spec(), "fp32", export_cache, PIXELS)
    bound = OrtRunner(path, RuntimeOptions(threads=1), io_binding=True)
    plain = OrtRunner(path, RuntimeOptions(threads=1)).run(u8)
    got = bound.run(u8)
    binding = next(iter(bound._bindings.values()))
    assert "overlay_heads" in binding.buffers and not binding.dynamic
    for name in ("overlay", "overlay_heads"):
        np.testing.assert_array_equal(got[name], plain[name])

"""One row per ViT family of the README's coverage table: exact maps, or a one-line refusal.

Each row builds a depth-2, random-init, 16x-sharpened model, exports the graph the pipeline
would export for it (fp32 ONNX), runs it with onnxruntime and compares every stored map with
timm's `AttentionExtract` (fx method: the model's own softmax nodes, block attention and the
attention pool's) on a separate copy of the model: <= 1e-5. The token roles, the maps a store
gets (never `cls_attention` without a class token) and the token stride are checked too.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
import zarr
from safetensors.torch import save_file
from timm.utils import AttentionExtract

from vit_attn.analysis import compute_stats_from_attention
from vit_attn.cli import main as cli_main
from vit_attn.errors import ModelError
from vit_attn.export import AttentionGraph, export_onnx, one_line, root_cause
from vit_attn.model import ModelSource, TokenLayout, load_model
from vit_attn.overlay import blend
from vit_attn.render import model_input_image
from vit_attn.runtime import OrtRunner, RuntimeOptions
from vit_attn.specs import OutputSpec
from vit_attn.stats import CLS_STAT_NAMES, STAT_NAMES

from .conftest import sharpened_model
from .helpers import block_output_nodes, softmax_shapes, stats_reference

SHARPEN = 16.0
# A random-init attention pool's logits are ~100x smaller than a block's: sharpened 16x like
# the blocks it stays near uniform, so its queries get this much more.
POOL_SHARPEN = 30.0
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4}
CLS, POOL, RECEIVED = "cls_attention", "pool_attention", "received_attention"
R = "register"

# family -> (timm name, create kwargs, img_size, prefix roles, pooling, stored maps, stride)
FAMILIES: dict[str, tuple] = {
    "vit": ("vit_tiny_patch16_224", SMALL, (48, 80), ("class",), "class_token", (CLS,), 16),
    # `dynamic_img_size` (position embeddings resampled to the input): runs at its img_size.
    "vit_dynamic_img_size": (
        "vit_tiny_patch16_224",
        {**SMALL, "dynamic_img_size": True},
        (48, 80),
        ("class",),
        "class_token",
        (CLS,),
        16,
    ),
    "deit_distilled": (
        "deit_tiny_distilled_patch16_224",
        SMALL,
        (48, 64),
        ("class", "distillation"),
        "class_token",
        (CLS,),
        16,
    ),
    "deit3": ("deit3_small_patch16_224", SMALL, (48, 64), ("class",), "class_token", (CLS,), 16),
    "dinov2": ("vit_small_patch14_dinov2", SMALL, (42, 56), ("class",), "class_token", (CLS,), 14),
    "dinov2_reg4": (
        "vit_small_patch14_reg4_dinov2",
        SMALL,
        (42, 56),
        ("class", R, R, R, R),
        "class_token",
        (CLS,),
        14,
    ),
    "clip": ("vit_base_patch16_clip_224", SMALL, (48, 64), ("class",), "class_token", (CLS,), 16),
    "eva02": ("eva02_tiny_patch14_224", SMALL, (42, 56), ("class",), "average", (CLS,), 14),
    "beit": ("beit_base_patch16_224", SMALL, (48, 64), ("class",), "average", (CLS,), 16),
    "flexivit": ("flexivit_small", SMALL, (48, 64), ("class",), "class_token", (CLS,), 16),
    "hybrid_resnet": (
        "vit_tiny_r_s16_p8_224",
        {"depth": 2},
        (96, 128),
        ("class",),
        "class_token",
        (CLS,),
        32,
    ),
    # BatchNorm in the stem: a 0-dim buffer (num_batches_tracked) crashed the weights digest
    "hybrid_batchnorm": (
        "vit_small_resnet26d_224",
        {"depth": 2},
        (64, 96),
        ("class",),
        "class_token",
        (CLS,),
        32,
    ),
    "gap": ("vit_medium_patch16_gap_256", SMALL, (48, 64), (), "average", (RECEIVED,), 16),
    "reg_gap": (
        "vit_base_patch16_reg4_gap_256",
        SMALL,
        (48, 64),
        (R, R, R, R),
        "average",
        (RECEIVED,),
        16,
    ),
    "rope_reg1_gap": (
        "vit_base_patch16_rope_reg1_gap_256",
        SMALL,
        (48, 64),
        (R,),
        "average",
        (RECEIVED,),
        16,
    ),
    "siglip": (
        "vit_base_patch16_siglip_224",
        SMALL,
        (48, 64),
        (),
        "attention_pool",
        (POOL,),
        16,
    ),
    "siglip_reg4_map": (
        "vit_so150m_patch16_reg4_map_256",
        SMALL,
        (48, 64),
        (R, R, R, R),
        "attention_pool",
        (POOL,),
        16,
    ),
    "pe_core": (
        "vit_pe_core_tiny_patch16_384",
        {"depth": 2, "attn_pool_num_heads": 3},
        (48, 64),
        ("class",),
        "attention_pool",
        (POOL, CLS),
        16,
    ),
    "dinov3": (
        "vit_small_patch16_dinov3",
        SMALL,
        (48, 64),
        ("class", R, R, R, R),
        "average",
        (CLS,),
        16,
    ),
    "rope_mixed": (
        "vit_base_patch16_rope_mixed_224",
        SMALL,
        (48, 64),
        ("class",),
        "class_token",
        (CLS,),
        16,
    ),
    "aimv2": ("aimv2_large_patch14_224", SMALL, (42, 56), (), "average", (RECEIVED,), 14),
    # The pretrained config's pool: 8 heads over blocks of 4 (the store's `pool_head` dim).
    "pe_core_pool_heads": (
        "vit_pe_core_tiny_patch16_384",
        SMALL,
        (48, 64),
        ("class",),
        "attention_pool",
        (POOL, CLS),
        16,
    ),
    # Layers are the class-attention blocks (`blocks_token_only`): the class token's row only.
    "cait": ("cait_xxs24_224", SMALL, (48, 64), ("class",), "class_token", (CLS,), 16),
}
# Families whose blocks are timm's plain `Attention`: with CLS maps alone, each captured block
# computes its CLS query row only. The others add terms inside the softmax (rope, relative
# position bias) and keep capturing the whole softmax.
ROWS_ONLY = {
    "vit",
    "vit_dynamic_img_size",
    "deit_distilled",
    "deit3",
    "dinov2",
    "dinov2_reg4",
    "clip",
    "flexivit",
    "hybrid_resnet",
    "hybrid_batchnorm",
}
REFUSED = {
    "cait_without_class_attention": (
        "cait_xxs24_224",
        {"depth": 2, "depth_token_only": 0},
        r"\(CaiT\) has no class-attention blocks: .* mixes heads after the softmax.*"
        r"depth_token_only >= 1",
    ),
    "xcit": (
        "xcit_nano_12_p16_224",
        {"depth": 2},
        r"\(XCiT\) is not supported: .* across feature channels",
    ),
    # refused by accident of a shape check, "not attention over this model's tokens"
    "sam": (
        "samvit_base_patch16",
        {"depth": 2, "embed_dim": 64, "num_heads": 4, "global_attn_indexes": [1]},
        r"\(SAM's image encoder\) is not supported: .* attend within windows",
    ),
    "parallel_blocks": (
        "vit_small_patch16_18x2_224",
        {"depth": 2},
        r"\(parallel blocks\) is not supported: .* compute attention inline",
    ),
    "convit_class_token_never_joins": (
        "convit_tiny",
        {"depth": 2},
        r"\(ConViT\) has no block after its class token joins \(local_up_to_layer 10",
    ),
    # its refusal said "attention has shape [8, 5, 5], not [heads=4, ...]"
    "differential_attention": (
        "vit_dwee_patch16_reg1_gap_256",
        {"depth": 2},
        r"\(differential attention\) is not supported: .* subtracts one softmax from another",
    ),
}


def build(name: str, kwargs: dict, img_size):
    """The sharpened model of one row (conftest.sharpen, and more for an attention pool)."""
    loaded = sharpened_model(name, factor=SHARPEN, img_size=img_size, **kwargs)
    pool = getattr(loaded.model, "attn_pool", None)
    if pool is not None:
        with torch.no_grad():
            pool.q.weight *= POOL_SHARPEN
            pool.q.bias *= POOL_SHARPEN
    return loaded


def reference(name: str, kwargs: dict, img_size, x: torch.Tensor):
    """timm's AttentionExtract on the softmax nodes of a separate copy of the sharpened model:
    the blocks' (for CaiT the class-attention blocks') and the attention pool's."""
    twin = build(name, kwargs, img_size).model
    names = ["*attn.softmax"] + (["attn_pool.softmax"] if getattr(twin, "attn_pool", None) else [])
    layers = "blocks_token_only." if getattr(twin, "blocks_token_only", None) else "blocks."
    with torch.no_grad():
        found = AttentionExtract(twin, names=names, method="fx")(x)
    blocks = [v.double().numpy() for k, v in found.items() if k.startswith(layers)]
    pool = found.get("attn_pool.softmax")
    return blocks, None if pool is None else pool.double().numpy()


def output_spec(layout) -> OutputSpec:
    """What `plan.output_spec` asks for with layers: all, full: true, and stats: true for models
    without a class token (the statistics add ~60% to an export; CLS models' statistics are
    tested in tests/test_stats.py, the patch-only ones of CLS-free models here)."""
    return OutputSpec(
        layers=tuple(range(layout.depth)),
        logits=False,
        topk=min(5, layout.num_classes),
        cls_attention=CLS in layout.maps,
        attention=not layout.class_queries_only,  # CaiT: the class token's rows only
        stats=not layout.has_class_token,
        received_attention=RECEIVED in layout.maps,
        pool_attention=POOL in layout.maps,
        class_token=layout.has_class_token,
    )


@pytest.mark.parametrize(
    "family",
    [f if f == "vit" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
    + list(REFUSED),  # `make test-fast` keeps one exact family and the refusals
)
def test_family(family, export_cache):
    if family in REFUSED:
        name, kwargs, reason = REFUSED[family]
        with pytest.raises(ModelError, match=reason) as caught:
            load_model(ModelSource(name, kwargs=kwargs))
        assert "\n" not in str(caught.value)
        return
    name, kwargs, img_size, roles, pooling, maps, stride = FAMILIES[family]
    loaded = build(name, kwargs, img_size)
    lay = loaded.layout
    assert (lay.prefix_roles, lay.pooling, lay.maps) == (roles, pooling, maps)
    assert lay.patch_size == (stride, stride)
    assert lay.input_size == (lay.grid[0] * stride, lay.grid[1] * stride)
    assert TokenLayout.from_dict(json.loads(json.dumps(dataclasses.asdict(lay)))) == lay
    p, (gh, gw), nh = lay.num_prefix_tokens, lay.grid, lay.num_heads

    spec = output_spec(lay)
    path = export_onnx(loaded, spec, "fp32", cache_dir=export_cache)
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(3))
    outs = OrtRunner(path, RuntimeOptions(threads=2)).run(x.numpy())
    blocks, pool = reference(name, kwargs, img_size, x)
    assert len(blocks) == lay.depth

    stored = {n for n in outs if n.endswith("_attention")}
    assert stored == set(maps)  # no model without a class token gets a cls_attention
    ref = np.stack(blocks, axis=1)  # [B, L, H, T, T]; CaiT [B, L, H, 1, T]
    assert ref.shape[-2:] == ((1,) if lay.class_queries_only else (lay.num_tokens,)) + (
        lay.num_tokens,
    )
    assert ref.max() > 0.2  # sharpened: an index error would show
    if spec.attention:
        np.testing.assert_allclose(outs["attention"], ref, atol=1e-5, rtol=0)
    if CLS in maps:
        want = ref[:, :, :, 0, p:].reshape(2, lay.depth, nh, gh, gw)
        np.testing.assert_allclose(outs[CLS], want, atol=1e-5, rtol=0)
        check_cls_rows_only(family, loaded, x, want, export_cache)
    if RECEIVED in maps:
        # For each patch key: the mean over patch queries of A[query, key].
        want = ref[:, :, :, p:, p:].mean(axis=-2).reshape(2, lay.depth, nh, gh, gw)
        np.testing.assert_allclose(outs[RECEIVED], want, atol=1e-5, rtol=0)
        assert outs[RECEIVED].sum(axis=(-2, -1)) == pytest.approx(
            1 - ref[:, :, :, p:, :p].sum(-1).mean(-1), abs=1e-5
        )
    if POOL in maps:
        assert pool is not None and pool.shape[2] == 1  # [B, H, latents, keys]
        keys = pool[:, :, 0, p:] if pool.shape[-1] == lay.num_tokens else pool[:, :, 0]
        assert pool.max() > 0.2
        pool_heads = lay.pool_heads or nh
        assert pool.shape[1] == pool_heads
        np.testing.assert_allclose(
            outs[POOL], keys.reshape(2, pool_heads, gh, gw), atol=1e-5, rtol=0
        )

    expected_stats = () if spec.class_token else [s for s in STAT_NAMES if s not in CLS_STAT_NAMES]
    assert [n for n in STAT_NAMES if n in outs] == list(expected_stats)
    for b in range(2 if expected_stats else 0):
        for layer in range(lay.depth):
            for h in range(nh):
                want = stats_reference(ref[b, layer, h], p, lay.grid, lay.patch_size)
                for stat in expected_stats:
                    assert outs[stat][b, layer, h] == pytest.approx(want[stat], abs=2e-4), stat


def check_cls_rows_only(family: str, loaded, x: torch.Tensor, want: np.ndarray, export_cache):
    """CLS maps alone: the same maps; where the blocks allow it (`ROWS_ONLY`) every block
    computes its CLS row only, and the last block nothing after it (no projection, no MLP)."""
    lay = loaded.layout
    spec = OutputSpec(layers=tuple(range(lay.depth)), logits=False, topk=0)
    rows = family in ROWS_ONLY
    assert AttentionGraph(loaded, spec).rows_blocks == (spec.layers if rows else ())
    path = export_onnx(loaded, spec, "fp32", cache_dir=export_cache)
    out = OrtRunner(path, RuntimeOptions(threads=2)).run(x.numpy())[CLS]
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    shapes, last = softmax_shapes(path), lay.depth - 1
    row, whole = (lay.num_heads, 1, lay.num_tokens), (lay.num_heads, lay.num_tokens, lay.num_tokens)
    if lay.class_queries_only:  # CaiT: a class row per class-attention block, and the
        every = [shape for found in shapes.values() for shape in found]  # patch-only blocks'
        patches = (lay.num_heads, lay.num_patches, lay.num_patches)  # (talking-heads) softmax
        assert every.count(row) == lay.depth and whole not in every, shapes
        assert every.count(patches) == loaded.model.blocks.__len__(), shapes
        return
    if rows:
        assert all(row in shapes[b] for b in spec.layers), shapes
        assert shapes[last] == [row], shapes  # the last block: no whole softmax of its own
    else:
        assert shapes[last] == [whole], shapes
    assert block_output_nodes(path, last) == []


# ----------------------------------------------------------------- stores of models without CLS


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from . import imagefactory

    root = tmp_path_factory.mktemp("family-images")
    imagefactory.write_rgb_set(root, [(40 + 7 * i, 50 + 5 * i) for i in range(5)])
    return root


def run_store(
    tmp_path, family: str, images, export_cache, output: dict | None = None, **attention
) -> tuple[int, object]:
    """`vit-attn run` on the row's sharpened weights (the export is the row test's, cached)."""
    name, kwargs, img_size, *_ = FAMILIES[family]
    weights = tmp_path / "w.safetensors"
    state = build(name, kwargs, img_size).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    cfg = {
        "model": {
            "name": name,
            "checkpoint": str(weights),
            "img_size": list(img_size),
            "kwargs": kwargs,
        },
        "data": {"source": str(images)},
        "attention": {"layers": "all", "full": True, "stats": True, **attention},
        "inference": {"batch_size": 4, "threads": 1, "cache_dir": str(export_cache)},
        "output": {"store": "run.zarr", "overlays": "heads", **(output or {})},
        "cluster": {"kind": "none"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return cli_main(["run", str(config), "--no-progress"]), tmp_path / "run.zarr"


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 1e-3)])
def test_the_store_holds_timms_attention(tmp_path, images, export_cache, dtype, tolerance):
    # What a user reads back, not only the graph's output: float32 as timm computes it,
    # float16 that rounded once (relative 2^-11).
    name, kwargs, img_size, *_ = FAMILIES["vit"]
    output = {"attention_dtype": dtype}
    code, store = run_store(tmp_path, "vit", images, export_cache, output=output)
    assert code == 0
    group = zarr.open_group(str(store), mode="r")
    prep = group.attrs["preprocess"]
    mean = np.asarray(prep["mean"], np.float32)[:, None, None]
    std = np.asarray(prep["std"], np.float32)[:, None, None]
    pixels = np.stack([model_input_image(group, i) for i in range(group["status"].shape[0])])
    x = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std
    blocks, _ = reference(name, kwargs, img_size, torch.from_numpy(x))
    want = np.stack(blocks, axis=1)  # [image, layer, head, T, T]
    stored = np.asarray(group["attention"][:])
    assert stored.dtype == np.dtype(dtype)
    assert np.abs(stored.astype(np.float64) - want).max() <= tolerance
    assert (
        np.abs(
            np.asarray(group["cls_attention"][:]).astype(np.float64)
            - want[:, :, :, 0, 1:].reshape(np.asarray(group["cls_attention"]).shape)
        ).max()
        <= tolerance
    )
    assert group.attrs["fingerprint_inputs"]["outputs"].get("attention_dtype") == (
        None if dtype == "float16" else dtype
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["reg_gap", "siglip"])
def test_store_of_a_model_without_class_token(tmp_path, family, images, export_cache, capsys):
    code, store = run_store(tmp_path, family, images, export_cache)
    assert code == 0
    _, _, _, roles, pooling, maps, _ = FAMILIES[family]
    ds = xr.open_zarr(str(store))
    (map_name,) = maps
    assert "cls_attention" not in ds.data_vars and "rollout" not in ds.data_vars
    dims = (
        ("image", "layer", "head", "y", "x")
        if map_name == RECEIVED
        else ("image", "head", "y", "x")
    )
    assert ds[map_name].dims == dims
    assert ds.attrs["token_roles"] == {
        "prefix_roles": list(roles),
        "has_class_token": False,
        "num_distillation_tokens": 0,
        "num_register_tokens": len(roles),
        "pooling": pooling,
        "pool_latents": 1 if pooling == "attention_pool" else 0,
        "maps": [map_name],
    }
    assert not set(CLS_STAT_NAMES) & set(ds.data_vars)
    assert {"attention_distance", "prefix_mass", "patch_self"} <= set(ds.data_vars)
    assert (ds["status"].values == 1).all()

    # The overlay is the head mean of the stored map (its last layer) over the model input.
    group_map = ds[map_name].values.astype(np.float32)
    last = group_map[:, -1] if map_name == RECEIVED else group_map
    import zarr

    group = zarr.open_group(str(store), mode="r")
    for i in range(ds.sizes["image"]):
        want = blend(model_input_image(group, i)[None], last[i].mean(0)[None])[0]
        np.testing.assert_array_equal(ds["overlay"].values[i], want)

    # Statistics recomputed from the stored (float16) full attention agree with the graph's.
    again = compute_stats_from_attention(store)
    assert sorted(again.data_vars) == sorted(["attention_distance", "prefix_mass", "patch_self"])
    for stat in again.data_vars:
        np.testing.assert_allclose(again[stat].values, ds[stat].values, atol=2e-3, rtol=1e-3)

    capsys.readouterr()
    assert cli_main(["inspect", str(store)]) == 0
    tokens = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tokens"))
    assert f"pooling {pooling}" in tokens and f"maps {map_name}" in tokens
    assert "class token no" in tokens
    assert cli_main(["stats", str(store)]) == 0
    table = capsys.readouterr().out
    assert "attention_distance" in table and "cls_entropy" not in table
    png = tmp_path / "grid.png"
    args = ["show", str(store), "--image", "1", "--head", "grid", "--mask", "0.6"]
    assert cli_main([*args, "--normalize", "dataset", "-o", str(png)]) == 0
    assert png.stat().st_size > 0
    assert cli_main(["show", str(store), "--image", "0", "--map", "cls", "-o", str(png)]) == 2
    assert "no class token" in capsys.readouterr().err


@pytest.mark.slow
def test_store_of_cait_holds_class_attention_maps(tmp_path, images, export_cache, capsys):
    """CaiT's layers are its class-attention blocks: a CLS map per block, opened, inspected
    and shown like any store; what needs every token's row is refused in one line."""
    (tmp_path / "refused").mkdir()
    code, store = run_store(tmp_path / "refused", "cait", images, export_cache)
    assert code == 2 and not store.exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "(CaiT)" in err and "attention.full" in err

    code, store = run_store(tmp_path, "cait", images, export_cache, full=False, stats=False)
    assert code == 0
    ds = xr.open_zarr(str(store))
    assert ds["cls_attention"].dims == ("image", "layer", "head", "y", "x")
    assert ds["layer"].values.tolist() == [0, 1] and "attention" not in ds.data_vars
    assert ds.attrs["model"]["layer_kind"] == "class_attention"
    assert ds.attrs["token_roles"]["maps"] == [CLS]
    assert (ds["status"].values == 1).all()
    # Each class-attention row: a probability over [class, patches], the patches' share < 1.
    sums = ds["cls_attention"].values.astype(np.float32).sum(axis=(-2, -1))
    assert ((sums > 0.0) & (sums < 1.0 + 1e-3)).all()

    capsys.readouterr()
    assert cli_main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "class-attention blocks" in out and "class token yes" in out
    png = tmp_path / "grid.png"
    assert cli_main(["show", str(store), "--image", "1", "--head", "grid", "-o", str(png)]) == 0
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_store_of_a_pool_with_its_own_head_count(tmp_path, images, export_cache, capsys):
    """PE-core's pool has 8 heads over blocks of 4: `pool_attention` and the per-head overlays
    get a `pool_head` dim; the store opens, renders, and the viewer offers the pool's heads."""
    from vit_attn.view.data import Selection, StoreData, ViewError

    code, store = run_store(tmp_path, "pe_core_pool_heads", images, export_cache, stats=False)
    assert code == 0
    ds = xr.open_zarr(str(store))
    assert (ds.sizes["head"], ds.sizes["pool_head"]) == (4, 8)
    assert ds[POOL].dims == ("image", "pool_head", "y", "x")
    assert ds[CLS].dims == ("image", "layer", "head", "y", "x")
    assert ds["overlay_heads"].dims == ("image", "pool_head", "pixel_y", "pixel_x", "channel")
    assert ds["pool_head"].values.tolist() == list(range(8))
    import zarr

    group = zarr.open_group(str(store), mode="r")
    pool = ds[POOL].values.astype(np.float32)
    for i in range(ds.sizes["image"]):
        base = model_input_image(group, i)[None]
        np.testing.assert_array_equal(
            ds["overlay"].values[i], blend(base, pool[i].mean(0)[None])[0]
        )
        np.testing.assert_array_equal(
            ds["overlay_heads"].values[i, 7], blend(base, pool[i, 7:8])[0]
        )

    png = tmp_path / "p.png"
    assert cli_main(["show", str(store), "--image", "0", "--head", "7", "-o", str(png)]) == 0
    assert (
        cli_main(
            ["show", str(store), "--image", "0", "--map", "cls", "--head", "7", "-o", str(png)]
        )
        == 2
    )
    assert "--head '7'" in capsys.readouterr().err

    data = StoreData(store)
    sources = {s["name"]: s for s in data.meta()["sources"]}
    assert sources[POOL]["head_count"] == 8 and sources[CLS]["head_count"] == 0
    np.testing.assert_array_equal(data.chosen_map(1, Selection(POOL, -1, "7")), pool[1, 7])
    with pytest.raises(ViewError, match="head must be 0..3"):
        data.chosen_map(1, Selection(CLS, -1, "7"))


def test_rollout_without_class_token_is_refused(tmp_path, images, export_cache, capsys):
    code, store = run_store(tmp_path, "gap", images, export_cache, rollout=True)
    assert code == 2 and not store.exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "attention.rollout" in err and "no class token" in err


def test_export_failure_names_the_cause_in_one_line(export_cache):
    """A layout that does not fit the model: our check, raised while tracing, reaches the user."""
    name, kwargs, img_size, *_ = FAMILIES["vit"]
    loaded = build(name, kwargs, img_size)
    loaded.layout = dataclasses.replace(loaded.layout, num_heads=loaded.layout.num_heads + 1)
    with pytest.raises(ModelError, match=r"block 0's attention has shape \[4, 16, 16\]") as caught:
        export_onnx(loaded, OutputSpec(layers=(0,)), "fp32", export_cache)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_exporter_chains_are_reduced_to_their_root_without_colour():
    try:
        try:
            raise ValueError("\x1b[31mnum_prefix must be >= 1\x1b[0m\nmore detail")
        except ValueError as inner:
            raise RuntimeError("Failed to export the model with torch.export.") from inner
    except RuntimeError as outer:
        assert one_line(root_cause(outer)) == "ValueError: num_prefix must be >= 1"


def test_pool_with_two_latent_queries_gets_a_latent_dim():
    """No timm preset has more than one latent query: swap one in and check map and store dims."""
    from timm.layers import AttentionPoolLatent

    from vit_attn.model import token_layout
    from vit_attn.runtime import TorchRunner
    from vit_attn.store import StoreSpec

    name, kwargs, img_size, *_ = FAMILIES["siglip"]
    loaded = build(name, kwargs, img_size)
    torch.manual_seed(0)
    pool = AttentionPoolLatent(64, num_heads=4, latent_len=2, pool_type="avg")
    with torch.no_grad():
        pool.latent *= 40.0  # sharpened: its queries are the latents themselves times W_q
    pool.fused_attn = False
    loaded.model.attn_pool = pool.eval()
    loaded.layout = lay = token_layout(loaded.model)
    assert (lay.pooling, lay.pool_latents, lay.maps) == ("attention_pool", 2, (POOL,))
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(5))
    spec = dataclasses.replace(output_spec(lay), attention=False, stats=False)
    out = TorchRunner(AttentionGraph(loaded, spec), RuntimeOptions()).run(x.numpy())[POOL]
    with torch.no_grad():
        ref = AttentionExtract(loaded.model, names=["attn_pool.softmax"], method="fx")(x)
    ref = ref["attn_pool.softmax"].double().numpy()  # [B, H, latents, N]
    assert ref.max() > 0.2 and not np.allclose(ref[:, :, 0], ref[:, :, 1], atol=1e-3)
    want = ref.transpose(0, 2, 1, 3).reshape(2, 2, lay.num_heads, *lay.grid)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)

    spec_store = StoreSpec(
        n_images=3,
        batch_size=2,
        layers=(0, 1),
        num_heads=lay.num_heads,
        grid=lay.grid,
        input_size=lay.input_size,
        num_tokens=lay.num_tokens,
        topk=None,
        full_attention=False,
        rollout=False,
        overlays="heads",
        maps=lay.maps,
        pool_latents=lay.pool_latents,
    )
    arrays = {a.name: a for a in spec_store.layout()}
    assert "cls_attention" not in arrays
    assert arrays[POOL].dims == ("image", "latent", "head", "y", "x")
    assert arrays[POOL].shape == (3, 2, lay.num_heads, *lay.grid)


def test_convit_stores_the_blocks_after_its_class_token_joins_and_refuses_the_others(
    export_cache,
):
    # Its gated positional blocks were refused with "not attention over this model's tokens,
    # so the model is not supported", though the blocks after them are plain attention.
    kwargs, img_size = {"depth": 4, "local_up_to_layer": 2}, (48, 48)
    loaded = build("convit_tiny", kwargs, img_size)
    for layers, rollout in (((1, 3), False), ((2, 3), True)):
        spec = OutputSpec(layers=layers, logits=False, topk=0, cls_attention=True, rollout=rollout)
        with pytest.raises(ModelError, match=r"\(ConViT\): blocks 0-1 are gated positional"):
            export_onnx(loaded, spec, "fp32", export_cache)
    spec = OutputSpec(layers=(2, 3), logits=False, topk=0, cls_attention=True, attention=True)
    path = export_onnx(loaded, spec, "fp32", export_cache)
    x = torch.randn(2, 3, *img_size, generator=torch.Generator().manual_seed(1))
    out = OrtRunner(path, RuntimeOptions(threads=1)).run(x.numpy())
    twin = build("convit_tiny", kwargs, img_size).model
    with torch.no_grad():
        found = AttentionExtract(
            twin, names=["blocks.2.attn.softmax", "blocks.3.attn.softmax"], method="fx"
        )(x)
    want = np.stack([found[f"blocks.{i}.attn.softmax"].double().numpy() for i in (2, 3)], axis=1)
    assert want[:, :, :, 0, 1:].max() > 0.2  # sharpened: peaked maps, not near uniform
    np.testing.assert_allclose(out["attention"], want, atol=2e-6)
    gh, gw = loaded.layout.grid
    np.testing.assert_allclose(
        out["cls_attention"], want[:, :, :, 0, 1:].reshape(2, 2, -1, gh, gw), atol=2e-6
    )

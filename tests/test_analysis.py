"""Analysis on a store (vit_attn.analysis, `vit-attn stats`, `vit-attn show` options): statistics
from stored full attention, dataset summaries, image selection, plots, normalisation and masks;
and the invariants on the demo model over generated demo images."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from PIL import Image

import vit_attn
from vit_attn.analysis import (
    compute_stats_from_attention,
    dataset_scale,
    image_index,
    layer_means,
    select_image,
    summarise,
)
from vit_attn.cli import main as cli_main
from vit_attn.decode import Preprocess, load_image
from vit_attn.demo import ASSETS
from vit_attn.errors import StoreError
from vit_attn.maps import fuse_heads, mass_threshold_mask
from vit_attn.stats import STAT_NAMES, attention_stats, max_distance
from vit_attn.store import (
    STATUS_FAILED,
    STATUS_OK,
    StoreSpec,
    create_store,
    empty_batch,
    open_dataset,
    write_batch,
)

P, GRID, PATCH = 2, (3, 4), (14, 16)
SIZE = (GRID[0] * PATCH[0], GRID[1] * PATCH[1])
T = P + GRID[0] * GRID[1]
SPEC = StoreSpec(
    n_images=10,
    batch_size=4,
    layers=(1, 3),
    num_heads=3,
    grid=GRID,
    input_size=SIZE,
    num_tokens=T,
    topk=None,
    full_attention=True,
    rollout=False,
    overlays="none",
)
FAILED = 5


def _attention(rng: np.random.Generator, n: int) -> np.ndarray:
    a = rng.dirichlet(np.full(T, 0.3), size=(n, 2, 3, T))
    return a.astype(np.float16)


def _write(path: Path, batch: int, rng: np.random.Generator) -> None:
    result = empty_batch(SPEC, batch)
    n = result.stop - result.start
    att = _attention(rng, n)
    result.arrays["attention"][:] = att
    result.arrays["cls_attention"][:] = att[..., 0, P:].reshape(n, 2, 3, *GRID)
    result.status[:] = STATUS_OK
    for i in range(n):
        if result.start + i == FAILED:
            result.status[i], result.error[i] = STATUS_FAILED, "broken"
    write_batch(path, result)


@pytest.fixture()
def store(tmp_path) -> Path:
    """10 images in batches of 4: image 5 failed, the last batch (8, 9) still pending."""
    path = tmp_path / "s.zarr"
    attrs = {
        "model": {
            "name": "hand-made",
            "num_prefix_tokens": P,
            "grid": list(GRID),
            "patch_size": list(PATCH),
            "depth": 4,
            "num_heads": 3,
        },
        "preprocess": Preprocess(input_size=SIZE).to_dict(),
        "image_root": str(tmp_path / "images"),  # absent: `show` draws on a grey canvas
    }
    create_store(path, SPEC, [f"img/{i}.png" for i in range(10)], attrs)
    rng = np.random.default_rng(0)
    for b in (0, 1):
        _write(path, b, rng)
    return path


def _finish(path: Path) -> None:
    _write(path, 2, np.random.default_rng(1))


def test_stats_from_attention_equal_numpy_stats_of_stored_matrices(store):
    stats = compute_stats_from_attention(store)
    group = zarr.open_group(str(store), mode="r")
    att, status = group["attention"][:].astype(np.float64), group["status"][:]
    want = attention_stats(att, P, GRID, PATCH)
    for name in STAT_NAMES:
        got = stats[name].values
        assert stats[name].dims == ("image", "layer", "head") and got.dtype == np.float32
        np.testing.assert_allclose(
            got[status == STATUS_OK], want[name][status == STATUS_OK], rtol=1e-6, atol=1e-6
        )
        assert not got[status != STATUS_OK].any(), name  # failed and pending images hold 0


def test_writing_stats_waits_for_a_finished_store_and_happens_once(store):
    with pytest.raises(StoreError, match="pending"):
        compute_stats_from_attention(store, write=True)
    _finish(store)
    written = compute_stats_from_attention(store, write=True)
    group = zarr.open_group(str(store), mode="r")
    for name in STAT_NAMES:
        arr = group[name]
        assert arr.metadata.dimension_names == ("image", "layer", "head")
        assert arr.chunks == (SPEC.batch_size, 2, 3) and arr.dtype == np.float32
    np.testing.assert_array_equal(
        written["cls_entropy"].values, compute_stats_from_attention(store)["cls_entropy"].values
    )
    with pytest.raises(StoreError, match="already"):
        compute_stats_from_attention(store, write=True)


def test_summarise_uses_only_ok_images(store):
    _finish(store)
    compute_stats_from_attention(store, write=True)
    ds = open_dataset(store)
    table = summarise(ds)
    assert list(table.columns) == ["n", "mean", "std", "p5", "p50", "p95"]
    ok = np.flatnonzero(ds["status"].values == STATUS_OK)
    assert len(ok) == 9
    for name in STAT_NAMES:
        values = ds[name].values[ok].astype(np.float64)
        for li, layer in enumerate((1, 3)):
            for head in range(3):
                row = table.loc[(name, layer, head)]
                col = values[:, li, head]
                assert row["n"] == 9
                assert row["mean"] == pytest.approx(col.mean(), rel=1e-5, abs=1e-6)
                assert row["std"] == pytest.approx(col.std(), rel=1e-4, abs=1e-6)
                for p in (5, 50, 95):
                    assert row[f"p{p}"] == pytest.approx(np.percentile(col, p), rel=1e-5, abs=1e-6)
    per_layer = layer_means(table)
    assert list(per_layer.index) == [1, 3] and list(per_layer.columns) == list(STAT_NAMES)


def test_summarise_without_stats_says_how_to_get_them(store):
    with pytest.raises(StoreError, match="attention.stats"):
        summarise(open_dataset(store))


def test_analysis_arguments_are_checked_with_clear_errors(store):
    ds = open_dataset(store)
    with pytest.raises(ValueError, match="an empty list"):
        summarise(ds, [])
    with pytest.raises(ValueError, match=r"\['status'\] are not statistics"):
        summarise(ds, ["status"])
    with pytest.raises(ValueError, match=r"\[150\] are outside 0..100"):
        summarise(ds, ["cls_entropy"], percentiles=[150])
    layers = ds.sizes["layer"]
    with pytest.raises(IndexError, match=f"the store holds {layers} layers"):
        dataset_scale(ds, layers)
    with pytest.raises(ValueError, match="outside 0..100"):
        dataset_scale(ds, 0, percentile=101)


def test_select_image_by_path_and_index(store):
    ds = vit_attn.open_store(store)
    one = vit_attn.select_image(ds, "img/7.png")
    assert str(one["image_path"].values) == "img/7.png" and "image" not in one.dims
    assert image_index(ds, -1) == 9 and image_index(ds, "img/0.png") == 0
    np.testing.assert_array_equal(
        select_image(ds, 6)["cls_attention"].values, ds["cls_attention"].values[6]
    )
    with pytest.raises(KeyError, match="not in the store"):
        image_index(ds, "img/none.png")
    with pytest.raises(IndexError):
        image_index(ds, 10)


def test_a_listed_path_of_digits_is_that_image_and_an_int_an_index():
    # A Parquet id column of numbers lists images as "7", "3", ...: `select_image(ds, "3")`
    # and `show --image 3` took index 3, and the image listed as "3" could not be selected.
    from vit_attn.store import ImageSelectionError, find_image

    ids = np.array(["7", "3", "0", "1", "5", "2", "6", "4"])
    assert find_image(8, "3", lambda: ids) == 1  # the listed name
    assert find_image(8, 3, lambda: ids) == 3  # an int is always an index
    assert find_image(8, "-1", lambda: ids) == 7  # not a listed name: an index
    with pytest.raises(ImageSelectionError, match="out of range"):
        find_image(8, "9", lambda: ids)
    # Paths match as given: " b.png" (listed, a leading space) was taken for "b.png".
    names = np.array(["b.png", " b.png", "c.png"])
    assert find_image(3, " b.png", lambda: names) == 1
    assert find_image(3, "b.png", lambda: names) == 0
    assert find_image(3, " 2 ", lambda: names) == 2  # a number with spaces is still an index
    with pytest.raises(ImageSelectionError, match="not in the store"):
        find_image(3, "c.png ", lambda: names)


def test_dataset_scale_is_a_percentile_of_map_peaks(store):
    ds = open_dataset(store)
    ok = ds["status"].values == STATUS_OK
    peaks = (
        ds["cls_attention"].values[ok, 1].astype(np.float64).max(axis=(-2, -1))
    )  # [images, heads]
    np.testing.assert_allclose(dataset_scale(ds, 1), np.percentile(peaks, 99, axis=0), rtol=1e-6)


def test_stats_cli_prints_the_table_and_writes_plots(store, tmp_path, capsys):
    _finish(store)
    plots = tmp_path / "plots"
    assert cli_main(["stats", str(store), "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    assert "over 9 ok images" in out and "cls_entropy" in out and "attention_distance" in out
    assert (
        len([line for line in out.splitlines() if line.strip()]) == 2 + 2 * 3
    )  # title, header, layers x heads
    assert (plots / "per_layer.md").read_text().startswith("| block | cls_entropy [nats]")
    for name in ("attention_distance.png", "heatmap_cls_entropy.png", "summary.csv"):
        assert (plots / name).stat().st_size > 1000, name
    assert "cls_entropy" not in dict(zarr.open_group(str(store), mode="r").arrays())  # not written
    assert cli_main(["stats", str(store), "--write"]) == 0
    assert "cls_entropy" in dict(zarr.open_group(str(store), mode="r").arrays())
    capsys.readouterr()
    assert cli_main(["stats", str(store), "--write"]) == 0  # was silent: nothing written
    assert "already holds statistics" in capsys.readouterr().err


def _outline_reference(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose 4-neighbour differs in the (patch-block upsampled) mask, or mask on the border."""
    h, w = size
    px = np.repeat(np.repeat(mask, h // mask.shape[0], 0), w // mask.shape[1], 1)
    edge = np.zeros_like(px)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w:
                    edge[y, x] |= px[yy, xx] != px[y, x]
                else:
                    edge[y, x] |= px[y, x]
    return edge


def test_show_draws_the_mass_threshold_outline(store, tmp_path):
    group = zarr.open_group(str(store), mode="r+")
    maps = np.full((2, 3, *GRID), 0.01, np.float16)
    maps[:, :, 1, 2] = 0.9  # one hot patch: the 60% mask is exactly that patch
    group["cls_attention"][0] = maps
    png = tmp_path / "mask.png"
    assert (
        cli_main(
            [
                "show",
                str(store),
                "--image",
                "img/0.png",
                "--head",
                "0",
                "--mask",
                "0.6",
                "-o",
                str(png),
            ]
        )
        == 0
    )
    out = np.asarray(Image.open(png))
    cyan = (out == (0, 255, 255)).all(-1)
    mask = np.zeros(GRID, bool)
    mask[1, 2] = True
    np.testing.assert_array_equal(cyan, _outline_reference(mask, SIZE))


def test_show_normalisations_differ_and_grids_render(store, tmp_path):
    shown = {}
    for mode in ("per_map", "per_image", "dataset"):
        png = tmp_path / f"{mode}.png"
        assert (
            cli_main(
                [
                    "show",
                    str(store),
                    "--image",
                    "2",
                    "--head",
                    "1",
                    "--normalize",
                    mode,
                    "-o",
                    str(png),
                ]
            )
            == 0
        )
        shown[mode] = np.asarray(Image.open(png)).astype(int)
    assert np.abs(shown["per_map"] - shown["per_image"]).max() > 10
    assert np.abs(shown["per_image"] - shown["dataset"]).max() > 10
    grid = tmp_path / "grid.png"
    assert (
        cli_main(
            [
                "show",
                str(store),
                "--image",
                "2",
                "--head",
                "grid",
                "--normalize",
                "dataset",
                "--mask",
                "0.6",
                "-o",
                str(grid),
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(grid)).shape[0] > 2 * SIZE[0]
    assert cli_main(["show", str(store), "--image", "2", "--mask", "1.5", "-o", str(grid)]) == 2


# ----------------------------------------------------------------------------- whole runs

# Overridable to check a candidate model before it ships in vit_attn/demo/assets/.
DEMO_JSON = Path(os.environ.get("VIT_ATTN_DEMO_JSON", ASSETS / "demo_vit.json"))
DEMO_IMAGES = 40


def _run(root: Path, model: dict, n_images: int, cache: Path) -> Path:
    """Generate demo images and run the pipeline on them with statistics and full attention."""
    from vit_attn.demo.shapes import generate

    generate(
        root / "shapes", n_images, seed=2027
    )  # not a training or held-out seed of the demo model
    cfg = {
        "model": model,
        "data": {"source": str(root / "shapes" / "images")},
        "attention": {"layers": "all", "full": True, "stats": True},
        "inference": {"batch_size": 16, "threads": 2, "cache_dir": str(cache)},
        "output": {"store": str(root / "run.zarr"), "overlays": "none"},
        "cluster": {"kind": "none"},
    }
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert cli_main(["run", str(config), "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def sharpened_run(tmp_path_factory, export_cache) -> Path:
    """A seeded tiny ViT, attention sharpened 16x, two prefix tokens, non-square input."""
    from safetensors.torch import save_file

    from .conftest import sharpened_model

    name, kwargs = "deit_tiny_distilled_patch16_224", {"depth": 2}
    loaded = sharpened_model(name, factor=16.0, seed=0, img_size=(48, 80), **kwargs)
    root = tmp_path_factory.mktemp("sharpened")
    save_file(loaded.model.state_dict(), str(root / "w.safetensors"))
    model = {
        "name": name,
        "checkpoint": str(root / "w.safetensors"),
        "img_size": [48, 80],
        "kwargs": kwargs,
    }
    return _run(root, model, 20, export_cache)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, export_cache) -> Path:
    if not DEMO_JSON.is_file():
        pytest.skip(
            f"the demo model is not there yet ({DEMO_JSON}; scripts/train_demo_model.py makes it)"
        )
    info = json.loads(DEMO_JSON.read_text())
    model = {
        "name": info["timm_name"],
        "checkpoint": str(DEMO_JSON.with_name(info["weights_file"])),
        "img_size": info["img_size"],
        "kwargs": {**info["kwargs"], "num_classes": info["num_classes"]},
    }
    return _run(tmp_path_factory.mktemp("demo"), model, DEMO_IMAGES, export_cache)


@pytest.fixture(params=["sharpened", "demo"])
def any_run(request) -> Path:
    return request.getfixturevalue(f"{request.param}_run")


def test_in_run_stats_equal_stats_from_the_stored_attention(any_run):
    store = any_run / "run.zarr"
    ds = open_dataset(store)
    assert (ds["status"].values == STATUS_OK).all()
    recomputed = compute_stats_from_attention(store)
    for name in STAT_NAMES:
        got, want = ds[name].values, recomputed[name].values
        scale = max(1.0, float(np.abs(want).max()))
        # in-graph float32 softmax vs the float16 stored copy
        tol = 1.5 / ds.sizes["x"] / ds.sizes["y"] if name == "concentration_60" else 5e-3 * scale
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=name)


def test_invariants_that_hold_for_any_model(any_run):
    ds = open_dataset(any_run / "run.zarr")
    model = ds.attrs["model"]
    p, grid, patch = model["num_prefix_tokens"], tuple(model["grid"]), tuple(model["patch_size"])
    n = grid[0] * grid[1]
    ent = ds["cls_entropy"].values
    assert (ent >= -1e-6).all() and (ent <= math.log(n) + 1e-4).all()
    dist = ds["attention_distance"].values
    assert (dist >= 0).all() and (dist <= max_distance(grid, patch) + 1e-3).all()
    att = ds["attention"].values.astype(np.float64)  # [image, layer, head, T, T]
    prefix = att[..., p:, :p].sum(-1)
    patches = att[..., p:, p:].sum(-1)
    np.testing.assert_allclose(prefix + patches, 1.0, atol=5e-3)  # every patch row, every image
    np.testing.assert_allclose(ds["prefix_mass"].values, prefix.mean(-1), atol=2e-3)
    for name in ("prefix_mass", "cls_self", "patch_self", "concentration_60", "cls_max"):
        v = ds[name].values
        assert (v >= 0).all() and (v <= 1 + 1e-6).all(), name
    # far from uniform, so a wrong axis or offset would show in the comparisons above
    assert ent.mean(axis=(0, 2)).min() < math.log(n) - 0.2
    assert ds.attrs["stat_units"]["attention_distance"] == "pixels"


def _model_input_mask(mask_path: Path, prep: Preprocess) -> np.ndarray:
    """The object mask through the model's own resize and crop, as bool [H, W]."""
    rgb = load_image(mask_path, prep)
    return rgb[..., 0] > 127


# The same maps put where a wrong grid order, flip or one-patch offset would put them.
MISPLACED = {
    "transposed": lambda m: m.transpose(0, 2, 1),
    "flipped": lambda m: m[:, ::-1],
    "shifted": lambda m: np.roll(m, 1, axis=2),
}


def mask_on_object(ds, mask_root: Path, t: float = 0.6, move=lambda m: m) -> np.ndarray:
    """Per image: the share of the last layer's head-mean mass-threshold mask that is object.

    Pixel level: the patch mask is expanded to its patches' pixels and intersected with the
    object mask put through the model's resize and crop ("intersection over the mask").
    `move` rearranges the [image, gh, gw] maps first (see MISPLACED).
    """
    prep = Preprocess.from_dict(ds.attrs["preprocess"])
    h, w = prep.input_size
    gh, gw = ds.sizes["y"], ds.sizes["x"]
    cls = ds["cls_attention"].isel(layer=-1).values.astype(np.float64)  # [image, head, gh, gw]
    masks = mass_threshold_mask(move(fuse_heads(cls, "mean", axis=1)), t)  # [image, gh, gw]
    out = []
    for i, rel in enumerate(ds["image_path"].values.tolist()):
        obj = _model_input_mask(mask_root / rel, prep)
        keep = np.repeat(np.repeat(masks[i], h // gh, 0), w // gw, 1)
        out.append((keep & obj[: keep.shape[0], : keep.shape[1]]).sum() / keep.sum())
    return np.asarray(out)


def test_mask_overlap_measure_on_oracle_attention(tmp_path):
    """The overlap measure itself: attention equal to each patch's object share scores high, the
    same maps with a wrong axis or offset score low."""
    from vit_attn.demo.shapes import generate

    items = generate(tmp_path / "shapes", 12, seed=11)
    prep = Preprocess(input_size=(64, 64), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9)
    grid = (8, 8)
    share = np.stack(
        [
            _model_input_mask(it.mask_path, prep).reshape(8, 8, 8, 8).mean(axis=(1, 3))
            for it in items
        ]
    )  # [image, gh, gw]: object fraction of each 8 x 8 patch
    spec = StoreSpec(
        n_images=12,
        batch_size=12,
        layers=(0,),
        num_heads=2,
        grid=grid,
        input_size=(64, 64),
        num_tokens=65,
        topk=None,
        full_attention=False,
        rollout=False,
        overlays="none",
    )
    scores = {}
    wrong = {name: move(share) for name, move in MISPLACED.items()}
    for name, maps in (("oracle", share), *wrong.items()):
        path = tmp_path / f"{name}.zarr"
        create_store(path, spec, [it.name for it in items], {"preprocess": prep.to_dict()})
        result = empty_batch(spec, 0)
        result.arrays["cls_attention"][:] = (maps + 1e-4)[:, None, None]  # both heads
        result.status[:] = STATUS_OK
        write_batch(path, result)
        scores[name] = mask_on_object(open_dataset(path), tmp_path / "shapes" / "masks").mean()
    # ~0.9, not 1: boundary patches are partly background. A misplaced map still overlaps an
    # object that spans 2-4 patches (~0.3-0.55), but clearly less than the right one.
    assert scores["oracle"] > 0.75, scores
    assert all(scores[name] < 0.7 * scores["oracle"] for name in wrong), scores


def test_demo_last_layer_masks_lie_on_the_objects(demo_run):
    """The 60% mass mask of the last layer is mostly object (objects cover ~12% of the input),
    and more so than the same masks transposed, flipped or shifted by one patch."""
    ds, masks = open_dataset(demo_run / "run.zarr"), demo_run / "shapes" / "masks"
    on_object = mask_on_object(ds, masks).mean()
    assert on_object >= 0.4, on_object
    for name, move in MISPLACED.items():
        misplaced = mask_on_object(ds, masks, move=move).mean()
        assert on_object > 1.15 * misplaced, (name, on_object, misplaced)


def test_stats_are_part_of_the_fingerprint(sharpened_run, capsys):
    config = sharpened_run / "run.yaml"
    assert cli_main(["run", str(config), "--no-progress", "--set", "attention.stats=false"]) == 2
    assert "attention.stats" in capsys.readouterr().err

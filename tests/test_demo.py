"""The shipped demo: `make demo`'s driver on fresh images, judged by where the demo ViT looks.

The references are independent of the pipeline: each saved object mask goes through timm's
own eval transform objects (resize + centre crop) and is averaged per patch; the overlays are
inverted with matplotlib's colormap table. A transposed grid, a wrong prefix offset or a
flipped overlay moves the attention off the objects and fails these tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import zarr
from PIL import Image

from vit_attn import open_store
from vit_attn.demo import ASSETS
from vit_attn.demo import main as demo_main

INFO = json.loads((ASSETS / "demo_vit.json").read_text())
N_IMAGES = 24
SEED = 4242  # neither the training (1) nor the held-out (2) stream of the demo model


def _geometric_transforms():
    """timm's eval resize + centre crop for the demo model's input size (no ToTensor/Normalize)."""
    cfg = timm.data.resolve_data_config(
        args={
            "input_size": (3, INFO["img_size"], INFO["img_size"]),
            **{
                k: INFO["preprocessing"][k]
                for k in ("interpolation", "crop_pct", "crop_mode", "mean", "std")
            },
        }
    )
    return timm.data.create_transform(**cfg).transforms[:-2]


def _through(transforms, img: Image.Image) -> np.ndarray:
    for t in transforms:
        img = t(img)
    return np.asarray(img)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, export_cache) -> Path:
    """`python -m vit_attn.demo` (cluster `auto`) with the hub unreachable."""
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        rc = demo_main(
            [
                "--out",
                str(out),
                "--n",
                str(N_IMAGES),
                "--seed",
                str(SEED),
                "--set",
                f"inference.cache_dir={export_cache}",
            ]
        )
    finally:
        mp.undo()
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def masks(demo) -> dict[str, np.ndarray]:
    """Object masks in model-input pixels (bool [S, S]) by listed image path."""
    tf = _geometric_transforms()
    out = {}
    for path in sorted((demo / "shapes" / "masks").glob("*.png")):
        out[path.name] = _through(tf, Image.open(path).convert("L")) > 127
    return out


def test_demo_store_is_complete_and_includes_non_square_images_and_photographs(demo):
    ds = open_store(demo / "demo.zarr")
    paths = ds["image_path"].values.tolist()
    assert (ds["status"].values == 1).all()
    assert sum(p.startswith("photos/") for p in paths) >= 3
    sizes = {Image.open(demo / "shapes" / "images" / p).size for p in paths if p.startswith("img_")}
    assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)
    assert (
        ds.sizes["layer"] == INFO["kwargs"]["depth"]
        and ds.sizes["head"] == INFO["kwargs"]["num_heads"]
    )
    for p in paths:
        assert (demo / "png" / f"{p}.png").is_file() and (demo / "png" / f"{p}.heads.png").is_file()


def _object_share_per_patch(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    gh, gw = grid
    ph, pw = mask.shape[0] // gh, mask.shape[1] // gw
    return mask.reshape(gh, ph, gw, pw).mean(axis=(1, 3))


def _misplaced(mask: np.ndarray, patch: int) -> dict[str, np.ndarray]:
    """The mask where a wrong grid order, flip or one-patch offset would put the attention."""
    return {
        "transposed": mask.T,
        "flipped left-right": mask[:, ::-1],
        "flipped up-down": mask[::-1],
        "one patch left": np.roll(mask, -patch, axis=1),
        "one patch right": np.roll(mask, patch, axis=1),
        "one patch up": np.roll(mask, -patch, axis=0),
        "one patch down": np.roll(mask, patch, axis=0),
    }


def test_last_layer_cls_attention_lands_on_the_objects(demo, masks):
    """Head-mean CLS attention of the last block holds >= 3x the object's area share of its mass,
    and more of it than any transposed, flipped or one-patch-shifted copy of the masks."""
    ds = open_store(demo / "demo.zarr")
    grid = tuple(ds.attrs["model"]["grid"])
    patch = INFO["kwargs"]["patch_size"]
    misplaced: dict[str, list[float]] = {}
    on, area = [], []
    for i, p in enumerate(ds["image_path"].values.tolist()):
        if p not in masks:
            continue  # photographs have no mask
        a = ds["cls_attention"].isel(image=i, layer=-1).values.astype(np.float64).mean(axis=0)
        a /= a.sum()  # CLS row over patches, renormalised: prefix mass is not on any patch
        w = _object_share_per_patch(masks[p], grid)
        on.append((a * w).sum())
        area.append(w.mean())
        for name, m in _misplaced(masks[p], patch).items():
            misplaced.setdefault(name, []).append((a * _object_share_per_patch(m, grid)).sum())
    assert len(on) == N_IMAGES
    ratio = np.mean(on) / np.mean(area)
    assert ratio >= 3.0, (
        f"attention on objects {np.mean(on):.3f} vs area {np.mean(area):.3f}: {ratio:.2f}x"
    )
    for name, values in misplaced.items():
        assert np.mean(on) > 1.2 * np.mean(values), (name, np.mean(on), np.mean(values))


def _overlay_levels(overlay: np.ndarray, image: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    """Invert `overlay = (1 - alpha) image + alpha cmap(level)`: level in [0, 1] per pixel."""
    from matplotlib import colormaps

    lut = colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255.0
    colour = (overlay.astype(np.float64) - (1 - alpha) * image.astype(np.float64)) / alpha
    d = ((colour[:, :, None, :] - lut[None, None]) ** 2).sum(-1)
    return d.argmin(-1) / 255.0


def test_overlays_are_brightest_on_the_objects(demo, masks):
    """The stored head-mean overlays, inverted, are hotter on object pixels than elsewhere."""
    ds = open_store(demo / "demo.zarr")
    cfg = ds.attrs["config"]["output"]
    tf = _geometric_transforms()
    hot, cold, flipped = [], [], []
    for i, p in enumerate(ds["image_path"].values.tolist()):
        if p not in masks:
            continue
        image = _through(tf, Image.open(demo / "shapes" / "images" / p).convert("RGB"))
        levels = _overlay_levels(
            ds["overlay"].isel(image=i).values, image, cfg["overlay_alpha"], cfg["colormap"]
        )
        # the PNG file is the stored overlay
        np.testing.assert_array_equal(
            np.asarray(Image.open(demo / "png" / f"{p}.png").convert("RGB")),
            ds["overlay"].isel(image=i).values,
        )
        hot.append(levels[masks[p]].mean())
        cold.append(levels[~masks[p]].mean())
        wrong = _misplaced(masks[p], INFO["kwargs"]["patch_size"])
        flipped.append(
            max(
                levels[wrong[k]].mean()
                for k in ("transposed", "flipped left-right", "flipped up-down")
            )
        )
    assert np.mean(hot) >= 1.5 * np.mean(cold), (np.mean(hot), np.mean(cold))
    assert np.mean(hot) > 1.2 * np.mean(flipped), (np.mean(hot), np.mean(flipped))


def test_demo_model_card_matches_the_shipped_weights():
    """The model card describes the committed weights (token count, classes, file size)."""
    from safetensors import safe_open

    weights = ASSETS / INFO["weights_file"]
    assert weights.stat().st_size < 5e6
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("pos_embed").shape[1] == INFO["num_prefix_tokens"] + math.prod(
            INFO["grid"]
        )
        assert f.get_tensor("head.weight").shape[0] == INFO["num_classes"]


def _timm_demo_model():
    """The shipped weights in a plain timm model, built from the model card (not the pipeline)."""
    from safetensors.torch import load_file

    model = timm.create_model(
        INFO["timm_name"],
        pretrained=False,
        num_classes=INFO["num_classes"],
        img_size=INFO["img_size"],
        **INFO["kwargs"],
    )
    model.load_state_dict(load_file(str(ASSETS / INFO["weights_file"])))
    return model.eval()


def test_demo_model_is_accurate_on_fresh_images():
    """Accuracy on 400 images of an unseen stream, through timm alone, matches the model card."""
    import torch

    from vit_attn.demo.shapes import render_index

    model = _timm_demo_model()
    cfg = timm.data.resolve_data_config(
        args={"input_size": (3, INFO["img_size"], INFO["img_size"])}, model=model
    )
    tf = timm.data.create_transform(**cfg)
    samples = [render_index(SEED + 1, i) for i in range(400)]
    with torch.no_grad():
        logits = model(torch.stack([tf(s.image) for s in samples]))
    accuracy = (logits.argmax(1).numpy() == np.array([s.label for s in samples])).mean()
    # 400 images: a binomial standard error of at most 2.5 points around the recorded accuracy.
    assert accuracy >= INFO["heldout_accuracy"] - 0.08, (accuracy, INFO["heldout_accuracy"])


def test_store_predictions_are_the_timm_model_predictions(demo):
    """topk_index in the demo store is what the timm model predicts on the same inputs."""
    import torch

    ds = open_store(demo / "demo.zarr")
    model = _timm_demo_model()
    cfg = timm.data.resolve_data_config(
        args={"input_size": (3, INFO["img_size"], INFO["img_size"])}, model=model
    )
    tf = timm.data.create_transform(**cfg)
    root = demo / "shapes" / "images"
    paths = ds["image_path"].values.tolist()
    images = [Image.open(root / p).convert("RGB") for p in paths]
    with torch.no_grad():
        reference = model(torch.stack([tf(im) for im in images])).argmax(1).numpy()
    assert (ds["topk_index"].values[:, 0] == reference).all()


def test_demo_option_mistakes_are_one_line_before_any_image(tmp_path, capsys):
    # --out naming a file and --seed -3 were tracebacks; --n -1 "generated -1 images"; a
    # missing --config was found after every image was drawn.
    from vit_attn.demo import main as demo_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "out"
    for args, words in [
        (["--out", str(afile)], "is a file; give a folder"),
        (["--out", str(out), "--seed", "-3"], "--seed -3: give a seed"),
        (["--out", str(out), "--n", "-1"], "--n -1: give the number of images"),
        (["--out", str(out), "--n", "0"], "--n 0"),
        (["--out", str(out), "--config", str(tmp_path / "nope.yaml")], "is not a file"),
        # --set mistakes were found after every image was drawn, naming the bundled config
        (["--out", str(out), "--set", "model.nme=x"], "unknown key (from --set 'model.nme=x')"),
        (["--out", str(out), "--set", "a..b=1"], "empty part"),
    ]:
        assert demo_main(args) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (args, err)
        assert not out.exists(), args  # nothing drawn


def test_verbose_demo_is_the_demo_and_warnings_are_put_back(tmp_path, capsys):
    # `vit-attn -v demo` fell through to `show` (AttributeError); the CLI's one-line warning
    # handler stayed installed after it returned (a notebook's later warnings too).
    import warnings

    from vit_attn.cli import main as cli_main

    before, filters = warnings.showwarning, list(warnings.filters)
    assert cli_main(["-v", "demo", "--out", str(tmp_path / "o"), "--n", "0"]) == 2
    assert "--n 0" in capsys.readouterr().err
    assert cli_main(["cache", "--dir", str(tmp_path / "none")]) == 0
    assert warnings.showwarning is before
    assert warnings.filters == filters  # without -v it hides Pillow's and FutureWarnings


def test_fresh_deletes_only_what_the_demo_wrote(tmp_path, capsys, export_cache):
    # `--fresh` was rmtree(--out): `--out ~/thesis --fresh` deleted the thesis.
    from vit_attn.demo import main as demo_main

    cache = f"inference.cache_dir={export_cache}"
    mine = tmp_path / "mine"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "ch1.tex").write_text("ch1")
    (mine / "results.csv").write_text("data")
    demo_main(["--out", str(mine), "--fresh", "--n", "1", "--set", "model.name=nosuchmodel"])
    assert (mine / "thesis" / "ch1.tex").read_text() == "ch1"
    assert (mine / "results.csv").read_text() == "data"
    # a file of the user's among the generated ones: nothing is deleted
    stranger = mine / "shapes" / "images" / "holiday.jpg"
    stranger.write_text("x")
    capsys.readouterr()
    assert demo_main(["--out", str(mine), "--fresh", "--n", "1", "--set", cache]) == 2
    err = capsys.readouterr().err
    assert "images/holiday.jpg, which the demo did not write; nothing was deleted" in err, err
    assert stranger.exists() and (mine / "shapes" / "images" / "img_00000.png").exists()
    # an earlier demo's own output: fewer images now, none of the old left, the run whole
    again = tmp_path / "again"
    assert demo_main(["--out", str(again), "--n", "3", "--set", cache]) == 0
    (again / "notes.txt").write_text("keep")
    assert demo_main(["--out", str(again), "--fresh", "--n", "2", "--set", cache]) == 0
    drawn = sorted(p.name for p in (again / "shapes" / "images").glob("img_*.png"))
    assert drawn == ["img_00000.png", "img_00001.png"]
    status = zarr.open_array(again / "demo.zarr" / "status", mode="r")[:]
    assert (again / "notes.txt").read_text() == "keep" and (status == 1).all()
    assert status.size == 2 + len(list((again / "shapes" / "images" / "photos").glob("*.png")))
    pngs = {p.name for p in (again / "png").rglob("*.png")}
    assert "img_00002.png.png" not in pngs and "img_00001.png.png" in pngs, sorted(pngs)
